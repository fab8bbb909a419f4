"""Perturbation-size units: one unit inside, converted once where a size enters.

Configs and the CLI write eps and step sizes in *pixel units over 255*: ``8`` means
8/255. A string ``"a/b"`` is an explicit fraction of the [0, 1] pixel range, so the
GAIRAT paper's ``0.031`` is written ``"0.031/1"`` and ``"8/255"`` is 8/255
(:func:`parse_size`). The Python API takes floats in [0, 1] image units, as AutoAttack and
torchattacks do (:func:`check_size`). Every function past those entry points takes and
returns [0, 1] units, and so does every JSON file the project writes; the pixel form
appears only in printed text (:func:`format_size`).
"""

from __future__ import annotations

import math
from typing import Any, Union

from .errors import ConfigError

#: A size as written in a config file or on the command line: pixel units over 255, or "a/b".
PixelSize = Union[int, float, str]

# A bare number below this many pixel units is almost surely a value already in
# [0, 1] units (e.g. 0.031 meant as 8/255), which would silently attack at 0.03/255.
_SMALLEST_PLAUSIBLE_PIXELS = 0.5
#: L2 radii in pixel units are large (0.5 in [0, 1] units is 127.5): below 2 a value in [0, 1] units is meant
_SMALLEST_PLAUSIBLE_L2_PIXELS = 2.0


def parse_size(value: PixelSize, name: str = "eps", *, allow_zero: bool = True, max_unit: float = 1.0) -> float:
    """Convert a size written in pixel units over 255 (or as ``"a/b"``) to [0, 1] units.

    Args:
        value: ``8`` (means 8/255), ``"8"``, ``"8/255"`` or ``"0.031/1"``.
        name: the option's name, used in error messages.
        allow_zero: whether 0 is accepted.
        max_unit: the largest accepted value in [0, 1] units (1.0 for L-inf sizes).

    Raises:
        ConfigError: for negative, non-finite, implausibly small or too large values.
    """
    explicit = False
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number in pixel units over 255 (e.g. 8) or 'a/b', got {value!r}.")
    if isinstance(value, str):
        text = value.strip()
        if "/" in text:
            num, _, den = text.partition("/")
            try:
                numf, denf = float(num), float(den)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not a fraction like '8/255'.") from None
            if denf <= 0:
                raise ConfigError(f"{name}={value!r} has a non-positive denominator.")
            unit = numf / denf
            explicit = True
        else:
            try:
                unit = float(text) / 255.0
            except ValueError:
                raise ConfigError(
                    f"{name}={value!r} is not a size: write pixel units over 255 (8 means 8/255) or 'a/b'."
                ) from None
    elif isinstance(value, (int, float)):
        unit = float(value) / 255.0
    else:
        raise ConfigError(f"{name} must be a number or a string like '8/255', got {type(value).__name__}.")

    if not math.isfinite(unit):
        raise ConfigError(f"{name}={value!r} is not finite.")
    if unit < 0:
        raise ConfigError(f"{name}={value!r} is negative; perturbation sizes must be >= 0.")
    if unit == 0 and not allow_zero:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    smallest = _SMALLEST_PLAUSIBLE_PIXELS if max_unit <= 1.0 else _SMALLEST_PLAUSIBLE_L2_PIXELS
    if not explicit and 0 < unit * 255.0 < smallest:
        raise ConfigError(
            f"{name}={value!r} means {unit * 255:g}/255 in pixel units, which looks like a value already in "
            f"[0, 1] units. Write {unit * 255 * 255:g} (pixel units over 255) or '{value}/1' if you really mean it."
        )
    if unit > max_unit:
        raise ConfigError(
            f"{name}={value!r} is {unit:g} in [0, 1] image units, larger than the {max_unit:g} this option allows; "
            f"sizes are in pixel units over 255 (8 means 8/255)."
        )
    return unit


