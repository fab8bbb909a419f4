"""Markdown tables in the shape of the IAAT paper's Tables 1, 5, 7, 8 and 9 (and of the state-of-practice parts),
from run records."""

from __future__ import annotations

from typing import Optional

from .collect import RunRecord


def _pct(value: Optional[float]) -> str:
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


def robustness_table(records: list[RunRecord]) -> str:
    """Table 1: clean and robust accuracy (%) of every run under every attack, the worst case, training time."""
    labels = attack_labels(records)
    rows = []
    for r in records:
        if r.evaluation is None:
            rows.append([r.name, r.method, _radius(r), "not evaluated"] + [""] * (len(labels) + 2))
            continue
        rows.append([r.name, r.method, _radius(r), _pct(r.accuracy())] + [_pct(r.accuracy(a)) for a in labels]
                    + [_pct(r.accuracy("worst")), f"{r.train_seconds:.0f}"])
    return _table(["run", "method", "training ε (/255)", "clean"] + labels + ["worst case", "train s"], rows)


def _compare(records: list[RunRecord]) -> str:
    """A small table: clean, every attack and the worst case, for the runs a comparison is about."""
    labels = attack_labels(records)
    rows = [[r.name, r.method, _radius(r), _pct(r.accuracy())] + [_pct(r.accuracy(a)) for a in labels]
            + [_pct(r.accuracy("worst"))] for r in records]
    return _table(["run", "method", "training ε (/255)", "clean"] + labels + ["worst case"], rows)


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
    shown = [r for r in records if r.parts or r.weights == "raw" or r.method == "mart"]
    if not shown:
        return _missing("run with train.ema, train.awp or method mart", "add them with iaat sweep --with ema awp mart")
    ref = [r for r in _reference(records) if r.cfg.train.awp is None]  # cost relative to plain PGD-AT only
    labels = attack_labels(ref + shown)
    rows = []
    for r in ref + [r for r in shown if r not in ref]:
        parts = r.parts + (" (raw weights)" if r.weights == "raw" else "")
        rows.append([r.name, r.method, parts.strip() or "–", _pct(r.accuracy())]
                    + [_pct(r.accuracy(a)) for a in labels] + [_pct(r.accuracy("worst")), _cost(r, ref)])
    return _table(["run", "method", "parts", "clean"] + labels + ["worst case", "train time / PGD-AT"], rows) + COST_NOTE


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
    shown = [r for r in records if r.method in FAMILY and not r.parts and r.group != "grid"]
    if not shown:
        return _missing("run of the instance-adaptive family", "add them with iaat sweep --with mma cat mail")
    ref = [r for r in _reference(records) if not r.parts]
    labels = attack_labels(ref + shown)
    rows = [[r.name, r.method, _pct(r.accuracy())] + [_pct(r.accuracy(a)) for a in labels]
            + [_pct(r.accuracy("worst")), _cost(r, ref), per_sample_state(r)] for r in ref + shown]
    return _table(["run", "method", "clean"] + labels + ["worst case", "train time / PGD-AT", "per-sample state"],
                  rows) + COST_NOTE


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
    return _compare(_reference(records) + with_w + without)


def line_search_table(records: list[RunRecord]) -> str:
    """Table 7: IAAT's Alg. 2 selection against the exact line search over eps."""
    alg2 = [r for r in records if r.adaptive and r.params.get("selection") == "alg2" and r.group != "grid"
            and r.params.get("warmup_epochs", 0) > 0]
    search = [r for r in records if r.adaptive and r.params.get("selection") == "line_search"]
    if not search:
        return _missing("line-search IAAT run", "add one with `iaat sweep ... --with iaat_line_search`")
    return _compare(_reference(records) + alg2[:1] + search)


def mixup_table(records: list[RunRecord]) -> str:
    """Table 8: Mixup-AT against IAAT and PGD-AT."""
    mixup = [r for r in records if r.method == "mixup_at"]
    if not mixup:
        return _missing("Mixup-AT run", "add one with `iaat sweep ... --with mixup_at`")
    iaat = [r for r in records if r.adaptive and r.group != "grid" and r.params.get("warmup_epochs", 0) > 0
            and r.params.get("selection") == "alg2"]
    return _compare(_reference(records) + iaat[:1] + mixup)


def sensitivity_table(records: list[RunRecord], attack: str) -> str:
    """Table 9: IAAT's clean / robust accuracy over its γ (rows) and β (columns), for runs equal but for them."""
    def rest(r: RunRecord) -> tuple:
        params = {k: v for k, v in r.params.items() if k not in ("gamma", "beta")}
        cfg = r.cfg.to_dict()
        cfg.pop("method")
        return repr((sorted(params.items()), cfg))

    groups: dict = {}
    for r in records:
        if r.method == "iaat" and r.evaluation is not None:
            groups.setdefault(rest(r), []).append(r)
    best = max(groups.values(), key=len, default=[])
    gammas = sorted({r.params["gamma"] for r in best})
    betas = sorted({float(r.params["beta"]) for r in best})
    if len(gammas) * len(betas) < 2:
        return _missing("IAAT runs that differ only in γ and β", "sweep them with `iaat sweep ... --grid "
                        "method.gamma=1,1.9,4 --grid method.beta=0.1,0.5`")
    cell = {(r.params["gamma"], float(r.params["beta"])): r for r in best}
    rows = []
    for g in gammas:
        row = [f"γ = {g * 255:.3g}/255"]
        for b in betas:
            r = cell.get((g, b))
            row.append(f"{_pct(r.accuracy())} / {_pct(r.accuracy(attack))}" if r else "–")
        rows.append(row)
    return (_table(["clean / " + attack + " (%)"] + [f"β = {b:g}" for b in betas], rows)
            + "\nRuns: " + ", ".join(r.name for r in best) + "\n")
