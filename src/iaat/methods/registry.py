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
    """The method class registered under ``name``, or a user's own named ``module:Class`` (a :class:`Method`
    subclass, imported from the current folder or the path); an unknown name is an error with a "did you mean"
    hint."""
    if ":" in name:
        from ..plugins import resolve

        cls = resolve(name, "method.name", "mypkg.methods:MyMethod")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method.name {name}: {cls!r} is not a subclass of iaat.Method.")
        return cls
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'.{did_you_mean(name, METHODS)} Known: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
