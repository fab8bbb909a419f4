"""Checks of model sizes shared by the registry and the model classes."""

from __future__ import annotations

import numbers

from ..errors import ConfigError
from ..units import python_scalar


def check_num_classes(num_classes: object) -> None:
    """A whole number >= 2: the models here end in one logit per class, and with one class nothing is learnt
    (``Linear(128, 0)`` builds with no more than a warning)."""
    value = python_scalar(num_classes)  # np.int64(10), torch.tensor(10)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2:
        raise ConfigError(f"num_classes must be a whole number >= 2 (one logit per class), got {num_classes!r}.")
