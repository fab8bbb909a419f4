"""Models in and out: export, load_model, evaluating any model, starting from weights, TensorBoard, metrics as CSV."""

from __future__ import annotations

import csv
import doctest
import json
import shutil
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import iaat
from helpers import run_cli, run_in_process, tiny_train_args
from iaat.errors import CheckpointError, ConfigError, DataError

#: A user's own architecture in an importable module: the same network as the tiny runs' (width-8 small CNN).
FACTORY = '''
import iaat

def small(num_classes=10):
    return iaat.build_model("small_cnn", num_classes, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), width=8)


def bare(num_classes=10):  # the same network without the normalisation around it: other tensor names
    return iaat.models.small_cnn.SmallCNN(num_classes, 3, 8)
'''


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run exported in every format: ``{format: (model file, JSON)}``."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for fmt, name in (("safetensors", "model.safetensors"), ("torchscript", "model.pt"), ("export", "model.pt2")):
        res = run_in_process("export", str(tiny_run), "--format", fmt, "--out", str(folder / name))
        assert res.returncode == 0, res.stderr
        files[fmt] = (folder / name, folder / f"{name}.json")
    return files


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "export"])
def test_export_round_trips_to_identical_logits(exported, tiny_run, fmt):
    path, meta_path = exported[fmt]
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    assert torch.equal(iaat.load_model(path)(x), iaat.load_model(tiny_run)(x))
    meta = json.loads(meta_path.read_text())
    assert meta["architecture"] == {"name": "small_cnn", "depth": None, "width": 8}
    assert (meta["num_classes"], meta["input_shape"], meta["input_range"]) == (10, [3, 32, 32], [0, 1])
    assert meta["training"]["method"] == "pgd_at" and meta["training"]["eps"] == pytest.approx(8 / 255)
    assert meta["iaat_version"] == iaat.__version__ and meta["file"]["format"] == fmt
    assert 0 <= meta["accuracy"]["robust"] <= meta["accuracy"]["clean"] <= 1  # the run's newest held-out numbers
    if fmt == "export":  # the program's weights go by the model's own names, both ways
        model, run_weights = iaat.load_model(path), iaat.load_model(tiny_run).state_dict()
        assert model.state_dict().keys() == run_weights.keys()
        out_bias = [k for k, v in run_weights.items() if k.endswith("bias") and v.shape == (10,)][-1]
        before = model(x)
        model.load_state_dict({**run_weights, out_bias: run_weights[out_bias] + 1})  # every logit one higher
        torch.testing.assert_close(model(x), before + 1)


