"""Models whose weights are not float32, seen by attacks as float32 models."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Float32View(nn.Module):
    """``model`` with float32 images in and float32 logits out, its weights kept in their own float type.

    For float64 models: the attack's float32 iterates are cast up on the way in (exactly) and the logits
    down on the way out; gradients flow through both casts.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.training = model.training  # a view: the model's mode, not nn.Module's default (and not set on the model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def float32_view(model: nn.Module) -> nn.Module:
    """``model`` as attacks should see it: itself when its floating-point weights are float32 (or it has none); a
    :class:`Float32View` when they are float64; a float32 copy when they are float16 or bfloat16, since their
    gradients underflow where a sample's logit margin is large (softmax tails below float16's range), which would
    leave confident samples unattacked and overstate robustness. The copy's weights equal the model's exactly;
    its arithmetic is float32.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 2).double()
        >>> float32_view(net)(torch.rand(3, 4)).dtype
        torch.float32
        >>> plain = torch.nn.Linear(4, 2)
        >>> float32_view(plain) is plain
        True
        >>> next(float32_view(torch.nn.Linear(4, 2).half()).parameters()).dtype
        torch.float32
    """
    if isinstance(model, Float32View):
        return model
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        return copy.deepcopy(model).float()
    return model if dtype == torch.float32 else Float32View(model, dtype)
