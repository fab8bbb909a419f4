"""Adversarial weight perturbation (train.awp): the authors' perturbation and gradient, exact restore, the trainer."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F
from torch import nn

import iaat
from helpers import ctrl_c_at_step, run_main, tiny_train_args
from iaat.awp import AWP, awp_settings
from iaat.engine.checkpoint import load_checkpoint
from iaat.errors import ConfigError
from iaat.methods.base import StepOutput
from iaat.methods.trades import trades_objective


# --- a port of the authors' code: csdongxian/AWP, AT_AWP/utils_awp.py and trades_AWP/utils_awp.py (MIT) -------------
PORT_EPS = 1E-20


def diff_in_weights(model, proxy):
    diff_dict = OrderedDict()
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if 'weight' in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + PORT_EPS) * diff_w
    return diff_dict


def add_into_weights(model, diff, coeff=1.0):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name])


class AdvWeightPerturb:
    def __init__(self, model, proxy, proxy_optim, gamma):
        self.model, self.proxy, self.proxy_optim, self.gamma = model, proxy, proxy_optim, gamma

    def calc_awp(self, inputs_adv, targets):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = - F.cross_entropy(self.proxy(inputs_adv), targets)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        return diff_in_weights(self.model, self.proxy)

    def perturb(self, diff):
        add_into_weights(self.model, diff, coeff=1.0 * self.gamma)


class TradesAWP(AdvWeightPerturb):
    def calc_awp(self, inputs_adv, inputs_clean, targets, beta):
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss_natural = F.cross_entropy(self.proxy(inputs_clean), targets)
        loss_robust = F.kl_div(F.log_softmax(self.proxy(inputs_adv), dim=1),
                               F.softmax(self.proxy(inputs_clean), dim=1), reduction='batchmean')
        loss = - 1.0 * (loss_natural + beta * loss_robust)
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        return diff_in_weights(self.model, self.proxy)
# --- end of the port -------------------------------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).double()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 6, 6, generator=g, dtype=torch.float64)
    x_adv = (x + 0.03 * torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, x_adv, torch.randint(0, 5, (8,), generator=g)


def authors_step(model: nn.Module, adversary_cls, calc_args: dict, loss_fn, gamma: float) -> nn.Module:
    """The authors' perturbation then the training step's backward (their order up to the optimiser step)."""
    proxy = copy.deepcopy(model)
    adversary = adversary_cls(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01), gamma)
    model.train()
    adversary.perturb(adversary.calc_awp(**calc_args))
    loss_fn(model).backward()
    return model


@pytest.mark.parametrize("style", ["at", "trades"])
def test_perturbation_and_gradient_equal_the_authors(style):
    x, x_adv, y = batch()
    beta, gamma = 6.0, (0.01 if style == "at" else 0.005)
    if style == "at":
        def objective(net):
            logits = net(x_adv)
            return StepOutput(F.cross_entropy(logits, y), logits)
        adversary_cls, calc_args = AdvWeightPerturb, {"inputs_adv": x_adv, "targets": y}
    else:
        objective = trades_objective(x_adv, x, y, beta)
        adversary_cls, calc_args = TradesAWP, {"inputs_adv": x_adv, "inputs_clean": x, "targets": y, "beta": beta}

    theirs = authors_step(tiny_model(), adversary_cls, calc_args, lambda m: objective(m).loss, gamma)

    ours = tiny_model().train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    awp = AWP(ours, gamma=gamma)
    assert awp.names == ["0.weight", "4.weight"]  # conv kernel and linear matrix; BatchNorm and biases stay
    v = dict(zip(awp.names, awp.perturbation(objective)))
    for name, p in theirs.named_parameters():  # their w + gamma * diff is our w + v
        expected = p.detach() - before[name]
        got = v.get(name, torch.zeros_like(expected))
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), name
        assert name not in v or got.norm() == pytest.approx(gamma * before[name].norm().item(), rel=1e-9)
    with awp.applied(objective):
        objective(ours).loss.backward()
    for (name, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-6), name
        assert torch.equal(q.detach(), before[name]), name  # restored bitwise
    if style == "at":  # the ascent pass leaves BatchNorm's statistics alone (theirs: a proxy copy absorbs it)
        for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.allclose(theirs.state_dict()[key].double(), ours.state_dict()[key].double(), atol=1e-12), key


def test_the_perturbed_forward_under_autocast_runs_at_the_perturbed_weights():
    """Autocast caches its bf16 copy of each weight for the whole region: the step's forward inside the same region
    as the attack and the ascent pass must still see w + v, and a forward after the restore w again."""
    model = tiny_model().float().train()
    x, x_adv, y = (t.float() if t.is_floating_point() else t for t in batch())

    def objective(net):
        logits = net(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits)

    awp = AWP(model, gamma=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unperturbed = objective(model).loss.item()  # fills the cache with the bf16 copies of w
        with awp.applied(objective):
            perturbed = objective(model).loss.item()
        restored = objective(model).loss.item()
    with awp.applied(objective), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = objective(model).loss.item()  # w + v in a region of its own: no cache to go stale
    assert perturbed == pytest.approx(fresh, rel=1e-2) and abs(perturbed - unperturbed) > 0.1
    assert restored == unperturbed


def test_under_fp16_the_ascent_loss_is_scaled_as_the_steps_loss():
    """A deep net with small weights: its float16 weight gradients underflow to 0 (no perturbation at all) unless
    the ascent's loss is scaled by the loop's GradScaler; scaled, the perturbation is the float32 one."""
    torch.manual_seed(0)
    layers: list = [nn.Flatten()]
    for i in range(10):
        layers += [nn.Linear(48 if i == 0 else 32, 32), nn.ReLU()]
        nn.init.normal_(layers[-2].weight, std=0.02)
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8) % 3
    method = iaat.PGDAT(eps=8 / 255, steps=1, random_start=False)
    exact = AWP(model, 0.01).perturbation(method.objective(model, x, y))

    def in_fp16(scaler):
        with torch.autocast("cpu", dtype=torch.float16):
            return AWP(model, 0.01, scaler=scaler).perturbation(method.objective(model, x, y))

    assert all(float(v.abs().max()) == 0 for v in in_fp16(None)[:3])  # what an unscaled loss gives
    for v, w in zip(in_fp16(torch.amp.GradScaler("cpu", init_scale=2.0**16)), exact):  # float16's rounding apart
        assert F.cosine_similarity(v.flatten(), w.flatten(), dim=0) > 0.9
    overflowing = in_fp16(torch.amp.GradScaler("cpu", init_scale=2.0**100))  # this step's scale overflows
    assert all(torch.isfinite(v).all() for v in overflowing)


def test_bad_settings_are_clear():
    model = tiny_model()
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        AWP(model, gamma=0.0)
    with pytest.raises(ConfigError, match="warm-up"):
        AWP(model, gamma=0.01, warmup_epochs=-1)
    with pytest.raises(ConfigError, match="none to train"):
        AWP(nn.Sequential(nn.BatchNorm1d(3)), gamma=0.01)
    assert awp_settings("auto", None, "mart") == (0.005, 9)
    assert awp_settings("auto", None, "iaat", "trades") == (0.005, 9)
    assert awp_settings("auto", None, "gairat") == (0.01, 0)


@pytest.mark.parametrize("sets, message", [
    (["method.name=clean", "train.awp=auto"], "which method clean does not have"),
    (["train.awp=sometimes"], "train.awp must be auto"),
    (["train.awp=1.5"], "must be in \\(0, 1\\)"),
    (["train.awp_warmup=3"], "applies with train.awp only"),
    (["method.name=iaat", "method.train_loss=trades"], "needs loss_split: false"),
    (["method.name=iaat", "method.trades_beta=3"], "applies to method.train_loss=trades only"),
])
def test_unsupported_settings_name_what_is_supported(sets, message):
    from iaat.config import config_from_dict

    raw: dict = {}
    for item in sets:
        key, value = item.split("=")
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)  # as --set reads it
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_trades_at_iaat_radii_attacks_each_sample_within_its_own_radius():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    method = iaat.IAAT(num_train=8, eps=8 / 255, warmup_epochs=0, eps_init=4 / 255, train_loss="trades",
                       loss_split=False, selection="online")
    method.memory = torch.linspace(0, 12, 8) / 255
    method.start_epoch(0)
    x, y, index = torch.rand(8, 3, 8, 8), torch.arange(8) % 10, torch.arange(8)
    seen = {}
    original = iaat.methods.trades.trades_objective

    def spy(x_adv, x_clean, labels, beta):
        seen["delta"] = (x_adv - x_clean).flatten(1).abs().amax(1)
        seen["beta"] = beta
        return original(x_adv, x_clean, labels, beta)

    iaat.methods.iaat.trades_objective = spy
    try:
        out = method.compute(model, x, y, index)
    finally:
        iaat.methods.iaat.trades_objective = original
    radii = torch.linspace(0, 12, 8) / 255
    assert torch.all(seen["delta"] <= radii + 1e-6) and seen["beta"] == 6.0
    assert torch.all(seen["delta"][1:] > 0.5 * radii[1:])  # a real attack, not the clean image
    assert {"kl", "radius", "up", "down"} <= set(out.stats)
    assert not torch.equal(method.memory, radii)  # online: the radii moved by the training forward


AWP_ARGS = ("--method", "iaat", "--set", "method.warmup_epochs=1", "--set", "train.awp=0.01",
            "--set", "train.awp_warmup=1")


@pytest.fixture(scope="module")
def awp_run(tiny_cifar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("awp") / "run"
    code, stdout, err = run_main(*tiny_train_args(tiny_cifar, out, 2, *AWP_ARGS))
    assert code == 0, err
    assert "weight perturbation (AWP) gamma 0.01 from epoch 2" in stdout
    return out


@pytest.mark.slow
def test_awp_changes_training_only_after_its_warmup(awp_run, tiny_cifar, tmp_path):
    plain = tmp_path / "plain"
    code, _, err = run_main(*tiny_train_args(tiny_cifar, plain, 2, *AWP_ARGS[:4]))
    assert code == 0, err
    a, b = (load_checkpoint(r / "checkpoints" / "epoch_0001.pt") for r in (awp_run, plain))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())  # epoch 1: the warm-up, no AWP
    a, b = (load_checkpoint(r / "checkpoints" / "epoch_0002.pt") for r in (awp_run, plain))
    assert not all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    rows = [json.loads(line) for line in (awp_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["val_pgd10_acc"] <= r["val_clean_acc"] for r in rows)


@pytest.mark.slow
def test_an_interrupted_awp_run_resumes_bitwise(awp_run, tiny_cifar, tmp_path):
    """Ctrl-C in the middle of epoch 2 (with AWP on), then resume: the same weights and radii as without a stop."""
    run = tmp_path / "resumed"
    with ctrl_c_at_step(iaat.IAAT, 8 + 3):  # epoch 2, step 3 (8 steps an epoch), AWP on: the step ends, then the stop
        code, _, err = run_main(*tiny_train_args(tiny_cifar, run, 2, *AWP_ARGS))
    assert code == 130 and "at epoch 2 step 3 of 8" in err, err
    code, _, err = run_main("train", "--out", str(run), "--resume", "--no-progress")
    assert code == 0, err
    a = load_checkpoint(awp_run / "checkpoints" / "epoch_0002.pt")
    c = load_checkpoint(run / "checkpoints" / "epoch_0002.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, c["model"][key]), key
    assert torch.equal(a["method"]["memory"], c["method"]["memory"])


def authors_at_lr(t: float, epochs: int = 200, lr_max: float = 0.1) -> float:
    """AT_AWP/train_cifar10.py's piecewise schedule at (fractional) epoch t (csdongxian/AWP)."""
    if t / epochs < 0.5:
        return lr_max
    elif t / epochs < 0.75:
        return lr_max / 10.
    return lr_max / 100.


