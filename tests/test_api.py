"""The public Python API: what ``import iaat`` offers, its docstring examples, one unit, and no silent traps."""

from __future__ import annotations

import copy
import doctest
import importlib
import json
import warnings

import pytest
import torch
import yaml
from torch import nn

import iaat
from helpers import run_in_process, tiny_train_args
from iaat.errors import ConfigError

#: Modules whose docstring examples are part of the public API's documentation.
DOCUMENTED = ["iaat.units", "iaat.data.batch", "iaat.data.indexed", "iaat.data.imageset", "iaat.models.registry",
              "iaat.models.normalize", "iaat.models.precision", "iaat.attacks.pgd", "iaat.methods.base",
              "iaat.methods.standard", "iaat.methods.iaat", "iaat.methods.reweighted", "iaat.methods.trades",
              "iaat.methods.mart", "iaat.methods.gair", "iaat.methods.mma", "iaat.methods.cat", "iaat.methods.mail",
              "iaat.methods.per_sample", "iaat.evaluation.api", "iaat.evaluation.attacks", "iaat.ema", "iaat.awp",
              "iaat.plugins", "iaat.evaluation.protocol"]


@pytest.mark.parametrize("module", DOCUMENTED)
def test_docstring_examples_run(module):
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0, f"{module} has no example"


def test_subpackages_are_reachable_as_attributes_in_a_fresh_interpreter():
    """``iaat.errors.ConfigError`` as the README writes it, not only after another import loaded the module."""
    import subprocess
    import sys

    code = "import iaat; print(iaat.errors.ConfigError.__name__, iaat.units.format_size(8 / 255))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["ConfigError", "8/255"], out.stderr


def test_every_public_name_resolves_and_has_an_example():
    for name in iaat.__all__:
        obj = getattr(iaat, name)
        if callable(obj) and not isinstance(obj, type(iaat)):
            assert ">>>" in (obj.__doc__ or ""), name
    assert "IAAT" in iaat.methods.__all__


def _linear(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, classes))


def _batch(n: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 4, 4, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("call", [
    lambda m, x, y: iaat.pgd(m, x, y, eps=8),
    lambda m, x, y: iaat.pgd(m, x, y, eps=8 / 255, step_size=2),
    lambda m, x, y: iaat.pgd(m, x, y, eps=torch.full((len(y),), 8.0)),  # per-sample radii
    lambda m, x, y: iaat.PGD(m, eps=8),
    lambda m, x, y: iaat.PGDAT(eps=8),
    lambda m, x, y: iaat.IAAT(num_train=6, gamma=1.9),
    lambda m, x, y: iaat.AttackSpec(eps=8),
    lambda m, x, y: iaat.evaluate(m, x, y, eps=8),
])
def test_a_size_in_pixel_units_is_an_error_that_names_the_fix(call):
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError, match=r"larger than 1.*/255") as info:
        call(model, x, y)
    assert isinstance(info.value, ValueError)  # what a Python caller catches


class _Pair(nn.Module):
    def forward(self, z: torch.Tensor) -> tuple:
        return z, z


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: iaat.pgd(m, (x * 255).to(torch.uint8), y, 8 / 255), "float images in .0, 1.*255"),
    (lambda m, x, y: iaat.pgd(m, x, y.float(), 8 / 255), r"pgd takes integer class labels \(torch.long\)"),
    (lambda m, x, y: iaat.pgd(m, x, y - 1, 8 / 255), "pgd takes class labels >= 0, got -1"),
    (lambda m, x, y: iaat.pgd(m, x, y + 3, 8 / 255), "labels go up to 5, but the model has 3 outputs"),
    (lambda m, x, y: iaat.pgd(m, x, y, torch.full((len(y),), -0.1)), "eps must hold finite sizes >= 0"),
    (lambda m, x, y: iaat.pgd(m, x, y, 8 / 255, steps=2.5), "whole number >= 0, got 2.5"),
    (lambda m, x, y: iaat.pgd(m, x, y, 8 / 255, steps=-1), "whole number >= 0, got -1"),
    (lambda m, x, y: iaat.pgd(nn.Sequential(m, _Pair()), x, y, 8 / 255), "logits of shape .B, classes., got tuple"),
    (lambda m, x, y: iaat.PGD(m, eps=8 / 255, stepz=3), "unknown option.s. stepz"),
    (lambda m, x, y: iaat.PGDAT(eps=8 / 255, step_size=0), "step_size must be positive"),
    (lambda m, x, y: iaat.TRADES(beta=float("inf")), "method.beta must be finite, got inf"),
    (lambda m, x, y: iaat.IAAT(num_train=6, beta=float("nan")), "method.beta must be a number, got nan"),
    (lambda m, x, y: iaat.pgd(m, x * float("nan"), y, 8 / 255), "images holding NaN values"),  # class 0 "robust"
    (lambda m, x, y: iaat.pgd(m, x.bfloat16(), y, 8 / 255), "float32 or float64 images, got torch.bfloat16"),
    (lambda m, x, y: iaat.pgd(m.double(), x, y, 8 / 255), r"weights are torch.float64, the images torch.float32"),
    (lambda m, x, y: iaat.pgd(m.half(), x, y, 8 / 255), r"keep the images float32 and run the model under autocast"),
    (lambda m, x, y: iaat.pgd(lambda t: m(t), x, y, 8 / 255), "must be a torch.nn.Module.*got function"),
    (lambda m, x, y: iaat.pgd(m, x, y, 8 / 255, target=y.float()), "target must be integer class indices"),
    (lambda m, x, y: iaat.pgd(m, x, y, 8 / 255, target=y + 3), "target classes go up to 5, but the model has 3"),
    (lambda m, x, y: iaat.pgd(m, x, y, 8 / 255, autocast_dtype="bf16"), "autocast_dtype must be torch.bfloat16"),
    (lambda m, x, y: iaat.PGDAT(attack_dtype=torch.int8), "attack_dtype must be torch.bfloat16"),
    (lambda m, x, y: iaat.AttackSpec(kind="cw"), "CW is PGD with the margin loss"),
    (lambda m, x, y: iaat.build_model("small_cnn", 10, mean=(0.5,) * 3), "give both mean and std"),
    (lambda m, x, y: iaat.gair_weights(torch.zeros(3), 10, 0.0, fn="relu"), "choose tanh, sigmoid or discrete"),
    (lambda m, x, y: iaat.GAIRAT().start_epoch(1.5), r"a whole number >= 0\), got 1.5"),
    (lambda m, x, y: iaat.PGDAT().start_epoch(-1), r"a whole number >= 0\), got -1"),
    (lambda m, x, y: iaat.AWP(m).perturbation(m(x).sum()), "objective, a function of the weights"),
])
def test_the_attack_names_the_mistake(call, message):
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError, match=message):
        call(model, x, y)


