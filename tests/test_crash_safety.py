"""Crash safety: repeated SIGKILL, SIGTERM/SIGINT with a mid-epoch checkpoint, damaged checkpoints, NaN, determinism.

Every run here is IAAT past its warmup, so the per-sample epsilon memory has to survive each
crash too. Runs without a kill go through ``iaat.cli.main`` in this process; subprocesses get
this process's thread count so that both give bitwise equal results.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import child_env, ctrl_c_at_step, run_main
from iaat.engine.checkpoint import interrupt_path, resume_point, save_checkpoint
from iaat.errors import CheckpointError
from test_cli import snapshot

EPOCHS = 4
IAAT_ARGS = ["--dataset", "cifar10", "--model", "small_cnn", "--set", "model.width=8", "--set", "data.val_size=100",
             "--set", "attack.steps=2", "--set", "train.eval_steps=3", "--batch-size", "50", "--no-progress",
             "--method", "iaat", "--set", "method.warmup_epochs=1", "--set", "data.download=false", "--epochs", str(EPOCHS)]
STEPS_PER_EPOCH = 8  # 400 training images (500 - 100 held out) in batches of 50


def fresh_args(data_dir: Path, out: Path) -> list[str]:
    return ["train", "--data-dir", str(data_dir), "--out", str(out), *IAAT_ARGS]


def resume_args(out: Path) -> list[str]:
    return ["train", "--out", str(out), "--resume", "--no-progress"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "iaat", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())


def final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / f"epoch_{EPOCHS:04d}.pt", weights_only=True)


def assert_bitwise_equal(reference: Path, run: Path) -> None:
    """Weights, epsilon memory, momentum and every logged number (not timings) as in the uninterrupted run."""
    a, b = final(reference), final(run)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert torch.equal(a["method"]["memory"], b["method"]["memory"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    timing = {"train_seconds", "images_per_second", "seconds"}
    rows_a = [{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (reference / "metrics.jsonl").read_text().splitlines()]
    rows_b = [{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows_a == rows_b
    assert not interrupt_path(run / "checkpoints").exists()


@pytest.fixture(scope="module")
def reference(tiny_cifar, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bitwise."""
    out = tmp_path_factory.mktemp("crash") / "reference"
    code, _, err = run_main(*fresh_args(tiny_cifar, out))
    assert code == 0, err
    return out


def epoch_seconds(run: Path) -> float:
    """A conservative (short) estimate of one post-warmup epoch, evaluation included.

    Capped at 0.8 s (an epoch takes about 0.55 s on an idle 2-core CPU), so that a reference slowed down by
    a busy machine does not stretch the kill delays over several epochs of a faster child.
    """
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return min(0.8, min(r["seconds"] for r in rows[1:]))


# ---- 1. SIGKILL at random moments, several times ----------------------------------------------------------------


def _first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the resumed run printed nothing"
    return proc.stdout.readline()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.01)


def _start_or_resume(data_dir: Path, run: Path) -> tuple[subprocess.Popen, bool]:
    """Resume where config.yaml exists; else (the first start was killed during set-up) start again."""
    if (run / "config.yaml").is_file():
        return start(resume_args(run)), True
    return start(fresh_args(data_dir, run)), False


@pytest.mark.slow
def test_repeated_sigkill_at_random_moments_then_resume_is_bitwise_equal(tiny_cifar, reference, tmp_path):
    rng = random.Random(20240607)
    epoch_s = epoch_seconds(reference)
    run = tmp_path / "killed"
    kills: list[str] = []
    for attempt in range(4):
        proc, resumed = _start_or_resume(tiny_cifar, run)
        if rng.random() < 0.25:
            where = "start"  # from process start: often still importing or loading data
            delay = rng.uniform(0.2, 1.5)
        elif resumed:
            where = _first_line(proc).strip()  # "resuming ... from epoch_000E.pt": set-up is done
            delay = rng.uniform(0.0, epoch_s)
        else:
            where = "config.yaml written"  # a fresh run writes it when set-up is done
            _wait_for(run / "config.yaml", proc)
            delay = rng.uniform(0.0, epoch_s)
        # At most one epoch's worth of time after set-up, so each kill advances the run by at most one epoch
        # whatever the load: the first three kills all find the process running (two or more epochs left).
        time.sleep(delay)
        if proc.poll() is not None:
            assert len(kills) >= 3 and proc.returncode == 0, (f"finished before kill {attempt + 1}", kills)
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills.append(f"{where} + {delay:.2f}s")
    else:
        proc, _ = _start_or_resume(tiny_cifar, run)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert_bitwise_equal(reference, run)
    assert not list((run / "checkpoints").glob(".*.tmp-*")), "temporary files of killed writes were left behind"


