"""Evaluation: attacks, the full protocol with sweeps, corruptions and sanity checks.

Submodules are imported on first use, so that the command line can read the protocol names
(:mod:`.presets`) without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"AttackSpec": "attacks", "evaluate": "api", "accuracy": "robustness", "parse_attack": "attacks",
            "build_plan": "protocol", "run_evaluation": "protocol", "EvalPlan": "protocol"}

__all__ = sorted(_EXPORTS)


#: Subpackages reachable as attributes (``iaat.evaluation.corruptions.mce``) without importing them first.
_SUBPACKAGES = ("corruptions",)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