def _first_epoch(method):
    method.start_epoch(0)
    return method


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: _first_epoch(iaat.IAAT(num_train=6)).loss(m, x, y + 3, torch.arange(6)),
     "labels go up to 5, but the model has 3 outputs"),
    (lambda m, x, y: iaat.Clean().loss(nn.Sequential(m, _Pair()), x, y), "logits of shape .B, classes., got tuple"),
    (lambda m, x, y: iaat.PGDAT().loss(m, (x * 255).to(torch.uint8), y), "float images in .0, 1.*divide 8-bit"),
    (lambda m, x, y: iaat.PGDAT().loss(m, x, y.float()), r"integer class labels \(torch.long\)"),
    (lambda m, x, y: iaat.MMA(num_train=6).loss(m, x, y - 1, torch.arange(6)), "class labels >= 0, got -1"),
    (lambda m, x, y: iaat.PGDAT().loss(m.double(), x, y), "weights are torch.float64, the images torch.float32"),
    (lambda m, x, y: iaat.TRADES().loss(m, x * float("nan"), y), "images holding NaN values"),
])
def test_a_method_names_the_mistake_on_the_first_batch(call, message):
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError, match=message):
        call(model, x, y)


def test_int32_labels_and_numpy_step_counts_are_accepted():
    import numpy as np

    model, (x, y) = _linear(), _batch()
    torch.manual_seed(0)
    a = iaat.pgd(model, x, y.int(), 8 / 255, steps=np.int64(3))
    torch.manual_seed(0)
    b = iaat.pgd(model, x, y, 8 / 255, steps=3, check_inputs=False)  # the checks draw no random numbers
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.kappa, b.kappa) and a.first_miss.dtype == torch.long


@pytest.mark.parametrize("name", sorted(set(iaat.methods.METHODS) - {"clean"}))
def test_every_method_takes_int32_labels_as_int64_ones(name):
    from iaat.methods import method_class

    model, (x, y) = _linear(), _batch()
    losses = []
    for labels in (y.int(), y):
        method = method_class(name)(num_train=len(y), eps=8 / 255, steps=2, random_start=False)
        method.start_epoch(200)  # past every warm-up and burn-in
        torch.manual_seed(0)
        losses.append(method.loss(model, x, labels, torch.arange(len(y))))
    assert torch.equal(losses[0], losses[1])


