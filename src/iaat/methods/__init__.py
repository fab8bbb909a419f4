"""Training methods: how a batch becomes a loss. Each is a small plug-in of the trainer and of any training loop."""

from .base import Method, StepOutput
from .iaat import IAAT
from .cat import CAT
from .mail import MAIL
from .mart import MART, mart_loss
from .mma import MMA
from .registry import METHODS, method_class
from .reweighted import FAT, GAIRAT, GAIRFAT
from .standard import PGDAT, Clean
from .trades import TRADES, MixupAT

__all__ = ["Method", "StepOutput", "METHODS", "method_class", "Clean", "PGDAT", "IAAT", "GAIRAT", "FAT", "GAIRFAT",
           "TRADES", "MixupAT", "MART", "mart_loss", "MMA", "CAT", "MAIL"]
