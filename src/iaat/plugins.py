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
    module_name, attr = check_spec(spec, what, example)
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current folder, as for `python -m`
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and missing != module_name and not module_name.startswith(missing + "."):
            raise ConfigError(f"{what} {spec}: importing {module_name} failed: it needs {missing}, which is not "
                              f"installed ({e}).") from None
        raise ConfigError(f"{what} {spec}: cannot import {module_name} ({e}); run from the folder that holds it or "
                          f"put it on PYTHONPATH.") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what} {spec}: {module_name} has no {attr}.") from None


def check_spec(spec: str, what: str = "--model", example: str = "mypkg.nets:resnet18") -> tuple[str, str]:
    """``(module, attribute)`` of ``module:attribute``, without importing; a script's own ``__main__`` is refused,
    since a run names its code to rebuild it later (resume, evaluation, export) from another process.

    >>> check_spec("mypkg.nets:wrn")
    ('mypkg.nets', 'wrn')
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r}: write module:attribute, e.g. {example}.")
    if module_name == "__main__":
        raise ConfigError(f"{what} {spec}: a script's own code cannot be imported again by the processes that resume, "
                          f"evaluate or export the run; put {attr} in a module (e.g. mynets.py beside the script) and "
                          f"name it as mynets:{attr}.")
    return module_name, attr