def test_a_frozen_batchnorm_stays_frozen_through_attacks_losses_and_evaluate():
    """The usual fine-tune: the model training, its BatchNorm layers in eval mode with their statistics frozen.
    Attacks, methods and evaluate put back each module's own mode, not the model's flag on every module."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(4 * 6 * 6, 10))
    model.train()
    model[1].eval()
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    stats = model[1].running_mean.clone()
    iaat.pgd(model, x, y, 8 / 255, steps=2)
    iaat.PGDAT(eps=8 / 255, steps=2).loss(model, x, y).backward()
    iaat.evaluate(model, x, y, attacks=["pgd:steps=2"], eps=8 / 255, checks=False)
    assert model.training and not model[1].training and model[3].training
    assert torch.equal(model[1].running_mean, stats)
    model.eval()
    model[3].train()  # dropout kept on at evaluation (MC dropout)
    iaat.evaluate(model, x, y, attacks=["pgd:steps=2"], eps=8 / 255, checks=False)
    assert not model.training and model[3].training


def test_evaluate_refuses_per_image_radii_and_attack_objects_by_name():
    import numpy as np

    model, (x, y) = _linear(), _batch(8)
    with pytest.raises(ConfigError, match=r"got an array of shape \(8,\) for 8 images: per-sample radii go to"):
        iaat.evaluate(model, x, y, eps=torch.full((8,), 4 / 255))  # was: 8 evaluations, one per radius
    with pytest.raises(ConfigError, match="attacks takes spec strings .* got a PGD"):
        iaat.evaluate(model, x, y, attacks=[iaat.PGD(model, eps=8 / 255)], eps=8 / 255)
    result = iaat.evaluate(model, x, y, attacks=["pgd:steps=1"], eps=np.array([4, 8]) / 255, checks=False)
    assert list(result["attacks"]) == ["PGD-1@4/255", "PGD-1@8/255"]  # an array of radii that is a sweep


def test_an_attack_naming_another_norm_without_its_own_radius_is_refused():
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError, match="names norm l2 but no eps, and would run at the linf radii given"):
        iaat.evaluate(model, x, y, attacks=["pgd:steps=2,norm=l2"], eps=0.5)  # was: L-inf at 0.5, silently
    with pytest.raises(ConfigError, match="names norm linf but no eps, and would run at the l2 radii given"):
        iaat.evaluate(model, x, y, attacks=["pgd:steps=2,norm=linf"], eps=0.5, norm="l2")
    result = iaat.evaluate(model, x, y, attacks=["pgd:steps=2,norm=l2,eps=128"], eps=8 / 255, checks=False)
    assert list(result["attacks"]) == ["PGD-2@128/255-l2"]


def test_a_models_own_error_is_not_taken_for_a_type_mismatch():
    """Only torch's complaint about weights and inputs of different types becomes the type-mismatch error: a float64
    model that evaluate attacks through its float32 view, failing on its own, fails with its own error."""
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = _linear().double(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:  # after the clean pass: inside the attack
                raise RuntimeError("expected scalar type Float in my own layer")
            return self.net(x)

    x, y = _batch()
    with pytest.raises(RuntimeError, match="in my own layer") as caught:
        iaat.evaluate(Failing(), x, y, attacks=["pgd:steps=2"], checks=False)
    assert not isinstance(caught.value, ConfigError)


def test_int32_targets_are_class_indices_as_int32_labels_are():
    model, (x, y) = _linear(), _batch()
    torch.manual_seed(0)
    a = iaat.pgd(model, x, y, 8 / 255, steps=3, target=((y + 1) % 3).int())
    torch.manual_seed(0)
    b = iaat.pgd(model, x, y, 8 / 255, steps=3, target=(y + 1) % 3)
    assert torch.equal(a.x_adv, b.x_adv)


def test_numpy_scalars_and_0d_tensors_are_sizes_and_per_sample_radii_go_through_pgd():
    import numpy as np

    model, (x, y) = _linear(), _batch()
    torch.manual_seed(0)
    a = iaat.PGD(model, eps=np.float32(8 / 255), steps=3)(x, y)
    torch.manual_seed(0)
    b = iaat.PGD(model, eps=torch.full((len(y),), float(np.float32(8 / 255))), steps=3)(x, y)  # one radius each
    assert torch.equal(a, b)
    method = iaat.PGDAT(eps=np.float64(4 / 255), steps=np.int64(2))
    method.start_epoch(torch.tensor(2))
    assert (method.steps, method.epoch) == (2, 2) and type(method.epoch) is int
    res = iaat.evaluate(model, x, y, attacks=["pgd:steps=2"], eps=torch.tensor(8 / 255), checks=False)
    assert list(res["attacks"]) == ["PGD-2@8/255"]


def test_indexed_dataset_takes_list_items_and_the_librarys_own_image_sets():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return [torch.zeros(1, 2, 2), i % 2]  # a list, as many datasets return

    x, y, index = next(iter(torch.utils.data.DataLoader(iaat.IndexedDataset(Pairs()), batch_size=4)))
    assert x.shape == (4, 1, 2, 2) and y.tolist() == [0, 1, 0, 1] and index.tolist() == [0, 1, 2, 3]
    digits = iaat.data.load_dataset("digits", None, download=False).train
    x, y, index = next(iter(torch.utils.data.DataLoader(iaat.IndexedDataset(digits), batch_size=8)))
    assert x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1 and index.tolist() == list(range(8))
    assert torch.equal(y, digits.y[:8])


def test_awp_leaves_out_a_layer_frozen_after_it_was_built():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 3))
    awp = iaat.AWP(model)
    model[1].requires_grad_(False)
    v = awp.perturbation(iaat.PGDAT(steps=1).objective(model, *_batch()))
    assert float(v[0].abs().max()) == 0 and float(v[1].abs().max()) > 0


def test_the_l_inf_default_radius_is_not_taken_under_l2():
    model, (x, y) = _linear(), _batch()
    for call in (lambda: iaat.PGD(model, norm="l2"), lambda: iaat.evaluate(model, x, y, norm="l2")):
        with pytest.raises(ConfigError, match="under l2 needs eps: the L-inf default 8/255 is a tiny L2 radius"):
            call()
    assert iaat.PGD(model).eps == 8 / 255 and iaat.evaluate(model, x, y, checks=False)["eps"] == 8 / 255
    with pytest.warns(UserWarning, match="pgd_at: eps 8/255 under l2 is the L-inf default"):
        iaat.PGDAT(norm="l2").start_epoch(0)
    notes = iaat.IAAT(num_train=4, norm="l2", eps=0.5, line_search_max=0.25, selection="line_search").notes()
    assert [n.split(" is ")[0].split(" ends ")[0] for n in notes] == ["iaat: gamma 1.9/255", "iaat: the line search's grid"]


def test_l2_sizes_may_exceed_one():
    model, (x, y) = _linear(), _batch()
    res = iaat.pgd(model, x, y, eps=2.0, norm="l2", steps=2)
    assert torch.all((res.x_adv - x).flatten(1).norm(dim=1) <= 2.0 + 1e-5)


def test_indices_already_on_the_device_are_checked_without_waiting_for_it_after_the_first_batch():
    """The first batch's indices get the clear error; later ones a device-side assert (no host sync on a GPU), never a
    silent wrap-around of -1 onto the last sample's radius. (Run here on CPU tensors through the GPU path.)"""
    from iaat.methods.per_sample import checked_rows

    good, bad = torch.tensor([0, 5]), torch.tensor([-1, 5])
    assert torch.equal(checked_rows(good, 6, torch.device("cpu"), values=False), good)
    with pytest.raises(RuntimeError):
        checked_rows(bad, 6, torch.device("cpu"), values=False)
    with pytest.raises(ConfigError, match="outside the training set"):
        checked_rows(bad, 6, torch.device("cpu"))


