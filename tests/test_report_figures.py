"""``iaat report`` on made-up run records and run folders (no training): the numbers, labels, styles and files
that its tables and figures are drawn from."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from iaat.config import config_from_dict, dump_yaml
from iaat.reporting import figures, tables
from iaat.reporting.collect import RunRecord
from iaat.reporting.report import _epochs_text, _main_attack, _warn_if_evaluated_differently, make_report

pytest.importorskip("matplotlib", reason="iaat report needs matplotlib (pip install 'iaat[report]')")

MAIN = ("PGD-10@8/255", "PGD-100@8/255")


def evaluation(clean: float = 0.6, robust: tuple = (0.32, 0.3), labels: tuple = MAIN, n: int = 300,
               extra: dict | None = None, **more) -> dict:
    """An evaluation JSON as iaat eval writes it: the attacks at the main radius, their worst case, and ``extra``
    attacks (label -> accuracy) at other radii, which the worst case is not over."""
    attacks = {label: {"accuracy": a} for label, a in zip(labels, robust)}
    attacks.update({label: {"accuracy": a} for label, a in (extra or {}).items()})
    return {"split": "test", "n": n, "clean": clean, "num_classes": 10, "eps": 8 / 255, "norm": "linf",
            "attacks": attacks, "worst_case": {"accuracy": min(robust), "over": list(labels)}, **more}


def config(method: str = "pgd_at", epochs: int = 3, eps: float = 8, ema=None, awp=None, **params) -> dict:
    return {"data": {"dataset": "cifar10"}, "method": {"name": method, **params}, "attack": {"eps": eps},
            "train": {"epochs": epochs, "ema": ema, "awp": awp}}


def record(name: str, method: str = "pgd_at", ev: dict | None = None, done: int = 3, weights: str = "trained",
           path: Path | None = None, **cfg) -> RunRecord:
    """A run record as collect_runs makes it, without a folder behind it."""
    return RunRecord(name=name, path=path or Path("/runs") / name, cfg=config_from_dict(config(method, **cfg)),
                     metrics=[{"epoch": e, "train_seconds": 10.0} for e in range(1, done + 1)], evaluation=ev,
                     evaluation_path=None, weights=weights, twin=name.endswith(":raw"))


def write_run(folder: Path, cfg: dict, done: int = 3, ev: dict | None = None) -> Path:
    """A run folder as the report reads it: config, metrics and (when given) one evaluation JSON."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(config_from_dict(cfg)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_seconds": 10.0}) + "\n"
                                                  for e in range(1, done + 1)))
    if ev is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "e.json").write_text(json.dumps(ev))
    return folder


def captured(monkeypatch) -> list:
    """The figures the report functions save, kept open to be looked at (nothing is written)."""
    figs: list = []
    monkeypatch.setattr(figures, "save", lambda fig, stem: figs.append(fig) or [])
    return figs


# 1. Table 9: several runs in one cell


def test_table9_shows_the_finished_run_on_more_images_whatever_the_order_and_names_the_runs_sharing_a_cell():
    finished = record("iaat", "iaat", evaluation(clean=0.5), gamma=2, beta=0.5)
    cut = record("iaat_cut", "iaat", evaluation(clean=0.3, n=1000), done=2, gamma=2, beta=0.5)
    other = record("iaat_g4", "iaat", evaluation(clean=0.4), gamma=4, beta=0.5)
    for order in ([finished, cut, other], [cut, finished, other], [other, cut, finished]):
        table = tables.sensitivity_table(order, "worst")
        assert "| γ = 2/255 | 50.0 / 30.0 |" in table and "30.0 / 30.0" not in table, table
        assert "share this cell; it shows iaat (3/3 epochs, 300 test images)" in table
        assert "iaat, iaat_cut share" in table or "iaat_cut, iaat share" in table
    bigger = record("iaat_n1000", "iaat", evaluation(clean=0.45, n=1000), gamma=2, beta=0.5)
    assert tables.preferred_run([finished, cut, bigger]) is bigger  # both finished: the larger evaluation
    assert "share" not in tables.sensitivity_table([finished, other], "worst")


# 2. and 3. The caption of the robust accuracy, and runs evaluated with different attacks


