"""``iaat report``: every figure and table of a set of saved runs, and a report.md that shows them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..errors import CheckpointError, ConfigError, DataError
from ..evaluation.checks import at_chance
from ..units import format_size, parse_size
from . import figures, tables
from .collect import RunRecord, collect_runs

#: Classes of the data sets whose evaluations predate the evaluation JSON's num_classes.
_KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}

FIGURE_NOTES = {
    "fig3_tradeoff": "Fig. 3 — clean accuracy against robust accuracy; the fixed-eps PGD-AT runs trace the "
                     "frontier, a point above and to the right of it is a better tradeoff.",
    "fig4_accuracy_over_eps": "Fig. 4 — accuracy over the test radius.",
}


def _main_attack(records: list[RunRecord]) -> tuple[str, str]:
    """The attack the tradeoff and the small tables use: the worst case over all attacks when there are
    several, else the one attack; with a caption naming it and the radius."""
    labels = tables.attack_labels(records)
    evaluated = [r for r in records if r.evaluation]
    eps = format_size(evaluated[0].evaluation["eps"]) if evaluated else "?"
    if len(labels) > 1:
        return "worst", f"worst case of {', '.join(labels)}"
    if labels:
        return labels[0], labels[0]
    return "worst", f"ε = {eps}"


def _warn_if_evaluated_differently(evaluated: list, log: Callable[[str], None]) -> None:
    """The runs of one report should share their evaluation (radius, norm, images); say which differ."""
    groups: dict = {}
    for r in evaluated:
        ev = r.evaluation
        eps = ev.get("eps")
        key = (format_size(eps) if isinstance(eps, (int, float)) else "?", ev.get("norm"), ev.get("n"))
        groups.setdefault(key, []).append(r.name)
    if len(groups) > 1:
        log("iaat: warning: the runs were evaluated differently, so their numbers do not compare across these "
            "groups: " + "; ".join(f"eps {e} {norm}, {n} images: {', '.join(names)}"
                                   for (e, norm, n), names in groups.items()))


def make_report(paths: list[Path], out: Path, data_dir: Optional[str] = None, image_eps: str = "16",
                device: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Write the figures (PNG, SVG), the tables (markdown), report.json and report.md into ``out``."""
    figures.pyplot()  # a missing matplotlib is reported before anything is read
    eps_images = parse_size(image_eps, "--image-eps", allow_zero=False)
    records = collect_runs(paths)
    if not records:
        raise CheckpointError("no runs to report: the sweep folders hold no started runs yet.")
    evaluated = [r for r in records if r.evaluation]
    for r in records:
        if r.evaluation is None:
            log(f"iaat: warning: {r.name} has no test evaluation yet; it is left out of the figures and tables")
        elif at_chance(r.evaluation.get("clean", 0.0), int(r.evaluation.get("n") or 0), _classes(r)):
            log(f"iaat: warning: {r.name} is at chance level ({100 * r.evaluation['clean']:.1f}% clean on "
                f"{_classes(r)} classes): its robustness numbers mean nothing")
    _warn_if_evaluated_differently(evaluated, log)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the report folder {out}: {e.strerror or e}.") from None
    attack, caption = _main_attack(evaluated)
    summary: dict = {"runs": [], "figures": {}, "tables": {}}
    for r in records:
        summary["runs"].append({"name": r.name, "path": str(r.path), "method": r.method, "group": r.group,
                                "train_eps": r.train_eps, "clean": r.accuracy(), "robust": r.accuracy(attack),
                                "evaluation": str(r.evaluation_path) if r.evaluation_path else None,
                                "train_seconds": r.train_seconds, "epochs": len(r.metrics),
                                "eval_seconds": ((r.evaluation or {}).get("seconds") or {}).get("this_run")})
    fig_md: list[str] = []

    def figure(stem: str, title: str, note: str = "") -> None:
        summary["figures"].setdefault(stem, [])
        fig_md.append(f"### {title}\n\n{note + chr(10) + chr(10) if note else ''}![{title}]({stem}.png)\n")

    if evaluated:
        summary["figures"]["fig3_tradeoff"] = figures.tradeoff(evaluated, out / "fig3_tradeoff", attack, caption)
        figure("fig3_tradeoff", "Accuracy / robustness tradeoff", FIGURE_NOTES["fig3_tradeoff"])
        curves = figures.accuracy_over_eps(evaluated, out / "fig4_accuracy_over_eps")
        if curves:
            summary["figures"]["fig4_accuracy_over_eps"] = curves
            figure("fig4_accuracy_over_eps", "Accuracy over the test radius", FIGURE_NOTES["fig4_accuracy_over_eps"])
    adaptive = [r for r in records if r.adaptive and r.radii]
    for r in adaptive:
        stem = f"fig7_radius_over_epochs_{r.name}".replace("/", "_")
        summary["figures"][stem] = figures.radius_over_epochs(r, out / stem)
        figure(stem, f"{r.name}: radii over epochs",
               "Fig. 7 — left: mean and quantiles of all samples' radii per epoch; right: single samples.")
        stem = f"fig8_radius_histograms_{r.name}".replace("/", "_")
        summary["figures"][stem] = figures.radius_histograms(r, out / stem)
        figure(stem, f"{r.name}: radius histograms", "Fig. 8 — the distribution of the radii at several epochs.")
    for r in [a for a in adaptive if a.group != "grid"]:
        stem = f"fig2_images_{r.name}".replace("/", "_")
        try:
            drawn = figures.smallest_largest(r, out / stem, data_dir, eps_images, device)
        except (CheckpointError, ConfigError, DataError, OSError) as e:  # e.g. the data is on another machine
            log(f"iaat: warning: no image grids for {r.name}: {e}")
            continue
        summary["figures"][stem] = drawn
        for which in ("smallest", "largest"):
            tied = drawn[which]["tied_at_edge"]
            first = "first" if which == "smallest" else "last"  # the largest are the sorted order read backwards
            ties = (f" {tied} samples share the radius at the edge of this group; those shown come {first} in "
                    f"training-set order." if tied > 1 else "")
            fig_md.append(f"### {r.name}: training images with the {which} radii\n\nFigs. 2, 5, 6 — each image "
                          f"above its PGD-20 perturbation at {format_size(eps_images)}, with class, final radius "
                          f"and the prediction on the perturbed image.{ties}\n\n![{which}]({stem}_{which}.png)\n")

    table_specs = {
        "table1_robustness": ("Table 1 — clean and robust accuracy (%)", tables.robustness_table(records)),
        "table5_warmup": ("Table 5 — IAAT with and without warmup", tables.warmup_table(evaluated)),
        "table7_line_search": ("Table 7 — Alg. 2 against the exact line search over ε",
                               tables.line_search_table(evaluated)),
        "table8_mixup": ("Table 8 — Mixup-AT against IAAT", tables.mixup_table(evaluated)),
        "table9_sensitivity": ("Table 9 — sensitivity of IAAT to γ and β (clean / robust %)",
                               tables.sensitivity_table(evaluated, attack)),
        "table_parts": ("Weight averaging (EMA), AWP and MART beside PGD-AT", tables.parts_table(evaluated)),
        "table_family": ("The instance-adaptive family beside PGD-AT", tables.family_table(evaluated)),
    }
    table_md = []
    for stem, (title, body) in table_specs.items():
        (out / f"{stem}.md").write_text(f"## {title}\n\n{body}")
        summary["tables"][stem] = body
        table_md.append(f"### {title}\n\n{body}")
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_report_md(records, evaluated, caption, fig_md, table_md))
    return out / "report.md"