def test_iaat_loss_needs_start_epoch_and_indices():
    model, (x, y) = _linear(), _batch()
    method = iaat.IAAT(num_train=6, eps=8 / 255, steps=2)
    with pytest.raises(ConfigError, match="before start_epoch"):
        method.loss(model, x, y, torch.arange(6))
    method.start_epoch(0)
    with pytest.raises(ConfigError, match="IndexedDataset"):
        method.loss(model, x, y)
    with pytest.raises(ConfigError, match="outside the training set of num_train=6"):
        method.loss(model, x, y, torch.arange(6) + 1)
    with pytest.raises(ConfigError, match="num_train"):
        iaat.IAAT(eps=8 / 255)
    assert method.loss(model, x, y, torch.arange(6)).ndim == 0


def test_normalised_inputs_are_refused():
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError, match=r"images in \[0, 1\].*NormalizedModel"):
        iaat.PGDAT().loss(model, (x - 0.5) / 0.25, y)
    with pytest.raises(ConfigError, match=r"images in \[0, 1\].*NormalizedModel"):
        iaat.pgd(model, (x - 0.5) / 0.25, y, 8 / 255)
    with pytest.raises(ConfigError, match=r"images in \[0, 1\]"):
        iaat.evaluate(model, (x - 0.5) / 0.25, y)


def test_iaat_memory_round_trips_through_state_dict():
    model, (x, y) = _linear(), _batch()
    a = iaat.IAAT(num_train=10, eps=8 / 255, steps=2, warmup_epochs=0, eps_init=4 / 255)
    a.start_epoch(0)
    a.loss(model, x, y, torch.tensor([9, 0, 3, 4, 5, 6]))
    b = iaat.IAAT(num_train=10, eps=8 / 255, steps=2, warmup_epochs=0, eps_init=4 / 255)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.memory, b.memory) and not torch.all(a.memory == 4 / 255)
    with pytest.raises(ConfigError, match="11 samples"):
        iaat.IAAT(num_train=11).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match=r"saved per-sample memory of method iaat: memory holds 8, larger than 1.*"
                                          r"pass memory/255"):
        b.load_state_dict({"memory": torch.full((10,), 8.0)})  # radii in pixel levels
    with pytest.raises(ConfigError, match="finite sizes >= 0"):
        b.load_state_dict({"memory": torch.full((10,), float("nan"))})
    assert torch.equal(a.memory, b.memory)  # a refused state leaves the memory as it was
    iaat.IAAT(num_train=10, norm="l2", eps=0.5).load_state_dict({"memory": torch.full((10,), 2.0)})  # L2 may exceed 1


def test_a_method_in_ones_own_loop_warns_what_the_trainer_would_print():
    method = iaat.IAAT(num_train=10, epochs=3)  # warmup_epochs 5: no radius would ever adapt
    with pytest.warns(UserWarning, match="all 3 epochs are warmup"):
        method.start_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.start_epoch(1)  # once
        taken = iaat.IAAT(num_train=10, epochs=3)
        assert any("all 3 epochs are warmup" in note for note in taken.take_notes())  # printed by the taker
        taken.start_epoch(0)


def test_iaat_warmup_follows_the_training_radius():
    assert iaat.IAAT(num_train=4, eps=4 / 255).eps_warmup == pytest.approx(4 / 255)
    explicit = iaat.IAAT(num_train=4, eps=4 / 255, eps_warmup=8 / 255)
    assert explicit.eps_warmup == pytest.approx(8 / 255)
    assert explicit.notes() and "8/255" in explicit.notes()[0] and "4/255" in explicit.notes()[0]
    assert iaat.IAAT(num_train=4, eps=4 / 255).notes() == []


