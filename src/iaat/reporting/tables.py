"""Markdown tables in the shape of the IAAT paper's Tables 1, 5, 7, 8 and 9 (and of the state-of-practice parts),
from run records."""

from __future__ import annotations

from typing import Optional

from ..config import RESUMABLE_KEYS
from .collect import RunRecord


def percent(value: Optional[float]) -> str:
    """An accuracy in per cent with one decimal, "–" where there is none."""
    return "–" if value is None else f"{100 * value:.1f}"


def attack_labels(records: list[RunRecord]) -> list[str]:
    """The attack labels of the evaluations, in first-seen order."""
    labels: list[str] = []
    for r in records:
        for label in (r.evaluation or {}).get("attacks", {}):
            if label not in labels:
                labels.append(label)
    return labels


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _radius(r: RunRecord) -> str:
    if r.method == "clean":
        return "0 (clean)"
    return f"{r.train_eps * 255:.2f} (mean, adaptive)" if r.adaptive else f"{r.train_eps * 255:.4g}"


#: The mark of a run at chance level in the tables, and the footnote that explains it.
CHANCE_MARK = "†"
CHANCE_NOTE = (f"\n_{CHANCE_MARK} beside a clean accuracy: the run is at chance level (no better than guessing), "
               f"so its robust accuracy means nothing._\n")


def clean_cell(r: RunRecord) -> str:
    """A run's clean accuracy (%) as the tables print it: marked when the run is at chance level (the mark is
    beside the number, not the name, so that the name column stays the run's name)."""
    return f"{percent(r.accuracy())} {CHANCE_MARK}" if r.at_chance else percent(r.accuracy())


def epochs_cell(r: RunRecord) -> str:
    """Epochs trained over epochs planned, e.g. ``2/3`` for a run interrupted after its second epoch."""
    return f"{r.epochs_done}/{r.cfg.train.epochs}"


def robustness_table(records: list[RunRecord]) -> str:
    """Table 1: clean and robust accuracy (%) of every run under every attack, the worst case, epochs trained over
    epochs planned and training time; footnotes for runs at chance level and runs that did not finish."""
    labels = attack_labels(records)
    rows = []
    for r in records:
        if r.evaluation is None:
            rows.append([r.name, r.method, _radius(r), epochs_cell(r), "not evaluated"] + [""] * (len(labels) + 2))
            continue
        rows.append([r.name, r.method, _radius(r), epochs_cell(r), clean_cell(r)]
                    + [percent(r.accuracy(a)) for a in labels] + [percent(r.accuracy("worst")), f"{r.train_seconds:.0f}"])
    notes = chance_note(records)
    unfinished = [r for r in records if not r.finished]
    if unfinished:
        notes += (f"\n_Not trained to the end (epochs done/planned below plan: interrupted or still training): "
                  f"{', '.join(r.name for r in unfinished)}._\n")
    return _table(["run", "method", "training ε (/255)", "epochs", "clean"] + labels + ["worst case", "train s"],
                  rows) + notes


def _compare(records: list[RunRecord]) -> str:
    """A small table: clean, every attack and the worst case, for the runs a comparison is about."""
    labels = attack_labels(records)
    rows = [[r.name, r.method, _radius(r), clean_cell(r)] + [percent(r.accuracy(a)) for a in labels]
            + [percent(r.accuracy("worst"))] for r in records]
    return _table(["run", "method", "training ε (/255)", "clean"] + labels + ["worst case"], rows) + chance_note(records)


def chance_note(records: list[RunRecord]) -> str:
    """The footnote on runs at chance level, if any of ``records`` is."""
    return CHANCE_NOTE if any(r.at_chance for r in records) else ""


