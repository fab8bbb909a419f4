"""Type checks of dataclass fields against their hints: the config sections and the training methods share them.

Kept apart from :mod:`iaat.config` so that the methods can check their own keyword arguments
without importing the config layer (which imports the methods).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Iterable, Union

from .errors import ConfigError
from .units import PixelSize, python_scalar


def did_you_mean(key: str, options: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest option, or an empty string; case is ignored (``IAAT`` finds ``iaat``)."""
    by_lower: dict[str, str] = {}
    for option in options:
        by_lower.setdefault(option.lower(), option)  # the first of options that differ only in case
    close = difflib.get_close_matches(str(key).lower(), list(by_lower), n=1, cutoff=0.6)  # a YAML key may be 1
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""


def check_type(value: Any, hint: Any, where: str) -> Any:
    """Check (and lightly coerce: integral floats to int, numbers to float, NumPy scalars to Python's) one value
    against a type hint."""
    value = python_scalar(value)
    origin = typing.get_origin(hint)
    if origin is Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        if hint == PixelSize or set(args) == {int, float, str}:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ConfigError(f"{where} must be a size like 8 or '8/255', got {value!r}.")
            return value
        inner = [a for a in args if a is not type(None)]
        for hint in inner[:-1]:  # the first alternative that fits; the last one's error otherwise
            try:
                return check_type(value, hint, where)
            except ConfigError:
                pass
        return check_type(value, inner[-1], where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 5e-4 (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return value
    if hint is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}.")
        return value
    return value


def check_keys(values: Iterable[str], names: Iterable[str], section: str) -> None:
    """Every key must be one of ``names``; an unknown one is an error with a "did you mean" hint."""
    names = list(names)
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key '{section}.{key}'.{did_you_mean(key, names)} "
                              f"Valid keys of '{section}': {', '.join(names)}.")


def build_dataclass(cls: type, values: dict, section: str) -> Any:
    """``cls(**values)`` after checking every key and value against the dataclass's fields."""
    hints = typing.get_type_hints(cls)
    check_keys(values, [f.name for f in dataclasses.fields(cls)], section)
    return cls(**{key: check_type(value, hints[key], f"{section}.{key}") for key, value in values.items()})


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its ``default_factory`` where it has one)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def field_docs(cls: type) -> dict:
    """What each field of a dataclass means, from its ``#:`` comments (inline or on the lines above) and from
    the ``Args:`` section of the docstrings of ``cls`` and its bases."""
    import inspect
    import re

    docs: dict = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list = []
        for line in lines:
            comment = re.match(r"\s*#:\s*(.*)$", line)
            field = re.match(r"\s{4}(\w+)\s*:\s*[^=#]+(?:=[^#]*)?(?:#:\s*(.*))?$", line)
            if comment:
                pending.append(comment.group(1))
            elif field:
                text = field.group(2) or " ".join(pending)
                if text:
                    docs[field.group(1)] = text
                pending = []
            else:
                pending = []
        docs.update(_docstring_args(klass.__doc__ or ""))
    return {k: v.replace("``", "") for k, v in docs.items()}


def _docstring_args(doc: str) -> dict:
    """``name: text`` entries of a Google-style ``Args:`` section (``a, b: text`` documents both)."""
    import re

    out: dict = {}
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("Args")), None)
    if start is None:
        return out
    while start + 1 < len(lines) and not lines[start].rstrip().endswith(":"):  # a header over several lines
        start += 1
    names: list = []
    for line in lines[start + 1:]:
        entry = re.match(r"\s{8}([\w, ]+?)(?: \(.*?\))?: (.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                out[n] = entry.group(2)
        elif line.startswith(" " * 12) and names:
            for n in names:
                out[n] += " " + line.strip()
        elif not line.strip() or not line.startswith(" " * 8):
            break
    return out
