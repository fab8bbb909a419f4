"""Weight averaging (train.ema): the update, checkpoints and exact resume, evaluation and export of the average."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import iaat
from helpers import ctrl_c_at_step, run_main, tiny_train_args
from iaat.ema import EMA_KEY, EMA_UPDATES_KEY
from iaat.engine.checkpoint import load_checkpoint, save_checkpoint
from iaat.errors import CheckpointError, ConfigError


def test_update_averages_parameters_with_a_warmed_up_decay_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = iaat.EMA(model, decay=0.99)
    start = [p.detach().clone() for p in model.parameters()]
    expected = [p.clone() for p in start]
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics
        d = min(0.99, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for avg, e in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(avg, e, rtol=1e-5, atol=1e-6)
    for avg, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(avg, b)  # copied, not averaged
    assert ema.updates == 30 and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_state_round_trips_and_bad_input_is_clear():
    model = nn.Linear(3, 2)
    ema = iaat.EMA(model, decay=0.9)
    ema.update(nn.Linear(3, 2))
    other = iaat.EMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.module.parameters(),
                                                                        ema.module.parameters()))
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        iaat.EMA(model, decay=1.0)
    with pytest.raises(CheckpointError, match="holds no averaged weights"):
        other.load_state_dict({"model": {}}, "x.pt")
    with pytest.raises(CheckpointError, match="do not fit this model"):
        iaat.EMA(nn.Linear(5, 2)).load_state_dict(ema.state_dict(), "x.pt")
    with pytest.raises(ConfigError, match="differ in number or shape"):
        iaat.EMA(model).update(nn.Linear(4, 2))


EMA_ARGS = ("--method", "iaat", "--set", "method.warmup_epochs=1", "--set", "train.ema=0.9")


@pytest.fixture(scope="module")
def ema_run(tiny_cifar, tmp_path_factory) -> Path:
    """Two epochs of IAAT with weight averaging (IAAT + EMA: per-sample radii and an averaged model)."""
    out = tmp_path_factory.mktemp("ema") / "run"
    code, stdout, err = run_main(*tiny_train_args(tiny_cifar, out, 2, *EMA_ARGS))
    assert code == 0, err
    assert "weight average (EMA) 0.9" in stdout and "ema_val_clean_acc" in stdout
    return out


@pytest.mark.slow
def test_both_copies_are_evaluated_and_saved(ema_run):
    rows = [json.loads(line) for line in (ema_run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"val_clean_acc", "val_pgd10_acc", "ema_val_clean_acc", "ema_val_pgd10_acc"} <= set(row)
    code, table, err = run_main("metrics", str(ema_run))  # the averaged model's columns in the table too
    assert code == 0 and "ema_val_clean_acc" in table.splitlines()[0], err
    ckpt = load_checkpoint(ema_run / "checkpoints" / "epoch_0002.pt")
    assert ckpt[EMA_UPDATES_KEY] == ckpt["global_step"] == 16
    differ = [k for k, v in ckpt[EMA_KEY].items() if v.is_floating_point() and not torch.equal(v, ckpt["model"][k])]
    assert differ  # an average, not a copy


@pytest.mark.slow
def test_resume_keeps_the_average_bitwise(ema_run, tiny_cifar, tmp_path):
    """Ctrl-C in the middle of epoch 2 (interrupt.pt holds the average), then resume: the same average."""
    run = tmp_path / "resumed"
    with ctrl_c_at_step(iaat.IAAT, 8 + 3):  # epoch 2, step 3 (8 steps an epoch)
        code, _, err = run_main(*tiny_train_args(tiny_cifar, run, 2, *EMA_ARGS))
    assert code == 130 and "at epoch 2 step 3 of 8" in err, err
    assert EMA_KEY in load_checkpoint(run / "checkpoints" / "interrupt.pt")
    code, _, err = run_main("train", "--out", str(run), "--resume", "--no-progress")
    assert code == 0, err
    a = load_checkpoint(ema_run / "checkpoints" / "epoch_0002.pt")
    b = load_checkpoint(run / "checkpoints" / "epoch_0002.pt")
    for key, tensor in a[EMA_KEY].items():
        assert torch.equal(tensor, b[EMA_KEY][key]), key
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


@pytest.mark.slow
def test_a_checkpoint_without_its_average_is_refused_on_resume(ema_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    path = run / "checkpoints" / "epoch_0002.pt"
    ckpt = load_checkpoint(path)
    del ckpt[EMA_KEY]
    save_checkpoint(path, ckpt)
    code, _, err = run_main("train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress")
    assert code == 2 and "holds no averaged weights" in err and "Traceback" not in err


@pytest.mark.slow
def test_eval_and_export_use_the_average_unless_raw(ema_run, tmp_path):
    from iaat.engine.runs import load_run

    common = ["--n", "32", "--attack", "pgd:steps=2", "--no-checks", "--no-progress"]
    results = {}
    for name, extra in (("auto", []), ("ema", ["--ema"]), ("raw", ["--raw"])):
        out = tmp_path / f"{name}.json"
        code, _, err = run_main("eval", str(ema_run), *common, *extra, "--out", str(out))
        assert code == 0, err
        results[name] = json.loads(out.read_text())
    assert results["auto"]["weights"] == "ema" and "averaged weights" in results["auto"]["model_source"]
    assert results["ema"]["weights"] == "ema" and results["ema"]["clean"] == results["auto"]["clean"]
    assert results["raw"]["weights"] == "raw"
    code, _, err = run_main("eval", str(ema_run), *common, "--ema", "--raw")
    assert code == 2 and "not allowed with" in err

    averaged, *_ = load_run(ema_run, weights="ema")
    trained, *_ = load_run(ema_run)
    model_file, _ = iaat.export_model(ema_run, tmp_path / "m.safetensors")  # auto: the average
    x = torch.rand(4, 3, 32, 32)
    raw_file, _ = iaat.export_model(ema_run, tmp_path / "raw.safetensors", weights="raw")
    with torch.no_grad():
        assert torch.equal(iaat.load_model(model_file)(x), averaged(x))
        assert not torch.equal(averaged(x), trained(x))
        # load_model picks a run's weights as eval and export do
        assert torch.equal(iaat.load_model(ema_run)(x), averaged(x))
        assert torch.equal(iaat.load_model(ema_run, weights="raw")(x), trained(x))
        assert torch.equal(iaat.load_model(raw_file, weights="raw")(x), trained(x))
    with pytest.raises(ConfigError, match="holds the raw weights of its run, not the ema ones"):
        iaat.load_model(raw_file, weights="ema")


@pytest.mark.slow
def test_averaging_leaves_the_training_itself_unchanged(ema_run, tiny_cifar, tmp_path):
    """The average and its evaluation draw no random numbers from the training's stream: the same run without
    train.ema ends with bitwise the same trained weights (so a sweep's iaat and iaat_ema share them)."""
    plain = tmp_path / "plain"
    code, _, err = run_main(*tiny_train_args(tiny_cifar, plain, 2, *EMA_ARGS[:-2]))
    assert code == 0, err
    a = load_checkpoint(ema_run / "checkpoints" / "epoch_0002.pt")
    b = load_checkpoint(plain / "checkpoints" / "epoch_0002.pt")
    assert EMA_KEY not in b
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert torch.equal(a["method"]["memory"], b["method"]["memory"])
