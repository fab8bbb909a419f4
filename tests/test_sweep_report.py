"""``iaat sweep`` and ``iaat report`` end to end on scikit-learn's digits (real, bundled, tiny)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from iaat.cli import main
from iaat.errors import ConfigError
from iaat.sweep import build_plan

pytest.importorskip("matplotlib", reason="iaat report needs matplotlib (pip install 'iaat[report]')")

BASE = {
    "data": {"dataset": "digits", "val_size": 197, "augment": False},
    "model": {"name": "small_cnn", "width": 8},
    "attack": {"eps": 32, "step_size": 8, "steps": 3},
    "optim": {"lr": 0.05, "schedule": "cosine"},
    "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "eval_steps": 2},
}
EVAL = {"n": 100, "attacks": ["pgd:steps=5", "pgd:steps=10"], "sweep_eps": [0, 16, 32], "checks": False}


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = {"base": BASE, "frontier_eps": [16, 32],
            "runs": {"iaat": {"method.warmup_epochs": 1, "method.gamma": 8, "method.eps_warmup": 32},
                     "iaat_no_warmup": {"method.gamma": 8, "method.eps_init": 16},
                     "gairat": {}, "clean": {}, "mixup_at": {},
                     "iaat_line_search": {"method.warmup_epochs": 1, "method.eps_warmup": 32,
                                          "method.line_search_step": 16, "method.line_search_max": 48}},
            "grid": {"of": "iaat", "params": {"method.gamma": [4, 8]}}, "eval": EVAL}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_plan_names_dedup_and_errors(tmp_path):
    plan = build_plan(yaml.safe_load(write_spec(tmp_path).read_text()))
    assert list(plan.runs) == ["pgd_at_eps16", "pgd_at_eps32", "iaat", "iaat_no_warmup", "gairat", "clean",
                               "mixup_at", "iaat_line_search", "iaat_gamma4"]  # iaat_gamma8 is the iaat run
    assert plan.runs["pgd_at_eps16"]["attack"]["step_size"] == "4"  # eps/4
    small = build_plan({"base": BASE, "frontier_eps": [1], "runs": {}})  # a quarter pixel level: written as such
    assert small.runs["pgd_at_eps1"]["attack"]["step_size"] == "0.25/255"
    assert plan.runs["gairat"]["method"] == {"name": "gairat"}  # a new method starts from its own defaults
    assert plan.groups["iaat_gamma4"] == "grid"
    with pytest.raises(ConfigError, match="unknown sweep key 'frontier'. Did you mean 'frontier_eps'"):
        build_plan({"base": BASE, "frontier": [8]})
    with pytest.raises(ConfigError, match="unknown sweep key 'run'. Did you mean 'runs'"):
        build_plan({"base": BASE, "run": {"iaat": {"method.name": "iaat"}}})
    with pytest.raises(ConfigError, match="unknown key 'eval.attack'. Did you mean 'attacks'"):
        build_plan({"base": BASE, "frontier_eps": [8], "eval": {"attack": ["pgd"]}})
    with pytest.raises(ConfigError, match="sweep run 'iaat'.*gama"):
        build_plan({"base": BASE, "runs": {"iaat": {"method.gama": 2}}})
    with pytest.raises(ConfigError, match="needs method.name"):
        build_plan({"base": BASE, "runs": {"mine": {"attack.eps": 4}}})
    with pytest.raises(ConfigError, match="sweep 'base' must be a train config"):
        build_plan({"base": [1, 2]})
    with pytest.raises(ConfigError, match="grid' is of 'nope', which is not a named run.*--with nope"):
        build_plan({"base": BASE, "grid": {"of": "nope", "params": {"method.gamma": [1]}}})
    with pytest.raises(ConfigError, match="grid' needs 'of: RUN'"):
        build_plan({"base": BASE, "grid": {"of": "iaat", "params": []}})


def test_an_evaluation_of_other_weights_than_the_newest_checkpoint_is_stale(tmp_path):
    from iaat.sweep import stale_evaluation

    run = tmp_path / "run"
    path = run / "eval" / "sweep-abc.json"
    (run / "checkpoints").mkdir(parents=True)
    path.parent.mkdir()
    assert not stale_evaluation(path, run)  # none yet: evaluate (a cut one's state is resumed)
    path.write_text(json.dumps({"clean": 0.5, "attacks": {}, "epoch": 2}))
    (run / "checkpoints" / "epoch_0002.pt").write_bytes(b"")
    assert not stale_evaluation(path, run)
    (run / "checkpoints" / "epoch_0003.pt").write_bytes(b"")  # trained further, by the sweep or by hand
    assert stale_evaluation(path, run)
    path.write_text("{")  # unreadable
    assert stale_evaluation(path, run)


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path):
    """Reports made again from the same runs change no file (no date, fixed ids in the SVGs)."""
    from iaat.reporting.figures import pyplot, save

    plt = pyplot()
    written = []
    for name in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [0.3, 0.2, 0.25], marker="o", label="run")
        ax.legend()
        written.append([p.read_bytes() for p in save(fig, tmp_path / name)])
    assert written[0] == written[1] and b"<svg" in written[0][1]


def test_wilson_intervals_and_distinct_trajectories():
    import numpy as np

    from iaat.reporting.figures import pick_trajectories, wilson

    assert wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0.0, 50)[0] == 0.0 and 0.0 < wilson(0.0, 50)[1] < 0.1 and wilson(1.0, 50)[1] == 1.0
    # samples 0 and 1 share one trajectory, 2 and 4 another: three distinct lines, by final radius
    stack = np.array([[8, 8, 8, 8, 8], [8, 8, 9, 7, 9], [8, 8, 10, 6, 10]], dtype=float)  # epochs x samples
    picked, shared = pick_trajectories(stack, k=8)
    assert picked.tolist() == [3, 0, 2] and shared.tolist() == [1, 2, 2]
    picked, _ = pick_trajectories(stack, k=2)
    assert picked.tolist() == [3, 2]  # the extremes when fewer are asked for


def epoch_lines(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"^epoch (\d+) \|", log.read_text(), flags=re.M)]


@pytest.mark.slow
def test_sweep_then_report_end_to_end(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path)
    out = tmp_path / "sweep"
    # Two runs at once, a thread each: as the sweep splits the cores itself (this suite's OMP_NUM_THREADS is kept).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    assert main(["sweep", str(spec), "--out", str(out), "--jobs", "2"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    command = hint.split(" with: ")[1].split()  # the closing hint's command, run as printed
    plan = yaml.safe_load((out / "sweep.yaml").read_text())
    assert len(plan["runs"]) == 9
    for name in plan["runs"]:
        assert epoch_lines(out / "logs" / f"{name}.log") == [1, 2]
        assert list((out / "runs" / name / "eval").glob("sweep-*.json"))
    # Everything finished: a second call trains and evaluates nothing.
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already trained and evaluated") == 9

    assert command == ["iaat", "report", str(out)]
    assert main(command[1:]) == 0
    report = out / "report"  # the default for a sweep folder
    summary = json.loads((report / "report.json").read_text())
    assert len(summary["figures"]["fig3_tradeoff"]) == 9  # one point per run
    for point in summary["figures"]["fig3_tradeoff"]:  # with its 95% interval on both axes, from n
        assert point["n"] == 100 and point["robust_interval"][0] <= point["robust"] <= point["robust_interval"][1]
        assert point["clean_interval"][1] - point["clean_interval"][0] > 0.05
    assert {c["run"] for c in summary["figures"]["fig4_accuracy_over_eps"]} == set(plan["runs"]) - {"iaat_gamma4"}
    adaptive = ["iaat", "iaat_no_warmup", "iaat_line_search", "iaat_gamma4"]
    stems = ["fig3_tradeoff", "fig4_accuracy_over_eps"]
    stems += [f"fig7_radius_over_epochs_{n}" for n in adaptive] + [f"fig8_radius_histograms_{n}" for n in adaptive]
    stems += [f"fig2_images_{n}_{w}" for n in ("iaat", "iaat_no_warmup", "iaat_line_search")
              for w in ("smallest", "largest")]
    for stem in stems:
        png, svg = report / f"{stem}.png", report / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, stem
        assert "<svg" in svg.read_text()[:2000], stem
    grid = summary["figures"]["fig2_images_iaat"]
    assert len(grid["smallest"]["radii"]) == 8 and max(grid["smallest"]["radii"]) <= min(grid["largest"]["radii"])
    tables = {t: (report / f"{t}.md").read_text() for t in
              ("table1_robustness", "table5_warmup", "table7_line_search", "table8_mixup", "table9_sensitivity")}
    assert all(name in tables["table1_robustness"] for name in plan["runs"])
    assert "PGD-5@32/255" in tables["table1_robustness"] and "PGD-10@32/255" in tables["table1_robustness"]
    assert "iaat_no_warmup" in tables["table5_warmup"] and "pgd_at_eps32" in tables["table5_warmup"]
    assert "iaat_line_search" in tables["table7_line_search"]
    assert "mixup_at" in tables["table8_mixup"]
    assert "γ = 4/255" in tables["table9_sensitivity"] and "γ = 8/255" in tables["table9_sensitivity"]
    family = {line.split(" | ")[0].strip("| "): line for line in (report / "table_family.md").read_text().splitlines()}
    assert "weight 1 ±" in family["gairat"] and re.search(r"radius \d+\.\d\d/255 \(10-90%", family["iaat"])
    md = (report / "report.md").read_text()
    assert all(f"({stem}.png)" in md for stem in stems)
    clean_row = next(r for r in summary["runs"] if r["name"] == "clean")
    pgd_row = next(r for r in summary["runs"] if r["name"] == "pgd_at_eps32")
    assert clean_row["robust"] < pgd_row["robust"]  # the attack is real: clean training is not robust

    # A single run folder works too, and reporting is repeatable into the same folder.
    assert main(["report", str(out / "runs" / "pgd_at_eps32"), "--out", str(report)]) == 0

    # A damaged radius file is left out of the figures, with a warning, not a crash.
    damaged = tmp_path / "damaged"
    shutil.copytree(out / "runs" / "iaat", damaged)
    first = sorted((damaged / "radii").glob("epoch_*.npy"))[0]
    first.write_bytes(b"")
    capsys.readouterr()
    assert main(["report", str(damaged), "--out", str(tmp_path / "damaged_report")]) == 0
    assert f"{first} is not an array of radii" in capsys.readouterr().err

    # Extended by a third epoch, a run is evaluated again: its numbers are of the weights it now has.
    assert main(["sweep", str(spec), "--out", str(out), "--only", "clean", "--epochs", "3"]) == 0
    (evaluation,) = (out / "runs" / "clean" / "eval").glob("sweep-*.json")
    assert json.loads(evaluation.read_text())["epoch"] == 3
    assert yaml.safe_load((out / "runs" / "clean" / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_sweep_trains_nothing_twice(tmp_path, how):
    """Stopped (SIGTERM: the sweep forwards it) or killed (SIGKILL: its children get SIGTERM from the kernel)
    in the middle of its second run, a sweep run again skips the first run and resumes the second."""
    base = {**BASE, "train": {**BASE["train"], "epochs": 3}}
    spec = write_spec(tmp_path, base=base, frontier_eps=[32], grid=None,
                      runs={"iaat": {"method.warmup_epochs": 1, "method.gamma": 8}},
                      eval={**EVAL, "attacks": ["pgd:steps=2"], "sweep_eps": []})
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "iaat", "sweep", str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "logs" / "iaat.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and 1 in epoch_lines(log)):
        time.sleep(0.05)
    assert log.is_file(), "the sweep never reached its second run"
    proc.send_signal(getattr(signal, how))
    text, _ = proc.communicate(timeout=120)
    if how == "SIGTERM":
        assert proc.returncode == 130, text
        assert "run the same command again" in text
    deadline = time.time() + 120  # the orphaned training saves its state and exits
    while time.time() < deadline and "iaat: interrupted" not in log.read_text():
        time.sleep(0.1)
    assert "SIGTERM received" in log.read_text()
    threads = int(os.environ["OMP_NUM_THREADS"])  # set by conftest: the runs keep the count the sweep was given
    assert f"cpu, {threads} thread{'s' if threads > 1 else ''} |" in log.read_text()
    first = out / "runs" / "pgd_at_eps32"
    frozen = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    assert not (out / "runs" / "iaat" / "summary.json").exists()  # stopped mid-run
    assert not list((out / "runs" / "iaat").glob("eval/sweep-*.json"))  # nothing new started after the signal

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[pgd_at_eps32] already trained and evaluated" in again.stdout
    assert "[iaat] training (resumed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == frozen
    assert list((out / "runs" / "iaat" / "eval").glob("sweep-*.json"))
    for name in ("pgd_at_eps32", "iaat"):  # every epoch trained exactly once over both calls
        assert epoch_lines(out / "logs" / f"{name}.log") == [1, 2, 3], name


@pytest.mark.slow
def test_sweep_refuses_a_folder_trained_with_another_config(tmp_path, capsys):
    spec = write_spec(tmp_path, frontier_eps=[32], runs={}, grid=None,
                      eval={**EVAL, "attacks": ["pgd:steps=2"], "sweep_eps": []})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    before = (out / "runs" / "pgd_at_eps32" / "metrics.jsonl").read_text()
    assert main(["sweep", str(spec), "--out", str(out), "--set", "optim.lr=0.2"]) == 2
    err = capsys.readouterr().err
    assert "trained with another config: optim.lr" in err and "Traceback" not in err
    assert (out / "runs" / "pgd_at_eps32" / "metrics.jsonl").read_text() == before
    assert main(["sweep", str(spec), "--out", str(out), "--epochs", "1"]) == 2  # was: "done", at 2 epochs
    assert "has trained 2 epochs, more than the 1 planned: a sweep trains its runs to one schedule" in \
        capsys.readouterr().err
    assert main(["sweep", str(spec), "--out", str(out), "--only", "nope"]) == 2
    assert "no run named nope" in capsys.readouterr().err
    import fcntl

    with open(out / "sweep.lock", "a+") as held:  # as if another sweep were running on this folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["sweep", str(spec), "--out", str(out)]) == 2
    assert "another iaat sweep is running" in capsys.readouterr().err


def test_a_run_keeps_the_thread_count_of_the_sweeps_environment():
    from iaat.sweep import child_env

    # torch takes MKL_NUM_THREADS over OMP_NUM_THREADS: the one not set follows the one that is
    assert child_env(2, {"OMP_NUM_THREADS": "1"}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert child_env(2, {"MKL_NUM_THREADS": "3"}) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert child_env(2, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    import doctest

    import iaat.sweep
    import iaat.threads  # the rule shared with train's own thread choice

    for module in (iaat.threads, iaat.sweep):  # iaat.sweep: child_env, and the warning when runs share too few cores
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_report_errors(tmp_path, capsys, monkeypatch):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--threads", "0"]) == 2  # it sets threads like train and eval
    assert "--threads must be >= 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'iaat[report]'" in capsys.readouterr().err


def test_sweep_cli_without_file_builds_the_default_plan(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run", "--with", "clean",
                 "--grid", "method.beta=0.1,0.5"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith("evaluation")]
    assert names == ["pgd_at_eps2", "pgd_at_eps4", "pgd_at_eps6", "pgd_at_eps8", "iaat", "iaat_no_warmup", "gairat",
                     "clean", "iaat_beta0p5"]
    assert not (tmp_path / "s").exists()
    # --set RUN:section.key=value sets one run; without a run name, every run.
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run",
                 "--set", "iaat:method.warmup_epochs=1", "--set", "optim.lr=0.02"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "warmup_epochs=1" in lines["iaat"]
    assert "warmup_epochs=0" in lines["iaat_no_warmup"]  # its own setting stays
    assert not any("warmup_epochs" in lines[name] for name in ("gairat", "pgd_at_eps8"))
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run",
                 "--set", "nope:method.gamma=2"]) == 2
    assert "'nope' is not a named run of this sweep" in capsys.readouterr().err
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run", "--with", "mart",
                 "iaat_ema", "pgd_at_ema"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"mart", "iaat_ema", "pgd_at_ema"} <= set(lines) and " mart eps=" in lines["mart"]
    plan = build_plan({"base": BASE, "runs": {"iaat_ema": {}}})
    assert plan.runs["iaat_ema"]["train"]["ema"] == 0.999 and plan.runs["iaat_ema"]["method"]["name"] == "iaat"
    assert main(["sweep", "--out", str(tmp_path / "s")]) == 2
    assert "needs a sweep file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others(tmp_path, capsys):
    spec = write_spec(tmp_path, frontier_eps=[], grid=None,
                      runs={"broken": {"method.name": "pgd_at", "train.device": "cuda:7"}, "clean": {}},
                      eval={**EVAL, "attacks": ["pgd:steps=2"], "sweep_eps": []})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    text = capsys.readouterr().err
    assert "CUDA is not available" in text  # the tail of the failed run's log is shown
    assert "1 run(s) failed: broken" in text
    assert (out / "runs" / "clean" / "summary.json").is_file()
    assert list((out / "runs" / "clean" / "eval").glob("sweep-*.json"))


def test_with_groups_expand_to_their_runs(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run", "--frontier-eps",
                 "--with", "ema", "awp", "iaat_trades"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"pgd_at_ema", "iaat_ema", "pgd_at_awp", "iaat_awp", "iaat_trades"} <= set(lines)
    assert lines["iaat_awp"].endswith("train.awp=auto") and "train.ema=0.999" in lines["iaat_ema"]
    assert "train_loss=trades" in lines["iaat_trades"]


def test_dry_run_shows_what_only_selects(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run", "--frontier-eps", "none",
                 "--only", "iaat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["iaat", "evaluation:"]
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "s"), "--dry-run", "--frontier-eps", "none",
                 "--only", "pgd_at_eps8"]) == 2
    assert "--only: no run named pgd_at_eps8" in capsys.readouterr().err  # the frontier is gone


@pytest.mark.slow
def test_an_ema_run_is_two_points_and_awp_runs_join_the_parts_table(tmp_path):
    spec = write_spec(tmp_path, frontier_eps=[32], grid=None, runs={"pgd_at_ema": {}, "pgd_at_awp": {}},
                      eval={**EVAL, "sweep_eps": []})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--epochs", "1"]) == 0
    evals = sorted(p.name for p in (out / "runs" / "pgd_at_ema" / "eval").glob("sweep-*.json"))
    raw_name = next(e for e in evals if e.endswith("-raw.json"))
    assert len(evals) == 2 and raw_name.replace("-raw", "") in evals
    average, raw = (json.loads((out / "runs" / "pgd_at_ema" / "eval" / e).read_text())
                    for e in (raw_name.replace("-raw", ""), raw_name))
    assert (average["weights"], raw["weights"]) == ("ema", "raw")
    # the raw weights are those of the frontier run at the same radius and step (same seed, same training)
    frontier = json.loads(next((out / "runs" / "pgd_at_eps32" / "eval").glob("sweep-*.json")).read_text())
    accuracies = lambda ev: {k: v["accuracy"] for k, v in ev["attacks"].items()}  # noqa: E731
    assert raw["clean"] == frontier["clean"] and accuracies(raw) == accuracies(frontier)
    assert main(["report", str(out)]) == 0
    table = (out / "report" / "table_parts.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]  # below the header and separator
    rows = {line.split(" | ")[0].strip("| "): line for line in lines}
    assert set(rows) == {"pgd_at_eps32", "pgd_at_ema", "pgd_at_ema:raw", "pgd_at_awp"}
    assert "| EMA |" in rows["pgd_at_ema"] and "(raw weights)" in rows["pgd_at_ema:raw"] and "| AWP |" in rows[
        "pgd_at_awp"]
    assert rows["pgd_at_eps32"].endswith("| 1.00x |")


@pytest.mark.slow
def test_family_sweep_report_has_the_family_table_and_radius_figures(tmp_path, capsys):
    """`--with mma cat mail` beside the frontier, IAAT and GAIRAT; the report's family table shows every run with
    its per-sample state, and MMA's margins and CAT's radii get the radius figures IAAT gets."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", "--config", str(base), "--out", str(tmp_path / "dry"), "--dry-run", "--frontier-eps", "32",
                 "--with", "mma", "cat", "mail", "--set", "cat:method.smoothing=3"]) == 0
    assert {"mma", "cat", "mail", "iaat", "gairat"} <= {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    spec = write_spec(tmp_path, frontier_eps=[32], grid=None, eval={**EVAL, "attacks": ["pgd:steps=5"], "sweep_eps": []},
                      runs={"mma": {}, "cat": {"method.smoothing": 3, "method.eta": 4}, "mail": {}})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--epochs", "1"]) == 0
    assert main(["report", str(out)]) == 0
    table = (out / "report" / "table_family.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[4:] if line.startswith("|")}
    assert set(rows) == {"pgd_at_eps32", "mma", "cat", "mail"}  # GAIRAT's row: test_sweep_then_report_end_to_end
    assert rows["pgd_at_eps32"].endswith("| 1.00x | – |")
    for name in ("mma", "cat"):
        assert re.search(r"radius \d+\.\d\d/255 \(10-90%", rows[name]), rows[name]
    assert re.search(r"weight \d\.\d\d ± \d\.\d\d \(max", rows["mail"])
    summary = json.loads((out / "report" / "report.json").read_text())
    for name in ("mma", "cat"):
        assert f"fig7_radius_over_epochs_{name}" in summary["figures"] and f"fig2_images_{name}" in summary["figures"]


def _fake_run(folder: Path, dataset: str, evaluations: dict) -> Path:
    """A run folder as the report reads it: its config and evaluation JSONs (no checkpoint is needed)."""
    from iaat.config import config_from_dict, dump_yaml

    (folder / "eval").mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(config_from_dict({"data": {"dataset": dataset}})))
    for name, ev in evaluations.items():
        (folder / "eval" / name).write_text(json.dumps({"split": "test", "attacks": {}, **ev}))
    return folder


def test_the_report_shows_only_evaluations_that_compare(tmp_path):
    """A sweep's run without its sweep evaluation is 'not evaluated', not shown with another one; runs of other data
    sets are refused; runs evaluated at other radii or on other images are named in a warning."""
    from iaat.reporting.collect import collect_runs, pick_evaluation
    from iaat.reporting.report import _warn_if_evaluated_differently

    run = _fake_run(tmp_path / "a", "cifar10", {"other.json": {"clean": 0.5, "n": 500, "eps": 2 / 255}})
    assert pick_evaluation(run, run / "eval" / "sweep-x.json") == (None, None)
    assert pick_evaluation(run)[0]["n"] == 500  # a run on its own: its evaluation on the most images
    digits = _fake_run(tmp_path / "b", "digits", {})
    with pytest.raises(ConfigError, match=r"different data sets \(cifar10: a; digits: b\)"):
        collect_runs([run, digits])
    said: list = []
    other = _fake_run(tmp_path / "c", "cifar10", {"e.json": {"clean": 0.4, "n": 100, "eps": 8 / 255, "norm": "linf"}})
    _warn_if_evaluated_differently(collect_runs([run, other]), said.append)
    assert len(said) == 1 and "eps 2/255" in said[0] and "eps 8/255 linf, 100 images: c" in said[0]


def test_a_damaged_first_radius_file_does_not_decide_the_sample_count(tiny_run, tmp_path):
    """The report keeps the epochs whose radius files agree on the sample count, whichever epoch is damaged."""
    import numpy as np

    from iaat.reporting.collect import collect_runs

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    samples = len(np.load(run / "data_split.npz")["train_indices"])
    (run / "radii").mkdir()
    np.save(run / "radii" / "epoch_0001.npy", np.full(5, 0.03, np.float32))  # a wrong length, finite: damaged
    for epoch in (2, 3):
        np.save(run / "radii" / f"epoch_{epoch:04d}.npy", np.full(samples, 0.03, np.float32))
    np.save(run / "radii" / "epoch_0004.npy", np.array([0.03, np.nan] * (samples // 2), np.float32))
    with pytest.warns(UserWarning) as caught:
        (record,) = collect_runs([run])
    assert sorted(record.radii) == [2, 3]
    messages = " ".join(str(w.message) for w in caught)
    assert f"epoch_0001.npy holds 5 radii where the run has {samples} training samples" in messages
    assert "epoch_0004.npy is not an array of radii" in messages
    # Without its data split, the count most epochs agree on decides
    (run / "data_split.npz").unlink()
    with pytest.warns(UserWarning, match="epoch_0001.npy holds 5 radii"):
        (record,) = collect_runs([run])
    assert sorted(record.radii) == [2, 3]


def test_a_sweep_warns_when_its_runs_would_share_too_few_cores(tmp_path, capsys, monkeypatch):
    import iaat.sweep

    monkeypatch.setenv("OMP_NUM_THREADS", str(2 * (os.cpu_count() or 1)))  # each run alone takes every core twice
    monkeypatch.setattr(iaat.sweep.SweepRunner, "run", lambda self, only=None: [])  # the warning, not the runs
    assert main(["sweep", str(write_spec(tmp_path)), "--out", str(tmp_path / "sweep"), "--jobs", "2"]) == 0
    assert "gives each of 2 runs at once" in capsys.readouterr().err


@pytest.mark.slow
def test_the_image_grids_of_an_l2_run_attack_in_l2_at_twice_its_radius(tmp_path, capsys):
    run = tmp_path / "l2"
    assert main(["train", "--dataset", "digits", "--model", "small_cnn", "--set", "model.width=8", "--set",
                 "data.train_subset=200", "--set", "data.val_size=0", "--method", "iaat", "--set",
                 "method.warmup_epochs=0", "--set", "attack.norm=l2", "--eps", "64", "--set", "attack.steps=2",
                 "--epochs", "1", "--no-progress", "--out", str(run)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    drawn = json.loads((tmp_path / "report" / "report.json").read_text())["figures"]["fig2_images_l2"]
    assert drawn["norm"] == "l2" and drawn["eps"] == pytest.approx(128 / 255)  # was: L-inf at 16/255
    assert "perturbation at 128/255 l2" in (tmp_path / "report" / "report.md").read_text()
