"""A user's own code named as ``module:attribute`` (``--model mypkg.nets:wrn``, ``method.name: mypkg.at:MyMethod``)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .errors import ConfigError


def resolve(spec: str, what: str = "--model", example: str = "mypkg.nets:resnet18") -> Any:
    """The object ``module:attribute`` names, the module imported from the current folder or the path; ``what``
    and ``example`` word the errors (the flag or key, and a spec to copy).

    Example:
        >>> resolve("math:sqrt")(16.0)
        4.0
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r}: write module:attribute, e.g. {example}.")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current folder, as for `python -m`
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ConfigError(f"{what} {spec}: cannot import {module_name} ({e}); run from the folder that holds it or "
                          f"put it on PYTHONPATH.") from None
    except AttributeError:
        raise ConfigError(f"{what} {spec}: {module_name} has no {attr}.") from None
