"""The run folder: config.yaml, metrics.jsonl, checkpoints/, data_split.npz, summary.json (radii/ for IAAT)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..config import Config, dump_yaml
from ..errors import CheckpointError
from .checkpoint import atomic_write_bytes

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
SPLIT = "data_split.npz"


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to reuse a folder that already holds something (without --resume)."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise CheckpointError(f"--out {run_dir} exists and is not a folder.")
        if any(run_dir.iterdir()):
            raise CheckpointError(f"run folder {run_dir} already exists and is not empty; pass --resume to "
                                  f"continue it or choose another --out. Nothing was changed.")


def check_resumable(run_dir: Path) -> None:
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"nothing to resume in {run_dir}: no {CONFIG} there (is it a run folder?).")


def create_run_dir(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG, dump_yaml(cfg).encode())


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep only rows of epochs <= ``last_epoch`` (the ones a resumed checkpoint has seen)."""
    rows = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= last_epoch]
    write_lines(run_dir / METRICS, (json.dumps(r) for r in rows))


def write_lines(path: Path, lines: Iterable[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
