"""Data-parallel training under torchrun (gloo, CPU): same result as one process, consistent state, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, child_env
from test_cli import snapshot
from iaat.distributed import DistInfo, merge_rows

pytest.importorskip("sklearn", reason="the distributed tests train on scikit-learn's bundled digits")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this PyTorch build has no gloo backend", allow_module_level=True)

WORKER = REPO / "tests" / "ddp_worker.py"

# Digits (8x8, real images; 600 to train on, 10 global batches), 3 epochs, no random starts
# (each rank draws its own noise, so random starts cannot match a 1-process run sample for sample); IAAT: one
# warmup epoch, then batched Alg. 2.
BASE = ["--dataset", "digits", "--epochs", "3", "--batch-size", "63", "--device", "cpu", "--no-progress",
        "--seed", "3", "--set", "attack.random_start=false", "--set", "attack.steps=3", "--set", "attack.eps=16",
        "--set", "attack.step_size=6", "--set", "data.train_subset=600", "--set", "data.val_size=97",
        "--set", "optim.lr=0.1", "--set", "optim.schedule=constant", "--set", "train.log_interval=2"]
COMMON = [*BASE, "--method", "iaat", "--set", "method.warmup_epochs=1", "--set", "method.eps_warmup=16"]


def _env(float64: bool = False, timeout: float = 300) -> dict:
    env = {**child_env(), "OMP_NUM_THREADS": "1", "IAAT_TEST_FLOAT64": "1" if float64 else "0",
           "IAAT_TEST_HANG_DUMP_S": str(max(timeout - 30, 1))}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(WORKER), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
            *args]


def _run(args: list[str], nproc: int, timeout: float = 300, float64: bool = False) -> subprocess.CompletedProcess:
    cmd = _command(args, nproc)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(float64, timeout), cwd=REPO, start_new_session=True)
    out, err = _communicate(proc, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{out}\n{err}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc``'s output once it ends; past ``timeout``, its whole process group is killed (torchrun's workers too,
    which a kill of torchrun alone would leave running) and the test fails with what the job printed, the
    workers' stack dumps included (tests/ddp_worker.py dumps them 30 s before the timeout)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} still ran after {timeout:.0f} s\n{out[-4000:]}\n{err[-8000:]}")


def _final(run: Path, epochs: int) -> dict:
    return torch.load(run / "checkpoints" / f"epoch_{epochs:04d}.pt", map_location="cpu", weights_only=False)


def _one_and_two(tmp_path: Path, args: list[str]) -> tuple[dict, dict, Path]:
    """The same training in 1 and in 2 processes, in float64 (see tests/ddp_worker.py)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(["train", "--out", str(one), "--model", "plain_cnn", *args], 1, float64=True)
    _run(["train", "--out", str(two), "--model", "plain_cnn", *args], 2, float64=True)
    return _final(one, 3), _final(two, 3), two