def evaluated(records: list[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.evaluation is not None]


def how_to_evaluate(runs: list[RunRecord]) -> str:
    """How to evaluate runs that have no evaluation yet: a sweep's runs by running its command again (it evaluates
    what is missing, with the sweep's own evaluation, the only one its report shows), a run on its own with iaat
    eval."""
    ways = [f"run `iaat sweep SWEEP_FILE --out {s}` again, which evaluates what is missing"
            for s in dict.fromkeys(r.sweep for r in runs if r.sweep is not None)]
    ways += [f"`iaat eval {r.path}`" for r in runs if r.sweep is None]
    return "; ".join(ways)


def not_evaluated(what: str, runs: list[RunRecord]) -> str:
    """The body of a table whose runs exist but are not evaluated yet: which, and how to evaluate them."""
    waiting = [r for r in runs if r.evaluation is None]
    return (f"_Not shown yet: of {what}, {', '.join(r.name for r in waiting)} {'is' if len(waiting) == 1 else 'are'} "
            f"not evaluated. To evaluate: {how_to_evaluate(waiting)}; then make the report again._\n")


def _pending_note(runs: list[RunRecord]) -> str:
    """A line under a table for the runs it would show that are not evaluated yet."""
    waiting = [r for r in runs if r.evaluation is None]
    if not waiting:
        return ""
    return (f"\n_Not evaluated yet, so not shown: {', '.join(r.name for r in waiting)}. To evaluate: "
            f"{how_to_evaluate(waiting)}._\n")


def _reference(records: list[RunRecord]) -> list[RunRecord]:
    """The PGD-AT run at the evaluation's radius (the paper's baseline), when there is one."""
    for r in sorted(records, key=lambda r: bool(r.parts)):  # the plain run before its AWP / EMA variants
        ev = r.evaluation or {}
        if r.method == "pgd_at" and ev and abs(r.cfg.eps - ev.get("eps", -1)) < 1e-9:
            return [r]
    return []


def _per_epoch(r: RunRecord) -> float:
    return r.train_seconds / max(len(r.metrics), 1)


def _cost(r: RunRecord, ref: list[RunRecord]) -> str:
    """Training time per epoch relative to the reference PGD-AT run's."""
    return f"{_per_epoch(r) / _per_epoch(ref[0]):.2f}x" if ref and _per_epoch(ref[0]) else "–"


#: Under the tables with a cost column: what it divides, and what distorts it.
COST_NOTE = ("\n_Train time / PGD-AT: each run's mean training time per epoch over the PGD-AT run's; an epoch that "
             "shared the machine with other work counts in full, so compare costs from runs on a quiet machine "
             "(or `benchmarks/throughput.py`)._\n")


def parts_table(records: list[RunRecord]) -> str:
    """EMA, AWP and MART beside plain PGD-AT: clean, every attack, the worst case, and the training time per epoch
    relative to PGD-AT's (a run with train.ema is two points: the average, and ``NAME:raw`` its raw weights)."""
    wanted = [r for r in records if r.parts or r.weights == "raw" or r.method == "mart"]
    if not wanted:
        return _missing("run with train.ema, train.awp or method mart", "add them with iaat sweep --with ema awp mart")
    shown = evaluated(wanted)
    if not shown:
        return not_evaluated("the runs with EMA, AWP or MART", wanted)
    ref = [r for r in _reference(records) if r.cfg.train.awp is None]  # cost relative to plain PGD-AT only
    labels = attack_labels(ref + shown)
    rows = []
    for r in ref + [r for r in shown if r not in ref]:
        parts = r.parts + (" (raw weights)" if r.weights == "raw" else "")
        rows.append([r.name, r.method, parts.strip() or "–", clean_cell(r)]
                    + [percent(r.accuracy(a)) for a in labels] + [percent(r.accuracy("worst")), _cost(r, ref)])
    return (_table(["run", "method", "parts", "clean"] + labels + ["worst case", "train time / PGD-AT"], rows)
            + COST_NOTE + chance_note(ref + shown) + _pending_note(wanted))


#: The instance-adaptive family: per-sample radii (IAAT, MMA, CAT) or per-sample loss weights (GAIRAT, MAIL).
FAMILY = ("iaat", "gairat", "mma", "cat", "mail")


def per_sample_state(r: RunRecord) -> str:
    """What a family run adapted per sample at its last epoch: radii (mean and 10-90% range, /255) or loss weights
    (mean and spread)."""
    last = r.metrics[-1] if r.metrics else {}
    if "radius_mean" in last:
        spread = (f" (10-90%: {255 * last['radius_q10']:.2f}-{255 * last['radius_q90']:.2f})"
                  if "radius_q10" in last else "")
        return f"radius {255 * last['radius_mean']:.2f}/255{spread}"
    if "weight_mean" in last:
        return f"weight {last['weight_mean']:.2f} ± {last['weight_std']:.2f} (max {last['weight_max']:.2f})"
    if "train_gair_weight_sq" in last:  # GAIR weights have mean 1 in every batch: their spread from E[w^2]
        return f"weight 1 ± {max(last['train_gair_weight_sq'] - 1, 0) ** 0.5:.2f}"
    if "train_kappa" in last:
        return f"uniform weights (burn-in; κ {last['train_kappa']:.1f})"
    return "–"


def family_table(records: list[RunRecord]) -> str:
    """The instance-adaptive family beside PGD-AT on one protocol: clean, every attack, the worst case, training
    time per epoch relative to PGD-AT's, and what each adapted per sample (plain runs: no AWP, no weight average)."""
    wanted = [r for r in records if r.method in FAMILY and not r.parts and r.group != "grid"]
    if not wanted:
        return _missing("run of the instance-adaptive family", "add them with iaat sweep --with mma cat mail")
    shown = evaluated(wanted)
    if not shown:
        return not_evaluated("the runs of the instance-adaptive family", wanted)
    ref = [r for r in _reference(records) if not r.parts]
    labels = attack_labels(ref + shown)
    rows = [[r.name, r.method, clean_cell(r)] + [percent(r.accuracy(a)) for a in labels]
            + [percent(r.accuracy("worst")), _cost(r, ref), per_sample_state(r)] for r in ref + shown]
    return (_table(["run", "method", "clean"] + labels + ["worst case", "train time / PGD-AT", "per-sample state"],
                   rows) + COST_NOTE + chance_note(ref + shown) + _pending_note(wanted))


def _missing(what: str, how: str) -> str:
    return f"_No {what} among these runs; {how}._\n"


def warmup_table(records: list[RunRecord]) -> str:
    """Table 5: IAAT with and without warmup, beside PGD-AT."""
    iaat = [r for r in records if r.adaptive and r.params.get("selection") == "alg2" and r.group != "grid"]
    with_w = [r for r in iaat if r.params.get("warmup_epochs", 0) > 0]
    without = [r for r in iaat if r.params.get("warmup_epochs", 0) == 0]
    if not (with_w and without):
        return _missing("IAAT runs both with and without warmup", "the default `iaat sweep` trains both "
                        "(iaat, iaat_no_warmup)")
    if not (evaluated(with_w) and evaluated(without)):
        return not_evaluated("the IAAT runs with and without warmup", with_w + without)
    return _compare(_reference(records) + evaluated(with_w) + evaluated(without)) + _pending_note(with_w + without)


def line_search_table(records: list[RunRecord]) -> str:
    """Table 7: IAAT's Alg. 2 selection against the exact line search over eps."""
    alg2 = [r for r in evaluated(records) if r.adaptive and r.params.get("selection") == "alg2"
            and r.group != "grid" and r.params.get("warmup_epochs", 0) > 0]
    search = [r for r in records if r.adaptive and r.params.get("selection") == "line_search"]
    if not search:
        return _missing("line-search IAAT run", "add one with `iaat sweep ... --with iaat_line_search`")
    if not evaluated(search):
        return not_evaluated("the line-search IAAT runs", search)
    return _compare(_reference(records) + alg2[:1] + evaluated(search)) + _pending_note(search)


def mixup_table(records: list[RunRecord]) -> str:
    """Table 8: Mixup-AT against IAAT and PGD-AT."""
    mixup = [r for r in records if r.method == "mixup_at"]
    if not mixup:
        return _missing("Mixup-AT run", "add one with `iaat sweep ... --with mixup_at`")
    if not evaluated(mixup):
        return not_evaluated("the Mixup-AT runs", mixup)
    iaat = [r for r in evaluated(records) if r.adaptive and r.group != "grid" and r.params.get("warmup_epochs", 0) > 0
            and r.params.get("selection") == "alg2"]
    return _compare(_reference(records) + iaat[:1] + evaluated(mixup)) + _pending_note(mixup)


def _gamma_beta(r: RunRecord) -> tuple:
    return r.params["gamma"], float(r.params["beta"])


def preferred_run(runs: list[RunRecord]) -> RunRecord:
    """Of runs that share a cell of Table 9 (equal but for their names): an evaluated one, then one that trained all
    its planned epochs, then the one evaluated on the most test images; among equals the first given."""
    return max(runs, key=lambda r: (r.evaluation is not None, r.finished, int((r.evaluation or {}).get("n") or 0)))


def _shared_cell_note(cell: tuple, runs: list[RunRecord], shown: RunRecord) -> str:
    """Which runs share a cell of Table 9 and which one it shows, and why."""
    g, b = cell
    why = (f"{shown.epochs_done}/{shown.cfg.train.epochs} epochs, "
           + (f"{shown.evaluation.get('n')} test images" if shown.evaluation else "not evaluated"))
    return (f"γ = {g * 255:.3g}/255, β = {b:g}: {', '.join(r.name for r in runs)} share this cell; it shows "
            f"{shown.name} ({why})")


def sensitivity_table(records: list[RunRecord], attack: str) -> str:
    """Table 9: IAAT's clean / robust accuracy over its γ (rows) and β (columns), for runs equal but for them (an
    EMA run's average only, not its ``:raw`` point). Runs that share a cell: see :func:`preferred_run`; a note
    under the table names them."""
    def rest(r: RunRecord) -> tuple:
        params = {k: v for k, v in r.params.items() if k not in ("gamma", "beta")}
        cfg = r.cfg.to_dict()
        cfg.pop("method")
        for section, key in RESUMABLE_KEYS - {("train", "epochs")}:  # how and where it ran, not what it trained
            cfg[section].pop(key, None)
        return repr((sorted(params.items()), cfg))

    groups: dict = {}
    for r in records:
        if r.method == "iaat" and r.weights != "raw":
            groups.setdefault(rest(r), []).append(r)
    # the group with the most cells, then the most evaluated runs
    best = max(groups.values(), key=lambda g: (len({_gamma_beta(r) for r in g}), len(evaluated(g))), default=[])
    cells: dict = {}
    for r in best:
        cells.setdefault(_gamma_beta(r), []).append(r)
    gammas = sorted({g for g, _ in cells})
    betas = sorted({b for _, b in cells})
    if len(cells) < 2:
        return _missing("IAAT runs that differ only in γ and β", "sweep them with `iaat sweep ... --grid "
                        "method.gamma=1,1.9,4 --grid method.beta=0.1,0.5`")
    if not evaluated(best):
        return not_evaluated("the IAAT runs that differ only in γ and β", best)
    shown = {cell: preferred_run(runs) for cell, runs in cells.items()}
    rows = []
    for g in gammas:
        row = [f"γ = {g * 255:.3g}/255"]
        for b in betas:
            r = shown.get((g, b))
            row.append("–" if r is None else f"{clean_cell(r)} / {percent(r.accuracy(attack))}" if r.evaluation
                       else "not evaluated")
        rows.append(row)
    shared = [_shared_cell_note(cell, runs, shown[cell]) for cell, runs in cells.items() if len(runs) > 1]
    notes = "".join(f"\n_{line}._\n" for line in shared)
    robust = "worst case" if attack == "worst" else attack
    return (_table([f"clean / {robust} (%)"] + [f"β = {b:g}" for b in betas], rows)
            + "\nRuns: " + ", ".join(r.name for r in best) + "\n" + notes + chance_note(list(shown.values()))
            + _pending_note(list(shown.values())))
