"""MART against a port of the authors' loss (YisenWang/MART, mart.py), and as a method in the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaat
from iaat.errors import ConfigError
from iaat.methods.mart import mart_loss


def authors_mart_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """The loss part of ``mart_loss`` in YisenWang/MART's mart.py (after the attack), ported for comparison."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(logits)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def hand_made_logits() -> tuple:
    """Clean and adversarial logits covering the cases: confident and right, fooled, wrong when clean,
    a saturated softmax (probabilities of exactly 0 and 1 in float32)."""
    clean = torch.tensor([[4.0, 0.5, -1.0, 0.0], [1.0, 1.2, 0.9, -2.0], [-1.0, 3.0, 0.0, 0.5],
                          [0.2, 0.1, 0.0, -0.1], [120.0, 0.0, -5.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, 2.5, 0.1, -1.0], [-2.0, 4.0, 1.0, 0.0],
                        [0.0, 0.0, 1.5, -0.5], [110.0, 3.0, -5.0, 2.0]], dtype=torch.float64)
    return clean, adv, torch.tensor([0, 2, 3, 1, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 5.0, 6.0])
def test_loss_equals_the_authors(beta, dtype):
    clean, adv, y = hand_made_logits()
    clean, adv = clean.to(dtype), adv.to(dtype)
    ours, theirs = mart_loss(clean, adv, y, beta), authors_mart_loss(clean, adv, y, beta)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)
    c1, a1 = clean.clone().requires_grad_(), adv.clone().requires_grad_()
    c2, a2 = clean.clone().requires_grad_(), adv.clone().requires_grad_()
    mart_loss(c1, a1, y, beta).backward()
    authors_mart_loss(c2, a2, y, beta).backward()
    assert torch.isfinite(c1.grad).all() and torch.isfinite(a1.grad).all()
    # In float32 the last row's clean softmax rounds to exactly 0 and 1: the port's gradient is NaN there.
    finite = torch.isfinite(c2.grad).all(dim=1)
    assert finite[:4].all() and bool(finite[4]) == (dtype == torch.float64)
    torch.testing.assert_close(c1.grad[finite], c2.grad[finite], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-6, rtol=1e-6)


def test_loss_equals_the_authors_in_float32_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(64, 10, generator=gen) * 3, torch.randn(64, 10, generator=gen) * 3
    y = torch.randint(0, 10, (64,), generator=gen)
    assert float(mart_loss(clean, adv, y, 6.0)) == pytest.approx(float(authors_mart_loss(clean, adv, y, 6.0)),
                                                                 rel=1e-6)


def test_method_trains_a_batch_and_logs_its_kl():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    method = iaat.MART(eps=8 / 255, steps=3, beta=5.0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    out = method.compute(model, x, y, None)
    out.loss.backward()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and float(out.stats["kl"]) >= 0
    assert model[1].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="method.beta"):
        iaat.MART(beta=-1.0)


def test_mart_is_a_method_of_the_cli_and_the_sweep():
    from iaat.sweep import OPTIONAL_RUNS

    assert iaat.METHODS["mart"] is iaat.MART and "mart" in OPTIONAL_RUNS


def authors_lr(lr: float, epoch: int) -> float:
    """``adjust_learning_rate`` of YisenWang/MART's train_resnet.py / train_wideresnet.py (1-based epoch)."""
    if epoch >= 100:
        return lr * 0.001
    elif epoch >= 90:
        return lr * 0.01
    elif epoch >= 75:
        return lr * 0.1
    return lr


@pytest.mark.parametrize("name, model, beta, lr, weight_decay, epochs", [
    ("cifar10_resnet18_mart", "resnet18", 5.0, 0.01, 3.5e-3, 120),
    ("cifar10_wrn34_10_mart", "wrn-34-10", 6.0, 0.1, 7e-4, 90)])  # train_wideresnet.py's defaults since 99b19ea
def test_presets_run_as_the_authors_code(name, model, beta, lr, weight_decay, epochs):
    from pathlib import Path

    from iaat.config import build_method, config_from_dict, load_yaml
    from iaat.engine.schedule import lr_at

    cfg = config_from_dict(load_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml"))
    method = build_method(cfg, num_train=49_000)
    assert (cfg.model.name, cfg.model.normalize, cfg.train.epochs, cfg.train.batch_size) == (model, False, epochs, 128)
    assert isinstance(method, iaat.MART) and method.beta == beta and method.init_std == 0.001
    assert (method.eps, method.step_size, method.steps) == pytest.approx((0.031, 0.007, 10))
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == pytest.approx((0.9, weight_decay))
    for epoch in range(epochs):  # ours 0-based, theirs 1-based
        assert lr_at(cfg.optim, epoch, epochs) == pytest.approx(authors_lr(lr, epoch + 1), rel=1e-12), epoch


@pytest.mark.slow
def test_cli_trains_mart_and_prints_its_kl(tiny_cifar, tmp_path):
    import json

    from helpers import run_main, tiny_train_args

    code, out, err = run_main(*tiny_train_args(tiny_cifar, tmp_path / "mart", 1, "--method", "mart",
                                               "--set", "method.beta=5"))
    assert code == 0, err
    assert "training mart (beta=5)" in out and "train_kl" in out.split("epoch 1 |")[1]
    row = json.loads((tmp_path / "mart" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_kl"] >= 0 and any(k.startswith("val_pgd") for k in row)
