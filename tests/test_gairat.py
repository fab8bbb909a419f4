"""GAIRAT, FAT, GAIR-FAT, TRADES, Mixup-AT and IAAT with GAIR weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import config_method
from iaat.attacks import pgd
from iaat.config import config_from_dict
from iaat.engine import train
from iaat.errors import ConfigError
from iaat.methods.gair import GairParams, GairWeighting, gair_weights

U = 1 / 255


@pytest.mark.parametrize("fn, raw", [
    ("tanh", lambda k, K, lam: (1 + math.tanh(lam + 5 * (1 - 2 * k / K))) / 2),
    ("sigmoid", lambda k, K, lam: 1 / (1 + math.exp(-(lam + 5 * (1 - 2 * k / K))))),
    ("discrete", lambda k, K, lam: (K + 1 - k) / (K + 1)),
])
def test_weights_match_the_formula_on_hand_computed_kappa(fn, raw):
    kappa, K, lam = [0, 2, 5, 7, 10], 10, -1.0
    expected = torch.tensor([raw(k, K, lam) for k in kappa])
    expected = expected * len(kappa) / expected.sum()
    got = gair_weights(torch.tensor(kappa), K, lam, fn)
    torch.testing.assert_close(got, expected.float())
    assert got.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(got[:-1] >= got[1:])  # closer to the boundary (small kappa) weighs more


def test_infinite_lambda_gives_exactly_uniform_weights():
    w = gair_weights(torch.tensor([0, 3, 10, 10]), 10, math.inf, "tanh")
    assert torch.equal(w, torch.ones(4))


def lam_values(**params) -> list[float]:
    g = GairWeighting(GairParams(**params))
    return [g.lam(e, 10) for e in range(10)]


def test_lambda_schedules_over_epochs():
    assert lam_values(lam=-1, burn_in_epochs=3) == [math.inf] * 3 + [-1.0] * 7
    linear = lam_values(lam=-1, lam_max=4, lam_schedule="linear", burn_in_epochs=5)
    assert linear[:5] == [math.inf] * 5
    assert linear[5:] == pytest.approx([3.0, 2.0, 1.0, 0.0, -1.0])
    piecewise = lam_values(lam=-1, lam_schedule="piecewise", lam_milestones=[6, 8], lam_drops=[1.0, 1.5],
                           burn_in_epochs=4)
    assert piecewise == [math.inf] * 4 + [-1.0, -1.0, -2.0, -2.0, -2.5, -2.5]  # the later branches are reached
    for values in (linear, piecewise):
        assert not any(math.isnan(v) for v in values)


def test_linear_schedule_with_infinite_start_is_refused():
    with pytest.raises(ConfigError, match="finite method.lam_max"):
        GairWeighting(GairParams(lam_schedule="linear"))


def _train(tmp_path, name: str, method: dict) -> dict:
    cfg = config_from_dict({
        "data": {"dataset": "digits", "val_size": 100, "augment": False},
        "model": {"name": "small_cnn", "width": 8}, "method": method,
        "attack": {"eps": 32, "step_size": 8, "steps": 5},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": 128, "seed": 3, "device": "cpu", "progress": False},
    })
    train(cfg, tmp_path / name, log=lambda _: None)
    return torch.load(tmp_path / name / "checkpoints" / "epoch_0001.pt", weights_only=True)["model"]


def test_gairat_with_infinite_lambda_trains_exactly_like_pgd_at(tmp_path):
    a = _train(tmp_path, "pgd", {"name": "pgd_at"})
    b = _train(tmp_path, "gair", {"name": "gairat", "lam": math.inf})
    c = _train(tmp_path, "gair1", {"name": "gairat", "lam": -1.0})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class Linear(nn.Module):
    def __init__(self, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _method(name: str, eps: float = 8, steps: int = 5, **params):
    return config_method(name, 8, {"eps": eps, "step_size": 2, "steps": steps}, **params)


def _record_train_inputs(model: nn.Module) -> list:
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()) if m.training else None)
    return seen


def test_trades_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = Linear()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = _record_train_inputs(model)
    out = _method("trades", beta=6.0).compute(model, x, y, torch.arange(6))
    x_clean, x_adv = seen
    assert torch.equal(x_clean, x) and (x_adv - x).abs().max() <= 8 * U + 1e-6
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        q = F.softmax(model(x_adv), 1)
        expected = F.cross_entropy(model(x), y) + 6.0 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    assert ((p * (p.log() - q.log())).sum(1) > 0).all()  # the inner maximisation moved every sample


def test_mixup_at_loss_on_identical_images_is_the_mean_cross_entropy():
    torch.manual_seed(0)
    model = Linear()
    x = torch.rand(1, 1, 4, 4).expand(6, 1, 4, 4).contiguous()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = _method("mixup_at", eps=0).compute(model, x, y, torch.arange(6))
    # Mixing identical images changes nothing; mixing labels by a permutation keeps the batch mean.
    torch.testing.assert_close(out.loss.detach(), F.cross_entropy(model(x), y).detach())


def test_gair_fat_keeps_labels_paired_with_their_own_examples():
    model = Linear()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    method = _method("gair_fat", eps=16, steps=6, tau=1, lam=-1.0)
    method.start_epoch(0)
    torch.manual_seed(1)
    out = method.compute(model, x, y, torch.arange(8))
    torch.manual_seed(1)  # the same attack again, by hand
    adv = pgd(model, x, y, 16 * U, steps=6, step_size=2 * U, early_stop_tau=1, final_check=False)
    weights = gair_weights(adv.kappa, 6, -1.0, "tanh")
    ce = F.cross_entropy(model(adv.x_adv), y, reduction="none")  # each example with its own label
    torch.testing.assert_close(out.loss.detach(), (ce * weights).mean().detach())
    assert int(out.stats["kappa"]) == int(adv.kappa.sum())


@pytest.mark.parametrize("name", ["fat", "gair_fat"])
def test_fat_omega_adds_the_kernels_step_noise(name):
    """``omega`` is a size (pixel units in a config, [0, 1] inside) that reaches the kernel as ``step_noise``."""
    model = Linear()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    gair = {"lam": -1.0} if name == "gair_fat" else {}
    method = _method(name, eps=16, steps=6, tau=1, omega="0.01/1", **gair)
    assert method.omega == 0.01
    method.start_epoch(0)
    torch.manual_seed(1)
    out = method.compute(model, x, y, torch.arange(8))
    torch.manual_seed(1)
    adv = pgd(model, x, y, 16 * U, steps=6, step_size=2 * U, early_stop_tau=1, final_check=False, step_noise=0.01)
    torch.manual_seed(1)
    quiet = pgd(model, x, y, 16 * U, steps=6, step_size=2 * U, early_stop_tau=1, final_check=False)
    assert not torch.equal(adv.x_adv, quiet.x_adv)
    weights = gair_weights(adv.kappa, 6, -1.0, "tanh") if name == "gair_fat" else torch.ones(8)
    ce = F.cross_entropy(model(adv.x_adv), y, reduction="none")
    torch.testing.assert_close(out.loss.detach(), (ce * weights).mean().detach())


def test_fat_tau_schedule():
    method = _method("fat", tau=0, tau_schedule=[[4, 3], [7, 6]])
    from iaat.methods.reweighted import _tau

    assert [_tau(method, e) for e in range(9)] == [0, 0, 0, 0, 3, 3, 3, 6, 6]


def test_iaat_with_gair_weights_weighs_its_losses():
    torch.manual_seed(0)
    model = Linear()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    method = _method("iaat", weights="gair", lam=-1.0, warmup_epochs=1, loss_split=False)
    method.start_epoch(0)
    out = method.compute(model, x, y, torch.arange(8))
    assert "gair_weight_sq" in out.stats and out.stats["gair_weight_sq"] >= 8 - 1e-4  # E[w^2] >= E[w]^2 = 1
    with pytest.raises(ConfigError, match="method.weights"):
        _method("iaat", weights="focal")


@pytest.mark.parametrize("name, params, phrase", [
    ("gairat", {"weight_fn": "relu"}, "method.weight_fn"),
    ("gairat", {"lam_schedule": "piecewise", "lam_milestones": [1]}, "same length"),
    ("fat", {"tau": -1}, "method.tau"),
    ("trades", {"beta": -1}, "method.beta"),
    ("mixup_at", {"alpha": 0}, "method.alpha"),
])
def test_bad_parameters(name, params, phrase):
    with pytest.raises(ConfigError, match=phrase):
        _method(name, **params)


def test_wrn_preset_starts_weights_and_decays_the_lr_where_the_authors_code_does():
    """configs/cifar10_wrn32_10_gairat.yaml against two lines of GAIRAT.py (zjfheart/Geometry-aware-Instance-
    reweighted-Adversarial-Training): its piecewise lr_schedule, called with epoch + 1, and its start of the
    weights, ``if (epoch + 1) >= args.begin_epoch`` with begin_epoch 60 (epochs 0-based)."""
    from helpers import REPO
    from iaat.config import build_method, load_yaml
    from iaat.engine.schedule import lr_at

    def authors_lr(t, epochs=120, lr_max=0.1):  # ported from GAIRAT.py, lr_schedule == "piecewise"
        if t / epochs < 0.5:
            return lr_max
        elif t / epochs < 0.75:
            return lr_max / 10.
        elif t / epochs < (11 / 12):
            return lr_max / 100.
        else:
            return lr_max / 200.

    cfg = config_from_dict(load_yaml(REPO / "configs" / "cifar10_wrn32_10_gairat.yaml"))
    for epoch in range(120):
        for within in (0.0, 0.5):
            assert lr_at(cfg.optim, epoch + within, 120) == pytest.approx(authors_lr(epoch + 1)), epoch
    method = build_method(cfg, num_train=1)
    assert [method.gair.active(e) for e in range(120)] == [(e + 1) >= 60 for e in range(120)]
    assert not cfg.model.normalize  # their WRN has no input normalisation


def authors_adjust_lambda(epoch, Lambda, Lambda_max, Lambda_schedule, epochs):
    """GAIRAT.py's adjust_Lambda (zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training), ported with
    its args as arguments; called there with the 1-based epoch."""
    Lam = float(Lambda)
    if epochs >= 110:
        Lambda = Lambda_max
        if Lambda_schedule == 'linear':
            if epoch >= 60:
                Lambda = Lambda_max - (epoch / epochs) * (Lambda_max - Lam)
        elif Lambda_schedule == 'piecewise':
            if epoch >= 60:
                Lambda = Lam
            elif epoch >= 90:
                Lambda = Lam - 1.0
            elif epoch >= 110:
                Lambda = Lam - 1.5
        elif Lambda_schedule == 'fixed':
            if epoch >= 60:
                Lambda = Lam
    else:
        Lambda = Lambda_max
        if Lambda_schedule == 'linear':
            if epoch >= 30:
                Lambda = Lambda_max - (epoch / epochs) * (Lambda_max - Lam)
        elif Lambda_schedule == 'piecewise':
            if epoch >= 30:
                Lambda = Lam
            elif epoch >= 60:
                Lambda = Lam - 2.0
        elif Lambda_schedule == 'fixed':
            if epoch >= 30:
                Lambda = Lam
    return Lambda


def authors_gair(num_steps, Kappa, Lambda, func):
    """GAIR.py's GAIR (same repository), ported: the normalised weights of one batch."""
    Kappa = Kappa.float()
    if func == "Tanh":
        reweight = ((Lambda + (int(num_steps / 2) - Kappa) * 5 / (int(num_steps / 2))).tanh() + 1) / 2
        normalized_reweight = reweight * len(reweight) / reweight.sum()
    return normalized_reweight