def _report_md(records: list[RunRecord], evaluated: list[RunRecord], caption: str, fig_md: list[str],
               table_md: list[str]) -> str:
    lines = ["# Report", ""]
    if evaluated:
        ev = evaluated[0].evaluation
        cfg = evaluated[0].cfg
        lines += [f"{len(records)} runs ({len(evaluated)} evaluated); {cfg.model.name} on {cfg.data.dataset} "
                  f"({ev.get('data_source', '')}), training subset {cfg.data.train_subset or 'all'}, "
                  f"{cfg.train.epochs} epochs. Evaluation: the first {ev['n']} {ev.get('split', 'test')} images at "
                  f"ε = {format_size(ev['eps'])}; robust accuracy in the figures and small tables is the {caption} "
                  f"(a sample counts as robust only if no attack iterate misclassifies it).", ""]
    if evaluated:
        lines += ["| run | clean % | robust % |", "|---|---|---|"]
        lines += [f"| {r.name} | {100 * r.accuracy():.1f} | {100 * (r.accuracy('worst') or 0):.1f} |"
                  for r in evaluated]
        lines.append("")
    lines += ["## Figures", ""] + fig_md + ["## Tables", ""] + table_md
    lines += ["", "Made by `iaat report` from the saved run folders: " + ", ".join(f"`{r.path}`" for r in records)]
    return "\n".join(lines) + "\n"


def _classes(record: RunRecord) -> Optional[int]:
    """The number of classes the run's evaluation scored (from its JSON, else from the data set's name)."""
    return (record.evaluation or {}).get("num_classes") or _KNOWN_CLASSES.get(record.cfg.data.dataset)
