"""The GPU kit (benchmarks/gpu_check.sh) does not rot between GPU loans: its CPU smoke mode runs every stage, it
refuses clearly without a GPU, and its data builder and schedule sizing are right."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

KIT = REPO / "benchmarks" / "gpu_check.sh"


def run_kit(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """The kit under this test's interpreter (by itself it prefers .venv/bin/python, then python3)."""
    return subprocess.run(["bash", str(KIT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def test_data_builder_writes_the_archive_images_as_a_cifar_folder(tmp_path):
    from PIL import Image

    from iaat.data import load_dataset

    npz = gpu_check.write_tiny_npz(tmp_path / "tiny.npz", n_train=20, n_test=7)
    root = gpu_check.build_cifar10(npz, tmp_path / "cifar")
    with pytest.warns(UserWarning, match="differ"):  # not the official files
        splits = load_dataset("cifar10", str(root), download=False)
    z = np.load(npz)
    assert len(splits.train) == 20 and len(splits.test) == 7
    third = Image.open(io.BytesIO(z["train_jpeg"][z["train_offsets"][2]:z["train_offsets"][3]].tobytes()))
    assert torch.equal(splits.train.x[2], torch.from_numpy(np.array(third.convert("RGB"))).permute(2, 0, 1))
    assert splits.test.y.tolist() == z["test_labels"].tolist()


def test_paper_schedule_fits_the_time_left():
    for ips in (2000, 7500, 20000):
        epochs, epoch_s = gpu_check.paper_epochs(300, ips, fixed=90)
        cost = epochs * epoch_s + epoch_s + (epochs - 1) * gpu_check.IAAT_COST * epoch_s + 90
        assert cost <= 300 < cost + (1 + gpu_check.IAAT_COST) * epoch_s  # the most epochs that fit
    assert gpu_check.paper_epochs(100, 2000, fixed=90)[0] < 2  # then the stage says it did not run


def test_speed_table_shows_failed_methods():
    result = {"batch_size": 512, "command": "python benchmarks/speed.py", "failed": {"mma": "RuntimeError: a|b"},
              "results": [{"method": "pgd_at", "images_per_second": 7600.4, "time_ratio_to_pgd_at": 1.0}]}
    table = gpu_check.speed_table("resnet18", result)
    assert "| pgd_at | 7600 | 1.00x | – | – | – |" in table and "| mma | failed: RuntimeError: a/b |" in table


def test_fast_path_names_of_the_speed_benchmark():
    import speed

    assert speed.fast_path("fp32") == {"amp": "off", "channels_last": False, "compile": False}
    assert speed.fast_path("bf16+cl+compile") == {"amp": "bf16", "channels_last": True, "compile": True}
    for bad in ("fp8", "bf16+nhwc", "cl"):
        with pytest.raises(ValueError, match="write fp32, bf16 or fp16"):
            speed.fast_path(bad)


def test_tests_cut_by_the_time_cap_keep_the_outcomes_before_the_cut(tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import time, pytest\n"
        "def test_quick():\n    pass\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
        "def test_slow():\n    time.sleep(120)\n")
    (tmp_path / "out").mkdir()
    kit = gpu_check.Kit(tmp_path / "out", tmp_path, budget=60, smoke=True)
    code, seconds, text = kit.run([sys.executable, "-m", "pytest", str(tmp_path / "test_three.py"), "-v",
                                   "-p", "no:cacheprovider"], cap=15)  # pytest starts in 2-6 s here
    assert code is None and seconds < 30  # cut, and its process group killed
    assert gpu_check.log_results(text) == [{"test": "test_quick", "outcome": "passed"},
                                           {"test": "test_skipped", "outcome": "skipped"}]


def test_a_line_begun_and_never_ended_does_not_hold_the_kit_past_its_cap(tmp_path):
    # pytest -v writes "file.py::test_name " when a test starts and the rest of the line when it ends
    prog = ("import sys, time; print('first', flush=True); time.sleep(0.5); sys.stdout.write('begun '); "
            "sys.stdout.flush(); time.sleep(60)")
    kit = gpu_check.Kit(tmp_path, tmp_path, budget=60, smoke=True)
    code, seconds, text = kit.run([sys.executable, "-c", prog], cap=5)
    assert code is None and seconds < 12 and text == "first\nbegun "


def test_the_stages_before_the_paper_stage_leave_it_its_minimum(tmp_path):
    kit = gpu_check.Kit(tmp_path, tmp_path, budget=20, smoke=True)
    kit.reserve = 18  # a command asking for 10 s gets the 2 s left above the reserve
    code, seconds, _ = kit.run([sys.executable, "-c", "import time; time.sleep(30)"], cap=10)
    assert code is None and 1.5 < seconds < 8
    # without a GPU's figures, two epochs of each method at the assumed 3,000 images/s still fit in the minimum
    epochs, _ = gpu_check.paper_epochs(gpu_check.PAPER_MIN - 20, 3000.0,
                                       fixed=2 * (gpu_check.EVAL_RESERVE + gpu_check.START_UP))
    assert epochs >= 2


def test_each_command_before_the_paper_stage_leaves_the_later_ones_their_floors(tmp_path):
    kit = gpu_check.Kit(tmp_path, tmp_path, budget=540, smoke=False)
    every = list(gpu_check.STAGES)
    floors = sum(floor for *_, floor in gpu_check.speed_plans(kit))
    assert floors > 0 and gpu_check._reserve(kit, "env", every) == gpu_check.PAPER_MIN + floors
    assert gpu_check._reserve(kit, "speed", every) == gpu_check.PAPER_MIN
    assert gpu_check._reserve(kit, "paper", every) == gpu_check._reserve(kit, "late", every) == 0
    assert gpu_check._reserve(kit, "env", ["env", "late"]) == 0  # no paper stage to keep time for
    # the tests' cap and the speed plans' caps fit beside the paper stage's minimum in the planned budget of 550 s,
    # the script's start (torch's import) included
    tests_cap = gpu_check.TESTS["env"][1]
    assert tests_cap + sum(cap for _, _, cap, _ in gpu_check.speed_plans(kit)) + gpu_check.PAPER_MIN <= 550 - 10


def test_what_has_too_little_time_is_not_started_and_says_so(tmp_path):
    kit = gpu_check.Kit(tmp_path, tmp_path, budget=3, smoke=True)
    assert gpu_check.stage_speed(kit, None, {}) == {}  # the smoke plan's floor is 5 s
    assert "small_cnn: not run" in kit.speed_parts["small_cnn"] and not (tmp_path / "2-speed-small_cnn.json").exists()
    asked = []
    gpu_check.stage_late(kit, lambda: asked.append(1), {})
    assert "not run" in kit.sections["late"] and "--stages late" in kit.sections["late"]
    assert "$ " not in (tmp_path / "log.txt").read_text() and not asked  # no command started, no data waited for


@pytest.mark.slow  # a speed run on random images
def test_without_the_archive_speed_runs_on_random_images_and_the_paper_stage_says_why(tmp_path):
    kit = gpu_check.Kit(tmp_path, tmp_path, budget=170, smoke=True)
    data = gpu_check.DataBuild(kit, gpu_check.argparse.Namespace(smoke=False, data=tmp_path / "no.npz", work=tmp_path))
    assert data.folder() is None and "no.npz is missing" in (tmp_path / "log.txt").read_text()
    speed = gpu_check.stage_speed(kit, data.folder(), {})
    assert speed["small_cnn"]["rounds_done"] == 1 and "--data-dir" not in speed["small_cnn"]["command"]
    assert gpu_check.stage_paper(kit, data.folder(), speed, data.problem) is None
    assert "Not run: no CIFAR-10 archive" in kit.sections["paper"]


def test_a_data_build_that_fails_is_said_once_and_as_it_was(tmp_path):
    bad = tmp_path / "pointer.npz"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")  # what an LFS checkout leaves
    kit = gpu_check.Kit(tmp_path, tmp_path, budget=60, smoke=False)
    data = gpu_check.DataBuild(kit, gpu_check.argparse.Namespace(smoke=False, data=bad, work=tmp_path))
    assert data.folder() is None and data.folder() is None and "pointer.npz failed" in data.problem
    assert (tmp_path / "log.txt").read_text().count("failed") == 1
    gpu_check.stage_paper(kit, data.folder(), {}, data.problem)
    assert "Not run: the data set's build from" in kit.sections["paper"] and "archive" not in kit.sections["paper"]


def test_sigterm_ends_the_kit_and_its_running_command_at_once(tmp_path):
    """The machine's own time limit: the running command's process group goes with the kit, which exits 143."""
    import signal
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(["bash", str(KIT), str(out), "--smoke", "--stages", "env", "--budget", "120", "--work",
                             str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    try:
        deadline = time.monotonic() + 60
        while "$ " not in ((out / "log.txt").read_text() if (out / "log.txt").is_file() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, "the tests' command never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
    finally:
        proc.kill()
    assert "terminated (SIGTERM)" in proc.stderr.read() and "terminated (SIGTERM)" in (out / "log.txt").read_text()
    time.sleep(1)
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(work) in _cmdline(p)]
    assert not left, "a command of the kit outlived it"


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


def test_a_cut_run_is_evaluated_at_its_newest_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert gpu_check._last_checkpoint(tmp_path) == 0
    for name in ("epoch_0001.pt", "epoch_0003.pt", "epoch_best.pt"):  # only the numbered ones are epochs
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert gpu_check._last_checkpoint(tmp_path) == 3


def test_the_plan_names_where_iaats_cost_ratio_comes_from():
    speed = {"resnet18": {"results": [{"method": "pgd_at", "images_per_second": 8000.0},
                                      {"method": "iaat", "images_per_second": 4000.0, "time_ratio_to_pgd_at": 2.0}]}}
    assert "from stage 2's steps, a lower bound" in gpu_check.plan_section(speed, {"iaat_epoch_ratio": None})
    speed["wrn-34-10"] = {"results": [{"method": "pgd_at", "images_per_second": 1000.0},
                                      {"method": "iaat", "time_ratio_to_pgd_at": 1.1}]}
    measured = gpu_check.plan_section(speed, {"iaat_epoch_ratio": 1.6})
    assert "from stage 3's epoch times" in measured and "| ResNet-18 | 200 | iaat | 5000 |" in measured
    assert "| iaat | 625 |" in measured  # WRN at the ratio measured while learning, not the random model's


def test_refuses_without_a_gpu_unless_smoke(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run_kit(str(tmp_path / "out"), timeout=120)
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr and "--smoke" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_within_budget(tmp_path):
    out = tmp_path / "out"
    res = run_kit(str(out), "--smoke", "--budget", "180", "--work", str(tmp_path / "work"), timeout=360)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["1-cuda-tests.log", "1-env.json", "2-speed-small_cnn.json", "3-paper-scale.json", "log.txt",
                     "summary.md"]  # at most 8 come back from a GPU machine
    env = json.loads((out / "1-env.json").read_text())
    assert env["torch"] == torch.__version__ and env["cuda_tests"]["exit_code"] == 0
    assert env["cuda_tests"]["tests"] and all(t["outcome"] == "skipped" for t in env["cuda_tests"]["tests"])
    rows = {r["method"]: r for r in json.loads((out / "2-speed-small_cnn.json").read_text())["results"]}
    assert {"pgd_at", "iaat", "gairat", "pgd_at [fp32]", "reference (plain PyTorch PGD-AT loop)"} <= set(rows)
    assert rows["pgd_at"]["flops_per_step"] == rows["pgd_at [fp32]"]["flops_per_step"] > 0
    paper = json.loads((out / "3-paper-scale.json").read_text())
    for name in ("pgd_at", "iaat"):
        run = paper["runs"][name]
        assert run["exit_code"] == 0 and len(run["epochs"]) == 1
        assert 0 <= run["eval"]["clean"] <= 1 and "PGD-20@8/255" in run["eval"]
    summary = (out / "summary.md").read_text()
    assert env["compile_tests"]["exit_code"] == 0 and env["compile_tests"]["tests"]  # the late stage's
    assert {t["test"] for t in env["compile_tests"]["tests"]}.isdisjoint(t["test"] for t in env["cuda_tests"]["tests"])
    for heading in ("## 1. Environment", "## 2. Training speed", "## 3. Paper-scale", "## 4. torch.compile",
                    "## Reproduction plan"):
        assert heading in summary
