"""The fast path computes what a plain PyTorch PGD-AT step computes.

The "plain path" is the textbook loop written out here: images converted with ``float() / 255``,
the model in fp32 and the default memory layout, PGD inline (signed-gradient steps of the mean
cross-entropy, projection onto the eps-ball and [0, 1]), then the mean cross-entropy of the
adversarial batch. The "fast path" is the trainer's own: the device-resident uint8 loader, the
model and method from :func:`iaat.engine.trainer.build_step` and the autocast region of the
training step. Off, the two agree to float rounding; channels_last, bf16 (also for the attack
alone) and torch.compile stay within a tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iaat.config import config_from_dict
from iaat.data import DeviceLoader
from iaat.engine.setup import autocast_context, prepare_data
from iaat.engine.trainer import build_step
from iaat.errors import ConfigError

CPU = torch.device("cpu")
EPS, STEP, STEPS = 8 / 255, 2 / 255, 5


def step_config(data_dir, **train) -> "Config":  # noqa: F821
    return config_from_dict({
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "val_size": 0, "download": False},
        "model": {"name": "small_cnn", "width": 8},
        "method": {"name": "pgd_at"},
        "attack": {"eps": 8, "step_size": 2, "steps": STEPS, "random_start": False},  # no RNG: exact comparison
        "train": {"batch_size": 64, "device": "cpu", **train},
    })


@pytest.fixture(scope="module")
def batch(tiny_cifar):
    """One training batch from the fast loader (no augmentation), its sample indices, and the data."""
    cfg = step_config(tiny_cifar)
    data = prepare_data(cfg)
    x, y, idx = next(iter(DeviceLoader(data.train, 64, CPU, shuffle=True, augment=False, seed=3).epoch(0)))
    return data, x, y, idx


def initial_weights(cfg, data, device: torch.device = CPU) -> dict:
    torch.manual_seed(0)
    model, _, _ = build_step(cfg, data, device)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def fast_step(cfg, data, x, y, idx, weights, device: torch.device = CPU) -> tuple[float, list[torch.Tensor]]:
    """The trainer's step from ``weights``: its loss and the parameter gradients (fp16: through the trainer's
    gradient scaler, unscaled as the optimiser step sees them)."""
    model, net, method = build_step(cfg, data, device)
    model.load_state_dict(weights)
    model.train()
    x, y, idx = x.to(device), y.to(device), idx.to(device)
    with autocast_context(device, cfg.train.amp)():
        out = method.compute(net, x, y, idx)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    scaler.scale(out.loss).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    return out.loss.item(), [p.grad.detach().clone().contiguous() for p in model.parameters()]


def plain_step(cfg, data, idx, weights, device: torch.device = CPU) -> tuple[float, list[torch.Tensor]]:
    """The textbook PGD-AT step on the same samples."""
    model, _, _ = build_step(step_config(cfg.data.data_dir), data, device)  # fp32, default layout, not compiled
    model.load_state_dict(weights)
    x = data.train.x[idx].float().to(device) / 255
    y = data.train.y[idx].to(device)
    model.eval()
    delta = torch.zeros_like(x)
    for _ in range(STEPS):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + STEP * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    model.train()
    loss = F.cross_entropy(model(x + delta), y)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in model.parameters()]


def max_relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((u - v).norm() / v.norm().clamp_min(1e-12)).item() for u, v in zip(a, b))


def test_loader_batch_is_the_plain_conversion_of_its_samples(batch):
    data, x, y, idx = batch
    assert torch.equal(x, data.train.x[idx].float() / 255)
    assert torch.equal(y, data.train.y[idx])


def test_fast_path_off_equals_plain_loop(batch, tiny_cifar):
    data, x, y, idx = batch
    cfg = step_config(tiny_cifar)
    weights = initial_weights(cfg, data)
    fast_loss, fast_grads = fast_step(cfg, data, x, y, idx, weights)
    plain_loss, plain_grads = plain_step(cfg, data, idx, weights)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6, abs=1e-7)
    assert max_relative_gap(fast_grads, plain_grads) < 1e-5


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Cosine similarity of two whole gradients (all parameters flattened into one vector)."""
    return F.cosine_similarity(torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b]), 0).item()


