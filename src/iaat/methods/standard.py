"""Clean training and PGD adversarial training (Madry et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, StepOutput
from .gair import weighted_ce


class Clean(Method):
    """Standard training on unperturbed images."""

    name = "clean"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), logits)


class PGDAT(Method):
    """Madry et al.: train on PGD(x, y, eps) with one fixed eps for every sample."""

    name = "pgd_at"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOutput:
        adv = self.attack_batch(model, x, y, final_check=False)
        logits = model(adv.x_adv)
        return StepOutput(weighted_ce(logits, y), logits)