def _assert_close_weights(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    assert sum(v.dtype == torch.float64 for v in a["model"].values()) >= 8  # every weight and bias
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.slow  # torchrun with two processes
def test_two_processes_match_one_process(tmp_path):
    """Same global batch (63: the ranks get 32 and 31 images, crops and flips included) and seed: the
    2-process run ends with the 1-process weights and the same epsilon memory."""
    a, b, two = _one_and_two(tmp_path, COMMON)
    assert b["world_size"] == 2 and len(b["rng_ranks"]) == 2
    _assert_close_weights(a, b)
    mem_a, mem_b = a["method"]["memory"], b["method"]["memory"]
    assert torch.equal(mem_b, mem_a)
    assert mem_a.std() > 0  # the radii moved apart after warmup: the comparison is not of constants
    # the radii file written by rank 0 holds the merged memory of both ranks
    np.testing.assert_array_equal(np.load(two / "radii" / "epoch_0003.npy"), mem_b.numpy())


@pytest.mark.slow  # torchrun with two processes
def test_gairat_weights_are_normalised_over_the_global_batch(tmp_path):
    """GAIRAT's weights have mean 1 over the global batch, not over each rank's share."""
    a, b, _ = _one_and_two(tmp_path, [*BASE, "--method", "gairat", "--set", "method.burn_in_epochs=0"])
    _assert_close_weights(a, b)


@pytest.mark.slow  # torchrun with two processes
def test_cat_mix_sums_its_hinge_over_the_global_batch(tmp_path):
    """CAT-MIX's hinge is a sum over the batch (the mean terms divide by its size): over the global batch, so the
    update is the 1-process one. Labels unsmoothed: each rank draws its own label noise."""
    a, b, _ = _one_and_two(tmp_path, [*BASE, "--method", "cat", "--set", "method.train_loss=mix",
                                      "--set", "method.smoothing=0"])
    _assert_close_weights(a, b)
    assert torch.equal(b["method"]["radii"], a["method"]["radii"]) and a["method"]["radii"].max() > 0


@pytest.mark.slow  # torchrun with two processes
def test_resume_under_torchrun_is_exact(tmp_path):
    """A 2-process run stopped in epoch 2 and resumed under torchrun equals an uninterrupted 2-process run
    (BatchNorm model, random starts on: each rank's random stream is saved and restored). A stop mid-epoch
    restores more than one at an epoch's end (the loader's position too), so it stands for both."""
    args = ["--model", "small_cnn", "--set", "model.width=8", *COMMON, "--set", "attack.random_start=true"]
    full = tmp_path / "full"
    _run(["train", "--out", str(full), *args], 2)

    # SIGTERM to torchrun mid-epoch: the agent forwards it, every rank stops at the same step, rank 0 saves.
    term = tmp_path / "term"
    proc = subprocess.Popen(_command(["train", "--out", str(term), *args], 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(timeout=240), cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (term / "checkpoints" / "epoch_0001.pt.sha256").exists():
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            _communicate(proc, 0)
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, err = _communicate(proc, 240)
    assert proc.returncode != 0
    assert err.count("interrupted (SIGTERM) at epoch 2 step") == 1, err  # rank 0 speaks for the job
    ckpt = torch.load(term / "checkpoints" / "interrupt.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] >= 1 and len(ckpt["rng_ranks"]) == 2
    _run(["train", "--out", str(term), "--resume"], 2)
    _assert_same_run(full, term)


def _interrupted(args: list[str], nproc: int, **env: str) -> subprocess.CompletedProcess:
    """A run that tests/ddp_worker.py signals as ``env`` says; it must stop with an error exit."""
    cmd = _command(args, nproc)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), **env}, cwd=REPO, start_new_session=True)
    out, err = _communicate(proc, 300)
    assert proc.returncode != 0, f"{' '.join(cmd)}\n{out}\n{err}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _exits(res: subprocess.CompletedProcess) -> set:
    """The workers' exit codes in torchrun's report (after its own traceback): a worker still on its way out when
    the first one exits is stopped by torchrun's SIGTERM (-15), its state already saved."""
    codes = set(re.findall(r"exitcode\s*: (-?\d+)", res.stderr))
    assert codes, res.stderr
    return codes


@pytest.mark.slow  # torchrun with two processes
def test_a_signal_that_reaches_one_rank_stops_all_of_them_cleanly(tmp_path):
    """A SIGTERM to rank 0 alone (one node preempted), after the last step of epoch 1, then in the held-out
    evaluation of epoch 2: every rank stops with the signal's message and exit code, the state is saved, and the
    resumed runs end as the uninterrupted one (the redone evaluation's numbers too)."""
    args = ["--model", "small_cnn", "--set", "model.width=8", *COMMON, "--set", "data.val_size=200"]
    full = tmp_path / "full"
    _run(["train", "--out", str(full), *args], 2)

    run = tmp_path / "cut"
    res = _interrupted(["train", "--out", str(run), *args], 2, IAAT_TEST_SIGTERM_RANK0_AT_STEP="10")
    assert _exits(res) <= {"143", "-15"} and "Error:" not in res.stderr.replace("ChildFailedError:", "")
    assert res.stderr.count("interrupted (SIGTERM) at epoch 1 step 10 of 10") == 1, res.stderr
    assert torch.load(run / "checkpoints" / "interrupt.pt", weights_only=False)["step"] == 10  # the epoch's last
    res = _interrupted(["train", "--out", str(run), "--resume"], 2, IAAT_TEST_SIGTERM_RANK0_IN_EVAL="2")
    assert _exits(res) <= {"143", "-15"} and "interrupted (SIGTERM) after epoch 2" in res.stderr, res.stderr
    assert torch.load(run / "checkpoints" / "epoch_0002.pt", weights_only=False)["held_out_pending"]
    _run(["train", "--out", str(run), "--resume"], 2)
    _assert_same_run(full, run)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, run)]
    assert [r["val_pgd10_acc"] for r in rows[1]] == [r["val_pgd10_acc"] for r in rows[0]]