def format_size(unit: float) -> str:
    """Format a [0, 1]-unit size as pixels over 255, for printed text.

    Example:
        >>> from iaat import format_size
        >>> format_size(8 / 255)
        '8/255'
    """
    return f"{unit * 255:.4g}/255"


#: the radius where none is given: CIFAR-10's L-inf standard (L2 has none that fits every data set)
LINF_EPS = 8 / 255


def default_radius(eps: Any, norm: str, who: str) -> Any:
    """``eps``, or where it is None the L-inf standard 8/255; under L2 a radius must be given.

    Example:
        >>> default_radius(None, "linf", "PGD"), default_radius(0.5, "l2", "PGD")
        (0.03137254901960784, 0.5)
        >>> default_radius(None, "l2", "PGD")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        iaat.errors.ConfigError: PGD under l2 needs eps: the L-inf default 8/255 is a tiny L2 radius ...
    """
    if eps is not None:
        return eps
    if norm == "l2":
        raise ConfigError(f"{who} under l2 needs eps: the L-inf default 8/255 is a tiny L2 radius (CIFAR-10's usual "
                          f"L2 radius is 0.5, i.e. 127.5/255).")
    return LINF_EPS


def _is_linf(norm: str) -> bool:
    return norm == "linf"


def python_scalar(value: Any) -> Any:
    """A NumPy scalar or a one-element 0-d tensor or array as the Python number it holds; anything else as it is.

    >>> import numpy as np
    >>> python_scalar(np.float32(0.5)), python_scalar(np.int64(3)), python_scalar("8/255")
    (0.5, 3, '8/255')
    """
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    return value


def check_size(value: Any, name: str = "eps", *, norm: str = "linf", allow_zero: bool = True) -> float:
    """Check a size passed to the Python API, in [0, 1] image units; returns it as a float.

    Under L-inf a size above 1 is larger than the whole pixel range: almost surely pixel units
    (``eps=8`` meant as 8/255), so it is an error that names the fix. L2 sizes may exceed 1.

    Example:
        >>> from iaat import check_size
        >>> check_size(8 / 255)
        0.03137254901960784
        >>> check_size(8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        iaat.errors.ConfigError: eps=8 is larger than 1, the whole [0, 1] pixel range: ... write eps=8/255.
    """
    value = python_scalar(value)  # np.float32(8 / 255), torch.tensor(8 / 255)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number in [0, 1] image units (e.g. 8/255), got {value!r}.")
    unit = float(value)
    if not math.isfinite(unit) or unit < 0:
        raise ConfigError(f"{name}={value!r} must be a finite size >= 0 in [0, 1] image units.")
    if unit == 0 and not allow_zero:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    if _is_linf(norm) and unit > 1:
        raise ConfigError(f"{name}={value:g} is larger than 1, the whole [0, 1] pixel range: the Python API takes "
                          f"sizes in [0, 1] image units. For {value:g} pixel levels write {name}={value:g}/255.")
    return unit


def check_size_range(name: str, smallest: float, largest: float, norm: str = "linf") -> None:
    """Check an array of sizes, given its smallest and largest value, as :func:`check_size` checks one: finite,
    >= 0, and at most 1 under L-inf (else pixel levels, ``8`` meant as 8/255).

    Example:
        >>> check_size_range("radii", 0.0, 8.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        iaat.errors.ConfigError: radii holds 8, larger than 1, the whole [0, 1] pixel range: ... pass radii/255.
    """
    if not (math.isfinite(smallest) and math.isfinite(largest)) or smallest < 0:
        raise ConfigError(f"{name} must hold finite sizes >= 0 in [0, 1] image units, got values in "
                          f"[{smallest:g}, {largest:g}].")
    if _is_linf(norm) and largest > 1:
        raise ConfigError(f"{name} holds {largest:g}, larger than 1, the whole [0, 1] pixel range: sizes are in "
                          f"[0, 1] image units; for pixel levels pass {name}/255.")
