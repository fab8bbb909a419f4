"""GAIRAT, friendly adversarial training (FAT) and their combination GAIR-FAT.

All three craft their training examples with the one PGD kernel; kappa comes from that
same attack (never a second attack), and FAT's early stopping is the kernel's per-sample
``early_stop_tau`` mask (no loop over samples): FAT's PGD-K-tau, as in the authors'
``earlystop``, where a misclassified iterate spends one of tau and a sample stops at a
misclassified iterate with none left (an iterate classified correctly again costs nothing).

Differences from the authors' code (zjfheart/Friendly-Adversarial-Training and the GAIRAT
repository's GAIR_FAT.py), each deliberate:

1. Labels stay paired with their own examples throughout; GAIR_FAT.py's early stop removes
   stopped samples from the batch and then compares later predictions with the labels of the
   full batch, and its loss pairs labels with reordered logits.
2. ``omega``, the std of the Gaussian noise added to every step (the kernel's ``step_noise``),
   defaults to 0 here and in GAIR_FAT.py; FAT.py's default is 0.001 (0.26/255 beside a 2/255
   step): ``omega: "0.001/1"``.
3. Defaults: ``tau`` 0 and no schedule, GAIR's ``lam`` -1 for GAIR-FAT too. The authors' scripts
   grow tau over training (FAT.py: 0, 1, 2 up to 1-based epochs 50 / 90 / after; GAIR_FAT.py: 0, 3, 6
   up to 40 / 70 / after, with lambda 0): ``tau_schedule: [[50, 1], [90, 2]]`` and
   ``[[40, 3], [70, 6]]`` (0-based epochs), and ``lam``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .base import CompatParams, Method, Objective, StepOutput, size
from .gair import GairParams, GairWeighting, weighted_ce


@dataclass(kw_only=True)
class FatParams:
    """Friendly AT: each sample's attack stops at its (tau + 1)-th misclassified iterate (FAT's PGD-K-tau)."""

    tau: int = 0  #: misclassified iterates a sample may still step on from
    tau_schedule: list = field(default_factory=list)  #: [[epoch, tau], ...]: tau from that 0-based epoch on
    omega: float = size(0.0)  #: std of the Gaussian noise added to every step, [0, 1] units (FAT.py: 0.001)


def _tau(p: FatParams, epoch: int) -> int:
    """FAT's tau at 0-based ``epoch`` (``p``: anything with the :class:`FatParams` keys)."""
    tau = p.tau
    for start, value in sorted(p.tau_schedule):
        if epoch >= start:
            tau = value
    return tau


def _check_fat(p: FatParams) -> None:
    if p.tau < 0 or any(not (isinstance(s, (list, tuple)) and len(s) == 2 and s[1] >= 0) for s in p.tau_schedule):
        raise ConfigError("method.tau must be >= 0 and method.tau_schedule a list of [epoch, tau] pairs.")


@dataclass(eq=False, kw_only=True)
class _Reweighted(Method):
    """Shared step: attack (optionally early-stopped), then a (optionally GAIR-weighted) loss."""

    needs_epoch = True
    log_keys = ("train_kappa", "gair_lambda", "fat_tau")
    use_gair: ClassVar[bool] = False
    use_fat: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        authors = getattr(self, "compat", "none") == "authors"
        if self.use_gair:
            self.check_compat()
            self.gair = GairWeighting(self, authors=authors)
            if (self.lam_schedule == "linear" or authors) and self.epochs is None:
                raise ConfigError(f"the {'authors' if authors else 'linear'} lambda schedule runs over the whole "
                                  f"training: pass epochs=N.")
        else:
            self.gair = None
        if self.use_fat:
            _check_fat(self)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        tau: Optional[int] = _tau(self, self.epoch) if self.use_fat else None
        noise = {"step_noise": self.omega} if self.use_fat else {}
        adv = self.attack_batch(model, x, y, final_check=False, early_stop_tau=tau, **noise)
        stats = {"kappa": adv.kappa.sum()}
        weights = None
        if self.gair is not None and self.gair.active(self.epoch):
            weights = self.gair.weights(adv.kappa, self.steps, self.epoch, self.epochs)
            stats["gair_weight_sq"] = (weights * weights).sum()

        def objective(net: nn.Module) -> StepOutput:
            logits = net(adv.x_adv)
            return StepOutput(weighted_ce(logits, y, weights), logits, dict(stats))
        return objective

    def end_epoch(self) -> dict:
        row = {}
        if self.epoch is None:  # no epoch started: nothing scheduled to report
            return row
        if self.gair is not None:
            row["gair_lambda"] = self.gair.lam(self.epoch, self.epochs)
        if self.use_fat:
            row["fat_tau"] = _tau(self, self.epoch)
        return row


@dataclass(eq=False, kw_only=True)
class GAIRAT(_Reweighted, GairParams, CompatParams):
    """Zhang et al. 2021: PGD-AT with each sample's loss weighted by its geometry (kappa).

    Args: the attack's (see :class:`~iaat.methods.base.Method`) and the GAIR keys of
    :class:`~iaat.methods.gair.GairParams`: ``weight_fn``, ``lam``, ``lam_schedule``, ``lam_max``,
    ``lam_milestones``, ``lam_drops``, ``burn_in_epochs``; ``compat="authors"`` computes as GAIRAT.py (weights
    from their 1-based ``begin_epoch``, default 60, and their ``adjust_Lambda``; see :mod:`iaat.methods.gair`).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.GAIRAT(eps=8 / 255, lam=-1.0, burn_in_epochs=0)
        >>> method.start_epoch(0)
        >>> loss = method.loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "gairat"
    use_gair = True


@dataclass(eq=False, kw_only=True)
class FAT(_Reweighted, FatParams):
    """Zhang et al. 2020: friendly adversarial training with early-stopped PGD (keys ``tau``, ``tau_schedule``,
    ``omega``).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.FAT(eps=8 / 255, tau=2)
        >>> method.start_epoch(0)
        >>> loss = method.loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "fat"
    use_fat = True


@dataclass(eq=False, kw_only=True)
class GAIRFAT(_Reweighted, GairParams, FatParams, CompatParams):
    """GAIR weights on friendly (early-stopped) adversarial examples: the keys of GAIRAT and FAT.

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.GAIRFAT(eps=8 / 255, tau=2, lam=-1.0)
        >>> method.start_epoch(0)
        >>> loss = method.loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "gair_fat"
    use_gair = True
    use_fat = True