@pytest.mark.slow  # torchrun with two processes
def test_a_mid_epoch_resume_on_another_batch_plan_is_refused(tmp_path):
    """602 images in batches of 50: one process keeps a last batch of 2, two fold it into the one before (a rank
    would get 1 image); continuing the epoch's steps on the other plan would skip images."""
    run = tmp_path / "r"
    args = ["train", "--out", str(run), "--model", "plain_cnn", *BASE, "--set", "data.train_subset=602",
            "--batch-size", "50", "--method", "pgd_at"]
    _interrupted(args, 1, IAAT_TEST_SIGTERM_RANK0_AT_STEP="3")
    before = snapshot(run)
    res = _interrupted(["train", "--out", str(run), "--resume"], 2)
    assert "stopped epoch 1 after step 3 of its batches for 1 process(es); with 2 the epoch is cut into other " \
           "batches" in res.stderr and _exits(res) <= {"2", "-15"}, res.stderr  # a clear error
    assert snapshot(run) == before


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = _final(a_dir, 3), _final(b_dir, 3)
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    assert torch.equal(a["method"]["memory"], b["method"]["memory"])
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    # the interrupted epoch's loss sum is added up in another order (saved total + rest): float rounding only
    assert [r["train_loss"] for r in rows[1]] == pytest.approx([r["train_loss"] for r in rows[0]], rel=1e-6)


@pytest.mark.slow  # torchrun with two processes
def test_a_bad_distributed_setting_is_a_clear_error_from_every_rank(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "iaat",
           "train", "--out", str(tmp_path / "r"), "--dataset", "digits", "--model", "small_cnn", "--device", "cpu",
           "--no-progress", "--batch-size", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
                            start_new_session=True)
    _, stderr = _communicate(proc, 300)
    assert proc.returncode != 0
    # the two ranks write to the same pipe, so their lines may run into each other
    assert "iaat: error: train.batch_size is the global batch" in stderr, stderr  # rank 0's, unlabelled
    assert "iaat: error: [rank 1] " in stderr  # rank 1's copy is labelled
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_distributed_settings_are_checked_against_the_world():
    """The checks every rank makes before training (the test above shows how their errors reach the user)."""
    from iaat.config import config_from_dict
    from iaat.engine.trainer import _check_distributed
    from iaat.errors import ConfigError

    two = DistInfo(rank=1, world_size=2, local_rank=1)
    cpu = torch.device("cpu")
    _check_distributed(config_from_dict({"train": {"batch_size": 4, "sync_bn": False}}), two, cpu)
    with pytest.raises(ConfigError, match="train.batch_size is the global batch: 3 cannot give each of the 2"):
        _check_distributed(config_from_dict({"train": {"batch_size": 3}}), two, cpu)
    with pytest.raises(ConfigError, match="train.sync_bn needs CUDA"):
        _check_distributed(config_from_dict({"train": {"batch_size": 64, "sync_bn": True}}), two, cpu)
    _check_distributed(config_from_dict({"train": {"batch_size": 2, "sync_bn": True}}), DistInfo(), cpu)  # 1 process


def test_a_training_set_too_small_for_the_world_is_refused_before_the_model(tmp_path):
    """3 images over 2 processes would leave one rank a single image, which breaks BatchNorm in train mode."""
    from iaat.config import config_from_dict
    from iaat.engine.trainer import _setup
    from iaat.errors import ConfigError

    cfg = config_from_dict({"data": {"dataset": "digits", "train_subset": 3, "val_size": 10},
                            "train": {"batch_size": 4}})
    two = DistInfo(rank=0, world_size=2, local_rank=0)
    with pytest.raises(ConfigError, match="the training set has 3 image.s., too few to give each of the 2 processes"):
        _setup(cfg, tmp_path / "run", torch.device("cpu"), two, print)
    assert not (tmp_path / "run").exists()


def test_merge_rows_single_process_is_identity():
    values, touched = torch.arange(5.0), torch.tensor([True, False, True, False, False])
    assert merge_rows(values, touched, DistInfo()) is values
