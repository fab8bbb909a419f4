"""What a report reads: the saved files of run folders and sweep folders, never a live process."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import Config, load_yaml, method_params
from ..engine import rundir
from ..errors import CheckpointError, ConfigError
from ..evaluation.checks import at_chance

_RADII = re.compile(r"epoch_(\d+)\.npy$")
#: Classes of the data sets whose evaluations predate the evaluation JSON's num_classes.
_KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}
#: Methods that train each sample at its own radius (kept in RUN/radii): IAAT's radii, MMA's margins, CAT's radii.
RADIUS_METHODS = ("iaat", "mma", "cat")


@dataclass
class RunRecord:
    """One run as saved: its config, metrics, evaluation and (IAAT) per-epoch radii."""

    name: str
    path: Path
    cfg: Config
    metrics: list
    evaluation: Optional[dict]  #: the chosen eval JSON (see :func:`pick_evaluation`), or None
    evaluation_path: Optional[Path]
    radii: dict = field(default_factory=dict)  #: epoch -> path of that epoch's radii (.npy, [0, 1] units)
    group: str = "run"  #: frontier | run | grid (from the sweep plan) or run
    #: the weights evaluated: trained (no train.ema), ema (the average, what iaat eval uses) or raw (of an EMA run)
    weights: str = "trained"
    sweep: Optional[Path] = None  #: the sweep folder the run was read from, None for a run given on its own
    twin: bool = False  #: the ``NAME:raw`` row of an EMA run whose averaged weights have a row of their own

    @property
    def method(self) -> str:
        return self.cfg.method.name

    @property
    def params(self) -> dict:
        """The method's own parameters with defaults filled in, sizes in [0, 1] units."""
        return method_params(self.cfg)

    @property
    def train_eps(self) -> float:
        """The training radius in [0, 1] units (per-sample radii: the final mean radius)."""
        if self.adaptive and self.metrics and "radius_mean" in self.metrics[-1]:
            return float(self.metrics[-1]["radius_mean"])
        return self.cfg.eps

    @property
    def adaptive(self) -> bool:
        """Trains each sample at its own radius (IAAT, MMA, CAT)."""
        return self.method in RADIUS_METHODS

    @property
    def parts(self) -> str:
        """The state-of-practice parts behind this point: ``""``, ``"AWP"``, ``"EMA"``, ``"AWP + EMA"``."""
        return " + ".join(p for p, on in (("AWP", self.cfg.train.awp is not None), ("EMA", self.weights == "ema"))
                          if on)

    @property
    def train_seconds(self) -> float:
        return float(sum(row.get("train_seconds", 0.0) for row in self.metrics))

    @property
    def epochs_done(self) -> int:
        """The last epoch metrics.jsonl records (0 before the first)."""
        return rundir.last_epoch(self.metrics)

    @property
    def evaluated_epoch(self) -> Optional[int]:
        """The epoch whose weights the evaluation scored (None: not evaluated, or not recorded)."""
        return (self.evaluation or {}).get("epoch")

    @property
    def finished(self) -> bool:
        """Trained all the epochs its config plans (an interrupted or still running run has not)."""
        return self.epochs_done >= self.cfg.train.epochs

    @property
    def cut_short(self) -> bool:
        """Not :attr:`finished`, said of the run itself: an EMA run's ``:raw`` row is the same run, said once."""
        return not self.finished and not self.twin

    @property
    def num_classes(self) -> Optional[int]:
        """The number of classes the run's evaluation scored (from its JSON, else from the data set's name)."""
        return (self.evaluation or {}).get("num_classes") or _KNOWN_CLASSES.get(self.cfg.data.dataset)

    @property
    def at_chance(self) -> bool:
        """Evaluated, and its clean accuracy is no better than guessing: its robust accuracy means nothing."""
        ev = self.evaluation
        return ev is not None and at_chance(ev.get("clean", 0.0), int(ev.get("n") or 0), self.num_classes)

    @property
    def worst_case_over(self) -> list[str]:
        """The attacks the evaluation's worst case is over (those at its main radius); [] for evaluations without
        one."""
        return list(((self.evaluation or {}).get("worst_case") or {}).get("over") or [])

    def accuracy(self, attack: Optional[str] = None) -> Optional[float]:
        """Clean accuracy (attack None), an attack's accuracy by label, or the worst case ("worst")."""
        ev = self.evaluation
        if ev is None:
            return None
        if attack is None:
            return ev.get("clean")
        if attack == "worst":
            worst = ev.get("worst_case")
            if worst:
                return worst["accuracy"]
            # an evaluation without one (older files): the weakest attack at its main radius, not at any radius
            values = [a["accuracy"] for a in ev.get("attacks", {}).values()
                      if a.get("eps") == ev.get("eps") and a.get("norm", ev.get("norm")) == ev.get("norm")]
            return min(values) if values else None
        entry = ev.get("attacks", {}).get(attack)
        return entry["accuracy"] if entry else None

    def radii_at(self, epoch: int) -> np.ndarray:
        return np.load(self.radii[epoch])