@pytest.mark.parametrize("epochs, schedule, lam_max, begin", [
    (120, "fixed", math.inf, 60), (120, "linear", 1.5, 60), (120, "piecewise", math.inf, 40),
    (100, "fixed", math.inf, 1), (100, "linear", 0.0, 30), (100, "piecewise", 2.0, 80)])
def test_compat_authors_weights_equal_gairat_py_every_epoch(epochs, schedule, lam_max, begin):
    kappa = torch.tensor([0, 2, 5, 7, 10, 10])
    for name in ("gairat", "gair_fat"):
        method = _method(name, steps=10, epochs=epochs, compat="authors", begin_epoch=begin, lam=-1.0,
                         lam_schedule=schedule, lam_max=lam_max)
        for epoch in range(epochs):  # theirs: train(epoch, ...) with Lambda = adjust_Lambda(epoch + 1)
            lam = authors_adjust_lambda(epoch + 1, "-1.0", lam_max, schedule, epochs)
            theirs = authors_gair(10, kappa, lam, "Tanh") if (epoch + 1) >= begin else torch.ones(6)
            ours = (method.gair.weights(kappa, 10, epoch, epochs) if method.gair.active(epoch) else torch.ones(6))
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (name, epoch)


@pytest.mark.parametrize("params, phrase", [
    ({"compat": "authors", "burn_in_epochs": 3}, "begin_epoch"),
    ({"begin_epoch": 60}, "used with method.compat=authors"),
    ({"compat": "theirs"}, "method.compat must be none or authors")])
