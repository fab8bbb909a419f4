"""Input normalisation as part of the model, so attacks always work in [0, 1] pixel space."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Subtract a per-channel mean and divide by a per-channel std (kept as buffers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net(normalize(x))``: the network sees normalised inputs, callers pass [0, 1] images.

    Wrap any classifier (your own, torchvision's, timm's) this way, and attacks, training methods and
    :func:`iaat.evaluate` all work in [0, 1] pixel space, where radii like 8/255 mean what they say.

    Example:
        >>> import iaat, torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        >>> model = iaat.NormalizedModel(net, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
