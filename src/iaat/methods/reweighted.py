"""GAIRAT, friendly adversarial training (FAT) and their combination GAIR-FAT.

All three craft their training examples with the one PGD kernel; kappa comes from that
same attack (never a second attack), and FAT's early stopping is the kernel's per-sample
``early_stop_tau`` mask (no loop over samples). Labels stay paired with their own
examples throughout (the official GAIR-FAT code pairs labels with reordered logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method, StepOutput
from .gair import GairParams, GairWeighting, weighted_ce


@dataclass
class FatParams:
    """Friendly AT: stop each sample tau steps after it is first misclassified."""

    tau: int = 0  #: steps a sample keeps moving after its first misclassification
    tau_schedule: list = field(default_factory=list)  #: [[epoch, tau], ...]: tau from that 0-based epoch on


def _tau(p: FatParams, epoch: int) -> int:
    tau = p.tau
    for start, value in sorted(p.tau_schedule):
        if epoch >= start:
            tau = value
    return tau


def _check_fat(p: FatParams) -> None:
    if p.tau < 0 or any(not (isinstance(s, (list, tuple)) and len(s) == 2 and s[1] >= 0) for s in p.tau_schedule):
        raise ConfigError("method.tau must be >= 0 and method.tau_schedule a list of [epoch, tau] pairs.")


class _Reweighted(Method):
    """Shared step: attack (optionally early-stopped), then a (optionally GAIR-weighted) loss."""

    use_gair = False
    use_fat = False

    def __init__(self, params: Any, attack, num_train: int, num_classes: int, device: torch.device) -> None:
        super().__init__(params, attack, num_train, num_classes, device)
        self.gair = GairWeighting(params) if self.use_gair else None

    @classmethod
    def parse_params(cls, raw: dict) -> Any:
        params = super().parse_params(raw)
        if cls.use_gair:
            GairWeighting.check(params)
        if cls.use_fat:
            _check_fat(params)
        return params

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOutput:
        tau: Optional[int] = _tau(self.params, self.epoch) if self.use_fat else None
        adv = self.attack_batch(model, x, y, final_check=False, early_stop_tau=tau)
        logits = model(adv.x_adv)
        stats = {"kappa": adv.kappa.sum()}
        weights = None
        if self.gair is not None and self.gair.active(self.epoch):
            weights = self.gair.weights(adv.kappa, self.attack.steps, self.epoch, self.total_epochs)
            stats["gair_weight_sq"] = (weights * weights).sum()
        return StepOutput(weighted_ce(logits, y, weights), logits, stats)

    def end_epoch(self, epoch: int, run_dir) -> dict:
        row = {}
        if self.gair is not None:
            row["gair_lambda"] = self.gair.lam(epoch, self.total_epochs)
        if self.use_fat:
            row["fat_tau"] = _tau(self.params, epoch)
        return row


class GAIRAT(_Reweighted):
    """Zhang et al. 2021: PGD-AT with each sample's loss weighted by its geometry (kappa)."""

    name = "gairat"
    use_gair = True

    @dataclass
    class Params(GairParams):
        pass


class FAT(_Reweighted):
    """Zhang et al. 2020: friendly adversarial training with early-stopped PGD."""

    name = "fat"
    use_fat = True

    @dataclass
    class Params(FatParams):
        pass


class GAIRFAT(_Reweighted):
    """GAIR weights on friendly (early-stopped) adversarial examples."""

    name = "gair_fat"
    use_gair = True
    use_fat = True

    @dataclass
    class Params(GairParams, FatParams):
        pass