# ---- 3. SIGTERM / SIGINT: finish the step, save, exit 128+signal, resume exactly ---------------------------------


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_state_and_resume_is_bitwise_equal(tiny_cifar, reference, tmp_path):
    run = tmp_path / "term"
    proc = start(fresh_args(tiny_cifar, run))
    _wait_for(run / "checkpoints" / "epoch_0001.pt.sha256", proc)
    time.sleep(0.15)  # into epoch 2, which takes several times as long even on an idle machine
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    saved = interrupt_path(run / "checkpoints")
    assert "interrupted (SIGTERM) at epoch 2 step " in err, err
    assert f"state saved to {saved}; resume with iaat train --out {run} --resume" in err
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["epoch"] == 1 and 1 <= ckpt["step"] <= STEPS_PER_EPOCH
    assert f"at epoch 2 step {ckpt['step']} of {STEPS_PER_EPOCH}" in err
    assert ckpt["global_step"] == STEPS_PER_EPOCH + ckpt["step"]
    assert not (run / "checkpoints" / "epoch_0002.pt").exists()

    code, out, err = run_main(*resume_args(run))
    assert code == 0, err
    assert f"from interrupt.pt (epoch 2 step {ckpt['step']})" in out
    assert_bitwise_equal(reference, run)


@pytest.mark.slow
def test_sigint_twice_in_process_then_resume_is_bitwise_equal(tiny_cifar, reference, tmp_path):
    """Ctrl-C at exact steps (the signal is raised from inside the loss), twice, with handlers restored each time."""
    from iaat.methods.iaat import IAAT

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    run = tmp_path / "int"

    with ctrl_c_at_step(IAAT, STEPS_PER_EPOCH + 3):  # epoch 2, step 3
        code, _, err = run_main(*fresh_args(tiny_cifar, run))
    assert code == 130, err
    assert "interrupted (SIGINT) at epoch 2 step 3 of 8" in err and "Traceback" not in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert torch.load(interrupt_path(run / "checkpoints"), weights_only=True)["step"] == 3

    with ctrl_c_at_step(IAAT, (STEPS_PER_EPOCH - 3) + 5):  # the rest of epoch 2, then epoch 3 step 5
        code, out, err = run_main(*resume_args(run))
    assert code == 130, err
    assert "from interrupt.pt (epoch 2 step 3)" in out
    assert "interrupted (SIGINT) at epoch 3 step 5 of 8" in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert (run / "checkpoints" / "epoch_0002.pt").exists()

    code, out, err = run_main(*resume_args(run))
    assert code == 0, err
    assert "from interrupt.pt (epoch 3 step 5)" in out
    assert_bitwise_equal(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [2, EPOCHS])
