"""The one conversion of stored images into model inputs: uint8 pixels to float32 in [0, 1]."""

from __future__ import annotations

from typing import Optional, Union

import torch


def to_unit(x: torch.Tensor, device: Optional[Union[str, torch.device]] = None,
            non_blocking: bool = False) -> torch.Tensor:
    """uint8 images (any shape) as float32 in [0, 1] on ``device`` (moved before converting: 4x less to copy).

    Images that are float already (in [0, 1]) are only moved, never changed in place.

    Example:
        >>> to_unit(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
    """
    if x.is_floating_point():
        return x.to(device if device is not None else x.device, torch.float32, non_blocking=non_blocking)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_unit converts uint8 pixels (or passes float images on), got {x.dtype}")
    if device is not None:
        x = x.to(device, non_blocking=non_blocking)
    return x.float().div_(255.0)
