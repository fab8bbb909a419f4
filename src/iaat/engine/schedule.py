"""Learning-rate schedules as a pure function of training progress (nothing to checkpoint)."""

from __future__ import annotations

import bisect
import math
from typing import Optional

from ..config import OptimConfig


def peak_lr(optim: OptimConfig, batch_size: Optional[int] = None) -> float:
    """The schedule's base rate: ``lr``, or ``lr * batch_size / base_batch_size`` with linear scaling."""
    if optim.lr_scaling == "linear":
        if batch_size is None:
            raise ValueError("optim.lr_scaling=linear needs the batch size")
        return optim.lr * batch_size / optim.base_batch_size
    return optim.lr


def lr_at(optim: OptimConfig, progress: float, total_epochs: int, batch_size: Optional[int] = None) -> float:
    """Learning rate at ``progress`` epochs into training (fractional within an epoch).

    ``step`` multiplies by ``decay`` at each milestone epoch (by ``decay[i]`` at milestone i when it is a
    list); ``cosine`` anneals to 0 over
    ``total_epochs``; ``constant`` keeps ``lr``. An optional linear warmup (Goyal et al.)
    ramps from 0 over ``warmup_epochs``. ``batch_size`` (the global batch) matters only with
    ``lr_scaling: linear`` (see :func:`peak_lr`).
    """
    base = peak_lr(optim, batch_size)
    if optim.schedule == "step":
        if isinstance(optim.decay, list):  # one factor per milestone, in the milestones' order
            factor = math.prod(d for m, d in zip(optim.milestones, optim.decay) if m <= int(progress))
        else:
            factor = optim.decay ** bisect.bisect_right(sorted(optim.milestones), int(progress))
        lr = base * factor
    elif optim.schedule == "cosine":
        lr = base * 0.5 * (1 + math.cos(math.pi * min(progress / total_epochs, 1.0)))
    else:
        lr = base
    if optim.warmup_epochs > 0 and progress < optim.warmup_epochs:
        lr *= progress / optim.warmup_epochs
    return lr
