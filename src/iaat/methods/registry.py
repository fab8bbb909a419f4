"""Methods by name."""

from __future__ import annotations

import difflib
from typing import Any

import torch

from ..errors import ConfigError
from .base import AttackSettings, Method
from .iaat import IAAT
from .reweighted import FAT, GAIRAT, GAIRFAT
from .standard import PGDAT, Clean
from .trades import TRADES, MixupAT

METHODS: dict[str, type[Method]] = {m.name: m for m in (Clean, PGDAT, IAAT, GAIRAT, FAT, GAIRFAT, TRADES, MixupAT)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'.{hint} Known: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def build_method(name: str, raw_params: dict, attack: AttackSettings, num_train: int, num_classes: int,
                 device: torch.device) -> Method:
    cls = method_class(name)
    params: Any = cls.parse_params(raw_params)
    return cls(params, attack, num_train, num_classes, device)
