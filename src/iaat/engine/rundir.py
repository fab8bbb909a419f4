"""The run folder: config.yaml, metrics.jsonl, checkpoints/, data_split.npz, summary.json, and a method's
per-sample arrays (radii/ for IAAT).

Every write either happens atomically or can be rolled back, and a failed write (disk full,
read-only folder) becomes an :class:`~iaat.errors.OutputError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..config import RESUMABLE_KEYS, Config, config_from_dict, dump_yaml, load_yaml, locate
from ..errors import CheckpointError, ConfigError
from .checkpoint import TEMPORARY_FILE, atomic_write_bytes, remove_temporaries, write_failure

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"  #: in checkpoints/: the file a training locks while it writes to its run folder
SUMMARY = "summary.json"
SPLIT = "data_split.npz"


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to reuse a folder that already holds something (without --resume).

    Temporary files of a write that was killed before ``config.yaml`` existed do not count, and neither does a
    start that stopped before its first checkpoint (an error in the first epoch): nothing was trained there, and
    the same command with the setting corrected starts it again.
    """
    try:
        if run_dir.exists():
            if not run_dir.is_dir():
                raise CheckpointError(f"--out {run_dir} exists and is not a folder.")
            if any(not TEMPORARY_FILE.match(p.name) for p in run_dir.iterdir()) and not _never_trained(run_dir):
                raise CheckpointError(f"run folder {run_dir} already exists and is not empty; pass --resume "
                                      f"(resume=True) to continue it or choose another --out. Nothing was changed.")
    except OSError as e:
        raise CheckpointError(f"cannot use --out {run_dir}: {e.strerror or e}.") from None


def _never_trained(run_dir: Path) -> bool:
    """Only what a start writes before its first checkpoint: config.yaml, the data split, an empty checkpoints/
    (which a start makes right after config.yaml: a folder of a config.yaml alone is a user's file, not a start)."""
    names = {p.name for p in run_dir.iterdir() if not TEMPORARY_FILE.match(p.name)}
    checkpoints = run_dir / CHECKPOINTS
    return names <= {CONFIG, SPLIT, CHECKPOINTS} and checkpoints.is_dir() and all(
        TEMPORARY_FILE.match(p.name) or p.name == LOCK for p in checkpoints.iterdir())


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold a lock on ``run_dir`` (made where it is new) while a training writes to it; a second training of the
    same folder is refused. An advisory ``flock`` of ``checkpoints/.lock``, which the system releases when the
    process ends however it ends; a file opened for writing, as NFS's emulation of ``flock`` needs. Where the
    system or the file system has no such locks, the training runs without one."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is None:
        yield
        return
    _mkdir(run_dir / CHECKPOINTS, parents=True)
    path = run_dir / CHECKPOINTS / LOCK
    try:
        handle = open(path, "a")
    except OSError as e:
        raise write_failure(path, e) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"another training is writing to {run_dir} (an iaat train, or a sweep training "
                                  f"it); wait for it to end or stop it first. Nothing was changed.") from None
        except OSError:  # a file system without flock (some cluster mounts): no lock, as before locks
            pass
        yield


def check_resumable(run_dir: Path) -> None:
    """Refuse ``--resume`` where there is no run folder."""
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"nothing to resume in {run_dir}: no {CONFIG} there (is it a run folder?).")


def _mkdir(folder: Path, parents: bool = False) -> None:
    try:
        folder.mkdir(parents=parents, exist_ok=True)
    except OSError as e:
        raise write_failure(folder, e) from None


def create_run_dir(run_dir: Path, cfg: Config) -> None:
    """Create the run folder with its config; config.yaml comes first so that a killed start can be resumed."""
    _mkdir(run_dir, parents=True)
    remove_temporaries(run_dir)
    write_config(run_dir, cfg)
    _mkdir(run_dir / CHECKPOINTS)


def read_config(run_dir: Path) -> dict:
    """The run's ``config.yaml`` as a dict; one without the sections every run writes is refused (read as it is, an
    empty file would be the defaults: another data set and model than the run's)."""
    raw = load_yaml(run_dir / CONFIG)
    if not {"data", "model", "method"} <= set(raw):
        raise CheckpointError(f"{run_dir / CONFIG} is not a run's config (it lacks the data, model or method section"
                              f"{'; the file is empty' if not raw else ''}); restore it, or start a new run.")
    return raw


def run_config(run_dir: Path) -> Config:
    """The checked config of the run folder ``run_dir``: a bad value in its config.yaml is an error naming the file
    (and the line, where the key is written there), not only the key."""
    path = Path(run_dir) / CONFIG
    raw = read_config(Path(run_dir))
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # nothing but the file is read: it is to blame even where locate finds no line
        located = locate(e, path)
        raise (located if located is not e else ConfigError(f"{path}: {e}")) from None


