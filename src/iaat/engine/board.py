"""TensorBoard event files of a run (``train.tensorboard``): epoch metrics, the learning rate, and a
histogram per epoch of each per-sample array a method keeps (IAAT's radii). An optional extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

FOLDER = "tensorboard"
#: metrics.jsonl keys whose first word becomes a TensorBoard group ("train_loss" → "train/loss")
_GROUPS = ("train", "val", "radius", "gair", "fat")


def require_tensorboard() -> Any:
    """TensorBoard's ``SummaryWriter``, or a clear error when the optional extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard needs the optional extra: pip install 'iaat[tensorboard]' (or set "
                          "train.tensorboard=false).") from None
    return SummaryWriter


def tag(key: str) -> str:
    """A metrics.jsonl key as a TensorBoard tag, e.g. ``train_loss`` → ``train/loss``, ``lr`` → ``lr``."""
    group, sep, rest = key.partition("_")
    return f"{group}/{rest}" if sep and group in _GROUPS else key


class Board:
    """Writes ``RUN/tensorboard``; ``purge_step`` drops what an interrupted run wrote from that epoch on."""

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None) -> None:
        self.writer = require_tensorboard()(log_dir=str(Path(run_dir) / FOLDER), purge_step=purge_step)

    def epoch(self, epoch: int, row: dict, arrays: dict) -> None:
        """One epoch (1-based): every number of its metrics row, and a histogram of each per-sample array
        (sizes in [0, 1] units, like metrics.jsonl)."""
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, epoch)
        for name, values in arrays.items():
            self.writer.add_histogram(name, values, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
