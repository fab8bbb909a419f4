"""TRADES against a port of the authors' ``trades_loss`` (yaodongyu/TRADES, trades.py): the same inner
maximisation from the same Gaussian start, the same loss and the same weight gradients.

The two documented differences do not arise here: the images stay inside [0.01, 0.99], so the start needs no
projection into [0, 1], and the model has no BatchNorm, so one or two clean forward passes in train mode are alike.
The attack's objective is computed in float32 here (theirs in the model's float64): a gradient entry within
rounding of 0 may take the other sign, so the examples agree entry by entry but for a few; the loss at the same
examples agrees to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iaat
from iaat.methods.trades import trades_examples, trades_objective


def authors_trades_loss(model: nn.Module, x_natural: torch.Tensor, y: torch.Tensor, step_size: float,
                        epsilon: float, perturb_steps: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Their ``trades_loss`` (L-inf), ported: ``.cuda()`` and the optimiser's ``zero_grad`` left out, its batch
    size taken from the batch, and the adversarial examples returned beside the loss."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, dtype=x_natural.dtype).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust, x_adv


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).double()


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_examples_loss_and_gradients_equal_the_authors(beta):
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = (0.01 + 0.98 * torch.rand(16, 3, 8, 8, generator=g)).double()
    y = torch.randint(0, 10, (16,), generator=g)
    settings = dict(eps=0.031, step_size=0.003, steps=10)  # their CIFAR-10 defaults

    torch.manual_seed(5)
    theirs, x_adv_theirs = authors_trades_loss(model, x, y, 0.003, 0.031, 10, beta)
    grads_theirs = torch.autograd.grad(theirs, list(model.parameters()))

    method = iaat.TRADES(beta=beta, **settings)
    torch.manual_seed(5)
    x_adv = trades_examples(method, model, x, y, method.init_std)
    same = (x_adv - x_adv_theirs).abs() <= 1e-9
    assert same.double().mean() > 0.98 and (x_adv - x).abs().max() > 0.02, float(same.double().mean())

    model.train()
    ours = trades_objective(x_adv_theirs, x, y, beta)(model)
    grads = torch.autograd.grad(ours.loss, list(model.parameters()))
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.manual_seed(5)  # the method's own step: its examples, its loss, near theirs
    assert float(method.loss(model, x, y).detach()) == pytest.approx(float(theirs.detach()), rel=1e-2)
