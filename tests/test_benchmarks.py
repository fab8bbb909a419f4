"""The benchmark scripts still run (a smoke test; the figures themselves are not tests).

Their ``main(argv)`` runs in this process, as ``python benchmarks/<script>.py ARGS`` would run it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, call_main, run_in_process, tiny_train_args

sys.path.insert(0, str(REPO / "benchmarks"))
import speed  # noqa: E402
import throughput  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: trains and evaluates


def run_script(module, *argv: str) -> subprocess.CompletedProcess:
    """``module.main(argv)`` with its output captured, shaped like a finished ``python script ARGS``."""
    return subprocess.CompletedProcess([module.__file__, *argv], *call_main(module.main, argv))


def test_throughput_benchmark_runs_and_reports_ratios(tmp_path, monkeypatch):
    out = tmp_path / "t.json"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/a b")  # part of the recorded command, as a shell takes it
    res = run_script(throughput, "--models", "small_cnn", "--methods", "pgd_at", "iaat:selection=online", "--steps",
                     "1", "--warmup", "0", "--batch-size", "16", "--device", "cpu", "--out", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert rows["pgd_at"]["time_ratio_to_pgd_at"] == 1.0
    assert rows["iaat:selection=online"]["images_per_second"] > 0
    assert result["torch"] and result["command"].startswith("OMP_NUM_THREADS=")  # this suite sets it
    assert " TORCHINDUCTOR_CACHE_DIR='/tmp/a b' python " in result["command"]
    assert "throughput.py --models small_cnn" in result["command"]


def test_speed_benchmark_times_the_plain_reference_loop_too(tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # torch's FLOP counter sets it during the run
    res = run_script(speed, "--methods", "pgd_at", "clean", "--images", "64", "--batch-size", "16", "--steps", "1",
                     "--rounds", "1", "--warmup", "0", "--device", "cpu", "--out", str(out))
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert rows["pgd_at"]["time_ratio_to_pgd_at"] == 1.0
    assert rows["reference (plain PyTorch PGD-AT loop)"]["images_per_second"] > 0
    assert rows["clean"]["time_ratio_to_pgd_at"] < 1.0  # no attack: cheaper than PGD-10 training
    assert result["pgd_at_speedup_over_reference"] > 0 and result["device"] == "cpu"
    assert "TORCHINDUCTOR_CACHE_DIR" not in result["command"]  # the recorded command is the one that was run


def test_speed_benchmark_keeps_the_other_rows_when_one_method_fails(tmp_path, monkeypatch):
    """On a GPU a method may fail alone (a CUDA-only bug, memory): its error is recorded, the others are timed."""
    step = throughput.Runner.step

    def failing_step(self, *args, **kwargs):
        if self.spec == "clean":
            raise RuntimeError("CUDA out of memory (as if)")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(throughput.Runner, "step", failing_step)
    out = tmp_path / "s.json"
    common = ["--images", "32", "--batch-size", "16", "--steps", "1", "--rounds", "2", "--warmup", "1", "--no-flops",
              "--device", "cpu", "--out", str(out)]
    res = run_script(speed, "--methods", "pgd_at", "clean", "iaat:no_such_key=1", *common)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]] == ["reference (plain PyTorch PGD-AT loop)", "pgd_at"]
    assert result["failed"]["clean"] == "RuntimeError: CUDA out of memory (as if)"
    assert "no_such_key" in result["failed"]["iaat:no_such_key=1"]  # could not even be built
    assert result["rounds_done"] == result["rounds"] == 2 and "failed: clean" in res.stdout

    monkeypatch.setattr(throughput.Runner, "step", lambda self, *a, **k: 1 / 0)
    res = run_script(speed, "--methods", "pgd_at", *common)
    assert res.returncode == 1 and "pgd_at failed (ZeroDivisionError" in res.stderr


def test_run_data_times_a_run_on_its_own_images_and_radii(tiny_cifar, tmp_path):
    """--run-data: the run's training images in its order and its newest radii, which IAAT's runner starts from."""
    import argparse

    import numpy as np
    import torch

    run = tmp_path / "iaat"
    res = run_in_process(*tiny_train_args(tiny_cifar, run, 1, "--method", "iaat", "--set", "method.warmup_epochs=0"))
    assert res.returncode == 0, res.stderr
    data, splits, name, radii = throughput.run_data(str(run), str(tiny_cifar), 64, None, argparse.ArgumentParser())
    order = np.load(run / "data_split.npz")["train_indices"][:64]
    assert torch.equal(data.x, splits.train.x[torch.as_tensor(order)]) and torch.equal(data.y, splits.train.y[order])
    saved = np.load(run / "radii" / "epoch_0001.npy")[:64]
    assert np.array_equal(radii.numpy(), saved) and len(np.unique(saved)) > 1  # selection moved the radii
    assert str(run) in name and "epoch_0001.npy" in name
    runner = throughput.Runner("small_cnn", "iaat", data, splits, torch.device("cpu"), 16, radii=radii,
                               train={"amp": "off"})
    assert torch.equal(runner.method.memory, radii)

    out = tmp_path / "t.json"
    args = ["--models", "small_cnn", "--methods", "pgd_at", "iaat", "--steps", "1", "--warmup", "0", "--batch-size",
            "8", "--device", "cpu", "--out", str(out), "--data-dir", str(tiny_cifar), "--init-from", str(run),
            "--run-data"]
    res = run_script(throughput, "--run-data", "--models", "small_cnn")
    assert res.returncode == 2 and "--run-data needs --init-from" in res.stderr
    res = run_script(throughput, *args)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert str(run) in result["data"] and 0 <= result["clean_accuracy_on_timed_images"] < 1

    # --clean-correct-only: IAAT's worst case, every timed image classified correctly by the initial model
    res = run_script(throughput, *args, "--batch-size", "4", "--clean-correct-only")
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert result["clean_accuracy_on_timed_images"] == 1.0 and "classifies correctly" in result["data"]


def test_the_recorded_command_has_the_environment_main_started_with_even_an_empty_one(monkeypatch):
    for key in throughput.RESULT_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(throughput, "_STARTING_ENV", None)
    throughput.note_starting_env()  # as a benchmark's main does first: none of them set
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_root")  # what torch's FLOP counter then sets
    header = throughput.run_header("b", throughput.torch.device("cpu"), ["--x"], throughput.__file__)
    assert header["command"].startswith("python ") and "TORCHINDUCTOR" not in header["command"]


def test_runners_time_full_batches_only():
    """images/s is batch_size over the median step: an epoch's smaller last batch (20 images, batch 8: 8, 8, 4) is
    a faster step, which would overstate the speed, so it is left out."""
    import torch

    data, splits, _ = throughput.bench_data(None, 20, None)
    runner = throughput.Runner("small_cnn", "pgd_at", data, splits, torch.device("cpu"), 8, train={"amp": "off"})
    assert [len(next(runner.batches)[1]) for _ in range(6)] == [8] * 6  # three epochs of two full batches


def test_summarize_runs_reads_radius_protocol_and_epochs_from_the_runs(tiny_cifar, tmp_path):
    """The table says what each run was trained and evaluated with, not the CPU comparison's usual settings."""
    import summarize_runs

    root = tmp_path / "runs"
    res = run_in_process(*tiny_train_args(tiny_cifar, root / "pgd_at", 1, "--eps", "4"))
    assert res.returncode == 0, res.stderr
    (root / "pgd_at" / "config.yaml").write_text((root / "pgd_at" / "config.yaml").read_text().replace(
        "epochs: 1", "epochs: 3"))  # as if it had been stopped after 1 of 3 epochs
    res = run_in_process("eval", str(root / "pgd_at"), "--eps", "4", "--n", "20", "--attack", "pgd:steps=2",
                         "--no-progress", "--out", str(root / "pgd_at" / "eval-test1000-pgd20.json"))
    assert res.returncode == 0, res.stderr
    res = run_script(summarize_runs, str(root), "--out", str(tmp_path / "table"), "--command", "cmd", "--data", "d")
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "table.json").read_text())
    assert result["protocol"].startswith("clean and PGD-2@4/255 (linf 4/255, step 5/255) on the first 20 test images")
    assert "| pgd_at | 1 of 3 (unfinished) |" in res.stdout and "| 4 (fixed) |" in res.stdout
