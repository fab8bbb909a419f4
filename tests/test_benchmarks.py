"""The benchmark scripts still run (a smoke test; the figures themselves are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_throughput_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "t.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--models", "small_cnn",
                          "--methods", "pgd_at", "iaat:selection=online", "--steps", "1", "--warmup", "0",
                          "--batch-size", "16", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert rows["pgd_at"]["time_ratio_to_pgd_at"] == 1.0
    assert rows["iaat:selection=online"]["images_per_second"] > 0
    assert result["torch"] and result["command"].startswith("python")


def test_speed_benchmark_times_the_plain_reference_loop_too(tmp_path):
    out = tmp_path / "s.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--methods", "pgd_at", "clean",
                          "--images", "64", "--batch-size", "16", "--steps", "1", "--rounds", "1", "--warmup", "0",
                          "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert rows["pgd_at"]["time_ratio_to_pgd_at"] == 1.0
    assert rows["reference (plain PyTorch PGD-AT loop)"]["images_per_second"] > 0
    assert rows["clean"]["time_ratio_to_pgd_at"] < 1.0  # no attack: cheaper than PGD-10 training
    assert result["pgd_at_speedup_over_reference"] > 0 and result["device"] == "cpu"
