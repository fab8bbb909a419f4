"""Input normalisation as part of the model, so attacks always work in [0, 1] pixel space."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError


class Normalize(nn.Module):
    """Subtract a per-channel mean and divide by a per-channel std (kept as buffers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = _constants(mean, "mean"), _constants(std, "std")
        if len(mean) != len(std):
            raise ConfigError(f"mean and std need one value per channel each, got {len(mean)} and {len(std)}.")
        if any(v < 0 or v > 1 for v in mean) or any(v <= 0 or v > 1 for v in std):
            raise ConfigError(f"mean {mean} and std {std} must be statistics of [0, 1] images (mean in [0, 1], std "
                              f"in (0, 1]); for statistics of 0-255 pixels divide both by 255.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.mean.shape[1]
        # shapes only (no host sync); a TorchScript trace records the shape as fixed anyway
        if not torch.jit.is_tracing() and (x.ndim != 4 or (channels != 1 and x.shape[1] != channels)):
            raise ConfigError(f"the model normalises {channels}-channel images (B, {channels}, H, W), got input of "
                              f"shape {tuple(x.shape)}.")
        return (x - self.mean) / self.std


def _constants(values: Sequence[float], name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of numbers, one per channel, got {values!r}.") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name} must hold one finite number per channel, got {values!r}.")
    return out


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
