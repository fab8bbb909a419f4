"""The CPU thread count a user set through the environment (no torch import: the sweep reads it too)."""

from __future__ import annotations

import os
from typing import Mapping, Optional


def user_thread_count(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The count set in ``OMP_NUM_THREADS`` or else ``MKL_NUM_THREADS`` of ``environ`` (default: this process's
    environment), or ``None`` when neither sets one; such a count overrides iaat's own choice.

    >>> user_thread_count({"MKL_NUM_THREADS": "2"})
    '2'
    >>> user_thread_count({"OMP_NUM_THREADS": ""}) is None
    True
    """
    env = os.environ if environ is None else environ
    return env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS") or None