def test_an_evaluation_without_a_worst_case_takes_the_weakest_attack_at_its_main_radius():
    """Older evaluation files have no worst_case: the robust accuracy is then the lowest at the main radius, not
    at a larger one the file also holds."""
    attacks = {"PGD-20@8/255": {"accuracy": 0.4, "eps": 8 / 255, "norm": "linf"},
               "CW-40@8/255": {"accuracy": 0.38, "eps": 8 / 255, "norm": "linf"},
               "PGD-20@16/255": {"accuracy": 0.1, "eps": 16 / 255, "norm": "linf"}}
    ev = {"n": 100, "clean": 0.8, "eps": 8 / 255, "norm": "linf", "attacks": attacks}
    assert record("old", ev=ev).accuracy("worst") == 0.38


def test_a_run_alone_evaluated_on_its_raw_weights_is_still_said_to_be_cut_short():
    """An EMA run's raw-weights row is silent about the run only beside its averaged row (a sweep's NAME:raw)."""
    from iaat.reporting.report import _run_warnings

    alone = record("ema_raw", ema=0.999, weights="raw", done=2, ev=evaluation())
    twin = record("ema:raw", ema=0.999, weights="raw", done=2, ev=evaluation())
    said = _run_warnings([alone, twin], lambda line: None)
    assert len(said) == 1 and "ema_raw trained 2 of its 3 planned epochs" in said[0]


def test_the_frontier_leaves_out_raw_rows_and_runs_without_a_robust_number(tmp_path, monkeypatch):
    captured(monkeypatch)
    runs = [record("pgd_at_eps4", ev=evaluation(clean=0.7, robust=(0.3, 0.25)), eps=4, ema=0.999, weights="ema"),
            record("pgd_at_eps4:raw", ev=evaluation(clean=0.72, robust=(0.28, 0.2)), eps=4, ema=0.999,
                   weights="raw", path=Path("/runs/pgd_at_eps4")),
            record("pgd_at_eps8", ev=evaluation(clean=0.6, robust=(0.4, 0.35))),
            record("clean_only", ev={**evaluation(), "attacks": {}, "worst_case": None}, eps=2)]
    for r in runs:
        r.group = "frontier"  # a sweep's frontier with EMA: the raw rows keep their run's group
    assert [r.name for r in figures._frontier(runs, "worst")] == ["pgd_at_eps4", "pgd_at_eps8"]
    figures.tradeoff(runs, tmp_path / "fig3", "worst", "caption")  # a run evaluated clean only: no TypeError


def test_the_caption_names_the_attacks_the_worst_case_is_over():
    runs = [record("a", ev=evaluation(extra={"PGD-10@4/255": 0.5})), record("b", ev=evaluation())]
    assert _main_attack(runs) == ("worst", "worst case of PGD-10@8/255, PGD-100@8/255")
    single = [record("a", ev=evaluation(robust=(0.3,), labels=("PGD-20@8/255",), extra={"PGD-20@2/255": 0.5}))]
    assert _main_attack(single) == ("worst", "PGD-20@8/255")


def test_runs_that_faced_different_attacks_are_named_in_a_warning_and_the_caption():
    runs = [record("a", ev=evaluation()), record("b", ev=evaluation(robust=(0.3,), labels=("PGD-10@8/255",)))]
    said: list = []
    returned = _warn_if_evaluated_differently(runs, said.append)
    assert len(said) == 1 and returned == [said[0].removeprefix("iaat: warning: ")]
    assert "attacks PGD-10@8/255, PGD-100@8/255: a" in said[0] and "attacks PGD-10@8/255: b" in said[0]
    assert "differ between the runs" in _main_attack(runs)[1]
    assert _warn_if_evaluated_differently([runs[0], record("c", ev=evaluation())], said.append) == []
    from iaat.reporting.report import _by_run

    assert _by_run(["600", "600"]) == "600" and _by_run(["600", "400", "600"]) == "600 / 400 (by run)"  # the header
    other_data = record("d", ev=evaluation(data_source="/data/other"))  # e.g. another copy of the test set
    _warn_if_evaluated_differently([record("c", ev=evaluation(data_source="/data/jpeg75")), other_data], said.append)
    assert "test images of /data/other: d" in said[-1] and "test images of /data/jpeg75: c" in said[-1]


