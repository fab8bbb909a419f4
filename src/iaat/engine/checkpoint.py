"""Atomic, checksummed checkpoints that load without running code.

A checkpoint is written to a temporary file in the same folder, fsynced, and renamed
over its final name, so a crash leaves either the old file or the new one, never half
of one. A ``.sha256`` file beside it lets a reader tell a damaged file from a good one.
Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, so a crafted pickle cannot execute anything.
"""

from __future__ import annotations

import contextlib
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

from ..errors import CheckpointError, OutputError, first_line

FORMAT = "iaat-checkpoint"
VERSION = 1
_EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")
#: The mid-epoch checkpoint written when training stops on SIGINT/SIGTERM.
INTERRUPT_FILE = "interrupt.pt"
#: Temporary files of :func:`atomic_write_bytes`; one left behind means its writer was killed.
TEMPORARY_FILE = re.compile(r"^\..+\.tmp-\d+$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(path: Union[str, Path], error: OSError) -> OutputError:
    """The user-facing error for a failed write of ``path`` (disk full, read-only folder, ...)."""
    reason = error.strerror or str(error)
    return OutputError(f"could not write {path}: {reason} (errno {error.errno}). Is the disk full or the folder "
                       f"read-only? Files written before this one, such as earlier checkpoints, are intact.")


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync folder).

    Raises:
        OutputError: when the file cannot be written (``path`` is then unchanged).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise write_failure(path, e) from None
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: Union[str, Path], payload: dict) -> None:
    """Serialise ``payload`` and write it atomically with a sha256 sidecar."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    data = buffer.getvalue()
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    # A name written more than once (interrupt.pt): drop the old checksum first, so that a crash between the two
    # renames leaves a new file without a checksum rather than a good file that fails its stale checksum.
    try:
        sidecar.unlink(missing_ok=True)
    except OSError as e:
        raise write_failure(sidecar, e) from None
    atomic_write_bytes(path, data)
    try:
        atomic_write_bytes(sidecar, (hashlib.sha256(data).hexdigest() + "\n").encode())
    except BaseException:  # a full disk, a second Ctrl-C: the caller takes back what it recorded for this file,
        with contextlib.suppress(OSError):  # so the file must go too, or a resume would continue from it
            path.unlink(missing_ok=True)
        raise


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
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes zip archives (since PyTorch 1.6)
        raise CheckpointError(f"{path} is not a checkpoint: {what_it_is(data)}.")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's own hint here is to switch the safety off: not repeated
        raise CheckpointError(f"refusing to load {path}: it is a PyTorch file holding objects other than tensors "
                              f"and plain data (a pickled model or optimizer object, or something else), which "
                              f"could run code when unpickled. Save a state_dict instead.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({first_line(e)}).") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iaat checkpoint (no '{FORMAT}' marker).")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer iaat (format {obj['version']} > {VERSION}).")
    return obj


def what_it_is(data: bytes) -> str:
    """What a file that is no PyTorch zip archive looks like, in a few words."""
    if data.startswith(b"PK\x03\x04"):
        return "a zip archive cut short or damaged (a truncated checkpoint?)"
    if data[:1] == b"\x80":
        return "a pickle (PyTorch's legacy format or another program's), which iaat does not unpickle"
    if not data:
        return "an empty file"
    try:
        text = data[:2000].decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"a text file (it begins with {first[:40]!r}; a config file?)"


def _numbered_epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return sorted(found, reverse=True)


def epoch_checkpoints(folder: Union[str, Path]) -> list[Path]:
    """Epoch checkpoints in ``folder``, newest first."""
    return [p for _, p in _numbered_epoch_checkpoints(Path(folder))]


def newest_epoch(folder: Union[str, Path]) -> Optional[int]:
    """The number of the newest epoch checkpoint in ``folder`` (by name; None when there is none)."""
    found = _numbered_epoch_checkpoints(Path(folder))
    return found[0][0] if found else None


def checkpoint_path(folder: Union[str, Path], epoch: int) -> Path:
    """Where the checkpoint of epoch ``epoch`` (1-based) lives in ``folder``."""
    return Path(folder) / f"epoch_{epoch:04d}.pt"


def interrupt_path(folder: Union[str, Path]) -> Path:
    """Where the mid-epoch checkpoint of an interrupted run lives in ``folder``."""
    return Path(folder) / INTERRUPT_FILE


def _first_loadable(candidates: list[Path], map_location: Any, preloaded: dict,
                    skipped: list[str]) -> tuple[Optional[Path], Optional[dict]]:
    """The first of ``candidates`` that loads; the errors of those that do not are appended to ``skipped``."""
    for path in candidates:
        try:
            return path, preloaded[path] if path in preloaded else load_checkpoint(path, map_location)
        except CheckpointError as e:
            skipped.append(str(e))
    return None, None


def _warn_skipped(skipped: list[str], used: Optional[Path], folder: Path) -> None:
    if not skipped:
        return
    then = f"using {used}, the newest valid checkpoint" if used else f"no valid checkpoint is left in {folder}"
    for reason in skipped:
        warnings.warn(f"skipping damaged checkpoint: {reason} Now {then}.", stacklevel=3)


def latest_valid(folder: Union[str, Path], map_location: Any = "cpu") -> tuple[Optional[Path], Optional[dict]]:
    """The newest epoch checkpoint in ``folder`` that loads.

    Each damaged one skipped gives a warning naming it and the checkpoint used instead.
    Returns ``(None, None)`` when none loads.
    """
    folder = Path(folder)
    skipped: list[str] = []
    path, ckpt = _first_loadable(epoch_checkpoints(folder), map_location, {}, skipped)
    _warn_skipped(skipped, path, folder)
    return path, ckpt


def resume_point(folder: Union[str, Path], map_location: Any = "cpu") -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint a resumed run continues from: the newest valid state in ``folder``.

    That is ``interrupt.pt`` (a mid-epoch state) when it loads and is newer than every epoch
    checkpoint that loads, else the newest valid epoch checkpoint; damaged files are skipped
    with a warning naming them and the file used. Returns ``(None, None)`` when the folder
    holds no checkpoint at all.

    Raises:
        CheckpointError: when checkpoints exist but none loads (starting over would discard them).
    """
    folder = Path(folder)
    skipped: list[str] = []
    # (completed epochs, steps into the next one, path): an interrupt at (E, S > 0) is newer than epoch_E.pt.
    ranked = [(epoch, 0, path) for epoch, path in _numbered_epoch_checkpoints(folder)]
    preloaded: dict = {}
    ipath = interrupt_path(folder)
    if ipath.is_file():
        try:
            state = load_checkpoint(ipath, map_location)
            preloaded[ipath] = state
            ranked.append((int(state.get("epoch", 0)), int(state.get("step", 0)), ipath))
        except CheckpointError as e:
            skipped.append(str(e))
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    path, ckpt = _first_loadable([p for _, _, p in ranked], map_location, preloaded, skipped)
    if path is None and skipped:
        raise CheckpointError(f"no checkpoint in {folder} loads, so the run cannot be resumed: {' '.join(skipped)} "
                              f"Nothing was changed; move the damaged files away to restart from epoch 1.")
    _warn_skipped(skipped, path, folder)
    return path, ckpt


def remove_checkpoint(path: Union[str, Path]) -> None:
    """Delete a checkpoint and its sha256 sidecar (missing files are fine)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def remove_temporaries(folder: Union[str, Path]) -> None:
    """Delete temporary files that a killed :func:`atomic_write_bytes` left in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMPORARY_FILE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def prune(folder: Union[str, Path], keep: int) -> None:
    """Delete all but the ``keep`` newest epoch checkpoints."""
    for path in epoch_checkpoints(folder)[keep:]:
        remove_checkpoint(path)
