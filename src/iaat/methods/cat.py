"""CAT: customized adversarial training (Cheng, Lei, Chen, Dhillon, Hsieh, 2020; arXiv 2002.06789).

Each training sample keeps a radius ``radii[i]`` (0 at first), raised while the sample stays robust, and
trains on labels smoothed in proportion to it. Per batch (the paper's Algorithm 1):

1. try ``trial = min(radius + eta, eps)`` (``eps``, the training attack's radius, is the cap);
2. attack at ``trial`` towards smoothed labels ``(1 - c * trial) * onehot(y) + c * trial * u``, ``u`` a fresh
   Dirichlet(1, ..., 1) draw per sample (``c``: ``smoothing``); the final iterate is classified;
3. a sample still classified correctly keeps ``trial``, a fooled one goes back to its radius;
4. train on the attack's examples against labels smoothed again (a new draw) at the updated radius:
   ``train_loss: ce`` the soft-label cross-entropy (the paper's CAT-CE); ``mix`` adds the radius-weighted
   Carlini-Wagner hinge ``sum_i radius_i * max(max_{k != y} z_k - z_y + kappa, 0)`` (CAT-MIX), summed over the
   batch as in the authors' code, and attacks the same mixed objective.

The authors' released code (cmhcbb/CAT-Customized-Adversarial-Training, main_adv_cus.py, version 2) moves the
radius the other way: a sample that stays correct goes back down by eta and a fooled one keeps the raise.
``compat: authors`` computes as that code (a port of its ``dirilabel`` and training step checks it in
``tests/test_family.py``); the default follows the paper, as every other public re-implementation does.
Their attack starts at the clean image (``random_start: false``) with a fixed step of 0.007, as the
presets do. One difference in both modes: the noise ``u`` is drawn on the device of the batch (theirs on the
CPU, then moved); the same seed gives the same labels on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..attacks import margin_loss
from ..errors import ConfigError
from .base import CompatParams, Objective, StepOutput, refuse_unless, size
from .per_sample import PerSampleState, summary

LOSSES = ("ce", "mix")


def smoothed_labels(y: torch.Tensor, num_classes: int, weight: torch.Tensor) -> torch.Tensor:
    """CAT's labels: ``(1 - weight) * onehot(y) + weight * u``, ``u ~ Dirichlet(1, ..., 1)`` per sample.

    Example:
        >>> import torch
        >>> from iaat.methods.cat import smoothed_labels
        >>> labels = smoothed_labels(torch.tensor([2, 0]), 10, torch.tensor([0.0, 0.3]))
        >>> labels[0].tolist() == [0.0, 0.0, 1.0] + [0.0] * 7, bool(abs(float(labels[1].sum()) - 1) < 1e-6)
        (True, True)
    """
    onehot = F.one_hot(y, num_classes).to(weight.dtype)
    alpha = torch.ones(num_classes, device=y.device)  # float32 as the authors' draw, whatever the weights' dtype
    noise = torch.distributions.Dirichlet(alpha, validate_args=False).sample((len(y),)).to(weight.dtype)  # no syncs
    return onehot * (1 - weight[:, None]) + noise * weight[:, None]


def soft_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft labels, per sample."""
    return -(labels * F.log_softmax(logits, dim=1)).sum(1)


