"""End-to-end CLI tests: train, kill, resume, eval, and the errors a user can cause.

Most commands run in this process (`iaat.cli.main`); a process of its own only where one is killed, and for
`python -m iaat` itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import torch

import iaat

from helpers import child_env, run_cli, run_in_process, run_main, tiny_train_args

def snapshot(root: Path) -> dict:
    """Every file under root with its content hash: what a failing command must leave unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_writes_run_folder(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert {"train_loss", "train_acc", "val_clean_acc", "val_pgd10_acc", "lr"} <= set(rows[0])
    assert (tiny_run / "checkpoints" / "epoch_0001.pt").is_file()
    ckpt = torch.load(tiny_run / "checkpoints" / "epoch_0001.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scaler", "method", "rng", "config"} <= set(ckpt)
    import yaml

    threads = yaml.safe_load((tiny_run / "config.yaml").read_text())["train"]["threads"]
    assert isinstance(threads, int) and threads >= 1  # the count it ran with, so a resume computes the same


def test_eval_writes_json(tiny_run, tmp_path):
    out = tmp_path / "e.json"
    res = run_in_process("eval", str(tiny_run), "--n", "64", "--eps", "8", "16", "--restarts", "2", "--out", str(out),
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert result["n"] == 64 and result["split"] == "test"
    assert result["command"] == f"iaat eval {tiny_run} --n 64 --eps 8 16 --restarts 2 --out {out} --no-progress"
    accs = [a["accuracy"] for a in result["attacks"].values()]
    assert len(accs) == 2 and all(a <= result["clean"] for a in accs)
    assert "clean accuracy" in res.stdout


def test_a_relative_data_folder_is_found_from_another_working_directory(tiny_cifar, tmp_path, monkeypatch):
    """config.yaml records the data folder as an absolute path: eval from elsewhere reads the same data."""
    (tmp_path / "project").mkdir()
    shutil.copytree(tiny_cifar, tmp_path / "project" / "data")
    monkeypatch.chdir(tmp_path / "project")
    args = tiny_train_args(Path("data"), Path("run"), 1)
    assert args[1:3] == ["--data-dir", "data"]
    code, _, err = run_main(*args)
    assert code == 0, err
    assert yaml.safe_load(Path("run/config.yaml").read_text())["data"]["data_dir"] == str(tmp_path / "project/data")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("eval", "project/run", "--n", "20", "--steps", "1", "--no-progress")
    assert code == 0 and "clean accuracy" in out, err
    assert not (tmp_path / "data").exists()  # no download attempt into this folder
    from iaat.engine.trainer import _anchored

    assert [_anchored(d) for d in ("", None, "~/data", "/abs")] == ["", None, "~/data", "/abs"]  # as they mean


def test_eval_takes_the_norm_and_radius_the_run_was_trained_for(tiny_cifar, tmp_path):
    run = tmp_path / "l2"
    code, _, err = run_main(*tiny_train_args(tiny_cifar, run, 1, "--set", "attack.norm=l2", "--eps", "64"))
    assert code == 0, err
    code, out, err = run_main("eval", str(run), "--n", "20", "--steps", "2", "--no-progress",
                              "--out", str(tmp_path / "e.json"))
    assert code == 0, err  # was: L-inf at 64/255
    result = json.loads((tmp_path / "e.json").read_text())
    assert (result["norm"], result["eps"]) == ("l2", pytest.approx(64 / 255))
    code, _, err = run_main("eval", str(run), "--n", "20", "--norm", "linf", "--no-progress")
    assert code == 2 and "trained under l2 (eps 64/255), the evaluation is under --norm linf: give its --eps" in err
    path, _ = iaat.export_model(run, tmp_path / "l2.safetensors")
    for model in (run, run / "checkpoints" / "epoch_0001.pt", path):  # a radius given: the norm read quickly
        code, _, err = run_main("eval", str(model), "--n", "20", "--steps", "1", "--eps", "128", "--no-progress",
                                "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "e128.json"))
        assert code == 0, err
        assert json.loads((tmp_path / "e128.json").read_text())["norm"] == "l2"


def _kill_during_epoch_2(args: list[str], run_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "iaat", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=child_env())  # this process's thread count: bitwise
    marker = run_dir / "checkpoints" / "epoch_0001.pt.sha256"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    epoch_seconds = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["train_seconds"]
    time.sleep(epoch_seconds * 0.4)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "epoch_0002.pt").exists(), "killed too late: epoch 2 had finished"


@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume_is_bitwise_equal(tiny_cifar, tmp_path):
    epochs = 3
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_in_process(*tiny_train_args(tiny_cifar, straight, epochs)).returncode == 0
    _kill_during_epoch_2(tiny_train_args(tiny_cifar, killed, epochs), killed)
    res = run_in_process("train", "--out", str(killed), "--resume", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    a = torch.load(straight / "checkpoints" / f"epoch_{epochs:04d}.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / f"epoch_{epochs:04d}.pt", weights_only=True)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    rows = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


@pytest.mark.slow
def test_resume_can_extend_epochs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = run_in_process("train", "--out", str(run), "--resume", "--epochs", "2", "--threads", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert (run / "checkpoints" / "epoch_0002.pt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())  # says what the last epochs ran with
    assert (saved["train"]["epochs"], saved["train"]["threads"]) == (2, 2)
    res = run_in_process("train", "--out", str(run), "--resume", "--no-progress")  # nothing left: no --epochs again
    assert res.returncode == 0 and "already finished 2 epochs (asked for 2)" in res.stdout, res.stdout


# ---- bad input: a clear one-paragraph error, non-zero exit, no file changed -------------------------------------


def _expect_error(res: subprocess.CompletedProcess, *phrases: str) -> None:
    assert res.returncode not in (0, None), res.stderr  # None: an exception escaped main()
    assert "Traceback" not in res.stderr, res.stderr
    assert "iaat: error:" in res.stderr, res.stderr
    for phrase in phrases:
        assert phrase in res.stderr, (phrase, res.stderr)


@pytest.mark.parametrize("extra, phrases", [
    (["--model", "resnet19"], ["unknown model 'resnet19'", "Did you mean 'resnet18'"]),
    (["--method", "pgd-at"], ["unknown method 'pgd-at'", "Did you mean 'pgd_at'"]),
    (["--set", "attack.eps=-8"], ["negative"]),
    (["--eps", "0.031"], ["looks like a value already in [0, 1] units", "0.031/1"]),
    (["--eps", "2000"], ["larger than"]),
    (["--set", "attack.epss=8"], ["unknown key 'attack.epss'", "Did you mean 'eps'"]),
    (["--set", "train.epochs=many"], ["train.epochs must be an integer"]),
])
def test_bad_train_options(tiny_cifar, tmp_path, extra, phrases):
    out = tmp_path / "run"
    res = run_in_process(*tiny_train_args(tiny_cifar, out, 1, *extra))
    _expect_error(res, *phrases)
    assert not out.exists()


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    res = run_in_process(*tiny_train_args(missing, tmp_path / "run", 1))
    _expect_error(res, "cifar10 not found", str(missing), "--data-dir")
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_without_resume(tiny_run, tiny_cifar):
    before = snapshot(tiny_run)
    _expect_error(run_in_process(*tiny_train_args(tiny_cifar, tiny_run, 1)), "already exists", "--resume")
    assert snapshot(tiny_run) == before


def test_resume_with_nothing_to_resume(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_error(run_in_process("train", "--out", str(tmp_path / "empty"), "--resume"), "nothing to resume")


def test_eval_ema_of_a_run_without_averaged_weights_is_refused(tiny_run):
    code, _, err = run_main("eval", str(tiny_run), "--ema", "--n", "8", "--no-checks")
    assert code == 2 and "averaged" in err and "Traceback" not in err, err


def test_an_emptied_run_config_is_refused_not_read_as_the_defaults(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.yaml").write_text("")
    for args in (["train", "--out", str(run), "--resume"], ["eval", str(run), "--n", "8"],
                 ["export", str(run), "--out", str(tmp_path / "m.safetensors")]):
        code, _, err = run_main(*args)
        assert code != 0 and "is not a run's config" in err and "the file is empty" in err, (args, err)


def test_resume_refuses_changed_model(tiny_run):
    before = snapshot(tiny_run)
    _expect_error(run_in_process("train", "--out", str(tiny_run), "--resume", "--model", "resnet18"),
                  "cannot change model.name")
    assert snapshot(tiny_run) == before


@pytest.mark.slow
def test_truncated_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "epoch_0001.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(run)
    _expect_error(run_in_process("eval", str(ckpt), "--n", "8"), "damaged")
    _expect_error(run_in_process("eval", str(run), "--n", "8"), "no valid checkpoint")
    assert snapshot(run) == before


def test_evaluating_a_checkpoint_of_a_run_writes_to_the_runs_eval_folder(tiny_run, tmp_path):
    """Where iaat report and iaat export look for a run's evaluations, not RUN/checkpoints/eval/."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = run_in_process("eval", str(run / "checkpoints" / "epoch_0001.pt"), "--n", "8", "--steps", "1",
                         "--no-checks", "--no-progress")
    assert res.returncode == 0, res.stderr
    (written,) = (run / "eval").glob("*.json")
    assert json.loads(written.read_text())["epoch"] == 1 and not (run / "checkpoints" / "eval").exists()


@pytest.mark.slow
def test_checkpoint_of_a_different_model(tiny_run, tiny_cifar, tmp_path):
    other = tmp_path / "wide"
    assert run_in_process(*tiny_train_args(tiny_cifar, other, 1), "--set", "model.width=16").returncode == 0
    # Put the width-16 checkpoint into a run whose config says width 8.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("epoch_0001.pt", "epoch_0001.pt.sha256"):
        shutil.copy(other / "checkpoints" / name, run / "checkpoints" / name)
    before = snapshot(run)
    _expect_error(run_in_process("eval", str(run), "--n", "8"), "different model")
    _expect_error(run_in_process("train", "--out", str(run), "--resume", "--epochs", "2"), "different model")
    assert snapshot(run) == before


def test_malicious_checkpoint_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "iaat-checkpoint", "model": Payload()}, bad)
    _expect_error(run_in_process("eval", str(bad)), "refusing to load")
    assert not marker.exists()


def test_cpu_threads_default_to_one_on_a_busy_machine(monkeypatch):
    from iaat.engine import setup

    threads = [4]
    monkeypatch.setattr(setup.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(setup.torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    said: list = []
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (6.5, 5.0, 4.0))
    assert setup.choose_threads(None, True, said.append) == 1
    assert threads == [4, 1] and "busy (load 6.5 on 4 cores)" in said[0] and "--threads" in said[0]
    threads[:] = [4]
    said.clear()
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert setup.choose_threads(None, True, said.append) == 4 and threads == [4] and not said  # quiet: all cores
    monkeypatch.setattr(setup.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(setup, "_SAID", set())
    assert setup.choose_threads(3, True, said.append) == 3 and not said  # asked for: always
    assert setup.choose_threads(9, True, said.append) == 9 and "more than the 4 cores" in said.pop()
    assert setup.choose_threads(9, True, said.append) == 9 and not said  # said once
    threads[:] = [4]
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert setup.choose_threads(None, True, said.append) == 4 and not said  # the user's OMP_NUM_THREADS wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("MKL_NUM_THREADS", "4")  # torch's other variable counts as the user's choice too
    assert setup.choose_threads(None, True, said.append) == 4 and not said
    monkeypatch.delenv("MKL_NUM_THREADS")
    assert setup.choose_threads(None, False, said.append) is None and threads == [4]  # not on a CPU: untouched


def test_busy_machine_note_waits_for_the_setup_checks(monkeypatch, tmp_path):
    """The one-thread note comes with the run's other notes, not just before an error about the model."""
    import iaat
    from iaat.engine import setup

    threads = [4]
    monkeypatch.setattr(setup.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(setup.torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    spec = {"data": {"dataset": "digits", "train_subset": 200, "val_size": 100}, "model": {"name": "torch.nn:Identity"},
            "train": {"epochs": 1, "progress": False, "eval_steps": 1}}
    said: list = []
    with pytest.raises(iaat.errors.IaatError, match="the model"):
        iaat.train(tmp_path / "bad", spec, log=said.append)
    assert said == []
    spec["model"] = {"name": "small_cnn", "width": 4}
    iaat.train(tmp_path / "good", spec, log=said.append)
    assert "busy (load 64.0 on 4 cores)" in said[1], said  # after the run's summary line


def test_print_config_shows_every_key_and_round_trips(tmp_path):
    res = run_in_process("train", "--method", "iaat", "--eps", "4", "--set", "method.gamma=2", "--threads", "1",
                         "--print-config")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for line in ("  name: iaat", "  eps: '4'", "  gamma: 2  #", "  warmup_epochs: 5  #", "  lr: 0.1  # peak",
                 "  threads: 1  #", "  lam: -1.0  #"):
        assert line in text, line
    assert "[a size: pixel units over 255]" in text and not (tmp_path / "out").exists()
    saved = tmp_path / "printed.yaml"
    saved.write_text(text)
    again = run_in_process("train", "--config", str(saved), "--print-config")
    assert again.returncode == 0 and again.stdout == text  # what it prints is a config that means the same


def test_help_states_units():
    res = run_cli("train", "--help")
    assert res.returncode == 0
    assert "pixel units over 255" in res.stdout and "--set" in res.stdout


def test_demo_help_gives_the_readmes_duration():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "(under a minute)" in readme.split("make demo", 2)[1].splitlines()[0]  # the README's first demo line
    for argv in (["--help"], ["demo", "--help"]):
        code, out, _ = run_main(*argv)
        assert code == 0 and "under a minute" in " ".join(out.split()) and "few-minute" not in out, out


def test_a_start_that_never_finished_an_epoch_does_not_block_its_folder(tiny_run, tiny_cifar, tmp_path):
    """What a start leaves when it fails in its first epoch (config.yaml, the data split, an empty checkpoints/):
    the same command, corrected, starts there again instead of asking for a --resume of nothing."""
    out = tmp_path / "failed"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "data_split.npz"):
        shutil.copy(tiny_run / name, out / name)
    code, _, err = run_main(*tiny_train_args(tiny_cifar, out, 1))
    assert code == 0, err
    assert (out / "checkpoints" / "epoch_0001.pt").is_file()


def test_print_config_with_resume_shows_the_runs_config(tiny_run):
    code, out, err = run_main("train", "--out", str(tiny_run), "--resume", "--epochs", "3", "--print-config")
    assert code == 0, err
    assert "  name: small_cnn" in out and "  width: 8" in out and "  epochs: 3" in out  # the run's, then --epochs


def test_extending_a_cosine_run_says_that_its_schedule_stretches(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("schedule: step", "schedule: cosine"))
    code, _, err = run_main("train", "--out", str(run), "--resume", "--epochs", "3", "--print-config")
    assert code == 0 and "the cosine learning-rate schedule now spans 3 epochs" in err, err
    code, _, err = run_main("train", "--out", str(run), "--resume", "--epochs", "2")
    assert code == 0 and err.count("the cosine learning-rate schedule now spans 2 epochs") == 1, err


def test_resuming_from_python_refuses_what_the_command_line_refuses(tiny_run, tmp_path):
    """engine.train(resume=True) checks the config against the run's as ``iaat train --resume`` does."""
    from iaat.config import config_from_dict
    from iaat.engine import train
    from iaat.engine.rundir import read_config
    from iaat.errors import ConfigError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = config_from_dict(read_config(run))
    cfg.attack.eps = 4
    with pytest.raises(ConfigError, match="cannot change attack.eps when resuming"):
        train(cfg, run, resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (tiny_run / "checkpoints").iterdir())  # untouched


def test_demo_threads_reach_both_runs_on_a_busy_machine(monkeypatch):
    """--threads N decides, however busy the machine: the count goes into both runs' configs."""
    import iaat.demo
    from iaat.engine import setup

    seen = {}
    monkeypatch.setattr(setup.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(setup.torch, "set_num_threads", lambda n: seen.setdefault("set", n))
    monkeypatch.setattr(setup.torch, "get_num_threads", lambda: seen.get("set", 4))
    monkeypatch.setattr(iaat.demo, "run_demo", lambda **kw: seen.update(kw))
    code, _, err = run_main("demo", "--threads", "2")
    assert code == 0, err
    assert seen["threads"] == 2 and "busy" not in err
    assert iaat.demo.demo_config("pgd_at", 1, "64", 0, seen["threads"])["train"]["threads"] == 2


def test_an_interrupted_demo_carries_on_in_its_folder(tmp_path):
    """Running the demo again into its own folder finishes what is missing instead of refusing the folder."""
    import shutil

    out = tmp_path / "demo"
    code, first, err = run_main("demo", "--out", str(out), "--epochs", "1")
    assert code == 0, err
    shutil.rmtree(out / "pgd_at")  # stopped before the second run began
    code, again, err = run_main("demo", "--out", str(out), "--epochs", "1")
    assert code == 0, err
    assert f"carrying on with the earlier demo's run {out / 'clean'}" in again and "pgd_at" not in again.split(
        "carrying on")[-1].split("\n")[0]
    assert first.splitlines()[-2:] == again.splitlines()[-2:]  # the same accuracies
    code, _, err = run_main("demo", "--out", str(out), "--epochs", "2")  # another demo: not reported as this one
    assert code == 2 and "holds another demo's run (clean" in err, err