def test_safetensors_load_involves_no_pickle(exported, monkeypatch):
    path, _ = exported["safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    model = iaat.load_model(path)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_safetensors_file_alone_carries_its_description(exported, tmp_path):
    path, _ = exported["safetensors"]
    alone = tmp_path / "copy.safetensors"
    alone.write_bytes(path.read_bytes())  # no JSON beside it: the file's own metadata says what it is
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(iaat.load_model(alone)(x), iaat.load_model(path)(x))


def test_a_damaged_program_file_is_a_clear_error(exported, tmp_path):
    import zipfile

    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(exported["export"][0]) as source, zipfile.ZipFile(bad, "w") as out:
        for name in source.namelist():
            data = source.read(name)
            out.writestr(name, data[: len(data) // 2] if name.endswith("models/model.json") else data)
    res = run_in_process("eval", str(bad), "--dataset", "cifar10", "--eps", "8", "--n", "4")
    assert res.returncode == 2 and "bad.pt2 is not a loadable torch.export file" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_model_torch_export_cannot_capture_is_a_clear_error(tiny_run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\nmore lines")

    monkeypatch.setattr(torch.export, "export", fail)
    res = run_in_process("export", str(tiny_run), "--format", "export", "--out", str(tmp_path / "m.pt2"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "torch.export could not capture this model (RuntimeError: data-dependent control flow)" in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_export_refuses_to_overwrite_and_to_invent_averaged_weights(exported, tiny_run, tmp_path):
    path, _ = exported["safetensors"]
    before = path.read_bytes()
    res = run_in_process("export", str(tiny_run), "--out", str(path))
    assert res.returncode == 2 and "exists; choose another --out (out=) or pass --overwrite" in res.stderr
    assert path.read_bytes() == before
    res = run_in_process("export", str(tiny_run), "--out", str(tmp_path / "ema.safetensors"), "--ema")
    assert res.returncode == 2 and "holds no averaged weights" in res.stderr
    assert not (tmp_path / "ema.safetensors").exists()


def test_the_format_follows_the_files_extension_unless_given(tiny_run, tmp_path):
    import iaat.model_files as module

    for name, fmt in (("m.pt2", "export"), ("m.pt", "torchscript"), ("m.safetensors", "safetensors"),
                      ("model_eps0.5", "safetensors"), ("wrn.ep100", "safetensors")):
        res = run_in_process("export", str(tiny_run), "--out", str(tmp_path / name))
        assert res.returncode == 0 and f"({fmt})" in res.stdout, res.stderr
        assert json.loads((tmp_path / f"{name}.json").read_text())["file"]["format"] == fmt
        assert module.read_model_file(tmp_path / name, "cpu")[0] is not None  # what its extension says it is
    res = run_in_process("export", str(tiny_run), "--format", "safetensors", "--out", str(tmp_path / "x.pt2"))
    assert res.returncode == 2 and "a .pt2 name says export, but the format (--format, fmt=) is safetensors" \
        in res.stderr


def test_model_file_examples_run(tiny_run, tmp_path):
    import iaat.model_files as module

    result = doctest.testmod(module, extraglobs={"run": tiny_run, "folder": tmp_path})
    assert result.failed == 0 and result.attempted >= 6


@pytest.mark.slow
def test_any_model_gets_the_numbers_of_its_run(tiny_run, tiny_cifar, exported, tmp_path):
    """iaat eval on the run, its safetensors and TorchScript exports, and the user's own architecture with the
    exported weights: the same model, so the same numbers."""
    (tmp_path / "mynets.py").write_text(FACTORY)
    common = ["--n", "64", "--no-progress", "--data-dir", str(tiny_cifar), "--attack", "pgd:steps=5",
              "--sweep-eps", "0", "4", "8"]
    sources = {"run": [str(tiny_run)], "safetensors": [str(exported["safetensors"][0])],
               "torchscript": [str(exported["torchscript"][0])], "export": [str(exported["export"][0])],
               "factory": ["--model", "mynets:small", "--weights", str(exported["safetensors"][0]), "--dataset",
                           "cifar10", "--eps", "8"]}
    results = {}
    for name, args in sources.items():
        out = tmp_path / f"{name}.json"
        argv = ("eval", *args, *common, "--out", str(out))  # the factory is imported from the working folder
        res = run_cli(*argv, cwd=tmp_path) if name == "factory" else run_in_process(*argv)
        assert res.returncode == 0, res.stderr
        results[name] = json.loads(out.read_text())
    numbers = {name: (r["clean"], {k: a["accuracy"] for k, a in r["attacks"].items()}, r["curves"]["eps"]["points"])
               for name, r in results.items()}
    assert all(v == numbers["run"] for v in numbers.values()), numbers
    # The tiny run may sit at chance level; every check about the model itself must pass for each source.
    verdicts = {name: {c["name"]: c["passed"] for c in r["checks"] if c["name"] != "better than chance"}
                for name, r in results.items()}
    assert all(all(v.values()) for v in verdicts.values()), verdicts
    assert results["torchscript"]["model_source"] == "TorchScript model model.pt"
    assert results["export"]["model_source"] == "torch.export model model.pt2"


def test_eval_of_a_model_file_says_what_it_needs(exported, tiny_cifar, tmp_path):
    (tmp_path / "mynets.py").write_text(FACTORY)
    script = str(exported["torchscript"][0])
    cases = [
        (["--model", "mynets:small", "--eps", "8"], "say which data set to evaluate on with --dataset"),
        (["--model", "mynets:missing", "--dataset", "cifar10", "--eps", "8"], "mynets has no missing"),
        (["--model", "mynets:small", "--dataset", "cifar10"], "give the evaluation's --eps"),
        ([script, "--weights", script], "--weights goes with --model"),
        ([script, "--split", "val", "--eps", "8"], "--split val is the held-out part of a run's training split"),
        (["--model", "mynets:small", "--dataset", "cifar10", "--num-classes", "7", "--eps", "8"],
         "the data has 10 classes: it needs one logit per class"),
        ([script, "--ema", "--eps", "8"], "holds the raw weights of its run, not the ema ones"),
        (["--model", "mynets:small", "--dataset", "cifar10", "--eps", "8", "--raw"], "--raw and --ema choose among"),
        (["--model", "mynets:bare", "--weights", str(exported["safetensors"][0]), "--dataset", "cifar10", "--eps",
          "8"], f"is a model exported by iaat (its architecture and normalisation inside): evaluate it without "
                f"--model, as iaat eval {exported['safetensors'][0]}"),
    ]
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the factory's module is imported from the current folder
    try:
        for args, phrase in cases:
            res = run_in_process("eval", *args, "--data-dir", str(tiny_cifar), "--n", "40", "--no-progress",
                                 "--out", str(tmp_path / "x.json"))
            assert res.returncode == 2 and phrase in res.stderr, (args, res.stderr)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "x.json").exists()


class _ExpectsStandardisedInputs(nn.Module):
    """Two classes, told apart by the sign of the mean of a *standardised* image: on [0, 1] inputs it always says 1."""

    def forward(self, x):
        z = x.flatten(1).mean(1)
        return torch.stack([-z, z], 1)


def test_evaluate_refuses_a_model_that_expects_normalised_inputs():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (0.5 + (2 * y - 1).view(-1, 1, 1, 1) * 0.1 + 0.05 * torch.randn(64, 1, 4, 4, generator=g)).clamp(0, 1)
    with pytest.raises(DataError, match=r"50% of the first 64 images .* but 100% once they are standardised"):
        iaat.evaluate(_ExpectsStandardisedInputs(), x, y, attacks=["pgd:steps=2"], eps=8 / 255)
    res = iaat.evaluate(_ExpectsStandardisedInputs(), x, y, attacks=["pgd:steps=2"], eps=8 / 255, checks=False)
    assert res["clean"] == pytest.approx(0.5)  # --no-checks / checks=False: evaluated as asked
    # the identity normalisation iaat.build_model puts around a user's net says nothing: still refused
    with pytest.raises(DataError, match="once they are standardised"):
        iaat.evaluate(iaat.NormalizedModel(_ExpectsStandardisedInputs(), mean=(0.0,), std=(1.0,)), x, y,
                      attacks=["pgd:steps=2"], eps=8 / 255)


def test_a_model_that_standardises_inside_is_not_taken_for_one_expecting_normalised_inputs(monkeypatch, tmp_path):
    """A weak run of iaat's own (a NormalizedModel with its data set's statistics) once tripped the check; so did its
    torch.export program (.pt2), which keeps the normalisation's name but not its class."""
    from iaat.evaluation import checks

    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (0.5 + (2 * y - 1).view(-1, 1, 1, 1) * 0.1 + 0.05 * torch.randn(64, 1, 4, 4, generator=g)).clamp(0, 1)
    inside = iaat.NormalizedModel(_ExpectsStandardisedInputs(), mean=(0.0,), std=(0.5,))  # says 1 on every image
    program, _ = iaat.export_model(inside, tmp_path / "inside.pt2", "export", input_shape=(1, 4, 4))
    for model in (inside, torch.jit.trace(inside, x[:2]), iaat.load_model(program)):  # as iaat export writes them
        assert checks.normalises_inside(model)
        assert iaat.evaluate(model, x, y, attacks=["pgd:steps=2"], eps=8 / 255)["clean"] == pytest.approx(0.5)
    monkeypatch.setattr(checks, "normalises_inside", lambda model: False)  # the case the test stands for
    with pytest.raises(DataError, match="once they are standardised"):
        iaat.evaluate(inside, x, y, attacks=["pgd:steps=2"], eps=8 / 255)


def test_a_model_that_returns_a_tuple_is_a_clear_error_before_any_attack():
    from iaat.errors import ConfigError
    from iaat.evaluation.checks import check_model_fits

    class Pair(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3], x

    with pytest.raises(ConfigError, match="wrap a model that returns a tuple or dict"):
        check_model_fits(Pair(), torch.rand(4, 3, 4, 4), torch.arange(4) % 3, 3)
    with pytest.raises(DataError, match="it needs one logit per class"):  # a tensor of another shape
        check_model_fits(nn.Flatten(0), torch.rand(4, 3, 4, 4), torch.arange(4) % 3, 3)


def test_sanity_attack_stops_at_the_first_miss_with_the_same_verdicts():
    from iaat.evaluation.attacks import run_attack
    from iaat.evaluation.protocol import large_eps_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    x, y = torch.rand(32, 3, 4, 4), torch.arange(32) % 3
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    spec = large_eps_attack("linf")
    fast = run_attack(spec, model, x, y, num_classes=3)
    rows_fast, calls[:] = sum(calls), []
    full = run_attack(type(spec)(**{**spec.__dict__, "stop_on_miss": False}), model, x, y, num_classes=3)
    assert torch.equal(fast["robust"], full["robust"]) and torch.equal(fast["first_miss"], full["first_miss"])
    assert rows_fast < sum(calls)  # fewer images went through the model


def test_eval_json_splits_the_time_between_attacks_and_checks(exported, tiny_cifar, tmp_path):
    out = tmp_path / "e.json"
    res = run_in_process("eval", str(exported["safetensors"][0]), "--data-dir", str(tiny_cifar), "--n", "64",
                         "--no-progress", "--out", str(out))
    assert res.returncode == 0, res.stderr
    seconds = json.loads(out.read_text())["seconds"]
    assert set(seconds["checks"]) == {"model probes", "PGD-20-nostart@127.5/255", "total"}
    assert set(seconds["attacks"]) == {"PGD-10@8/255"} and 0 < seconds["checks_share"] < 1
    assert "sanity checks" in res.stdout and "% of the evaluation" in res.stdout


@pytest.mark.slow
def test_init_from_starts_from_the_given_weights(tiny_run, tiny_cifar, exported, tmp_path):
    out = tmp_path / "tuned"
    res = run_in_process(*tiny_train_args(tiny_cifar, out, 1, "--init-from", str(exported["export"][0]), "--set",
                                   "optim.lr=1e-9", "--set", "optim.weight_decay=0"))
    assert res.returncode == 0, res.stderr
    assert "starting from the weights of" in res.stdout
    start = torch.load(tiny_run / "checkpoints" / "epoch_0001.pt", weights_only=True)["model"]
    tuned = torch.load(out / "checkpoints" / "epoch_0001.pt", weights_only=True)["model"]
    weights = [k for k in start if k.endswith("weight")]
    assert all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in weights)  # lr 1e-9: still the given weights
    assert "init_from" in (out / "config.yaml").read_text()

    other = tmp_path / "wider"
    res = run_in_process(*tiny_train_args(tiny_cifar, other, 1, "--init-from", str(exported["torchscript"][0]),
                                          "--set", "model.width=16"))
    assert res.returncode == 2 and "holds a small_cnn of width 8 but this run trains a small_cnn of width 16" \
        in res.stderr
    assert not other.exists()  # nothing written
    res = run_in_process("train", "--out", str(out), "--resume", "--init-from", str(exported["torchscript"][0]))
    assert res.returncode == 2 and "--init-from starts a new run" in res.stderr


def test_init_from_takes_a_run_whose_architecture_was_given_by_default(tmp_path):
    """A small_cnn trained without model.width is the width-32 small_cnn that a preset names: the same network."""
    base = ["--dataset", "digits", "--model", "small_cnn", "--epochs", "1", "--no-progress", "--set",
            "data.val_size=100", "--set", "attack.steps=1"]
    res = run_in_process("train", "--out", str(tmp_path / "a"), *base)
    assert res.returncode == 0, res.stderr
    res = run_in_process("train", "--out", str(tmp_path / "b"), *base, "--set", "model.width=32", "--init-from",
                         str(tmp_path / "a"))
    assert res.returncode == 0 and "starting from the weights of" in res.stdout, res.stderr


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_metrics_and_the_radius_histograms(tiny_cifar, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    res = run_in_process(*tiny_train_args(tiny_cifar, out, 2, "--method", "iaat", "--set", "method.warmup_epochs=1",
                                   "--set", "train.tensorboard=true"))
    assert res.returncode == 0, res.stderr
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/acc", "lr", "radius/mean", "val/clean_acc"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("radius/mean")] == [1, 2]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in rows])
    histograms = events.Histograms("radii")
    assert [h.step for h in histograms] == [1, 2] and histograms[0].histogram_value.num == 400  # one per sample
    assert histograms[0].histogram_value.max == pytest.approx(8 / 255, rel=1e-5)  # warmup: every radius 8/255


def test_tensorboard_missing_is_a_clear_error(tiny_cifar, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    res = run_in_process(*tiny_train_args(tiny_cifar, tmp_path / "r", 1, "--set", "train.tensorboard=true"))
    assert res.returncode == 2 and "pip install 'iaat[tensorboard]'" in res.stderr
    assert not (tmp_path / "r").exists()


def test_metrics_as_csv_and_as_a_table(tiny_run, tmp_path):
    res = run_in_process("metrics", str(tiny_run), "--csv", str(tmp_path / "m.csv"))
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    saved = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(saved) and float(rows[0]["train_loss"]) == pytest.approx(saved[0]["train_loss"])
    assert set(saved[0]) <= set(rows[0])
    table = run_in_process("metrics", str(tiny_run))
    assert table.returncode == 0 and "train_loss" in table.stdout and "val_clean_acc" in table.stdout
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        from iaat.cli import cmd_metrics

        cmd_metrics(type("Args", (), {"run": str(tmp_path), "csv": None})())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    text = (tiny_run / "metrics.jsonl").read_bytes()
    row = json.loads(text.splitlines()[0])
    (damaged / "metrics.jsonl").write_bytes(text + b'[1, 2]\n\xff\xfe{"epoch": \n' + json.dumps(
        {**row, "epoch": 2, "train_loss": "n/a"}).encode() + b"\n")
    shown = run_in_process("metrics", str(damaged))  # lines that are not rows skipped, odd cells shown as they are
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "n/a" in shown.stdout and len(shown.stdout.splitlines()) == 3


def test_a_damaged_description_beside_the_file_is_ignored_or_a_clear_error(exported, tmp_path):
    """The description inside a .safetensors file wins over the JSON beside it; a file without one and a damaged
    JSON beside it is a one-line error naming that JSON."""
    from safetensors.torch import load_file, save_file

    path, _ = exported["safetensors"]
    copy = tmp_path / "m.safetensors"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "m.safetensors.json").write_bytes(b"\xff{not json")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(iaat.load_model(copy)(x), iaat.load_model(path)(x))
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)  # the weights without iaat's metadata
    (tmp_path / "bare.safetensors.json").write_text('{"architecture": {"name": "small_cnn"}}')  # no num_classes
    with pytest.raises(CheckpointError, match=r"bare.safetensors.json is not a readable model description \(KeyError"):
        iaat.load_model(bare)


def test_the_card_reports_the_evaluation_at_the_training_radius_on_the_most_images(tiny_run, tmp_path):
    """Not merely the newest evaluation: a later small L2 check, or a larger evaluation with PGD-0 (random noise) or
    on the held-out split, must not become the model's advertised accuracy."""
    from helpers import run_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    common = ["--no-checks", "--no-progress"]
    for extra in (["--n", "48"], ["--n", "16"], ["--n", "16", "--norm", "l2", "--eps", "0.5/1"]):
        code, _, err = run_main("eval", str(run), "--attack", "pgd:steps=2", *common, *extra)
        assert code == 0, err
    for extra in (["--attack", "pgd:steps=0"], ["--attack", "pgd:steps=2", "--split", "val"]):
        code, _, err = run_main("eval", str(run), *common, "--n", "64", *extra)
        assert code == 0, err
    code, _, err = run_main("export", str(run), "--out", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    card = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert card["accuracy"]["n"] == 48 and card["accuracy"]["attacks"] == ["PGD-2@8/255"]


def test_a_module_from_your_own_loop_exports_loads_and_evaluates(tmp_path):
    """Any module, no run: TorchScript and .pt2 files with a description of what is known; safetensors refused."""
    from helpers import run_main

    torch.manual_seed(0)
    net = iaat.NormalizedModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (0.3,), (0.4,))
    x = torch.rand(4, 1, 8, 8)
    for fmt, name in (("torchscript", "mine.pt"), ("export", "mine.pt2")):
        path, meta = iaat.export_model(net, tmp_path / name, fmt, input_shape=(1, 8, 8))
        card = json.loads(meta.read_text())
        assert (card["num_classes"], card["input_shape"], card["training"]) == (10, [1, 8, 8], None)
        assert card["normalization_inside"] == {"mean": [pytest.approx(0.3)], "std": [pytest.approx(0.4)]}
        torch.testing.assert_close(iaat.load_model(path)(x), net(x))
        assert net.training  # exported from a copy: the module stays as the training loop left it
    code, _, err = run_main("eval", str(tmp_path / "mine.pt2"), "--dataset", "digits", "--eps", "32", "--n", "16",
                            "--attack", "pgd:steps=2", "--no-checks", "--no-progress")
    assert code == 0, err
    with pytest.raises(ConfigError, match="exports as torchscript or export"):
        iaat.export_model(net, tmp_path / "mine.safetensors", input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"needs input_shape=\(C, H, W\)"):
        iaat.export_model(net, tmp_path / "x.pt2", "export")
    with pytest.raises(ConfigError, match=r"fails on a batch of float32 images of shape \(2, 3, 32, 32\)"):
        iaat.export_model(net, tmp_path / "x.pt2", "export", input_shape=(3, 32, 32))
    import threading

    net.lock = threading.Lock()  # a module that cannot be copied is exported in place, then put back as it was
    path, _ = iaat.export_model(net, tmp_path / "locked.pt", "torchscript", input_shape=(1, 8, 8))
    assert net.training
    torch.testing.assert_close(iaat.load_model(path)(x), net.eval()(x))


OWN_NETS = '''
from torch import nn


def tiny(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


def needs_depth(depth):
    return nn.Linear(2, 2)


def sized(num_classes, in_channels, width=8):  # model.width reaches it
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def not_a_module(num_classes):
    return "resnet"


def torchvision_style(*, weights=None, **kwargs):  # num_classes through **kwargs, as torchvision's and timm's
    return tiny(kwargs.pop("num_classes", 1000), 1)


def rgb_only(num_classes):
    return tiny(num_classes, 3)


def thousand_classes(in_channels):
    return tiny(1000, in_channels)


def float64(num_classes, in_channels):
    return tiny(num_classes, in_channels).double()


def softmax_out(num_classes, in_channels):
    return nn.Sequential(tiny(num_classes, in_channels), nn.Softmax(dim=1))
'''


def test_eval_of_a_factory_without_weights_warns_that_it_keeps_the_factorys(tmp_path, monkeypatch):
    from helpers import run_main

    (tmp_path / "own_nets_unweighted.py").write_text(OWN_NETS)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("eval", "--model", "own_nets_unweighted:tiny", "--dataset", "digits", "--eps", "8",
                            "--n", "8", "--attack", "pgd:steps=1", "--no-progress", "--no-checks", "--out", "e.json")
    assert code == 0, err
    assert "iaat: warning: no --weights given" in err and "unless the factory loads trained weights" in err, err


def test_training_your_own_architecture_by_module_factory(tmp_path, monkeypatch):
    """iaat train --model module:factory: the trainer, its resume, eval and export with any architecture; a model
    file of it loads where its module can be imported."""
    from helpers import run_main

    (tmp_path / "own_nets_train.py").write_text(OWN_NETS)
    (tmp_path / "own_nets_needs_missing_dep.py").write_text("import not_an_installed_package\n")
    monkeypatch.chdir(tmp_path)  # imported from the working folder, as `iaat train` is run from a project's
    common = ("--dataset", "digits", "--method", "iaat", "--eps", "32", "--no-progress", "--set",
              "method.warmup_epochs=1", "--set", "data.train_subset=300")
    code, _, err = run_main("train", "--model", "own_nets_train:tiny", *common, "--epochs", "1", "--out", "run")
    assert code == 0, err
    code, _, err = run_main("train", "--out", "run", "--resume", "--epochs", "2", "--no-progress")
    assert code == 0, err
    code, _, err = run_main("eval", "run", "--n", "32", "--attack", "pgd:steps=3", "--no-progress", "--no-checks",
                            "--out", "e.json")
    assert code == 0, err
    assert json.loads(Path("e.json").read_text())["model"] == "own_nets_train:tiny"
    path, _ = iaat.export_model("run", "own.safetensors")
    model, x = iaat.load_model(path), torch.rand(3, 1, 8, 8)
    run_model = iaat.engine.runs.load_run(Path("run"))[0]
    torch.testing.assert_close(model(x), run_model(x))  # the same weights, its normalisation around it
    code, _, err = run_main("eval", "--model", "own_nets_train:tiny", "--dataset", "digits", "--eps", "32", "--n",
                            "16", "--attack", "pgd:steps=2", "--no-progress", "--no-checks", "--out", "f.json")
    assert code == 0, err  # built with the data set's channels, as training builds it
    code, _, err = run_main("train", "--model", "own_nets_train:torchvision_style", *common, "--epochs", "1",
                            "--out", "tv")
    assert code == 0, err  # num_classes reached it through **kwargs
    assert "look like probabilities" not in err
    code, _, err = run_main("train", "--model", "own_nets_train:softmax_out", *common, "--epochs", "1", "--out", "sm")
    assert code == 0 and "iaat: warning: the model's outputs look like probabilities" in err, err
    for i, (name, phrase) in enumerate([
            ("own_nets_train:nope", "own_nets_train has no nope"),
            ("no_such_module_here:f", "cannot import no_such_module_here"),
            ("own_nets_needs_missing_dep:f", "it needs not_an_installed_package, which is not installed"),
            ("__main__:tiny", "a script's own code cannot be imported again"),
            ("own_nets_train:needs_depth", "cannot be called with no arguments (missing a required argument: 'depth')"),
            ("own_nets_train:not_a_module", "returned a str, not a torch.nn.Module"),
            ("own_nets_train:rgb_only", "fails on the data set's images of shape (1, 8, 8)"),
            ("own_nets_train:thousand_classes", "gives 1000 logits per image, but the data set has 10 classes"),
            ("own_nets_train:float64", "weights are torch.float64, the images torch.float32")]):
        code, _, err = run_main("train", "--model", name, *common, "--epochs", "1", "--out", f"bad{i}")
        assert code == 2 and phrase in err, (name, err)
        assert not Path(f"bad{i}").exists()  # checked before the run folder is made
    # Starting from the run or from its TorchScript export: the same weights, so the same training
    iaat.export_model("run", "own.pt", "torchscript")
    losses = []
    for i, source in enumerate(("run", "own.pt")):
        code, _, err = run_main("train", "--model", "own_nets_train:tiny", *common, "--epochs", "1", "--init-from",
                                source, "--out", f"ft{i}")
        assert code == 0, err
        losses.append(iaat.engine.rundir.read_metrics(Path(f"ft{i}"))[0]["train_loss"])
    assert losses[0] == losses[1]
    # A report reads saved files only: it needs no import of the architecture (here: run from another folder)
    pytest.importorskip("matplotlib")
    (tmp_path / "elsewhere").mkdir()
    res = run_cli("report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), cwd=tmp_path / "elsewhere")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "report" / "report.md").is_file()


def test_model_width_and_depth_reach_a_factory_that_names_them(tmp_path, monkeypatch):
    from helpers import run_main

    (tmp_path / "own_nets_sized.py").write_text(OWN_NETS)
    monkeypatch.chdir(tmp_path)
    common = ("--dataset", "digits", "--no-progress", "--set", "data.train_subset=100", "--set", "attack.steps=1",
              "--epochs", "1")
    code, _, err = run_main("train", "--model", "own_nets_sized:sized", "--set", "model.width=5", *common,
                            "--out", "run")
    assert code == 0, err
    assert "has no effect" not in err
    from iaat.engine.runs import load_run

    assert load_run(Path("run"))[0].net[0].out_channels == 5  # rebuilt at its width, to evaluate
    code, _, err = run_main("train", "--model", "own_nets_sized:sized", "--set", "model.depth=3", *common,
                            "--out", "run3")
    assert code == 0, err
    assert err.count("model.depth=3 has no effect on own_nets_sized:sized: the factory has no depth argument") == 1


def test_an_export_to_a_folder_is_refused_before_anything_is_written(tmp_path):
    import iaat
    from iaat.errors import ConfigError

    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with pytest.raises(ConfigError, match=r"is a folder; name the model file to write \(e.g. .*model.pt2\)"):
        iaat.export_model(net, tmp_path, "export", input_shape=(3, 4, 4), overwrite=True)
    assert not list(tmp_path.iterdir())
