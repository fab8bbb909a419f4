"""The integration check on real CIFAR-10 (the shared JPEG-75 copy): the CPU preset trains and evaluates.

The CLI runs in this process (`iaat.cli.main`): a new interpreter would add its start-up to every call.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import REPO, run_in_process

pytestmark = pytest.mark.slow  # end-to-end: trains and evaluates


def test_small_cnn_preset_trains_and_evaluates_on_real_cifar10(real_cifar, tmp_path):
    out = tmp_path / "R"
    res = run_in_process("train", "--config", str(REPO / "configs" / "cifar10_small_cnn_cpu.yaml"), "--data-dir",
                  str(real_cifar.parent), "--epochs", "1", "--train-subset", "1000", "--out", str(out),
                  "--set", "data.val_size=200", "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "differ(s) from the official cifar10 release" in res.stderr  # the JPEG-75 copy is flagged
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and 0.0 <= row["val_pgd10_acc"] <= row["val_clean_acc"]

    res = run_in_process("eval", str(out), "--n", "300", "--no-progress", "--out", str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 300 and result["dataset"] == "cifar10"
    # One epoch on 1,000 images (8 steps) already beats chance (10%) on clean test images: 15.0% here.
    assert result["clean"] > 0.12
    robust = next(iter(result["attacks"].values()))["accuracy"]
    assert robust <= result["clean"]


def test_iaat_with_awp_and_ema_trains_and_evaluates_both_copies_on_real_cifar10(real_cifar, tmp_path):
    out = tmp_path / "R"
    res = run_in_process("train", "--config", str(REPO / "configs" / "cifar10_small_cnn_cpu.yaml"), "--data-dir",
                  str(real_cifar.parent), "--epochs", "2", "--train-subset", "500", "--out", str(out),
                  "--set", "data.val_size=100", "--set", "model.width=8",  # the plumbing, not the preset's speed
                  "--device", "cpu", "--no-progress", "--method", "iaat", "--set", "method.warmup_epochs=1",
                  "--set", "train.ema=0.999", "--set", "train.awp=auto")
    assert res.returncode == 0, res.stderr
    assert "weight average (EMA) 0.999, weight perturbation (AWP) gamma 0.01 |" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"val_clean_acc", "ema_val_clean_acc", "radius_mean"} <= set(rows[-1])
    results = {}
    for weights in ("ema", "raw"):
        path = tmp_path / f"{weights}.json"
        res = run_in_process("eval", str(out), "--n", "200", "--no-progress", "--out", str(path),
                      *(["--raw"] if weights == "raw" else []))
        assert res.returncode == 0, res.stderr
        results[weights] = json.loads(path.read_text())
        assert results[weights]["weights"] == weights and results[weights]["n"] == 200
    assert results["ema"]["clean"] != results["raw"]["clean"] or results["ema"]["attacks"] != results["raw"]["attacks"]


@pytest.mark.parametrize("method, sets, arrays", [
    ("mma", [], ["radii"]),
    ("cat", ["attack.random_start=false"], ["radii"]),
    ("mail", [], ["margins", "weights"]),
    ("iaat", ["method.compat=authors", "method.warmup_epochs=0"], ["radii"]),  # the authors' trainer_adaptive.py
    ("gairat", ["method.compat=authors", "method.begin_epoch=1"], []),  # the authors' GAIRAT.py, weights from epoch 1
])
def test_family_and_authors_modes_train_evaluate_and_export_on_real_cifar10(real_cifar, tmp_path, method, sets,
                                                                            arrays):
    out = tmp_path / "R"
    res = run_in_process("train", "--config", str(REPO / "configs" / "cifar10_small_cnn_cpu.yaml"), "--data-dir",
                  str(real_cifar.parent), "--epochs", "1", "--train-subset", "300", "--out", str(out),
                  "--set", "data.val_size=100", "--set", "model.width=8", "--device", "cpu", "--no-progress",
                  "--method", method,
                  *[arg for s in sets for arg in ("--set", s)])
    assert res.returncode == 0, res.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= row["val_pgd10_acc"] <= row["val_clean_acc"]
    for name in arrays:
        values = np.load(out / name / "epoch_0001.npy")
        assert values.shape == (300,) and np.isfinite(values).all()
    if "radii" in arrays:
        assert row["radius_max"] >= row["radius_mean"] >= 0
    res = run_in_process("eval", str(out), "--n", "100", "--attack", "pgd:steps=10", "--no-progress", "--out",
                  str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 100 and next(iter(result["attacks"].values()))["accuracy"] <= result["clean"]