# 4., 5., 6., 11., 16. A report of run folders, some not finished, not evaluated, at chance level


@pytest.fixture
def folders(tmp_path) -> dict:
    ev = evaluation(clean=0.55, curves={"eps": {"attack": "PGD-10", "points": [{"eps": 0.0, "accuracy": 0.55},
                                                                              {"eps": 8 / 255, "accuracy": 0.07}]}})
    return {
        "pgd": write_run(tmp_path / "pgd_at_eps8", config(), ev=ev),
        "cut": write_run(tmp_path / "cut", config(), done=2, ev=evaluation(clean=0.5)),
        "chance": write_run(tmp_path / "chance", config(eps=4), ev=evaluation(clean=0.1, robust=(0.05, 0.04))),
        "iaat": write_run(tmp_path / "iaat", config("iaat", warmup_epochs=1), ev=evaluation(clean=0.6)),
        "iaat_no_warmup": write_run(tmp_path / "iaat_no_warmup", config("iaat", warmup_epochs=0)),
        "mixup_at": write_run(tmp_path / "mixup_at", config("mixup_at")),
    }


def test_a_report_says_which_runs_did_not_finish_are_not_evaluated_or_are_at_chance(folders, tmp_path):
    said: list = []
    out = tmp_path / "report"
    make_report(list(folders.values()), out, log=said.append)
    md = (out / "report.md").read_text()
    table1 = (out / "table1_robustness.md").read_text()
    # 4: epochs done/planned, a warning for the run cut short, a header that does not claim all finished
    assert "| epochs |" in table1 and "| cut | pgd_at | 8 | 2/3 |" in table1
    assert "| pgd_at_eps8 | pgd_at | 8 | 3/3 |" in table1
    assert "cut trained 2 of its 3 planned epochs" in md and any("cut trained 2 of its 3" in s for s in said)
    assert "3 epochs planned, 1 of the runs not trained to the end" in md
    # 5: the tables whose runs exist but are not evaluated say so, and how to evaluate them
    warmup, mixup = (out / "table5_warmup.md").read_text(), (out / "table8_mixup.md").read_text()
    assert "iaat_no_warmup is not evaluated" in warmup and f"`iaat eval {folders['iaat_no_warmup']}`" in warmup
    assert "mixup_at is not evaluated" in mixup and "No Mixup-AT run" not in mixup
    # 11: a run at chance level is marked in the tables and in Fig. 3's data
    assert "| chance | pgd_at | 4 | 3/3 | 10.0 † |" in table1 and "† beside a clean accuracy" in table1
    assert "| chance | 10.0 † |" in md
    summary = json.loads((out / "report.json").read_text())
    assert [p["run"] for p in summary["figures"]["fig3_tradeoff"] if p["at_chance"]] == ["chance"]
    # 16: the console tells the truth about an unevaluated run; Fig. 4's accuracies are the evaluation's own
    (note,) = [s for s in said if s.startswith("iaat: warning: iaat_no_warmup has no test evaluation")]
    assert "Table 1 lists it as not evaluated" in note and "left out of the figures and tables" not in note
    assert summary["figures"]["fig4_accuracy_over_eps"][0]["accuracy"] == [0.55, 0.07]
    # 6: Figs. 2, 7 and 8 (no run has radii) are omitted in one line each
    assert "Figs. 2, 7 and 8 (the per-sample radii) are omitted" in md


def test_fig4_is_not_written_without_an_eps_sweep_and_the_report_says_so(tmp_path):
    run = write_run(tmp_path / "pgd", config(), ev=evaluation())
    make_report([run], tmp_path / "report", log=lambda _: None)
    md = (tmp_path / "report" / "report.md").read_text()
    assert not list((tmp_path / "report").glob("fig4_*")) and "Fig. 4 (accuracy over the test radius) is omitted" in md
    assert md.count("1 run (1 evaluated)") == 1 and "1 runs" not in md


