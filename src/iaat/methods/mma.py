"""MMA: max-margin adversarial training (Ding, Sharma, Lui, Huang, ICLR 2020).

Each training sample keeps a margin estimate ``radii[i]``: the distance to the decision boundary along the
attack's direction, found by AN-PGD (adaptive-norm PGD) and carried to the next epoch. Per batch:

1. samples classified correctly when clean (soft logit margin ``logsumexp_{k != y} z_k - z_y < 0``) are
   attacked by PGD at their stored margin ``max(memory, min_eps)`` on the soft logit margin, with step
   ``step_scale * eps / steps``;
2. a bisection of ``search_steps`` halvings along that PGD direction, on ``[0, eps]`` if the attack
   crossed the boundary and on ``[eps, search_max]`` if not (``search_max = search_max_scale * hinge_max``),
   gives each sample's new margin and the point at it, which become its memory and its training example;
3. the loss is cross-entropy on those points for the correct samples whose margin is below
   ``hinge_max`` (the hinge: margins that large stop counting) and on the clean image for the others, summed
   and divided by the batch size, mixed with the clean cross-entropy of the whole batch:
   ``(1 - clean_weight) * L_MMA + clean_weight * CE(f(x), y)`` (OMMA: ``clean_weight: 0``).

Samples misclassified when clean store a margin of 0 (the next attack starts from ``min_eps``). Only the
correct samples are attacked, so the cost grows with the clean accuracy: early in training, or where a small
model stays below 50% confidence on most samples, a step costs little more than clean training's two forwards.

The computation is the authors' (BorealisAI/mma_training: anpgd.py, trainer.py): a port of their
``bisection_search``, ``ANPGD.perturb`` and ``train_one_batch`` checks it in ``tests/test_family.py``.
Differences, each deliberate:

1. BatchNorm: the clean check and the bisection run in eval mode without gradients here (like every attack
   of this project); theirs decide "correct" on the train-mode forward of the loss and run the bisection's
   11 forwards in train mode, outside their eval context (their running statistics absorb them), with
   graphs built and thrown away. The PGD part is in eval mode in both.
2. The training example is clamped to [0, 1] here; theirs, ``x + eps * direction``, is not (the bisection
   itself evaluates clamped points in both).
3. The bisection's last forward, whose margin theirs computes and never reads, is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import attack_mode
from ..errors import ConfigError
from .base import Objective, StepOutput, size
from .per_sample import PerSampleState, summary


def soft_logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logsumexp_{k != y} z_k - z_y`` per sample: negative while the sample is classified correctly (with room).

    Example:
        >>> import torch
        >>> from iaat.methods.mma import soft_logit_margin
        >>> round(float(soft_logit_margin(torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([0]))), 4)
        -2.3069
    """
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return torch.logsumexp(others, dim=1) - logits.gather(1, y[:, None]).squeeze(1)


