"""``iaat report``: every figure and table of a set of saved runs, and a report.md that shows them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

from ..errors import CheckpointError, ConfigError, DataError
from ..evaluation.attacks import long_default_step
from ..units import format_size, parse_size
from . import figures, tables
from .collect import RunRecord, collect_runs

FIGURE_NOTES = {
    "fig3_tradeoff": "Fig. 3 — clean accuracy against robust accuracy; the fixed-eps PGD-AT runs trace the "
                     "frontier, a point above and to the right of it is a better tradeoff.",
    "fig4_accuracy_over_eps": "Fig. 4 — accuracy over the test radius.",
}


def _main_attack(records: list[RunRecord]) -> tuple[str, str]:
    """The attack the tradeoff and the small tables use, with a caption naming it: the worst case over the
    attacks at the evaluation's radius (its ``worst_case["over"]``) when there are several, else the one attack.
    Evaluations without a worst case (older ones) fall back to the lowest accuracy of all their attacks."""
    evaluated = [r for r in records if r.evaluation]
    eps = format_size(evaluated[0].evaluation["eps"]) if evaluated else "?"
    overs = list(dict.fromkeys(tuple(r.worst_case_over) for r in evaluated if r.worst_case_over))
    if len(overs) > 1:
        return "worst", f"worst case of each run's own attacks at ε = {eps}, which differ between the runs"
    if overs:
        return "worst", f"worst case of {', '.join(overs[0])}" if len(overs[0]) > 1 else overs[0][0]
    labels = tables.attack_labels(records)
    if len(labels) > 1:
        return "worst", f"lowest accuracy of {', '.join(labels)}"
    if labels:
        return labels[0], labels[0]
    return "worst", f"ε = {eps}"


def _attack_set(r: RunRecord) -> str:
    """The attacks a run's robust accuracy is the worst case over (all of its attacks for an evaluation without a
    worst case), marked where its attacks over 10 steps took the old default step (their labels are the same)."""
    attacks = (r.evaluation or {}).get("attacks", {})
    old = any(long_default_step(a.get("kind"), a.get("steps", 0), a.get("step_size")) and "step" not in a
              for a in attacks.values())  # an entry of the new rule records its step
    return ", ".join(r.worst_case_over or attacks) + (" (before eps/4 became the default step of longer attacks)"
                                                      if old else "")


def _warn_if_evaluated_differently(evaluated: list, log: Callable[[str], None]) -> list[str]:
    """The runs of one report should share their evaluation (radius, norm, images, attacks); say which differ.
    Returns the warning (without the console prefix), for report.md; none when they all agree."""
    groups: dict = {}
    for r in evaluated:
        ev = r.evaluation
        eps = ev.get("eps")
        key = (format_size(eps) if isinstance(eps, (int, float)) else "?", ev.get("norm"), ev.get("n"), _attack_set(r),
               f"{ev.get('split', 'test')} images of {ev.get('data_source', '?')}")
        groups.setdefault(key, []).append(r.name)
    if len(groups) < 2:
        return []
    sources = {key[-1] for key in groups}
    text = ("the runs were evaluated differently, so their numbers do not compare across these groups: "
            + "; ".join(f"eps {e} {norm}, {n} images{f', attacks {attacks}' if attacks else ''}"
                        f"{f', {data}' if len(sources) > 1 else ''}: {', '.join(names)}"
                        for (e, norm, n, attacks, data), names in groups.items()))
    log(f"iaat: warning: {text}")
    return [text]


def _run_warnings(records: list[RunRecord], log: Callable[[str], None]) -> list[str]:
    """What a reader must know about single runs (not evaluated, not trained to the end, at chance level): said on
    the console and returned for report.md."""
    said = []
    for r in records:
        if r.evaluation is None:
            radius_figs = (f"; its radius figures (Figs. {'2, ' if r.group != 'grid' else ''}7, 8) are drawn"
                           if r.adaptive and r.radii else "")
            said.append(f"{r.name} has no test evaluation yet: Table 1 lists it as not evaluated, and it is left out "
                        f"of Figs. 3 and 4 and of the comparison tables{radius_figs}. To evaluate it: "
                        f"{tables.how_to_evaluate([r])}")
        elif r.evaluated_epoch is not None and r.evaluated_epoch < r.epochs_done and not r.twin:
            said.append(f"{r.name}'s evaluation is of its epoch-{r.evaluated_epoch} weights, but it has trained "
                        f"{r.epochs_done} epochs since: its numbers are of the older model. To evaluate it again: "
                        f"{tables.how_to_evaluate([r])}")
        if r.evaluation is not None and r.at_chance:
            said.append(f"{r.name} is at chance level ({100 * r.evaluation['clean']:.1f}% clean on {r.num_classes} "
                        f"classes): its robustness numbers mean nothing (hollow grey in Fig. 3, "
                        f"{tables.CHANCE_MARK} in the tables)")
        if r.cut_short:
            said.append(f"{r.name} trained {r.epochs_done} of its {r.cfg.train.epochs} planned epochs (interrupted, "
                        f"or still training): its numbers are of a model trained for less than planned")
    for line in said:
        log(f"iaat: warning: {line}")
    return said


#: The files a report writes besides report.md and report.json. Only files named like these, and listed by the
#: earlier report's report.json, are ever removed from --out (those it wrote that this one did not).
REPORT_FILE = re.compile(r"fig(2_images_.+_(smallest|largest)|3_tradeoff|4_accuracy_over_eps|7_radius_over_epochs_.+"
                         r"|8_radius_histograms_.+)\.(png|svg)|table(1_robustness|5_warmup|7_line_search|8_mixup"
                         r"|9_sensitivity|_parts|_family)\.md")


def _earlier_report_files(out: Path) -> set[str]:
    """The figure and table files the report before this one in ``out`` wrote, by its report.json (none without)."""
    try:
        earlier = json.loads((out / "report.json").read_text())
        stems = list(earlier.get("figures", {})) + list(earlier.get("tables", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    names = {f"{stem}{end}" for stem in stems if isinstance(stem, str)
             for end in (".png", ".svg", ".md", "_smallest.png", "_smallest.svg", "_largest.png", "_largest.svg")}
    return {name for name in names if REPORT_FILE.fullmatch(name)}


def remove_stale_files(out: Path, written: set[str], log: Callable[[str], None]) -> list[str]:
    """Remove from ``out`` the figure and table files that the earlier report there wrote (its report.json says which)
    and this report did not (a run left out, a figure omitted), so that the folder shows one report; a file of the
    same kind of name that no report listed (yours, another report's) stays. Returns the names removed."""
    earlier = _earlier_report_files(out)
    stale = sorted(p.name for p in out.iterdir()
                   if p.name in earlier and p.name not in written and p.is_file() and not p.is_symlink())
    for name in stale:
        (out / name).unlink()
    if stale:
        log(f"iaat: removed {len(stale)} file(s) of an earlier report in {out} that this report does not write: "
            f"{', '.join(stale)}")
    return stale


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def make_report(paths: list[Path], out: Path, data_dir: Optional[str] = None, image_eps: Optional[str] = None,
                device: str = "auto", log: Callable[[str], None] = print) -> Path:
    """Write the figures (PNG, SVG), the tables (markdown), report.json and report.md into ``out``; figure and
    table files of an earlier report in ``out`` that this one does not write are removed."""
    figures.pyplot()  # a missing matplotlib is reported before anything is read
    # the image grids' radius, in each run's norm: 16/255 under L-inf, twice the training radius under L2
    eps_images = parse_size(image_eps, "--image-eps", allow_zero=False, max_unit=64.0) if image_eps else None
    records = collect_runs(paths)
    if not records:
        raise CheckpointError("no runs to report: the sweep folders hold no started runs yet.")
    evaluated = [r for r in records if r.evaluation]
    warned = _run_warnings(records, log) + _warn_if_evaluated_differently(evaluated, log)
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
                                "train_seconds": r.train_seconds, "epochs": r.epochs_done,
                                "epochs_planned": r.cfg.train.epochs, "at_chance": r.at_chance,
                                "eval_seconds": ((r.evaluation or {}).get("seconds") or {}).get("this_run")})
    fig_md: list[str] = []
    written: set[str] = set()

    def figure(stem: str, title: str, note: str = "") -> None:
        summary["figures"].setdefault(stem, [])
        written.update({f"{stem}.png", f"{stem}.svg"})
        fig_md.append(f"### {title}\n\n{note + chr(10) + chr(10) if note else ''}![{title}]({stem}.png)\n")

    if evaluated:
        if any(r.accuracy(attack) is not None for r in evaluated):
            summary["figures"]["fig3_tradeoff"] = figures.tradeoff(evaluated, out / "fig3_tradeoff", attack, caption)
            figure("fig3_tradeoff", "Accuracy / robustness tradeoff", FIGURE_NOTES["fig3_tradeoff"])
        else:
            fig_md.append(OMITTED["fig3_clean"])
        curves = figures.accuracy_over_eps(evaluated, out / "fig4_accuracy_over_eps")
        if curves:
            summary["figures"]["fig4_accuracy_over_eps"] = curves
            figure("fig4_accuracy_over_eps", "Accuracy over the test radius", FIGURE_NOTES["fig4_accuracy_over_eps"])
        else:
            fig_md.append(OMITTED["fig4"])
    else:
        fig_md.append(OMITTED["fig3"])
    adaptive = [r for r in records if r.adaptive and r.radii]
    if not adaptive:
        fig_md.append(OMITTED["radii"])
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
            written.update({f"{stem}_{which}.png", f"{stem}_{which}.svg"})
            tied = drawn[which]["tied_at_edge"]
            first = "first" if which == "smallest" else "last"  # the largest are the sorted order read backwards
            ties = (f" {tied} samples share the radius at the edge of this group; those shown come {first} in "
                    f"training-set order." if tied > 1 else "")
            fig_md.append(f"### {r.name}: training images with the {which} radii\n\nFigs. 2, 5, 6 — each image "
                          f"above its PGD-20 perturbation at {format_size(drawn['eps'])} {drawn['norm']} "
                          f"({drawn['weights']} weights), "
                          f"with class and final radius, and the model's prediction on the clean and on the "
                          f"perturbed image.{ties}\n\n![{which}]({stem}_{which}.png)\n")

    table_specs = {
        "table1_robustness": ("Table 1 — clean and robust accuracy (%)", tables.robustness_table(records)),
        "table5_warmup": ("Table 5 — IAAT with and without warmup", tables.warmup_table(records)),
        "table7_line_search": ("Table 7 — Alg. 2 against the exact line search over ε",
                               tables.line_search_table(records)),
        "table8_mixup": ("Table 8 — Mixup-AT against IAAT", tables.mixup_table(records)),
        "table9_sensitivity": ("Table 9 — sensitivity of IAAT to γ and β (clean / robust %)",
                               tables.sensitivity_table(records, attack)),
        "table_parts": ("Weight averaging (EMA), AWP and MART beside PGD-AT", tables.parts_table(records)),
        "table_family": ("The instance-adaptive family beside PGD-AT", tables.family_table(records)),
    }
    table_md = []
    for stem, (title, body) in table_specs.items():
        (out / f"{stem}.md").write_text(f"## {title}\n\n{body}")
        written.add(f"{stem}.md")
        summary["tables"][stem] = body
        table_md.append(f"### {title}\n\n{body}")
    remove_stale_files(out, written, log)
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_report_md(records, evaluated, caption, warned, fig_md, table_md))
    return out / "report.md"