# Tolerances ~10x the gaps measured on this batch on two CPUs (channels_last, whose kernels round differently per
# CPU: loss 1e-7 / 6e-6 relative, gradient cosine 0.99999 / 0.99991 with and without AVX-512; bf16: loss 6e-4 /
# 1.1e-3 relative, gradient cosine 0.982 / 0.983). Both flip the sign of some near-zero input gradients, so the
# adversarial batch moves a little. A wrong layout, a dropped autocast or a broken attack misses them by far.
@pytest.mark.parametrize("train, loss_tol, min_cosine", [
    ({"channels_last": True}, 1e-4, 0.999),
    ({"amp": "bf16"}, 1e-2, 0.9),
    ({"amp": "bf16", "channels_last": True}, 1e-2, 0.9),
    ({"attack_amp": "bf16"}, 1e-2, 0.9),
], ids=["channels_last", "bf16", "bf16+channels_last", "bf16-attack-only"])
def test_fast_path_on_stays_within_tolerance(batch, tiny_cifar, train, loss_tol, min_cosine):
    data, x, y, idx = batch
    weights = initial_weights(step_config(tiny_cifar), data)
    plain_loss, plain_grads = plain_step(step_config(tiny_cifar), data, idx, weights)
    fast_loss, fast_grads = fast_step(step_config(tiny_cifar, **train), data, x, y, idx, weights)
    assert fast_loss == pytest.approx(plain_loss, rel=loss_tol)
    if "amp" in train or "attack_amp" in train:  # bf16 did run: it cannot be bitwise equal
        assert fast_loss != plain_loss
    assert cosine(fast_grads, plain_grads) > min_cosine


def test_channels_last_changes_the_model_layout_only(batch, tiny_cifar):
    data, *_ = batch
    model, net, method = build_step(step_config(tiny_cifar, channels_last=True), data, CPU)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert net is model and method.attack_dtype is None


def test_attack_precision_is_its_own(batch, tiny_cifar):
    data, *_ = batch
    assert build_step(step_config(tiny_cifar, amp="bf16"), data, CPU)[2].attack_dtype == torch.bfloat16
    assert build_step(step_config(tiny_cifar, amp="bf16", attack_amp="off"), data, CPU)[2].attack_dtype is None
    assert build_step(step_config(tiny_cifar, attack_amp="bf16"), data, CPU)[2].attack_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="attack_amp=fp16 is for GPUs"):
        build_step(step_config(tiny_cifar, attack_amp="fp16"), data, CPU)
    with pytest.raises(ConfigError, match="train.attack_amp must be"):
        step_config(tiny_cifar, attack_amp="fp8")


@pytest.mark.slow
def test_compiled_step_matches_plain_loop(batch, tiny_cifar):
    """torch.compile of the model and of the PGD update (the CPU build needs a C++ compiler)."""
    data, x, y, idx = batch
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 -- any failure of the toolchain
        pytest.skip(f"torch.compile does not work on this machine: {type(e).__name__}: {str(e)[:200]}")
    weights = initial_weights(step_config(tiny_cifar), data)
    plain_loss, plain_grads = plain_step(step_config(tiny_cifar), data, idx, weights)
    cfg = step_config(tiny_cifar, compile=True)
    model, net, _ = build_step(cfg, data, CPU)
    assert net is not model and isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
    fast_loss, fast_grads = fast_step(cfg, data, x, y, idx, weights)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-4)
    assert cosine(fast_grads, plain_grads) > 0.999


@pytest.mark.parametrize("method, dynamic", [("pgd_at", False), ("trades", False), ("iaat", None), ("mma", None)])
def test_compile_keeps_static_shapes_unless_the_method_attacks_sub_batches(tiny_cifar, monkeypatch, method, dynamic):
    """Static graphs where every batch keeps its shape (the last, smaller batch gets its own instead of turning every
    later step's graph into a dynamic-shape one); torch's automatic dynamic shapes where sub-batches vary."""
    import iaat.engine.setup as setup

    seen: list = []
    monkeypatch.setattr(setup.torch, "compile", lambda model, **kw: seen.append(kw) or model)
    cfg = config_from_dict({**step_config(tiny_cifar, compile=True).to_dict(), "method": {"name": method}})
    build_step(cfg, prepare_data(cfg), CPU)
    assert seen == [{"dynamic": dynamic}]


def test_resume_may_switch_layout_but_not_precision(tiny_cifar, tmp_path):
    from helpers import run_main, tiny_train_args

    out = tmp_path / "run"
    assert run_main(*tiny_train_args(tiny_cifar, out, 1))[0] == 0
    code, _, err = run_main(*tiny_train_args(tiny_cifar, out, 2, "--resume", "--amp", "bf16"))
    assert code == 2 and "cannot change train.amp when resuming" in err
    code, _, err = run_main(*tiny_train_args(tiny_cifar, out, 2, "--resume", "--set", "train.channels_last=true"))
    assert code == 0, err
    assert (out / "checkpoints" / "epoch_0002.pt").is_file()
