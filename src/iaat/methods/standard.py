"""Clean training and PGD adversarial training (Madry et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, Objective, StepOutput
from .gair import weighted_ce


@dataclass(eq=False, kw_only=True)
class Clean(Method):
    """Standard training on unperturbed images (the attack settings are ignored).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> loss = iaat.Clean().loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "clean"

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        def objective(net: nn.Module) -> StepOutput:
            logits = net(x)
            return StepOutput(F.cross_entropy(logits, y), logits)
        return objective


@dataclass(eq=False, kw_only=True)
class PGDAT(Method):
    """Madry et al.: train on PGD(x, y, eps) with one fixed eps for every sample.

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.PGDAT(eps=8 / 255, step_size=2 / 255, steps=10)
        >>> loss = method.loss(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    """

    name = "pgd_at"

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> Objective:
        x_adv = self.attack_batch(model, x, y, final_check=False).x_adv

        def objective(net: nn.Module) -> StepOutput:
            logits = net(x_adv)
            return StepOutput(weighted_ce(logits, y), logits)
        return objective
