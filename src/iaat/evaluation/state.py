"""Resumable evaluation state: per-sample results of every finished batch, saved atomically."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine.checkpoint import atomic_write_bytes, write_failure
from ..errors import ConfigError, first_line


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
        """Write the state atomically and fsynced: a crash or power cut leaves the previous state, not half of one."""
        if self.path is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(json.dumps(self.meta)), **self.arrays)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_failure(self.path, e) from None
        atomic_write_bytes(self.path, buffer.getvalue())  # OutputError naming the file when it cannot be written

    def remove(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            meta, arrays = json.loads(str(f["__meta__"])), {k: f[k] for k in f.files if k != "__meta__"}
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        return meta, arrays
    # a truncated or empty file (a copy cut short, a full disk) fails in zipfile or numpy, not with an OSError
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"cannot read the evaluation state {path} (damaged? {_reason(e)}); delete it to start "
                          f"over.") from None


def _reason(error: BaseException) -> str:
    """What went wrong, without numpy's hint to load pickles unsafely: a state file never holds any."""
    return first_line(error).split(" If you trust the file")[0]
