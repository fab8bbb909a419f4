"""Resumable evaluation state: per-sample results of every finished batch, saved atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError, OutputError


class EvalState:
    """Per-sample arrays plus a JSON ``meta`` dict, kept in one ``.npz`` file.

    ``meta["fingerprint"]`` says which evaluation the state belongs to; loading a state written
    for another evaluation is refused rather than mixed in.
    """

    def __init__(self, path: Optional[Path], fingerprint: dict):
        self.path = Path(path) if path is not None else None
        self.arrays: dict[str, np.ndarray] = {}
        self.meta: dict = {"fingerprint": fingerprint, "progress": {}, "seconds": {}, "corruptions": {}}
        self.resumed = False
        if self.path is not None and self.path.is_file():
            self._load(fingerprint)

    @classmethod
    def read(cls, path: Path) -> "EvalState":
        """The state saved at ``path``, whichever evaluation wrote it: for reading what a cut evaluation finished."""
        state = cls(None, {})
        state.path, (state.meta, state.arrays), state.resumed = Path(path), _read(Path(path)), True
        return state

    def _load(self, fingerprint: dict) -> None:
        meta, arrays = _read(self.path)
        if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise ConfigError(f"{self.path} holds the state of a different evaluation (other checkpoint, images, seed "
                              f"or attacks); delete it or write this evaluation elsewhere with --out.")
        self.meta, self.arrays, self.resumed = meta, arrays, True

    def done_batches(self, label: str) -> int:
        return int(self.meta["progress"].get(label, 0))

    def finish_batch(self, label: str, batch: int, seconds: float) -> None:
        self.meta["progress"][label] = batch + 1
        self.meta["seconds"][label] = self.meta["seconds"].get(label, 0.0) + seconds
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, __meta__=np.array(json.dumps(self.meta)), **self.arrays)
            os.replace(tmp, self.path)
        except OSError as e:
            raise OutputError(f"cannot write the evaluation state {self.path}: {e.strerror or e}.") from None

    def remove(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["__meta__"])), {k: f[k] for k in f.files if k != "__meta__"}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read the evaluation state {path} ({e}); delete it to start over.") from None