def test_ctrl_c_in_the_held_out_evaluation_is_finished_on_resume(tiny_cifar, reference, tmp_path, monkeypatch,
                                                                  epoch):
    """A signal during the end-of-epoch evaluation ends it after the current batch; the epoch is saved, and the
    resumed run first evaluates it again (its own random stream: the same numbers), so every logged number is
    the uninterrupted run's. In the last epoch too: the run is not finished (no summary.json, exit 130)."""
    from iaat.engine import trainer

    original = trainer.accuracy
    calls = {"n": 0, "batches": 0}

    def accuracy_with_ctrl_c(*args, stop=None, **kwargs):
        calls["n"], calls["batches"] = calls["n"] + 1, 0

        def stop_after_one_batch():
            calls["batches"] += 1
            if calls["n"] == epoch and calls["batches"] == 2:  # that epoch's check, after its first batch
                os.kill(os.getpid(), signal.SIGINT)
            return stop()
        return original(*args, stop=stop_after_one_batch, **kwargs)

    monkeypatch.setattr(trainer, "accuracy", accuracy_with_ctrl_c)
    run = tmp_path / "val"
    code, out, err = run_main(*fresh_args(tiny_cifar, run), "--set", "train.tensorboard=true")
    assert code == 130, err
    assert f"held-out evaluation of epoch {epoch} was cut short (SIGINT); it runs when the run resumes" in out + err
    assert f"interrupted (SIGINT) after epoch {epoch}" in err and "Traceback" not in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epoch + 1)) and "val_clean_acc" not in rows[-1]
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(trainer, "accuracy", original)
    code, out, err = run_main(*resume_args(run))
    assert code == 0, err
    assert f"the held-out evaluation of epoch {epoch}, cut short before: epoch {epoch} |" in out
    assert_bitwise_equal(reference, run)
    assert json.loads((run / "summary.json").read_text())["last"]["val_clean_acc"] == \
        json.loads((reference / "summary.json").read_text())["last"]["val_clean_acc"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("val/clean_acc", "val_clean_acc"), ("train/loss", "train_loss")):  # the redone epoch too
        assert [(e.step, e.value) for e in events.Scalars(tag)] == \
            [(r["epoch"], pytest.approx(r[key])) for r in rows], tag


def test_second_signal_stops_at_once_without_saving(tiny_cifar, tmp_path, monkeypatch):
    from iaat.methods.iaat import IAAT

    original_loss = IAAT.objective  # what the trainer calls per step
    calls = {"n": 0}

    def loss_with_two_signals(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEPS_PER_EPOCH + 2:
            os.kill(os.getpid(), signal.SIGTERM)
            stop = signal.getsignal(signal.SIGTERM).__self__  # the trainer's StopOnSignal
            while stop.signum is None:  # two signals pending at once would be handled as one
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGTERM)  # impatient: the second one must not wait for the step
        return original_loss(self, *args, **kwargs)

    monkeypatch.setattr(IAAT, "objective", loss_with_two_signals)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "twice"
    code, _, err = run_main(*fresh_args(tiny_cifar, run))
    assert code == 143, err
    assert "interrupted again (SIGTERM): stopped at once without saving" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before
    assert not interrupt_path(run / "checkpoints").exists()
    assert torch.load(run / "checkpoints" / "epoch_0001.pt", weights_only=True)["epoch"] == 1


def test_a_second_signal_once_the_state_is_saved_does_not_say_unsaved(tiny_cifar, tmp_path, monkeypatch):
    """The impatient second Ctrl-C that lands after interrupt.pt is written lets the first one finish: the
    message names the saved state, and the resume continues from it."""
    from iaat.engine import trainer
    from iaat.methods.iaat import IAAT

    original_save_config = trainer._save_config

    def save_config_after_a_second_signal(s):
        stop = signal.getsignal(signal.SIGINT).__self__  # the trainer's StopOnSignal
        if stop.signum is not None:  # in _save_interrupt, not at an epoch's end
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs here
        return original_save_config(s)

    monkeypatch.setattr(trainer, "_save_config", save_config_after_a_second_signal)
    run = tmp_path / "late"
    with ctrl_c_at_step(IAAT, STEPS_PER_EPOCH + 3):
        code, _, err = run_main(*fresh_args(tiny_cifar, run))
    assert code == 130, err
    assert "interrupted (SIGINT) at epoch 2 step 3 of 8; state saved to" in err
    assert "interrupted again" not in err and "Traceback" not in err
    assert torch.load(interrupt_path(run / "checkpoints"), weights_only=True)["step"] == 3


def test_a_gpu_runs_mid_epoch_state_from_before_the_cpu_drawn_batches_is_refused(tiny_cifar, tmp_path):
    """An interrupt.pt of a GPU run written before the loader drew on the CPU: its epoch's remaining steps would
    follow another order. Refused, naming the way on; the same file with its marker resumes."""
    from iaat.methods.iaat import IAAT

    run = tmp_path / "old"
    with ctrl_c_at_step(IAAT, STEPS_PER_EPOCH + 3):
        code, _, err = run_main(*fresh_args(tiny_cifar, run))
    assert code == 130, err
    path = interrupt_path(run / "checkpoints")
    state = torch.load(path, weights_only=True)
    old = {**state, "rng": {**state["rng"], "cuda": []}, "config": {**state["config"], "train": {
        **state["config"]["train"], "device": "auto"}}}
    del old["batch_draws"]
    save_checkpoint(path, old)
    code, _, err = run_main(*resume_args(run))
    assert code == 2 and "of batches that an earlier iaat drew on the GPU" in err, err
    assert f"remove {path} to resume from the end of epoch 1 (its 3 steps are then trained again)" in err
    save_checkpoint(path, state)
    code, _, err = run_main(*resume_args(run))
    assert code == 0, err


