"""The method-agnostic trainer: optimiser, schedule, AMP, checkpoints, logging."""

from .checkpoint import load_checkpoint, save_checkpoint
from .trainer import train

__all__ = ["load_checkpoint", "save_checkpoint", "train"]
