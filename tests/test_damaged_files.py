"""Damaged files beside a run or an evaluation: a clear message naming the file (or a warning and the rest of the
work done), never a traceback from numpy or zipfile."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import run_in_process

pytest.importorskip("sklearn", reason="the runs here train on scikit-learn's bundled digits")
pytestmark = pytest.mark.slow  # each test reads back a run trained end to end

EVAL = ["--n", "32", "--attack", "pgd:steps=2", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def iaat_run(tmp_path_factory) -> Path:
    """A one-epoch IAAT run on digits (radius files, so that the report draws its image grids); read-only."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    res = run_in_process("train", "--method", "iaat", "--dataset", "digits", "--model", "small_cnn",
                         "--set", "model.width=8", "--set", "data.val_size=100", "--set", "data.train_subset=300",
                         "--set", "attack.steps=2", "--epochs", "1", "--no-progress", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _damage(path: Path, how: str, good: bytes) -> None:
    path.write_bytes({"truncated": good[:len(good) // 2], "empty": b"", "junk": b"junk\n"}[how])


@pytest.mark.parametrize("how", ["truncated", "empty", "junk"])
def test_a_damaged_evaluation_state_is_an_error_naming_it(iaat_run, tmp_path, how):
    """A cut evaluation's state file damaged (a copy cut short, a full disk): refused like a state that cannot be
    read, with the file named and how to start over, exit code 2."""
    from iaat.evaluation.state import EvalState

    out = tmp_path / "e.json"
    state = out.with_name(out.name + ".state.npz")
    saved = EvalState(state, {"evaluation": 1})
    saved.arrays["clean_ok"] = np.ones(32, dtype=bool)
    saved.save()
    _damage(state, how, state.read_bytes())
    res = run_in_process("eval", str(iaat_run), *EVAL, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert f"cannot read the evaluation state {state}" in res.stderr and "delete it to start over" in res.stderr
    assert "allow_pickle" not in res.stderr  # numpy's hint to load pickles is no advice for a state file
    state.unlink()  # as the message says: the evaluation then starts over
    assert run_in_process("eval", str(iaat_run), *EVAL, "--out", str(out)).returncode == 0


def test_the_evaluation_state_is_written_atomically_and_fsynced(tmp_path, monkeypatch):
    """A state written whole or not at all: a failed write is an error naming the file, and the state saved before
    stays readable."""
    import os

    from iaat.errors import OutputError
    from iaat.evaluation.state import EvalState

    path = tmp_path / "e.json.state.npz"
    state = EvalState(path, {"evaluation": 1})
    state.finish_batch("pgd", 0, 1.0)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    state.finish_batch("pgd", 1, 1.0)
    assert synced and EvalState(path, {"evaluation": 1}).done_batches("pgd") == 2

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError, match=str(path)):
        state.finish_batch("pgd", 2, 1.0)
    assert EvalState(path, {"evaluation": 1}).done_batches("pgd") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("how", ["truncated", "junk"])
def test_report_goes_on_without_a_damaged_data_split(iaat_run, tmp_path, how):
    """The data split is what the image grids need (to find the training images): without a readable one the
    report warns, naming the file, and writes everything else."""
    run = _copy(iaat_run, tmp_path)
    split = run / "data_split.npz"
    _damage(split, how, split.read_bytes())
    res = run_in_process("report", str(run), "--out", str(tmp_path / "report"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert f"iaat: warning: no image grids for run: cannot read the data split {split}" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert (tmp_path / "report" / "report.md").is_file()
    assert any((tmp_path / "report").glob("fig7_radius_over_epochs_*.png"))  # the radius figures need no split


@pytest.mark.parametrize("command", ["eval", "export", "report", "resume", "resume_longer"])
def test_a_bad_value_in_a_runs_config_names_the_file(iaat_run, tmp_path, command):
    """A run's config.yaml edited by hand to a bad value: every command reading the run names the file and line."""
    run = _copy(iaat_run, tmp_path)
    config = run / "config.yaml"
    text = config.read_text()
    assert "\n  epochs: 1\n" in text
    config.write_text(text.replace("\n  epochs: 1\n", "\n  epochs: four\n"))
    args = {"eval": ["eval", str(run), *EVAL, "--out", str(tmp_path / "e.json")],
            "export": ["export", str(run), "--out", str(tmp_path / "model.safetensors")],
            "report": ["report", str(run), "--out", str(tmp_path / "report")],
            "resume": ["train", "--out", str(run), "--resume", "--no-progress"],
            # --epochs replaces the bad value; the check of what the resume changes reads the file as it is
            "resume_longer": ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]}[command]
    res = run_in_process(*args)
    assert res.returncode == 2, res.stderr
    line = text.splitlines().index("  epochs: 1") + 1
    assert f"iaat: error: {config}, line {line}: train.epochs must be an integer, got 'four'." in res.stderr


def test_a_resume_whose_training_images_differ_from_the_runs_split_is_refused(iaat_run, tmp_path):
    """The split drawn now against data_split.npz: another order of the training images (another copy of the data,
    another torch drawing it) would give each stored radius to another image."""
    from test_cli import snapshot

    run = _copy(iaat_run, tmp_path)
    with np.load(run / "data_split.npz") as split:
        train, val = split["train_indices"], split["val_indices"]
    np.savez(run / "data_split.npz", train_indices=train[::-1], val_indices=val)
    before = snapshot(run)
    res = run_in_process("train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress")
    assert res.returncode == 2 and "the training images drawn now differ from those in" in res.stderr, res.stderr
    assert snapshot(run) == before