@pytest.mark.slow
def test_cli_iaat_warms_up_at_the_training_radius(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    res = run_in_process(*tiny_train_args(tiny_cifar, out, 1, "--method", "iaat", "--eps", "4", "--set",
                                   "method.warmup_epochs=1"))
    assert res.returncode == 0, res.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["radius_mean"] == pytest.approx(4 / 255) and row["train_radius"] == pytest.approx(4 / 255)
    assert "eps_warmup" not in res.stdout  # nothing to point out

    out = tmp_path / "explicit"
    res = run_in_process(*tiny_train_args(tiny_cifar, out, 1, "--method", "iaat", "--eps", "4", "--set",
                                   "method.warmup_epochs=1", "--set", "method.eps_warmup=8"))
    assert res.returncode == 0, res.stderr
    assert "warmup epoch(s) train at eps_warmup 8/255, not at the training radius eps 4/255" in res.stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["radius_mean"] == pytest.approx(8 / 255)


def test_methods_from_configs_get_unit_sizes():
    from iaat.config import build_method, config_from_dict

    cfg = config_from_dict({"method": {"name": "iaat", "gamma": 1.9, "eps_max": "12/255"}, "attack": {"eps": 6}})
    method = build_method(cfg, num_train=5)
    assert method.gamma == pytest.approx(1.9 / 255) and method.eps_max == pytest.approx(12 / 255)
    assert method.eps == pytest.approx(6 / 255) and method.eps_warmup == pytest.approx(6 / 255)


def test_evaluate_returns_the_protocol_numbers_as_a_plain_dict():
    torch.manual_seed(0)
    model, (x, y) = _linear(), _batch(24)
    res = iaat.evaluate(model, x, y, attacks=["pgd:steps=5", iaat.AttackSpec(steps=3, restarts=2)], eps=[8 / 255],
                        eps_sweep=[0, 4 / 255, 8 / 255], steps_sweep=[1, 5])
    assert set(res["attacks"]) == {"PGD-5@8/255", "PGD-3x2@8/255"}
    assert res["worst_case"]["accuracy"] <= min(a["accuracy"] for a in res["attacks"].values())
    assert [p["eps"] for p in res["curves"]["eps"]["points"]] == pytest.approx([0, 4 / 255, 8 / 255])
    assert "checks" in res and isinstance(res["suspicious"], bool)
    json.dumps(res)  # plain data
    for labels in (torch.arange(24) % 6, torch.arange(24) % 3 - 1):
        with pytest.raises(ConfigError, match=r"class indices in \[0, 2\] for a model with 3 outputs"):
            iaat.evaluate(model, x, labels)
    one = iaat.evaluate(model, x, y, attacks="pgd:steps=2", checks=False)  # one attack on its own
    assert set(one["attacks"]) == {"PGD-2@8/255"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_evaluate_takes_a_model_kept_in_another_float_type(dtype):
    """The attack's iterates stay float32: cast to a float64 model's type, or a float16 model evaluated as a float32
    copy of its weights (its own float16 gradients would underflow on confident samples)."""
    torch.manual_seed(0)
    model, (x, y) = _linear(), _batch(24)
    other = copy.deepcopy(model).to(dtype)
    kw = dict(attacks=["pgd:steps=5"], eps=8 / 255, checks=False)
    res, res_other = iaat.evaluate(model, x, y, **kw), iaat.evaluate(other, x, y, **kw)
    assert res_other["clean"] == res["clean"] > 0
    tolerance = 0 if dtype == torch.float64 else 2 / 24  # float16 weights may flip a close call
    assert abs(res_other["attacks"]["PGD-5@8/255"]["accuracy"] - res["attacks"]["PGD-5@8/255"]["accuracy"]) <= tolerance
    assert next(other.parameters()).dtype == dtype  # the model itself is left as it was, in its mode
    for training in (False, True):
        iaat.evaluate(other.train(training), x, y, **kw)
        assert other.training == training
    if dtype == torch.float16:  # the same numbers as the float32 model with the float16 model's weights
        same = iaat.evaluate(copy.deepcopy(other).float(), x, y, **kw)
        assert same["attacks"] == {k: {**a, "seconds": same["attacks"][k]["seconds"]}
                                   for k, a in res_other["attacks"].items()}


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: iaat.evaluate(m, x[:0], y[:0]), "N >= 1"),
    (lambda m, x, y: iaat.evaluate(m, x.numpy(), y.numpy()), "torch tensors, got ndarray and ndarray"),
    (lambda m, x, y: iaat.evaluate(m, x, y, eps="8/255"), "eps must be a number .*got '8/255'"),
    (lambda m, x, y: iaat.load_model(5), "given by its path .str or Path., got int"),
    (lambda m, x, y: iaat.evaluate(m, x, y.float()), "integer class indices"),
    (lambda m, x, y: iaat.evaluate(m, x, y, batch_size=0), "batch_size must be a whole number >= 1"),
    (lambda m, x, y: iaat.evaluate(nn.Sequential(m, _Pair()), x, y), "logits of shape .B, classes., got tuple"),
    (lambda m, x, y: iaat.evaluate(m, x[:, :1], y), r"fails on images of shape \(1, 4, 4\) from x: RuntimeError"),
])
def test_evaluate_names_the_mistake(call, message):
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError, match=message):
        call(model, x, y)


def test_the_package_has_no_import_cycles():
    """Every import (also those inside functions) between the package's modules, as a graph without cycles."""
    import ast
    from pathlib import Path

    root = Path(iaat.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ["iaat", *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        # importing a.b.c runs the packages a.b first (unless the importer lives inside them)
        graph[name] = {p for t in targets if t in modules for p in _with_parents(t, modules)
                       if p != name and not name.startswith(p + ".")}

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node, *rest]
        return None

    for name in sorted(graph):
        assert cycle_from(name, name, set()) is None, " -> ".join(cycle_from(name, name, set()))


def _with_parents(name: str, modules: dict) -> list:
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if p in modules]