def authors_trades_lr(epoch: int, lr: float = 0.1) -> float:
    """trades_AWP/train_trades_cifar.py's adjust_learning_rate at the 1-based epoch (csdongxian/AWP)."""
    if epoch >= 100:
        lr = 0.1 * 0.1
    if epoch >= 150:
        lr = 0.1 * 0.01
    return lr


@pytest.mark.parametrize("name, model, method, normalize", [
    ("cifar10_preact_resnet18_pgd_at_awp", "preact_resnet18", "pgd_at", True),
    ("cifar10_wrn34_10_pgd_at_awp", "wrn-34-10", "pgd_at", True),
    ("cifar10_wrn34_10_trades_awp", "wrn-34-10", "trades", False)])
def test_presets_run_as_the_authors_code(name, model, method, normalize):
    from iaat.config import config_from_dict, load_yaml
    from iaat.engine.schedule import lr_at

    cfg = config_from_dict(load_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml"))
    assert (cfg.model.name, cfg.method.name, cfg.model.normalize) == (model, method, normalize)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.weight_decay) == (200, 128, 5e-4)
    gamma, warmup = awp_settings(cfg.train.awp, cfg.train.awp_warmup, cfg.method.name)
    if method == "trades":
        assert (gamma, warmup) == (0.005, 9)  # theirs: from their 1-based epoch 10
        assert cfg.method.params["beta"] == 6.0
        for epoch in range(200):
            assert lr_at(cfg.optim, epoch, 200) == pytest.approx(authors_trades_lr(epoch + 1)), epoch
    else:
        assert (gamma, warmup) == (0.01, 0)
        for epoch in range(200):  # theirs at the epoch's first step
            assert lr_at(cfg.optim, epoch, 200) == pytest.approx(authors_at_lr(epoch + 1 / 390)), epoch


def test_applied_with_the_epoch_stays_off_during_the_warmup():
    """The own-loop use: AWP(warmup_epochs=5).applied(objective, epoch=e) perturbs nothing before epoch 5, and a
    block without the epoch is refused, which would perturb from epoch 0."""
    model = tiny_model().train()
    x, x_adv, y = batch()

    def objective(net):
        logits = net(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits)

    awp = AWP(model, gamma=0.5, warmup_epochs=5)
    plain = objective(model).loss.item()
    with awp.applied(objective, epoch=4):
        assert objective(model).loss.item() == plain
    with awp.applied(objective, epoch=5):
        assert objective(model).loss.item() != plain
    with pytest.raises(ConfigError, match=r"after 5 plain epoch\(s\).*awp.applied\(objective, epoch=epoch\)"):
        with awp.applied(objective):
            pass
    with AWP(model, gamma=0.5).applied(objective):  # no warm-up: the epoch may be left out
        assert objective(model).loss.item() != plain
    assert objective(model).loss.item() == plain
