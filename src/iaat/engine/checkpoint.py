"""Atomic, checksummed checkpoints that load without running code.

A checkpoint is written to a temporary file in the same folder, fsynced, and renamed
over its final name, so a crash leaves either the old file or the new one, never half
of one. A ``.sha256`` file beside it lets a reader tell a damaged file from a good one.
Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, so a crafted pickle cannot execute anything.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import CheckpointError

FORMAT = "iaat-checkpoint"
VERSION = 1
_EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: Union[str, Path], payload: dict) -> None:
    """Serialise ``payload`` and write it atomically with a sha256 sidecar."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    data = buffer.getvalue()
    path = Path(path)
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), (hashlib.sha256(data).hexdigest() + "\n").encode())


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().strip()
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {path} is damaged: its sha256 does not match {sidecar.name} "
                                  f"(truncated or modified file).")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain data, "
                              f"which could run code when unpickled ({str(e).splitlines()[0][:200]}).") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or not a PyTorch checkpoint "
                              f"({str(e).splitlines()[0][:200]}).") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iaat checkpoint (no '{FORMAT}' marker).")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer iaat (format {obj['version']} > {VERSION}).")
    return obj


def epoch_checkpoints(folder: Union[str, Path]) -> list[Path]:
    """Epoch checkpoints in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_path(folder: Union[str, Path], epoch: int) -> Path:
    return Path(folder) / f"epoch_{epoch:04d}.pt"


def latest_valid(folder: Union[str, Path], map_location: Any = "cpu") -> tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint in ``folder`` that loads, warning about each damaged one skipped."""
    for path in epoch_checkpoints(folder):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
    return None, None


def prune(folder: Union[str, Path], keep: int) -> None:
    """Delete all but the ``keep`` newest epoch checkpoints."""
    for path in epoch_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