def _data_set(record: RunRecord) -> str:
    """The data set a run trained on: its name, and for image folders also the folder (each is a data set)."""
    d = record.cfg.data
    return f"{d.dataset} {Path(d.data_dir).resolve()}" if d.dataset == "imagefolder" and d.data_dir else d.dataset


def pick_evaluation(run_dir: Path, preferred: Optional[Path] = None, epoch: Optional[int] = None
                    ) -> tuple[Optional[dict], Optional[Path]]:
    """The evaluation a report shows for a run: ``preferred`` (a sweep's own evaluation of its runs) when given,
    none while it is missing (another evaluation, at another radius or on other images, would not compare with
    the sweep's other runs); for a run on its own, of ``RUN/eval/*.json`` and ``RUN/*.json`` other than
    summary.json, one with attacks before a clean-only one, then one of the weights of its last ``epoch`` before
    one of older weights (a run trained on after it was evaluated: the report warns), then the one on the most
    test images, the newest among equals."""
    if preferred is not None:
        return (json.loads(preferred.read_text()), preferred) if preferred.is_file() else (None, None)
    best: Optional[tuple] = None
    for path in list((run_dir / "eval").glob("*.json")) + list(run_dir.glob("*.json")):
        if path.name == rundir.SUMMARY:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or "clean" not in data or data.get("split", "test") != "test":
            continue
        current = epoch is None or data.get("epoch") in (epoch, None)  # no epoch recorded: unknown, not stale
        key = (bool(data.get("attacks")), current, data.get("n", 0), path.stat().st_mtime)
        if best is None or key > best[0]:
            best = (key, data, path)
    return (best[1], best[2]) if best else (None, None)


def _radius_files(folder: Path, samples: Optional[int]) -> dict[int, Path]:
    """Each epoch's radius file (``epoch_NNNN.npy``) that holds one finite radius per training sample, by epoch; the
    others are left out with a warning. ``samples`` is the run's training set size (from its data split); where that
    is unknown, the count most files agree on, so that a damaged file does not decide it wherever it lies."""
    counts = {int(m.group(1)): (f, _radii_count(f)) for f in sorted(folder.iterdir()) if (m := _RADII.match(f.name))}
    lengths = Counter(n for _, n in counts.values() if n is not None)
    length = samples or (max(lengths, key=lambda n: (lengths[n], n)) if lengths else None)
    for f, n in counts.values():
        if n is not None and n != length:
            warnings.warn(f"{f} holds {n} radii where the run has {length} training samples (damaged?); the report "
                          f"leaves it out.", stacklevel=3)
    return {epoch: f for epoch, (f, n) in sorted(counts.items()) if n is not None and n == length}