def check_resume_config(run_dir: Path, cfg: Config) -> Optional[str]:
    """Refuse to continue ``run_dir`` with ``cfg`` where it changes more than a resume may (``RESUMABLE_KEYS``: where
    and how it runs, how long); returns a note when the change makes the run differ from one trained with ``cfg``
    from the start (more epochs on a cosine schedule), else None."""
    before, after = run_config(run_dir).to_dict(), cfg.to_dict()
    for section in after:
        for key in sorted(set(after[section]) | set(before.get(section, {}))):
            old, new = before.get(section, {}).get(key), after[section].get(key)
            if (section, key) not in RESUMABLE_KEYS and old != new:
                raise ConfigError(f"cannot change {section}.{key} when resuming ({old!r} in {run_dir / CONFIG}, "
                                  f"asked {new!r}); start a new run in another folder instead.")
    if before["train"]["epochs"] != cfg.train.epochs and cfg.optim.schedule == "cosine":
        return (f"train.epochs {before['train']['epochs']} -> {cfg.train.epochs}: the cosine learning-rate schedule "
                f"now spans {cfg.train.epochs} epochs from here on; the epochs already trained followed the old one, "
                f"so the run differs from one trained for {cfg.train.epochs} epochs from the start.")
    return None


def write_config(run_dir: Path, cfg: Config) -> None:
    """Write ``config.yaml`` (atomically); a resume that changed what it may change (epochs, threads, the data's
    folder, ...) writes it again, so the file always says what the run's last epochs ran with."""
    atomic_write_bytes(run_dir / CONFIG, dump_yaml(cfg).encode())


def prepare_resume(run_dir: Path) -> None:
    """Make a run folder killed at any moment ready to continue: checkpoints/ exists, no stale temporaries."""
    remove_temporaries(run_dir)
    remove_temporaries(run_dir / CHECKPOINTS)
    _mkdir(run_dir / CHECKPOINTS)


def write_split(run_dir: Path, train_indices: np.ndarray, val_indices: np.ndarray) -> None:
    """Which official training images are in the training set (the order of per-sample state) and held out."""
    buffer = io.BytesIO()
    np.savez(buffer, train_indices=train_indices, val_indices=val_indices)
    atomic_write_bytes(run_dir / SPLIT, buffer.getvalue())


def last_epoch(metrics: list) -> int:
    """The last epoch metrics.jsonl's rows (:func:`read_metrics`) record (0 before the first)."""
    return max((int(row.get("epoch", 0)) for row in metrics), default=0)


def read_train_indices(run_dir: Path) -> np.ndarray:
    """The official training-image index of each memory position, from ``data_split.npz``; a missing or damaged
    file is a :class:`CheckpointError` naming it."""
    path = run_dir / SPLIT
    try:
        with np.load(path, allow_pickle=False) as split:
            return split["train_indices"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # missing, truncated, not an .npz
        why = "no such file" if isinstance(e, FileNotFoundError) else "damaged or cut short?"
        raise CheckpointError(f"cannot read the data split {path} ({why}); it says which training images the run "
                              f"trained on.") from None


def write_epoch_arrays(run_dir: Path, epoch: int, arrays: dict) -> None:
    """A method's per-sample arrays after 1-based ``epoch``: ``RUN/<name>/epoch_NNNN.npy`` (e.g. IAAT's radii)."""
    for name, values in arrays.items():
        folder = run_dir / name
        _mkdir(folder)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(values, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(folder / f"epoch_{epoch:04d}.npy", buffer.getvalue())


def metrics_size(run_dir: Path) -> int:
    """The current size of metrics.jsonl in bytes (0 when absent): a point to roll back to."""
    path = run_dir / METRICS
    return path.stat().st_size if path.is_file() else 0


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append one JSON line to metrics.jsonl; on failure the file is cut back to its previous length."""
    path = run_dir / METRICS
    size = metrics_size(run_dir)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        rollback_metrics(run_dir, size)
        raise write_failure(path, e) from None


def rollback_metrics(run_dir: Path, size: int) -> None:
    """Cut metrics.jsonl back to ``size`` bytes (undo appends whose epoch was not checkpointed)."""
    path = run_dir / METRICS
    try:
        if path.is_file() and path.stat().st_size > size:
            os.truncate(path, size)
    except OSError:
        pass  # best effort: a resumed run drops rows newer than its checkpoint anyway


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short by a crash, or damaged otherwise, is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_evaluation(path: Path) -> Optional[dict]:
    """An ``iaat eval`` result (a JSON object with ``clean`` and ``attacks``), or ``None`` for any other file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return None
    return data if isinstance(data, dict) and "clean" in data and "attacks" in data else None


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep only rows of epochs <= ``last_epoch`` (the ones a resumed checkpoint has seen).

    The file is rewritten only when that drops something, so resuming leaves a consistent file untouched.
    """
    path = run_dir / METRICS
    if not path.is_file():
        return
    text = path.read_text(errors="replace")  # damaged bytes: that line is dropped, as read_metrics skips it
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        epoch = row.get("epoch", 0) if isinstance(row, dict) else None
        if isinstance(epoch, (int, float)) and epoch <= last_epoch:  # not a row of an epoch: dropped
            kept.append(json.dumps(row))
    if kept != lines or (text and not text.endswith("\n")):
        write_lines(path, kept)


def replace_metrics_row(run_dir: Path, row: dict) -> None:
    """Put ``row`` in place of the row of its epoch in metrics.jsonl, or among the rows in epoch order where the
    file lost it (atomically)."""
    rows = [r for r in read_metrics(run_dir) if r.get("epoch") != row["epoch"]]
    at = sum(1 for r in rows if isinstance(r.get("epoch"), (int, float)) and r["epoch"] < row["epoch"])
    write_lines(run_dir / METRICS, [json.dumps(r) for r in [*rows[:at], row, *rows[at:]]])


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write ``lines`` to ``path`` atomically, one per line."""
    text = "".join(line + "\n" for line in lines)
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