def _fake_checkpoint(folder: Path, name: str, epoch: int, step: int = 0) -> Path:
    path = folder / name
    save_checkpoint(path, {"epoch": epoch, "step": step, "model": {"w": torch.zeros(2)}})
    return path


def test_resume_point_prefers_the_newest_valid_state(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert resume_point(folder) == (None, None)
    _fake_checkpoint(folder, "epoch_0001.pt", 1)
    interrupted = _fake_checkpoint(folder, "interrupt.pt", 1, step=3)
    assert resume_point(folder)[0] == interrupted  # epoch 2 step 3 is newer than epoch 1
    newer = _fake_checkpoint(folder, "epoch_0002.pt", 2)
    assert resume_point(folder)[0] == newer  # a stale interrupt.pt (killed before its removal) is ignored
    newer.write_bytes(newer.read_bytes()[:100])
    with pytest.warns(UserWarning) as record:
        assert resume_point(folder)[0] == interrupted
    assert [str(w.message) for w in record] == [
        f"skipping damaged checkpoint: checkpoint {newer} is damaged: its sha256 does not match epoch_0002.pt.sha256 "
        f"(truncated or modified file). Now using {interrupted}, the newest valid checkpoint."]
    interrupted.write_bytes(b"garbage")
    with pytest.warns(UserWarning) as record:
        assert resume_point(folder)[0] == folder / "epoch_0001.pt"
    assert len(record) == 2 and all(f"using {folder / 'epoch_0001.pt'}" in str(w.message) for w in record)
    assert "interrupt.pt is damaged" in str(record[0].message)
    (folder / "epoch_0001.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads"):
        resume_point(folder)


# ---- 2. a damaged newest checkpoint: fall back to the newest valid one and say so --------------------------------


@pytest.mark.parametrize("damage", ["truncated", "one_byte_changed"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(reference, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest, older = run / "checkpoints" / f"epoch_{EPOCHS:04d}.pt", run / "checkpoints" / f"epoch_{EPOCHS - 1:04d}.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    code, out, err = run_main("eval", str(run), "--n", "8", "--steps", "1", "--out", str(tmp_path / "e.json"),
                              "--no-progress")
    assert code == 0, err
    assert f"iaat: warning: skipping damaged checkpoint: checkpoint {newest} is damaged" in err
    assert f"using {older}" in err
    assert json.loads((tmp_path / "e.json").read_text())["epoch"] == EPOCHS - 1

    code, out, err = run_main(*resume_args(run))
    assert code == 0, err
    assert f"iaat: warning: skipping damaged checkpoint: checkpoint {newest} is damaged" in err
    assert f"using {older}, the newest valid checkpoint" in err
    assert f"from {older.name} (epoch {EPOCHS - 1} done)" in out
    assert_bitwise_equal(reference, run)  # the redone last epoch is the same as the first time


def test_resume_of_a_trained_run_whose_checkpoints_are_gone_is_refused(reference, tmp_path):
    """Starting over would cut metrics.jsonl to nothing and overwrite the radii (summary.json staying behind)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    code, _, err = run_main(*resume_args(run))
    assert code == 2 and f"{run} has no checkpoint in checkpoints/, but its metrics.jsonl or summary.json record " \
        f"{EPOCHS} trained epochs" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_resume_reads_past_damaged_lines_of_metrics_jsonl(reference, tmp_path):
    """Lines that are no epoch row (a number, a list, bytes that are not UTF-8) are dropped, as readers skip them."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join([lines[0], b"42\n", b"[1, 2]\n", b"\xff\xfe{\n", *lines[1:]]))
    code, out, err = run_main(*resume_args(run))
    assert code == 0 and "nothing to do" in out, err
    assert (run / "metrics.jsonl").read_bytes() == b"".join(lines)


def test_a_checkpoint_whose_checksum_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """The trainer takes the epoch's metrics row back when the save fails; a checkpoint left without its checksum
    would still be resumed from, and that epoch's row would be missing for good."""
    from iaat.engine import checkpoint
    from iaat.errors import OutputError

    write = checkpoint.atomic_write_bytes

    def disk_full_at_the_checksum(path, data):
        if path.name.endswith(".sha256"):
            raise OutputError(f"could not write {path}: No space left on device")
        write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full_at_the_checksum)
    path = tmp_path / "epoch_0005.pt"
    with pytest.raises(OutputError, match="No space left"):
        save_checkpoint(path, {"epoch": 5})
    assert list(tmp_path.iterdir()) == []


def test_two_trainings_of_one_run_folder_are_refused(reference, tmp_path):
    """A re-queued job, or a resume of a run that a sweep is training: the second one is refused before it
    touches the folder (metrics.jsonl would get each epoch twice)."""
    from iaat.engine import rundir

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    with rundir.exclusive(run):  # as a training holds it
        code, _, err = run_main(*resume_args(run), "--epochs", str(EPOCHS + 1))
    assert code == 2 and f"another training is writing to {run}" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_the_lock_is_skipped_where_the_file_system_has_none(tmp_path, monkeypatch):
    """NFS without lockd, Lustre without flock: flock fails with another error than "held", and training goes on
    without a lock rather than being refused as if another one ran."""
    import errno
    import fcntl

    from iaat.engine import rundir

    def no_locks(handle, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with rundir.exclusive(tmp_path / "run"):
        pass
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_a_redone_held_out_row_goes_back_in_epoch_order(tmp_path):
    from iaat.engine import rundir

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "a": 1}\n{"epoch": 3, "a": 3}\n')
    rundir.replace_metrics_row(tmp_path, {"epoch": 2, "val_clean_acc": 0.5})  # its line was lost
    rundir.replace_metrics_row(tmp_path, {"epoch": 3, "a": 3, "val_clean_acc": 0.7})
    assert rundir.read_metrics(tmp_path) == [{"epoch": 1, "a": 1}, {"epoch": 2, "val_clean_acc": 0.5},
                                             {"epoch": 3, "a": 3, "val_clean_acc": 0.7}]


# ---- 4. a NaN loss: a clear error naming epoch and step; the last good checkpoint untouched ----------------------


def test_nan_loss_stops_with_epoch_and_step_and_leaves_the_run_untouched(tiny_cifar, tmp_path):
    run = tmp_path / "nan"
    # lr 0.1 in epoch 1, then x1e12 from epoch 2 on: the weights blow up within a few steps of epoch 2.
    code, _, err = run_main("train", "--data-dir", str(tiny_cifar), "--out", str(run), *IAAT_ARGS, "--epochs", "1",
                            "--set", "optim.schedule=step", "--set", "optim.milestones=[1]",
                            "--set", "optim.decay=1e12")
    assert code == 0, err
    before = snapshot(run)
    code, _, err = run_main("train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress")
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert "iaat: error: the training loss became NaN/inf at epoch 2, step " in err
    assert "last good checkpoint" in err and "lower learning rate" in err
    assert snapshot(run) == before  # epoch_0001.pt byte-identical, nothing added or rewritten


# ---- 6. determinism switch -------------------------------------------------------------------------------------


def test_deterministic_switch_sets_and_restores_global_state(monkeypatch):
    from iaat.config import config_from_dict
    from iaat.engine.trainer import deterministic_cuda

    assert config_from_dict({"train": {"deterministic": True}}).train.deterministic is True
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    with deterministic_cuda(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_switch_warns_when_cuda_ran_before_cublas_could_be_configured(monkeypatch):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once per process: a process that used CUDA before cannot be made
    deterministic by setting it now (the CLI trains in a fresh process; iaat.train in a user's may not)."""
    import warnings

    from iaat.engine.trainer import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="used CUDA before CUBLAS_WORKSPACE_CONFIG was set"):
        with deterministic_cuda(True):
            pass
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # set before CUDA: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with deterministic_cuda(True):
            pass