def _training_samples(run_dir: Path) -> Optional[int]:
    """How many training samples the run has (its data split file), or None where that file cannot be read."""
    try:
        return len(rundir.read_train_indices(run_dir))
    except CheckpointError:
        return None


def _radii_count(path: Path) -> Optional[int]:
    """How many radii ``path`` holds, if it holds one finite radius per sample; else None, and a warning that the
    report leaves the damaged file out."""
    try:
        radii = np.load(path, mmap_mode="r")
        if radii.ndim == 1 and radii.dtype.kind == "f" and np.isfinite(radii).all():
            return len(radii)
    except (OSError, ValueError, EOFError):
        pass
    warnings.warn(f"{path} is not an array of radii (damaged?); the report leaves it out.", stacklevel=3)
    return None


def _load_run(path: Path, name: str, group: str = "run", eval_path: Optional[Path] = None) -> RunRecord:
    config = path / rundir.CONFIG
    if not config.is_file():
        raise CheckpointError(f"{path} is neither a run folder (no {rundir.CONFIG}) nor a sweep folder (no sweep.yaml).")
    cfg = rundir.run_config(path)  # a bad value in config.yaml: an error naming the file
    radii = _radius_files(path / "radii", _training_samples(path)) if (path / "radii").is_dir() else {}
    metrics = rundir.read_metrics(path)
    evaluation, chosen = pick_evaluation(path, eval_path, rundir.last_epoch(metrics))
    weights = (evaluation or {}).get("weights", "ema") if cfg.train.ema else "trained"
    return RunRecord(name=name + (":raw" if weights == "raw" else ""), path=path, cfg=cfg, metrics=metrics,
                     evaluation=evaluation, evaluation_path=chosen, radii=radii, group=group, weights=weights)


def _raw_copy(record: RunRecord, eval_path: Path) -> RunRecord:
    """The point of an EMA run's raw weights (``NAME:raw``): its own evaluation, no radius figures of its own."""
    return RunRecord(name=f"{record.name}:raw", path=record.path, cfg=record.cfg, metrics=record.metrics,
                     evaluation=json.loads(eval_path.read_text()), evaluation_path=eval_path, group=record.group,
                     weights="raw", sweep=record.sweep, twin=True)


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Run records of run folders and of every run of sweep folders, in the order given (sweeps: plan order)."""
    from ..sweep import PLAN, RUNS, EvalSpec, eval_path

    records: list[RunRecord] = []
    seen: set = set()
    for path in paths:
        path = Path(path)
        if (path / PLAN).is_file():
            plan = load_yaml(path / PLAN)
            key = EvalSpec(**(plan.get("eval") or {})).key()
            groups = plan.get("groups") or {}
            for name in plan.get("runs") or {}:
                run_dir = path / RUNS / name
                if not (run_dir / rundir.CONFIG).is_file():
                    continue  # not started yet
                if run_dir.resolve() not in seen:
                    seen.add(run_dir.resolve())
                    records.append(_load_run(run_dir, name, groups.get(name, "run"), eval_path(run_dir, key)))
                    records[-1].sweep = path
                    raw = eval_path(run_dir, key, raw=True)
                    if records[-1].weights == "ema" and raw.is_file():
                        records.append(_raw_copy(records[-1], raw))
        elif path.resolve() not in seen:
            seen.add(path.resolve())
            records.append(_load_run(path, path.name))
    datasets = sorted({_data_set(r) for r in records})
    if len(datasets) > 1:
        which = "; ".join(f"{d}: {', '.join(r.name for r in records if _data_set(r) == d)}" for d in datasets)
        raise ConfigError(f"these runs were trained on different data sets ({which}); their numbers do not share a "
                          f"figure or a frontier: report each data set on its own.")
    names = [r.name for r in records]
    for r in records:  # two folders with the same name (from two sweeps): tell them apart by their parent
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.parent.name}/{r.name}" if r.path.parent.name == RUNS else str(r.path)
    return records

