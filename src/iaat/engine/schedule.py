"""Learning-rate schedules as a pure function of training progress (nothing to checkpoint)."""

from __future__ import annotations

import bisect
import math

from ..config import OptimConfig


def lr_at(optim: OptimConfig, progress: float, total_epochs: int) -> float:
    """Learning rate at ``progress`` epochs into training (fractional within an epoch).

    ``step`` multiplies by ``decay`` at each milestone epoch; ``cosine`` anneals to 0 over
    ``total_epochs``; ``constant`` keeps ``lr``. An optional linear warmup (Goyal et al.)
    ramps from 0 over ``warmup_epochs``.
    """
    if optim.schedule == "step":
        lr = optim.lr * optim.decay ** bisect.bisect_right(sorted(optim.milestones), int(progress))
    elif optim.schedule == "cosine":
        lr = optim.lr * 0.5 * (1 + math.cos(math.pi * min(progress / total_epochs, 1.0)))
    else:
        lr = optim.lr
    if optim.warmup_epochs > 0 and progress < optim.warmup_epochs:
        lr *= progress / optim.warmup_epochs
    return lr