def test_compat_errors_name_the_fix(params, phrase):
    with pytest.raises(ConfigError, match=phrase):
        _method("gairat", epochs=10, **params)


def test_weights_that_all_underflow_scale_to_one_not_nan():
    """lam = -45 puts every weight of an all-robust batch below float32's range: they are equal, so all 1."""
    import iaat
    from iaat.methods.gair import mean_one

    assert torch.equal(iaat.gair_weights(torch.tensor([10, 10]), steps=10, lam=-45.0), torch.ones(2))
    w = iaat.gair_weights(torch.tensor([9, 10]), steps=10, lam=-45.0)  # still ordered, mean 1, finite
    assert torch.isfinite(w).all() and w[0] > w[1] and float(w.mean()) == pytest.approx(1.0)
    assert torch.equal(mean_one(torch.zeros(3)), torch.ones(3))  # MAIL's normalised weights take this path


@pytest.mark.parametrize("kappa, steps, phrase", [
    (torch.tensor([0, 5, 12, 20]), 10, r"kappa in \[0, steps=10\].*got values in \[0, 20\]"),
    (torch.tensor([-1, 3]), 10, r"got values in \[-1, 3\]"),
    ([0, 5, 10], 10, "tensor of shape \\(B,\\).*got a list"),
    (torch.tensor(3), 10, r"got shape \(\)"),
    (torch.tensor([0, 5]), -1, "steps.*whole number >= 0, got -1")])
