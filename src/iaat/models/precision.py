"""Models whose weights are not float32, seen by attacks as float32 models."""

from __future__ import annotations

import torch
from torch import nn


class Float32View(nn.Module):
    """``model`` with float32 images in and float32 logits out, its weights kept in their own float type.

    Attacks keep their iterates in float32 (a float16 step of 2/255 loses digits near 1.0), so a
    model kept in float64 or float16 gets its inputs cast on the way in and its logits on the way out;
    gradients flow through both casts.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def float32_view(model: nn.Module) -> nn.Module:
    """``model`` itself when its floating-point weights are float32 (or it has none), else a :class:`Float32View`.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 2).double()
        >>> float32_view(net)(torch.rand(3, 4)).dtype
        torch.float32
        >>> plain = torch.nn.Linear(4, 2)
        >>> float32_view(plain) is plain
        True
    """
    if isinstance(model, Float32View):
        return model
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return model if dtype == torch.float32 else Float32View(model, dtype)