def test_the_epochs_of_the_header_do_not_claim_one_number_when_runs_differ():
    assert _epochs_text([record("a"), record("b")]) == "3 epochs"
    assert _epochs_text([record("a", epochs=1, done=1)]) == "1 epoch"
    assert _epochs_text([record("a", epochs=2, done=2), record("b")]) == "2-3 epochs (by run)"


def test_a_sweep_run_is_evaluated_by_running_the_sweep_again():
    run = record("iaat_no_warmup", "iaat", warmup_epochs=0)
    run.sweep = Path("/s")
    table = tables.warmup_table([record("iaat", "iaat", evaluation(), warmup_epochs=1), run])
    assert "iaat_no_warmup is not evaluated" in table and "`iaat sweep SWEEP_FILE --out /s` again" in table


# 15. A reused --out folder


def test_a_reused_report_folder_loses_only_the_report_files_this_report_did_not_write(folders, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    mine = ["notes.md", "fig_custom.png", "table1_robustness.md.bak", "figures.svg", "fig7_radius_over_epochs_x.txt",
            "fig7_radius_over_epochs_x.png"]  # the last: named like a report's figure, but no report listed it
    stale = ["fig7_radius_over_epochs_gone.png", "fig7_radius_over_epochs_gone.svg", "fig2_images_gone_largest.png",
             "fig4_accuracy_over_eps.svg"]
    for name in mine + stale:
        (out / name).write_text("x")
    (out / "report.json").write_text(json.dumps({"figures": {"fig7_radius_over_epochs_gone": {},
                                                             "fig2_images_gone": {}, "fig4_accuracy_over_eps": []},
                                                 "tables": {"table1_robustness": ""}}))
    said: list = []
    make_report([folders["cut"]], out, log=said.append)  # no eps sweep: Fig. 4 not written either
    left = {p.name for p in out.iterdir()}
    assert set(mine) <= left and not set(stale) & left
    assert {"fig3_tradeoff.png", "fig3_tradeoff.svg", "table1_robustness.md", "table_family.md"} <= left
    assert any("removed 4 file(s) of an earlier report" in s for s in said)


# 7. and 8. and 14. The radius figures


def test_histograms_draw_one_bar_per_radius_when_there_are_few():
    step = 0.19  # an IAAT step γ·β in pixel units: 30 equal bins over [0, max] would merge neighbours
    epochs = [np.array([7.62] * 50 + [7.81] * 30 + [8.0] * 20), np.array([7.43] * 10 + [7.62] * 40 + [8.19] * 50)]
    layout = figures.histogram_layout(epochs)
    assert layout["centers"].tolist() == [7.43, 7.62, 7.81, 8.0, 8.19]
    assert [c.tolist() for c in layout["counts"]] == [[0, 50, 30, 20, 0], [10, 40, 0, 0, 50]]
    assert 0 < layout["width"] < step and not layout["log"]


def test_histograms_bin_over_the_range_of_the_radii_when_there_are_many():
    radii = np.linspace(3.0, 9.0, 500)
    layout = figures.histogram_layout([radii])
    assert layout["edges"][0] == 3.0 and layout["edges"][-1] == 9.0 and len(layout["edges"]) == 31
    assert sum(layout["counts"][0]) == 500


def test_a_spike_at_zero_puts_the_histogram_on_a_log_axis():
    spike = np.concatenate([np.zeros(900), np.repeat([0.19, 0.38, 0.57, 0.76], [40, 30, 20, 10])])
    assert figures.histogram_layout([spike])["log"]
    assert not figures.histogram_layout([np.repeat([0.19, 0.38, 0.57], [40, 30, 20])])["log"]


def radius_record(tmp_path: Path, stack: np.ndarray) -> RunRecord:
    """An IAAT run with one radius file per epoch (rows of ``stack``, in pixel units) and its radius metrics."""
    (tmp_path / "radii").mkdir()
    radii, metrics = {}, []
    for e, row in enumerate(stack / 255, start=1):
        radii[e] = tmp_path / "radii" / f"epoch_{e:04d}.npy"
        np.save(radii[e], row.astype(np.float32))
        metrics.append({"epoch": e, "radius_mean": float(row.mean()),
                        **{f"radius_q{q}": float(np.percentile(row, q)) for q in (10, 25, 75, 90)}})
    r = record("iaat", "iaat", path=tmp_path, warmup_epochs=1)
    r.radii, r.metrics = radii, metrics
    return r


def test_fig7_gives_each_panel_its_own_y_axis_and_legends_with_two_decimals(tmp_path, monkeypatch):
    figs = captured(monkeypatch)
    stack = np.full((3, 200), 8.0)
    stack[1:, :100] = [[7.62], [7.43]]
    stack[1:, 100] = [30.0, 60.0]  # one outlier trajectory
    figures.radius_over_epochs(radius_record(tmp_path, stack), tmp_path / "fig7")
    left, right = figs[0].axes[:2]
    assert not left.get_shared_y_axes().joined(left, right)
    assert left.get_ylim()[1] < 20 < right.get_ylim()[1]  # the outlier does not squash the mean's panel
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    assert "training position 0: 7.43/255 (same as 99 others)" in labels
    assert figures.trajectory_label(5, 7.8149, 2) == "training position 5: 7.81/255 (same as 1 other)"


def test_fig8_puts_no_legend_on_the_bars(tmp_path, monkeypatch):
    figs = captured(monkeypatch)
    drawn = figures.radius_histograms(radius_record(tmp_path, np.array([[8.0] * 10, [7.81] * 5 + [8.19] * 5])),
                                      tmp_path / "fig8")
    assert all(ax.get_legend() is None for ax in figs[0].axes) and figs[0].legends == []
    assert drawn["centers"] == pytest.approx([7.81 / 255, 8 / 255, 8.19 / 255])  # report.json: [0, 1] units
    assert drawn["counts"] == [[0, 10, 0], [5, 0, 5]]


# 11., 12., 13. Styles and Fig. 3


def test_every_legend_entry_has_its_own_style_and_raw_points_are_hollow():
    runs = [record("pgd_at_eps2", eps=2), record("pgd_at_eps8"), record("pgd_at_ema", ema=0.999, weights="ema"),
            record("pgd_at_ema:raw", ema=0.999, weights="raw", path=Path("/runs/pgd_at_ema")),
            record("pgd_at_awp", awp="auto"), record("mart"), record("mart_ema", "mart", ema=0.999, weights="ema"),
            record("mart_ema:raw", "mart", ema=0.999, weights="raw", path=Path("/runs/mart_ema")),
            record("mart2", "mart"), record("iaat", "iaat"), record("iaat_b", "iaat"),
            record("mine", "fat"), record("own", "gair_fat"), record("own2", "gair_fat"), record("x", "mail"),
            record("y", "mail"), *[record(f"i{k}", "iaat") for k in range(7)], *[record(f"f{k}", "fat") for k in range(8)],
            record("cl", "clean")]
    style = figures.styles(runs)
    from matplotlib.colors import to_rgb

    looks = [(tuple(np.round(to_rgb(style[id(r)]["color"]), 3)), style[id(r)]["marker"],
              style[id(r)].get("markerfacecolor", "filled")) for r in runs]
    assert len(set(looks)) == len(runs), looks
    raw, average = style[id(runs[7])], style[id(runs[6])]
    assert raw["markerfacecolor"] == "none" and (raw["color"], raw["marker"]) == (average["color"], average["marker"])
    plt = figures.pyplot()
    assert style[id(runs[0])]["color"] == plt.cm.Blues(0.5)  # the lightest frontier blue is still visible


def test_fig3_draws_chance_runs_hollow_grey_bars_visible_and_the_frontier_under_the_points(tmp_path, monkeypatch):
    figs = captured(monkeypatch)
    runs = [record("pgd_at_eps4", ev=evaluation(clean=0.7, robust=(0.3, 0.25)), eps=4),
            record("pgd_at_eps8", ev=evaluation(clean=0.6, robust=(0.4, 0.35))),
            record("broken", "gairat", ev=evaluation(clean=0.1, robust=(0.05, 0.04)))]
    points = figures.tradeoff(runs, tmp_path / "fig3", "worst", "worst case")
    assert [p["at_chance"] for p in points] == [False, False, True]
    ax = figs[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert "broken (chance)" in lines and lines["broken (chance)"].get_markerfacecolor() == "none"
    assert lines["fixed-eps PGD-AT frontier"].get_zorder() < lines["pgd_at_eps8"].get_zorder()
    assert all(c.get_alpha() >= 0.7 for c in ax.collections)  # the 95% interval bars


# 9. and 10. The image grids


def test_image_grids_use_the_reported_weights_and_show_the_clean_prediction(tmp_path, monkeypatch):
    import torch

    import iaat.data
    import iaat.engine.runs

    n = 12
    np.savez(tmp_path / "data_split.npz", train_indices=np.arange(n))
    r = radius_record(tmp_path, np.linspace(1, 9, n)[None, :])
    r.weights = "ema"
    asked: list = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10)).eval()
    monkeypatch.setattr(iaat.engine.runs, "load_run", lambda path, dev, weights="raw": asked.append(weights)
                        or (model, None, None, None))
    x = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
    train = iaat.data.ImageSet(x, torch.arange(n) % 10)
    monkeypatch.setattr(iaat.data, "load_dataset", lambda *a, **k: SimpleNamespace(train=train))
    grids: list = []
    monkeypatch.setattr(figures, "image_grid", lambda *args: grids.append(args))
    drawn = figures.smallest_largest(r, tmp_path / "fig2", None, 16 / 255, "cpu", k=4)
    assert asked == ["ema"] and drawn["weights"] == "EMA"
    _, _, _, adv_captions, title, _ = grids[0]
    clean = model(x[:4].float() / 255).argmax(1).tolist()
    assert drawn["smallest"]["clean_predictions"] == clean
    assert adv_captions[0].startswith(f"clean: {figures.CIFAR10_CLASSES[clean[0]]}\nadv: ")
    assert "(EMA weights)" in title
    assert figures.grid_weights(record("a", weights="raw")) == "raw" == figures.grid_weights(record("b"))
    assert figures.prediction_caption(3, 5, "cifar10") == "clean: cat\nadv: dog"