def test_gair_weights_refuses_kappa_that_no_attack_of_those_steps_gives(kappa, steps, phrase):
    """Outside [0, steps] the formula weighs silently: negative weights (discrete), ~1e-14 (tanh)."""
    import iaat

    for fn in ("tanh", "discrete"):
        with pytest.raises(ConfigError, match=phrase):
            iaat.gair_weights(kappa, steps, -1.0, fn=fn)


def test_gair_weights_of_an_empty_batch_are_empty():
    import iaat

    for fn in ("tanh", "sigmoid", "discrete"):
        w = iaat.gair_weights(torch.zeros(0, dtype=torch.long), 10, -1.0, fn=fn)
        assert w.shape == (0,) and w.dtype == torch.get_default_dtype()


def test_the_methods_weigh_kappa_without_the_host_sync_of_its_check(monkeypatch):
    """The kernel's kappa is in [0, steps] by construction: the per-step path must not check it (a host sync)."""
    import iaat.methods.gair as gair

    def sync(*args):
        raise AssertionError("kappa checked in a training step")

    monkeypatch.setattr(gair, "_check_kappa", sync)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for method in (_method("gairat", steps=3), _method("iaat", steps=3, weights="gair", warmup_epochs=0)):
        method.start_epoch(0)
        assert "gair_weight_sq" in method.compute(model, x, y, torch.arange(4)).stats


@pytest.mark.parametrize("name, params, phrase", [
    ("gairat", {"lam_max": 3.0}, "method.lam_max applies with method.lam_schedule=linear only"),
    ("gairat", {"lam_milestones": [2], "lam_drops": [1.0]}, "method.lam_milestones applies with "
                                                             "method.lam_schedule=piecewise only"),
    ("gairat", {"lam_schedule": "linear", "lam_max": 3.0, "lam_drops": [1.0]}, "method.lam_drops applies with"),
    ("gair_fat", {"lam_max": 3.0}, "method.lam_max applies with method.lam_schedule=linear"),
    ("iaat", {"weights": "gair", "lam_max": 3.0}, "method.lam_max applies with method.lam_schedule=linear"),
    ("mail", {"trades_beta": 3.0}, "method.trades_beta applies with method.train_loss=trades only"),
    ("cat", {"kappa": 3.0, "train_loss": "ce"}, "method.kappa applies with method.train_loss=mix only")])
def test_keys_of_a_setting_that_is_off_are_refused(name, params, phrase):
    """README: a method's keys that apply only with another setting are refused without it (else: no effect)."""
    with pytest.raises(ConfigError, match=phrase):
        _method(name, epochs=10, **params)


@pytest.mark.parametrize("name, params", [
    ("gairat", {"lam_schedule": "linear", "lam_max": 3.0}),
    ("gairat", {"lam_schedule": "piecewise", "lam_milestones": [2], "lam_drops": [1.0]}),
    ("gairat", {"compat": "authors", "lam_max": 3.0}),  # the authors' adjust_Lambda starts at lam_max
    ("mail", {"train_loss": "trades", "trades_beta": 3.0}),
    ("cat", {"train_loss": "mix", "kappa": 3.0})])
def test_keys_of_a_setting_that_is_on_are_taken(name, params):
    method = _method(name, epochs=10, **params)
    assert all(getattr(method, key) == value for key, value in params.items())


def test_iaat_end_epoch_before_any_epoch_reports_the_radii():
    import iaat

    row = iaat.IAAT(num_train=10, weights="gair").end_epoch()
    assert row["radius_mean"] == 0.0 and "gair_lambda" not in row