@pytest.mark.parametrize("name", sorted(iaat.METHODS))
def test_an_objective_gives_the_same_loss_each_time_it_is_called(name):
    """AWP calls a batch's objective at perturbed weights, then at the trained ones: it must be one fixed loss of
    the weights (MixupAT once drew a new mixup on every call)."""
    model, (x, y) = _linear(), _batch(8)
    method = iaat.METHODS[name](eps=8 / 255, steps=2, num_train=8, epochs=2)
    method.start_epoch(0)
    torch.manual_seed(0)
    objective = method.objective(model, x, y, torch.arange(8))
    first, second = objective(model).loss, objective(model).loss
    assert torch.equal(first, second), (first, second)


@pytest.mark.parametrize("name", sorted(iaat.METHODS))
def test_end_epoch_before_any_epoch_returns_numbers_not_a_type_error(name):
    assert isinstance(iaat.METHODS[name](num_train=4, epochs=2).end_epoch(), dict)


def test_train_from_python_writes_a_run_that_the_command_line_continues(tmp_path, capsys):
    """iaat.train's example (a run, then its resume), then the same folder with `iaat train --resume`."""
    from helpers import run_main
    import iaat.training

    result = doctest.testmod(iaat.training, extraglobs={"iaat": iaat, "folder": tmp_path})
    assert result.attempted > 0 and result.failed == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"]["name"] == "iaat" and saved["train"]["epochs"] == 2 and saved["train"]["threads"] >= 1
    code, _, err = run_main("train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "3", "--no-progress")
    assert code == 0, err
    assert [int(row["epoch"]) for row in iaat.engine.rundir.read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_train_leaves_the_callers_random_streams_as_they_were(tmp_path):
    """A random search around iaat.train draws its next trial from the streams the run found, not reseeded ones."""
    import random

    import numpy as np

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    cfg = {"data": {"dataset": "digits", "train_subset": 100, "val_size": 0}, "model": {"name": "small_cnn", "width": 4},
           "attack": {"steps": 1}, "train": {"epochs": 1, "progress": False}}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    iaat.train(tmp_path / "run", cfg, log=lambda line: None)
    assert draws() == expected


def _yaml(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("call, message", [
    (lambda out: iaat.train(out, {"attack": {"eps": 0.03}}), "looks like a value already in"),
    (lambda out: iaat.train(out, overrides={"train_epochs": 2}), "'section.key' names"),
    (lambda out: iaat.train(out, overrides={"trian.epochs": 2}), "unknown config section 'trian'"),
    (lambda out: iaat.train(out, 42), "config must be a YAML file, a dict or an iaat.config.Config"),
    (lambda out: iaat.train(out, {"method": {"name": "iaat"}}, resume=True), "leave config out"),
    (lambda out: iaat.train(out, resume=True), "nothing to resume"),
    (lambda out: iaat.train(out, overrides=["train.epochs=2"]), "overrides must be a dict"),
    (lambda out: iaat.train(out, _yaml(out.parent / "c.yaml", "attack:\n  eps: 0.03\n")), "c.yaml, line 2: attack.eps"),
])
def test_train_names_the_mistake_before_touching_the_folder(tmp_path, call, message):
    out = tmp_path / "run"
    with pytest.raises(iaat.errors.IaatError, match=message):
        call(out)
    assert not out.exists()


def test_ctrl_c_in_train_passes_through_except_exception(tmp_path):
    """A script that trains several runs and carries on past failed ones still stops at Ctrl-C: the interrupt
    is a KeyboardInterrupt (state saved, exit code 130), not an Exception its ``except`` would swallow."""
    import subprocess
    import sys

    code = f"""
import os, signal, iaat
spec = {{"data": {{"dataset": "digits", "train_subset": 200}}, "model": {{"name": "small_cnn", "width": 4}},
        "train": {{"epochs": 3, "progress": False, "threads": 1}}}}
def log(line):  # the first epoch's row: Ctrl-C
    if line.startswith("epoch"):
        os.kill(os.getpid(), signal.SIGINT)
try:
    for name in ("a", "b"):
        try:
            iaat.train(os.path.join({str(tmp_path)!r}, name), spec, log=log)
        except Exception as e:
            print("carried on past", type(e).__name__)
except KeyboardInterrupt as e:
    print("stopped:", type(e).__name__, e.exit_code, e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "carried on" not in out.stdout, out.stdout
    assert out.stdout.startswith("stopped: TrainingInterrupted 130 interrupted (SIGINT) after epoch 1"), out.stdout
    assert (tmp_path / "a" / "checkpoints").is_dir() and not (tmp_path / "b").exists()


def test_train_refuses_a_resume_that_changes_the_method(tmp_path):
    spec = {"data": {"dataset": "digits", "train_subset": 200}, "model": {"name": "small_cnn", "width": 4},
            "train": {"epochs": 1, "progress": False, "threads": 1}}
    before = torch.get_num_threads()
    iaat.train(tmp_path / "run", spec, log=lambda line: None)
    assert torch.get_num_threads() == before  # the run's count applied while it trained, the caller's kept
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["threads"] == 1
    with pytest.raises(ConfigError, match="cannot change attack.eps when resuming"):
        iaat.train(tmp_path / "run", resume=True, overrides={"attack.eps": 4})


def test_evaluate_leaves_the_callers_random_stream_as_it_was():
    """A training loop that calls evaluate each epoch draws new shuffles and attack starts afterwards: the evaluation's
    per-batch seeds are its own (they reset the global generator, so every later epoch repeated the same draws)."""
    model, (x, y) = _linear(), _batch(12)
    loader = torch.utils.data.DataLoader(torch.arange(12), batch_size=12, shuffle=True)

    def draws(evaluate: bool) -> list:
        torch.manual_seed(5)
        before = [next(iter(loader)).tolist(), torch.rand(3).tolist()]
        if evaluate:
            iaat.evaluate(model, x, y, attacks=["pgd:steps=3"], checks=False)
        return before + [next(iter(loader)).tolist(), torch.rand(3).tolist()]

    assert draws(evaluate=True) == draws(evaluate=False)
    torch.manual_seed(1)
    first = iaat.evaluate(model, x, y, attacks=["pgd:steps=3"], checks=False)
    torch.manual_seed(2)
    second = iaat.evaluate(model, x, y, attacks=["pgd:steps=3"], checks=False)
    assert first["attacks"]["PGD-3@8/255"]["accuracy"] == second["attacks"]["PGD-3@8/255"]["accuracy"]


def test_evaluate_refuses_a_function_with_the_error_of_pgd():
    model, (x, y) = _linear(), _batch()
    with pytest.raises(ConfigError) as pgd_error:
        iaat.pgd(lambda t: model(t), x, y, 8 / 255)
    with pytest.raises(ConfigError) as evaluate_error:
        iaat.evaluate(lambda t: model(t), x, y)
    assert str(evaluate_error.value) == str(pgd_error.value)
    assert "must be a torch.nn.Module" in str(evaluate_error.value)


@pytest.mark.parametrize("kw", [dict(attacks=[]), dict(eps=0, attacks=["pgd:steps=2"]), dict(checks=False),
                                dict(attacks=[], checks=False)])
def test_evaluate_returns_every_documented_key(kw):
    """Also without an attack at the main radius (worst case: the clean accuracy over no attack) or without checks
    (none ran, none failed)."""
    model, (x, y) = _linear(), _batch(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eps 0 is said to leave the images clean
        res = iaat.evaluate(model, x, y, **kw)
    assert {"n", "clean", "eps", "norm", "attacks", "worst_case", "curves", "checks", "suspicious", "suspicious_reasons",
            "seconds"} <= set(res)
    from iaat.evaluation.protocol import markdown_report

    md = markdown_report(res)  # which still shows neither a robust accuracy nor checks where there were none
    if not res["attacks"] or kw.get("eps") == 0:
        assert res["worst_case"] == {"accuracy": res["clean"], "over": []} and "all attacks at" not in md
    if kw.get("checks") is False:
        assert res["checks"] == [] and res["suspicious"] is False and res["suspicious_reasons"] == []
        assert "Sanity checks" not in md
    json.dumps(res)


def test_evaluate_runs_inside_inference_mode():
    """Attacks need gradients, which inference mode switches off: evaluate switches it back on, and takes images
    made inside it; a model built inside it (weights that cannot take gradients) is an error that says so."""
    model, (x, y) = _linear(), _batch(12)
    kw = dict(attacks=["pgd:steps=3"], checks=True)
    expected = iaat.evaluate(model, x, y, **kw)
    with torch.inference_mode():
        inside = iaat.evaluate(model, x.clone(), y.clone(), **kw)
        assert torch.is_inference_mode_enabled()
    assert inside["attacks"]["PGD-3@8/255"]["accuracy"] == expected["attacks"]["PGD-3@8/255"]["accuracy"]
    assert inside["suspicious"] == expected["suspicious"]
    with torch.inference_mode():
        built = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        with pytest.raises(ConfigError, match="built inside torch.inference_mode"):
            iaat.evaluate(built, x, y, **kw)


def test_pgd_runs_inside_inference_mode():
    """iaat.pgd and iaat.PGD switch inference mode off as evaluate does, and take images made inside it; a model
    built inside it is refused by name (torch's own error came from restoring requires_grad)."""
    model, (x, y) = _linear(), _batch(12)
    torch.manual_seed(0)
    expected = iaat.pgd(model, x, y, eps=8 / 255, steps=3)
    with torch.inference_mode():
        torch.manual_seed(0)
        inside = iaat.pgd(model, x.clone(), y.clone(), eps=torch.full((12,), 8 / 255), steps=3)
        assert iaat.PGD(model, eps=8 / 255, steps=3)(x.clone(), y.clone()).shape == x.shape
    assert torch.equal(inside.x_adv, expected.x_adv) and torch.equal(inside.correct, expected.correct)
    assert not inside.x_adv.is_inference()
    with torch.inference_mode():
        built = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    with pytest.raises(ConfigError, match="built inside torch.inference_mode"):
        iaat.pgd(built, x, y, eps=8 / 255, steps=3)


def test_evaluate_crafts_transfer_attacks_on_a_surrogate(tmp_path):
    """``surrogate=`` (a module, or a model file or run read with iaat.load_model), or a transfer attack's own
    ``source=``, as ``iaat eval --surrogate`` and ``--attack transfer:source=RUN`` do."""
    model, (x, y) = _linear(), _batch(12)
    torch.manual_seed(3)
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    path, _ = iaat.export_model(other, tmp_path / "surrogate.pt", "torchscript", input_shape=(3, 4, 4))
    kw = dict(eps=32 / 255, checks=False)
    label = "transfer-PGD-3@32/255"
    from_module = iaat.evaluate(model, x, y, attacks=["transfer:steps=3"], surrogate=other, **kw)
    from_source = iaat.evaluate(model, x, y, attacks=[f"transfer:source={path},steps=3"], **kw)
    from_file = iaat.evaluate(model, x, y, attacks=["pgd:steps=3"], surrogate=str(path), **kw)
    assert list(from_module["attacks"]) == [label] and from_module["attacks"][label]["source"] == "<surrogate module>"
    assert from_source["attacks"][label]["source"] == str(path)
    assert set(from_file["attacks"]) == {"PGD-3@32/255", "transfer-PGD-10@32/255"}  # the surrogate adds its attack
    assert from_module["attacks"][label]["accuracy"] == from_source["attacks"][label]["accuracy"]
    with pytest.raises(ConfigError, match="the surrogate is the evaluated model itself"):
        iaat.evaluate(model, x, y, surrogate=model, **kw)
    with pytest.raises(ConfigError, match="surrogate must be an nn.Module or the path .* got function"):
        iaat.evaluate(model, x, y, surrogate=lambda t: other(t), **kw)


def test_a_size_key_of_ones_own_method_is_declared_with_iaat_size():
    """A plain float key is taken as written, so a config's pixel units (4 for 4/255) reach the kernel as 4: the
    error names the fix. Declared with iaat.size, the key is checked (and converted from a config) like eps."""
    import dataclasses

    import torch.nn.functional as F
    from iaat.methods.base import StepOutput

    @dataclasses.dataclass(eq=False, kw_only=True)
    class PlainRadius(iaat.Method):
        radius: float = 4 / 255

        def prepare(self, model, x, y, index):
            x_adv = self.attack_batch(model, x, y, eps=self.radius, final_check=False).x_adv
            return lambda net: StepOutput(F.cross_entropy(net(x_adv), y), net(x_adv))

    @dataclasses.dataclass(eq=False, kw_only=True)
    class SizedRadius(PlainRadius):
        radius: float = iaat.size(4 / 255)

    x, y = _batch()
    with pytest.raises(ConfigError, match=r"attack_batch got eps=4, larger than 1: .* iaat\.size\(default\)"):
        PlainRadius(radius=4.0).loss(_linear(), x, y)
    PlainRadius().loss(_linear(), x, y).backward()
    with pytest.raises(ConfigError, match="radius=4 is larger than 1"):
        SizedRadius(radius=4)
    assert dataclasses.fields(SizedRadius)[-1].metadata.get("size")  # what the config's conversion reads


def test_ones_own_method_without_dataclass_is_named_as_the_cause(tmp_path, monkeypatch):
    from iaat.config import config_from_dict

    (tmp_path / "own_methods_plain.py").write_text(
        "import iaat\n\n\nclass Weighted(iaat.PGDAT):  # @dataclass forgotten\n    clean_weight: float = 0.5\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="Weighted declares clean_weight but not as a dataclass field; put @dataclass"):
        config_from_dict({"method": {"name": "own_methods_plain:Weighted", "clean_weight": 0.2}})
    config_from_dict({"method": {"name": "own_methods_plain:Weighted"}})  # its class attribute, set by no config


def test_resuming_with_another_method_says_so_before_reading_the_old_methods_keys(tmp_path):
    """The old method's keys used to be refused as the new one's ("method 'pgd_at' takes no parameters")."""
    from iaat.config import config_from_dict
    from iaat.engine.rundir import create_run_dir
    from iaat.training import resumed_config

    create_run_dir(tmp_path / "run", config_from_dict({"method": {"name": "gairat", "lam": -1.0}}))
    assert resumed_config(tmp_path / "run", {"train.epochs": 3}).method.name == "gairat"
    with pytest.raises(ConfigError, match=r"cannot change method.name when resuming \('gairat' in .*'pgd_at'\)"):
        resumed_config(tmp_path / "run", {"method.name": "pgd_at"})


def test_evaluate_returns_per_image_results_that_make_up_its_accuracies():
    model, (x, y) = _linear(), _batch(24)
    res = iaat.evaluate(model, x, y, attacks=["pgd:steps=3", "cw:steps=3"], eps=32 / 255, checks=False, per_sample=True)
    per = res["per_sample"]
    assert set(per) == {"clean", "worst_case", *res["attacks"]}
    assert all(v.dtype == torch.bool and v.shape == (24,) for v in per.values())
    assert per["clean"].float().mean().item() == pytest.approx(res["clean"])
    for label, entry in res["attacks"].items():
        assert per[label].float().mean().item() == pytest.approx(entry["accuracy"])
        assert not (per[label] & ~per["clean"]).any()  # robust only where correct when clean
    first, second = res["attacks"]
    assert torch.equal(per["worst_case"], per[first] & per[second])
    assert "per_sample" not in iaat.evaluate(model, x, y, attacks=["pgd:steps=1"], checks=False)
