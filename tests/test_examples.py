"""The scripts in examples/ run as documented, and the README shows the first one as it is."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from helpers import REPO, child_env

EXAMPLES = REPO / "examples"


def run_example(script: str, cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=child_env())


def _accuracies(stdout: str) -> tuple[float, float]:
    clean, robust = re.search(r"test: clean ([\d.]+), PGD-20 at [\d.]+/255: ([\d.]+)", stdout).groups()
    return float(clean), float(robust)


@pytest.mark.slow
def test_iaat_example_learns_a_robust_model_and_saves_its_radii(tmp_path):
    import torch

    res = run_example("iaat_own_loop.py", tmp_path)
    assert res.returncode == 0, res.stderr
    clean, robust = _accuracies(res.stdout)
    assert clean > 0.8 and 0.2 < robust < clean, res.stdout  # PGD-trained: robust, far from chance (0.1)
    assert res.stdout.count("epoch ") == 6 and "epoch 1: " in res.stdout and "mean radius 32/255" in res.stdout
    saved = torch.load(tmp_path / "iaat_own_loop.pt", weights_only=True)
    assert saved["iaat"]["memory"].shape == (1497,)  # one radius per training digit, in [0, 1] units
    assert 0 < float(saved["iaat"]["memory"].mean()) < 1


@pytest.mark.slow
def test_gairat_example_learns_a_robust_model(tmp_path):
    res = run_example("gairat_weights_own_loop.py", tmp_path)
    assert res.returncode == 0, res.stderr
    clean, robust = _accuracies(res.stdout)
    assert clean > 0.8 and 0.2 < robust < clean, res.stdout
    assert res.stdout.count("epoch ") == 6


@pytest.mark.slow
def test_evaluate_example_attacks_and_evaluates_a_plain_model(tmp_path):
    res = run_example("evaluate_any_model.py", tmp_path)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["clean"] > 0.8 and result["worst_case"]["accuracy"] < result["clean"]
    assert len(result["attacks"]) == 8 and "sanity checks passed" in res.stdout
    assert result["eps"] == pytest.approx(16 / 255)  # [0, 1] units in the JSON


def test_readme_shows_the_iaat_example_as_it_is():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use it as a library"):]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert shown == (EXAMPLES / "iaat_own_loop.py").read_text(), "README and examples/iaat_own_loop.py differ"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_stay_short_and_explain_themselves(script):
    text = (EXAMPLES / script).read_text()
    assert len(text.splitlines()) <= 60 and text.startswith('"""') and "--cifar DIR" in text