#: report.md's line for a figure that is not drawn, and why.
OMITTED = {
    "fig3": "_Figs. 3 and 4 are omitted: no run is evaluated yet._\n",
    "fig3_clean": "_Fig. 3 (accuracy against robustness) is omitted: no evaluation ran an attack (`iaat eval RUN` "
                  "attacks at the training radius by default)._\n",
    "fig4": "_Fig. 4 (accuracy over the test radius) is omitted: no evaluation has an eps sweep (a sweep's "
            "`eval: sweep_eps`, or `iaat eval RUN --sweep-eps 0 2 4 8`)._\n",
    "radii": "_Figs. 2, 7 and 8 (the per-sample radii) are omitted: no run keeps per-sample radii (IAAT, MMA and CAT "
             "runs save them in RUN/radii)._\n",
}


def _by_run(values) -> str:
    """One value where every run has it, else each one, said to differ by run."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else f"{' / '.join(distinct)} (by run)"


def _epochs_text(records: list[RunRecord]) -> str:
    """The header's epochs: one number when every run plans the same, else the range; never claims a run finished
    that did not."""
    planned = sorted({r.cfg.train.epochs for r in records})
    text = _plural(planned[0], "epoch") if len(planned) == 1 else f"{planned[0]}-{planned[-1]} epochs (by run)"
    unfinished = [r for r in records if r.cut_short]
    if unfinished:
        text += f" planned, {len(unfinished)} of the runs not trained to the end (see the warnings)"
    return text


def _report_md(records: list[RunRecord], evaluated: list[RunRecord], caption: str, warned: list[str],
               fig_md: list[str], table_md: list[str]) -> str:
    lines = ["# Report", ""]
    if evaluated:
        ev = evaluated[0].evaluation
        models = _by_run(r.cfg.model.name for r in records)
        datasets = _by_run(f"{r.cfg.data.dataset} ({(r.evaluation or {}).get('data_source', '')})" for r in evaluated)
        subsets = _by_run(str(r.cfg.data.train_subset or "all") for r in records)
        lines += [f"{_plural(len(records), 'run')} ({len(evaluated)} evaluated); {models} on {datasets}, training "
                  f"subset {subsets}, {_epochs_text(records)}. Evaluation: the first {ev['n']} "
                  f"{ev.get('split', 'test')} images at ε = {format_size(ev['eps'])}; robust accuracy in the figures "
                  f"and small tables is the {caption} (a sample counts as robust only if no attack iterate "
                  f"misclassifies it).", ""]
    if warned:
        lines += ["## Warnings", ""] + [f"- {line}." for line in warned] + [""]
    if evaluated:
        lines += ["| run | clean % | robust % |", "|---|---|---|"]
        lines += [f"| {r.name} | {tables.clean_cell(r)} | {tables.percent(r.accuracy('worst'))} |"
                  for r in evaluated]
        if tables.chance_note(evaluated):
            lines += ["", tables.chance_note(evaluated).strip()]
        lines.append("")
    lines += ["## Figures", ""] + fig_md + ["## Tables", ""] + table_md
    lines += ["", "Made by `iaat report` from the saved run folders: " + ", ".join(f"`{r.path}`" for r in records)]
    return "\n".join(lines) + "\n"