def test_table9_groups_runs_that_differ_only_in_how_they_ran():
    """A resume may change train.threads or train.device: twins that ran with other threads still share a cell."""
    ev = evaluation()
    runs = [record("a", "iaat", ev=ev, gamma=1.9, beta=0.1), record("b", "iaat", ev=ev, gamma=4, beta=0.1),
            record("c", "iaat", ev=ev, gamma=1.9, beta=0.1)]
    runs[2].cfg.train.threads = 1  # the same training, resumed with one thread
    table = tables.sensitivity_table(runs, "worst")
    assert "a, c share this cell" in table, table


def test_a_run_trained_on_after_its_evaluation_shows_its_current_evaluation_or_warns(tmp_path):
    """An evaluation without attacks, or of older weights (the run was resumed and trained further), loses to one of
    the current weights with attacks, whatever their sizes; where an old one is shown, the report says so."""
    run = write_run(tmp_path / "run", config(), ev=evaluation(clean=0.25, robust=(0.11, 0.1), n=100, epoch=1))
    (run / "eval" / "clean_only.json").write_text(json.dumps({**evaluation(clean=0.795, n=200, epoch=3),
                                                               "attacks": {}, "worst_case": None}))
    said: list = []
    make_report([run], tmp_path / "r1", log=said.append)
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "| run | 25.0 | 10.0 |" in md  # the epoch-3 evaluation has no attacks
    assert "run's evaluation is of its epoch-1 weights, but it has trained 3 epochs since" in md
    assert any("epoch-1 weights" in s for s in said)

    (run / "eval" / "current.json").write_text(json.dumps(evaluation(clean=0.82, robust=(0.46, 0.47), n=50, epoch=3)))
    make_report([run], tmp_path / "r2", log=lambda _: None)
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "| run | 82.0 | 46.0 |" in md and "epoch-1 weights" not in md

    (run / "eval" / "e.json").unlink()
    (run / "eval" / "current.json").unlink()
    make_report([run], tmp_path / "r3", log=lambda _: None)
    md = (tmp_path / "r3" / "report.md").read_text()
    assert "| run | 79.5 | – |" in md  # no attack ran: no robust number, and no empty Fig. 3
    assert "Fig. 3 (accuracy against robustness) is omitted" in md and not list((tmp_path / "r3").glob("fig3_*"))
