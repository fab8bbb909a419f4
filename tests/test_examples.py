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


@pytest.mark.slow
def test_own_method_example_trains_its_method_with_the_library_trainer(tmp_path):
    res = run_example("own_method.py", tmp_path, "--out", "run")
    assert res.returncode == 0, res.stderr
    assert "training own_method:MixedAT (clean_weight=0.3)" in res.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["val_clean_acc"] > 0.5 and 0 < rows[-1]["val_pgd10_acc"] < rows[-1]["val_clean_acc"]


def test_readme_shows_the_iaat_example_as_it_is():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use it as a library"):]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert shown == (EXAMPLES / "iaat_own_loop.py").read_text(), "README and examples/iaat_own_loop.py differ"


def test_readme_shows_the_own_method_as_the_example_has_it():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Your own method"):]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = (EXAMPLES / "own_method.py").read_text()
    assert all(line in example for line in shown.splitlines()), "README and examples/own_method.py differ"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_stay_short_and_explain_themselves(script):
    text = (EXAMPLES / script).read_text()
    assert len(text.splitlines()) <= 60 and text.startswith('"""') and "--cifar DIR" in text


@pytest.mark.slow
def test_an_own_method_named_module_class_trains_resumes_and_evaluates(tiny_cifar, tmp_path, monkeypatch):
    """``--method own_method:MixedAT`` (examples/own_method.py, imported from the folder the command runs in): the
    trainer runs it with its keys from --set, a resumed run continues it, and eval and export read the run."""
    from helpers import run_main, tiny_train_args

    monkeypatch.chdir(EXAMPLES)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    out = tmp_path / "mixed"
    own = ("--method", "own_method:MixedAT", "--set", "method.clean_weight=0.3")
    code, stdout, err = run_main(*tiny_train_args(tiny_cifar, out, 1, *own))
    assert code == 0, err
    assert "training own_method:MixedAT (clean_weight=0.3)" in stdout
    assert "clean_weight: 0.3" in (out / "config.yaml").read_text()
    code, _, err = run_main(*tiny_train_args(tiny_cifar, out, 2, *own), "--resume")
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    code, _, err = run_main("eval", str(out), "--n", "16", "--attack", "pgd:steps=2", "--no-checks", "--no-progress")
    assert code == 0, err

    for method, message in (("own_method:Nothing", "own_method has no Nothing"),
                            ("no_such_module:MixedAT", "cannot import no_such_module"),
                            ("own_method:StepOutput", "is not a subclass of iaat.Method")):
        code, _, err = run_main(*tiny_train_args(tiny_cifar, tmp_path / "bad", 1, "--method", method))
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()
    code, _, err = run_main(*tiny_train_args(tiny_cifar, tmp_path / "bad", 1, *own[:2], "--set", "method.weight=1"))
    assert code == 2 and "weight" in err and "clean_weight" in err  # an unknown key, with a hint