def bisect_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, x_adv: torch.Tensor,
                  upper: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MMA's margin search: along the direction ``(x_adv - x) / eps``, bisect for the soft-margin boundary in
    ``[0, eps]`` where ``x_adv`` crossed it and in ``[eps, upper]`` where not. Returns ``(margin, point)``,
    the last midpoint of ``steps`` halvings and the image there (clamped to [0, 1]); ``model`` is called as is
    (put it in eval mode first) without gradients.

    Example:
        >>> import torch
        >>> from iaat.methods.mma import bisect_margin
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
        >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
        >>> eps = torch.full((2,), 0.01)
        >>> margin, point = bisect_margin(model, x, y, eps, (x + 0.01).clamp(0, 1), upper=0.1, steps=10)
        >>> bool((margin <= 0.1).all() and (point - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    direction = (x_adv - x) / (eps.view(shape) + 1e-12)
    top = torch.full_like(eps, upper)
    lo, hi, cur = torch.zeros_like(eps), top.clone(), eps
    with torch.no_grad():
        margin = soft_logit_margin(model(x_adv).float(), y)
        for k in range(steps):
            inside = margin < 0  # still classified correctly at cur: the boundary lies beyond it
            lo = torch.maximum(torch.where(inside, cur, torch.zeros_like(cur)), lo)
            hi = torch.minimum(torch.where(inside, top, cur), hi)
            cur = (lo + hi) / 2
            if k + 1 < steps:
                margin = soft_logit_margin(model((x + cur.view(shape) * direction).clamp(0, 1)).float(), y)
    return cur, (x + cur.view(shape) * direction).clamp(0, 1)


@dataclass(eq=False, kw_only=True)
class MMA(PerSampleState):
    """Max-margin adversarial training: train at each sample's own margin, found by AN-PGD and a bisection.

    Args (besides the attack's ``steps``, ``norm``, ``random_start``; ``eps`` is only the radius of the held-out
    evaluation; sizes in [0, 1] units):
        num_train: number of training samples (one margin each); required.
        hinge_max: d_max, margins at or beyond it leave the loss (32/255, the paper's MMA-32; 12/255, 20/255).
        min_eps: smallest radius an attack starts from (0.005, the authors' L-inf CIFAR-10 value).
        search_max_scale: the bisection's upper end is this times ``hinge_max`` (1.05: samples never broken
            land above the hinge).
        search_steps: halvings of the bisection (10).
        step_scale: PGD step ``step_scale * eps / steps`` (2.5).
        clean_weight: weight of the clean cross-entropy of the whole batch (1/3; 0 is OMMA).
        save_radii: write the margins to ``RUN/radii/epoch_NNNN.npy`` after every epoch (True).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.MMA(num_train=100, steps=3, hinge_max=32 / 255)
        >>> x, y, index = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([7, 3, 99, 0])
        >>> method.loss(model, x, y, index).backward()
        >>> method.radii.shape
        torch.Size([100])
    """

    name = "mma"
    varying_batches = True  # the margin search on the misclassified samples only
    log_keys = ("radius_mean", "train_hinged")
    state_keys = ("radii",)
    size_keys = ("radii",)
    epoch_keys = ("radii",)

    hinge_max: float = size(32 / 255)
    min_eps: float = size(0.005)
    search_max_scale: float = 1.05
    search_steps: int = 10
    step_scale: float = 2.5
    clean_weight: float = 1 / 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.min_eps < self.hinge_max:
            raise ConfigError("method.min_eps must be positive and smaller than method.hinge_max.")
        if self.search_max_scale < 1 or self.search_steps < 1 or self.step_scale <= 0:
            raise ConfigError("method.search_max_scale must be >= 1, method.search_steps >= 1 and method.step_scale "
                              "> 0.")
        if not 0 <= self.clean_weight <= 1:
            raise ConfigError(f"method.clean_weight must be in [0, 1], got {self.clean_weight}.")
        self.init_state(radii=0.0)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        rows = self.rows(index)
        with torch.no_grad(), attack_mode(model) as plain:
            correct = soft_logit_margin(plain(x).float(), y) < 0
        margin = torch.zeros(len(y), device=x.device)
        x_train = x.clone()
        hit = correct.nonzero().squeeze(1)  # one host sync: the samples to attack
        if len(hit):
            xc, yc = x[hit], y[hit]
            start = self.radii[rows[hit]].clamp(min=self.min_eps)
            adv = self.attack_batch(model, xc, yc, eps=start, step_size=self.step_scale * start / max(self.steps, 1),
                                    loss=soft_logit_margin, final_check=False)
            with attack_mode(model) as plain:
                found, point = bisect_margin(plain, xc, yc, start, adv.x_adv, self.search_max_scale * self.hinge_max,
                                             self.search_steps)
            margin[hit], x_train[hit] = found, point.to(x.dtype)
        self.write("radii", rows, margin)
        counted = ~correct | (margin < self.hinge_max)  # the hinge: margins beyond hinge_max leave the loss
        stats = {"radius": margin.sum(), "hinged": (~counted).sum()}

        def objective(net: nn.Module) -> StepOutput:
            logits_clean = net(x) if self.clean_weight else None
            logits = net(x_train)
            mma = (F.cross_entropy(logits, y, reduction="none") * counted).sum() / len(y)
            loss = mma if logits_clean is None else \
                (1 - self.clean_weight) * mma + self.clean_weight * F.cross_entropy(logits_clean, y)
            return StepOutput(loss, logits, dict(stats))
        return objective

    def end_epoch(self) -> dict:
        """The margins' mean, std, min, max and quantiles ([0, 1] units)."""
        return summary(self.radii, "radius")