@dataclass(eq=False, kw_only=True)
class CAT(PerSampleState, CompatParams):
    """Customized adversarial training: a radius per sample raised while it stays robust, with labels smoothed
    in proportion to it.

    Args (besides the attack's; ``eps`` caps every radius; sizes in [0, 1] units):
        num_train: number of training samples (one radius each); required.
        eta: radius step per visit (0.0025, the authors' code).
        smoothing: c, the label-smoothing weight per unit of radius (10: 8/255 smooths by 0.31).
        train_loss: ``mix`` (soft cross-entropy plus the radius-weighted CW hinge; the authors' script) | ``ce``.
        kappa: confidence of the CW hinge (10, the authors' code).
        compat: ``none`` (the paper's update) | ``authors`` (the released code's: see the module docstring).
        save_radii: write the radii to ``RUN/radii/epoch_NNNN.npy`` after every epoch (True).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.CAT(num_train=100, eps=8 / 255, steps=3, random_start=False)
        >>> x, y, index = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([7, 3, 99, 0])
        >>> method.loss(model, x, y, index).backward()
        >>> bool((method.radii[index] <= 8 / 255).all())
        True
    """

    name = "cat"
    log_keys = ("radius_mean",)
    state_keys = ("radii",)
    size_keys = ("radii",)
    epoch_keys = ("radii",)

    eta: float = size(0.0025)
    smoothing: float = 10.0
    train_loss: str = "mix"
    kappa: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_compat()
        if self.train_loss not in LOSSES:
            raise ConfigError(f"method.train_loss must be ce or mix, got {self.train_loss!r}.")
        refuse_unless(self, self.train_loss == "mix", "train_loss=mix", ("kappa",))  # the CW hinge's confidence
        if self.eta <= 0 or self.smoothing < 0 or self.kappa < 0:
            raise ConfigError("method.eta must be positive, method.smoothing and method.kappa >= 0.")
        if self.smoothing * self.eps > 1:
            raise ConfigError(f"method.smoothing times eps is {self.smoothing * self.eps:.3g}: above 1 the smoothed "
                              f"labels are not probabilities; lower method.smoothing or eps.")
        self.init_state(radii=0.0)

    def _objective(self, labels: Callable[[int], torch.Tensor], radius: torch.Tensor,
                   batch: Optional[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-sample objective the attack maximises (the training loss's, before the batch mean); ``batch``:
        the global batch's size (``mix``)."""
        def objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            ce = soft_ce(logits, labels(logits.shape[1]))
            if self.train_loss == "ce":
                return ce
            # the authors' attack descends sum_i radius_i * max(z_y - max_other + kappa, 0) - mean_i soft CE_i
            return ce / batch - radius * (self.kappa - margin_loss(logits, y)).clamp(min=0)
        return objective

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        rows = self.rows(index)
        radius = self.radii[rows]
        trial = (radius + self.eta).clamp(max=self.eps)
        drawn: list = []

        def attack_labels(num_classes: int) -> torch.Tensor:  # drawn once, at the attack's first step
            if not drawn:
                drawn.append(smoothed_labels(y, num_classes, self.smoothing * trial))
            return drawn[0]

        # mix sums its hinge over the batch: under torchrun over the global batch (all ranks), whose size the
        # mean terms then divide by, as in a 1-process run of it (the trainer weighs each rank's loss as a mean)
        batch = distributed.global_sum(torch.full((), float(len(y)), device=x.device)) if self.train_loss == "mix" \
            else None
        adv = self.attack_batch(model, x, y, eps=trial, loss=self._objective(attack_labels, trial, batch))
        if self.compat == "authors":  # the released code: robust samples step back down, fooled ones keep the raise
            new = torch.where(adv.correct, trial - self.eta, trial)
        else:
            new = torch.where(adv.correct, trial, radius)
        self.write("radii", rows, new)
        x_adv, stats = adv.x_adv, {"radius": new.sum(), "raised": (new > radius).sum()}
        train_labels: list = []

        def objective(net: nn.Module) -> StepOutput:
            logits = net(x_adv)
            if not train_labels:  # one draw per step, whichever weights the objective is evaluated at
                train_labels.append(smoothed_labels(y, logits.shape[1], self.smoothing * new))
            loss = soft_ce(logits, train_labels[0]).mean()
            if self.train_loss == "mix":
                loss = loss + (new * (self.kappa + margin_loss(logits, y)).clamp(min=0)).sum() * (batch / len(y))
            return StepOutput(loss, logits, dict(stats))
        return objective

    def end_epoch(self) -> dict:
        """The radii's mean, std, min, max and quantiles ([0, 1] units)."""
        return summary(self.radii, "radius")
