"""Methods by name (the config's ``method.name``)."""

from __future__ import annotations

from ..errors import ConfigError
from ..schema import did_you_mean
from .base import Method
from .iaat import IAAT
from .cat import CAT
from .mail import MAIL
from .mart import MART
from .mma import MMA
from .reweighted import FAT, GAIRAT, GAIRFAT
from .standard import PGDAT, Clean
from .trades import TRADES, MixupAT

METHODS: dict[str, type[Method]] = {m.name: m for m in (Clean, PGDAT, IAAT, GAIRAT, FAT, GAIRFAT, TRADES, MixupAT, MART,
                                             MMA, CAT, MAIL)}


def method_class(name: str) -> type[Method]:
    """The method class registered under ``name``; an unknown name is an error with a "did you mean" hint."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'.{did_you_mean(name, METHODS)} Known: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
