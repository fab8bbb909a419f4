"""``iaat sweep``: train and evaluate a set of runs on the same data, model and schedule, resumably.

A sweep is a plan (a YAML file, or built from flags) of named runs, each a train config:

* the fixed-eps frontier: ``pgd_at`` at every radius of ``frontier_eps`` (runs ``pgd_at_eps<E>``,
  PGD step eps/4, the paper's 2/255 at 8/255);
* named runs, each a set of ``section.key: value`` overrides of the base config (``iaat``,
  ``iaat_no_warmup``, ``gairat``, ...); a run that changes ``method.name`` starts from that
  method's defaults instead of the base method's parameters;
* a grid over any parameters of one named run (e.g. IAAT's γ and β, the paper's Table 9):
  every combination is a run, except those equal to a run already in the plan.

Every run is trained by ``iaat train`` in a child process into ``OUT/runs/<name>`` and then
evaluated by ``iaat eval`` with the same attacks, radius and test images; the results land
in ``OUT/runs/<name>/eval/sweep-<key>.json``. The plan is saved as ``OUT/sweep.yaml``. Re-running
the command skips what is finished, resumes an interrupted training from its checkpoint and
an interrupted evaluation from its saved state, so nothing is trained twice. ``--jobs N``
runs N runs at once (CPU threads are split between them).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from .config import RESUMABLE_KEYS, SECTIONS, config_from_dict, load_yaml, method_params
from .errors import CheckpointError, ConfigError
from .evaluation.presets import STEP_RULE
from .schema import check_keys, did_you_mean
from .threads import user_thread_count

PLAN = "sweep.yaml"
#: Ends the file name of the evaluation of the raw weights of a run with train.ema (``sweep-<key>-raw.json``).
RAW_SUFFIX = "-raw"
RUNS = "runs"
LOGS = "logs"
DEFAULT_FRONTIER = (2, 4, 6, 8)
#: The runs ``iaat sweep`` adds beside the frontier, and the optional ones ``--with`` adds.
DEFAULT_RUNS = ("iaat", "iaat_no_warmup", "gairat")
OPTIONAL_RUNS = ("clean", "trades", "mixup_at", "mart", "iaat_line_search", "pgd_at_ema", "iaat_ema", "pgd_at_awp",
                 "iaat_awp", "pgd_at_awp_ema", "iaat_awp_ema", "gairat_awp", "trades_awp", "iaat_trades",
                 "mma", "cat", "mail")
#: Names ``--with`` also takes for several runs at once.
RUN_GROUPS = {"ema": ("pgd_at_ema", "iaat_ema"), "awp": ("pgd_at_awp", "iaat_awp"),
              "awp_ema": ("pgd_at_awp_ema", "iaat_awp_ema")}
#: Overrides of the built-in run names (applied on top of the base config).
BUILTIN_RUNS: dict[str, dict] = {
    "iaat": {"method.name": "iaat"},
    "iaat_no_warmup": {"method.name": "iaat", "method.warmup_epochs": 0},
    "iaat_line_search": {"method.name": "iaat", "method.selection": "line_search"},
    "gairat": {"method.name": "gairat"},
    "clean": {"method.name": "clean"},
    "trades": {"method.name": "trades"},
    "mixup_at": {"method.name": "mixup_at"},
    "mart": {"method.name": "mart"},
    # weight averaging: a run with train.ema is evaluated twice, its average and its raw weights (NAME:raw in the
    # report); the raw weights equal those of the run without it (same seed: the average draws no random numbers)
    "pgd_at_ema": {"method.name": "pgd_at", "train.ema": 0.999},
    "iaat_ema": {"method.name": "iaat", "train.ema": 0.999},
    # adversarial weight perturbation with the authors' gamma and warm-up for the method (train.awp: auto)
    "pgd_at_awp": {"method.name": "pgd_at", "train.awp": "auto"},
    "iaat_awp": {"method.name": "iaat", "train.awp": "auto"},
    "pgd_at_awp_ema": {"method.name": "pgd_at", "train.awp": "auto", "train.ema": 0.999},
    "iaat_awp_ema": {"method.name": "iaat", "train.awp": "auto", "train.ema": 0.999},
    "gairat_awp": {"method.name": "gairat", "train.awp": "auto"},
    "trades_awp": {"method.name": "trades", "train.awp": "auto"},
    # TRADES' attack and loss at IAAT's per-sample radii
    "iaat_trades": {"method.name": "iaat", "method.train_loss": "trades", "method.loss_split": False},
    # the instance-adaptive family, each with its own defaults on the sweep's attack (MMA: its eps only evaluates)
    "mma": {"method.name": "mma"},
    "cat": {"method.name": "cat"},
    "mail": {"method.name": "mail"},
}
DEFAULT_ATTACKS = ("pgd:steps=10", "pgd:steps=100")
DEFAULT_SWEEP_EPS = (0, 2, 4, 6, 8, 10, 12, 14, 16)


@dataclass
class EvalSpec:
    """The one evaluation every run of a sweep gets."""

    eps: Any = None  #: test radius (pixel units over 255); default: the base config's attack.eps
    n: Optional[int] = None  #: first N test images (default all)
    attacks: list = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    sweep_eps: list = field(default_factory=lambda: list(DEFAULT_SWEEP_EPS))
    checks: bool = True

    def args(self) -> list[str]:
        out = ["--eps", str(self.eps)]
        for a in self.attacks:
            out += ["--attack", a]
        if self.sweep_eps:
            out += ["--sweep-eps", *[str(e) for e in self.sweep_eps]]
        if self.n is not None:
            out += ["--n", str(self.n)]
        if not self.checks:
            out.append("--no-checks")
        return out

    def key(self) -> str:
        text = json.dumps([str(self.eps), self.n, self.attacks, [str(e) for e in self.sweep_eps], self.checks,
                           STEP_RULE])
        return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass
class SweepPlan:
    runs: dict  #: name -> nested raw config (validated)
    eval: EvalSpec
    groups: dict = field(default_factory=dict)  #: name -> frontier | run | grid (what the run is for)

    def to_dict(self) -> dict:
        return {"runs": self.runs, "groups": self.groups,
                "eval": {"eps": self.eval.eps, "n": self.eval.n, "attacks": self.eval.attacks,
                         "sweep_eps": self.eval.sweep_eps, "checks": self.eval.checks}}


def _apply(raw: dict, overrides: dict, where: str) -> dict:
    """``raw`` with dotted ``section.key: value`` overrides applied (a new method starts from its defaults)."""
    out = copy.deepcopy(raw)
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping of section.key: value, got {overrides!r}.")
    new_method = overrides.get("method.name")
    if new_method is not None and new_method != (out.get("method") or {}).get("name", "pgd_at"):
        out["method"] = {"name": new_method}
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"{where}: '{dotted}' is not a section.key name (sections: {', '.join(SECTIONS)}).")
        section = out.setdefault(parts[0], {}) or {}
        out[parts[0]] = section
        section[parts[1]] = value
    return out


def _size_name(value: Any) -> str:
    return str(value).replace("/", "-").replace(".", "p")


def build_plan(spec: dict, base_dir: Path = Path(".")) -> SweepPlan:
    """A validated :class:`SweepPlan` from a sweep spec (the parsed sweep YAML; see configs/sweeps/)."""
    known = {"base", "set", "frontier_eps", "runs", "grid", "eval"}
    for key in spec:
        if key not in known:
            raise ConfigError(f"unknown sweep key '{key}'.{did_you_mean(str(key), known)} A sweep file has "
                              f"{', '.join(sorted(known))}.")
    base = spec.get("base")
    if isinstance(base, str):
        base = load_yaml((base_dir / base) if not Path(base).is_absolute() else Path(base))
    if base is not None and not isinstance(base, dict):
        raise ConfigError(f"sweep 'base' must be a train config (a mapping) or the path of one, got {base!r}.")
    base = _apply(base or {}, spec.get("set") or {}, "sweep 'set'")
    runs: dict[str, dict] = {}
    groups: dict[str, str] = {}
    identities: dict[str, dict] = {}

    def add(name: str, raw: dict, group: str) -> None:
        try:
            cfg = config_from_dict(copy.deepcopy(raw))
            ident = identity(cfg.to_dict())
        except ConfigError as e:
            raise ConfigError(f"sweep run '{name}': {e}") from None
        for other, other_ident in identities.items():
            if other_ident == ident:
                if group == "grid":
                    return  # the grid point is a run already in the plan
                raise ConfigError(f"sweep runs '{other}' and '{name}' have the same config.")
        runs[name] = cfg.to_dict()
        groups[name] = group
        identities[name] = ident

    from .units import parse_size

    for eps in spec.get("frontier_eps", DEFAULT_FRONTIER) or []:
        quarter = parse_size(eps, "frontier_eps", allow_zero=False) * 255 / 4  # the paper's 2/255 at 8/255
        # under half a pixel level a bare number reads as [0, 1] units: such a step is written as the fraction
        step = f"{quarter:g}" if quarter >= 0.5 else f"{quarter:g}/255"
        add(f"pgd_at_eps{_size_name(eps)}", _apply(base, {"method.name": "pgd_at", "attack.eps": eps,
                                                          "attack.step_size": step}, "frontier"), "frontier")
    named = spec.get("runs")
    if named is None:
        named = {name: {} for name in DEFAULT_RUNS}
    if not isinstance(named, dict):
        raise ConfigError(f"sweep 'runs' must map run names to overrides, got {named!r}.")
    for name, overrides in named.items():
        _check_name(name)
        merged = {**BUILTIN_RUNS.get(name, {}), **(overrides or {})}
        if "method.name" not in merged:
            raise ConfigError(f"sweep run '{name}' needs method.name (or a built-in name: "
                              f"{', '.join(BUILTIN_RUNS)}).")
        add(name, _apply(base, merged, f"sweep run '{name}'"), "run")
    grid = spec.get("grid")
    if grid:
        of = grid.get("of", "iaat") if isinstance(grid, dict) else None
        params = grid.get("params") if isinstance(grid, dict) else None
        if not isinstance(params, dict) or not params or not isinstance(of, str):
            raise ConfigError("sweep 'grid' needs 'of: RUN' (a named run of the sweep) and 'params: {section.key: "
                              "[values]}'.")
        if of not in named:
            raise ConfigError(f"sweep 'grid' is of '{of}', which is not a named run of this sweep (named runs: "
                              f"{', '.join(named)}); add it to 'runs' (iaat sweep --with {of}).")
        keys = list(params)
        for key in keys:
            if not isinstance(params[key], list) or not params[key]:
                raise ConfigError(f"sweep grid parameter '{key}' needs a non-empty list of values.")
        of_raw = _apply(base, {**BUILTIN_RUNS.get(of, {}), **(named[of] or {})}, f"sweep run '{of}'")
        for values in itertools.product(*(params[k] for k in keys)):
            name = of + "".join(f"_{k.split('.')[-1]}{_size_name(v)}" for k, v in zip(keys, values))
            add(name, _apply(of_raw, dict(zip(keys, values)), f"sweep grid point {name}"), "grid")
    if not runs:
        raise ConfigError("the sweep has no runs.")
    ev = spec.get("eval") or {}
    if not isinstance(ev, dict):
        raise ConfigError(f"sweep 'eval' must be a mapping, got {ev!r}.")
    check_keys(ev, ("eps", "n", "attacks", "sweep_eps", "checks"), "eval")
    spec_eval = EvalSpec(**ev)
    if spec_eval.eps is None:
        spec_eval.eps = (base.get("attack") or {}).get("eps", 8)
    if spec_eval.n is not None and (not isinstance(spec_eval.n, int) or spec_eval.n < 1):
        raise ConfigError(f"sweep eval.n must be a positive integer, got {spec_eval.n!r}.")
    norm = (base.get("attack") or {}).get("norm", "linf")
    _check_eval_attacks(spec_eval.attacks, norm)
    _check_eval_sizes(spec_eval, norm)
    return SweepPlan(runs=runs, eval=spec_eval, groups=groups)


def _check_eval_sizes(ev: "EvalSpec", norm: str) -> None:
    """The evaluation's radii in pixel units, read now as ``iaat eval`` will: a unit mistake (0.031 for 8/255) must
    fail before the first run trains, not after it."""
    from .units import parse_size

    max_unit = 1.0 if norm == "linf" else 64.0  # as iaat eval reads them
    for name, values in (("eval.eps", [ev.eps]), ("eval.sweep_eps", list(ev.sweep_eps or []))):
        for value in values:
            parse_size(value, f"sweep {name}", max_unit=max_unit)


def _check_eval_attacks(attacks: Any, norm: str = "linf") -> None:
    """The evaluation's attack specs, read now (in the runs' ``norm``, as iaat eval reads them): a typo must fail
    before the first run trains, not after it."""
    from .evaluation.attacks import parse_attack

    if not isinstance(attacks, list) or not all(isinstance(a, str) for a in attacks):
        raise ConfigError(f"sweep eval.attacks must be a list of attack specs like 'pgd:steps=20', got {attacks!r}.")
    for text in attacks:
        try:
            parse_attack(text, norm=norm)
        except ConfigError as e:
            raise ConfigError(f"sweep eval.attacks: {e}") from None


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name) or name[0] == ".":
        raise ConfigError(f"sweep run name {name!r} must be letters, digits, '_', '-' or '.'.")


def load_sweep_file(path: Path) -> dict:
    """The sweep spec of a YAML file (paths in it are relative to the file)."""
    return load_yaml(path)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class RunStatus:
    name: str
    trained: str = ""  #: done | skipped | resumed | started | failed | interrupted
    evaluated: str = ""
    seconds: float = 0.0
    log: Optional[Path] = None


PARENT_ENV = "IAAT_SWEEP_PARENT"


def stop_with_parent() -> None:
    """In a sweep's child (Linux): get SIGTERM when the sweep dies, even by SIGKILL, so that no orphaned
    training keeps writing into a run folder that a re-run of the sweep would resume. Called by the CLI."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        # PR_SET_PDEATHSIG fires when the parent *thread* ends: the sweep's pool threads live until every run is done
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the sweep died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def child_env(threads: int, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of a sweep's run: ``environ`` (default: this process's), with ``threads`` CPU threads
    unless it sets a count.

    PyTorch takes ``MKL_NUM_THREADS`` over ``OMP_NUM_THREADS``, so the one not set follows the one that is:
    ``OMP_NUM_THREADS=1`` alone must not leave the runs at ``threads`` (each waiting on the others' threads
    on a shared machine).

    >>> child_env(4, {"OMP_NUM_THREADS": "1"})["MKL_NUM_THREADS"]
    '1'
    >>> child_env(4, {})["OMP_NUM_THREADS"]
    '4'
    """
    env = dict(os.environ if environ is None else environ)
    count = user_thread_count(env) or str(threads)
    env.setdefault("OMP_NUM_THREADS", count)
    env.setdefault("MKL_NUM_THREADS", count)
    return env


def oversubscription(jobs: int, running: int, environ: Optional[Mapping[str, str]] = None,
                     cpus: Optional[int] = None) -> Optional[str]:
    """What to tell a user whose thread count (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, kept for every run) times
    the runs at once exceeds the CPU cores: each run's threads then wait on the others', many times slower than one
    run at a time.

    >>> oversubscription(2, 2, {"OMP_NUM_THREADS": "2"}, cpus=2)[:40]
    'OMP_NUM_THREADS=2 gives each of 2 runs a'
    >>> oversubscription(2, 2, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "8"}, cpus=2)[:20]
    'MKL_NUM_THREADS=8 gi'
    >>> oversubscription(2, 2, {}, cpus=2) is None  # unset: the sweep splits the cores itself
    True
    """
    env, cpus = os.environ if environ is None else environ, cpus or os.cpu_count() or 1
    counts = {name: int(env[name]) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
              if env.get(name, "").strip().isdigit()}
    if running < 2 or not counts:
        return None
    name = max(counts, key=counts.get)  # the larger count is the one some library uses
    if counts[name] * running <= cpus:
        return None
    return (f"{name}={counts[name]} gives each of {running} runs at once {counts[name]} threads on {cpus} CPU "
            f"cores: they will wait on each other's threads. Unset it (the sweep then splits the cores between the "
            f"runs) or lower it or --jobs.")


def _lock(out: Path) -> Any:
    """Hold ``OUT/sweep.lock`` for the sweep's lifetime; a second sweep on the same folder is refused."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(out / "sweep.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CheckpointError(f"another iaat sweep is running in {out}; wait for it or stop it first.") from None
    return handle


def identity(raw: dict) -> dict:
    """A config as a comparable dict: validated, with the method's defaults filled in."""
    cfg = config_from_dict(copy.deepcopy(raw))
    out = cfg.to_dict()
    out["method"] = {"name": cfg.method.name, **method_params(cfg)}
    return out


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 8) -> str:
    """The last lines of a child's log, indented (what went wrong, without opening the file)."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


def _same_config(saved: dict, planned: dict) -> Optional[str]:
    """The first key (other than where/how it runs) in which a run folder's config differs from the plan."""
    a, b = identity(saved), identity(planned)
    for section in b:
        for key in sorted(set(a.get(section, {})) | set(b[section])):
            if (section, key) in RESUMABLE_KEYS:  # where and how it runs, how long: a resume may change them
                continue
            if a.get(section, {}).get(key) != b[section].get(key):
                return f"{section}.{key} ({a.get(section, {}).get(key)!r} there, {b[section].get(key)!r} planned)"
    return None


def stale_evaluation(path: Path, run_dir: Path) -> bool:
    """Whether the evaluation at ``path`` is of other weights than the run's newest epoch checkpoint (it was trained
    further since, by the sweep or by hand), or unreadable."""
    from .engine.checkpoint import newest_epoch
    from .engine.rundir import CHECKPOINTS, read_evaluation

    if not path.is_file():
        return False
    ev = read_evaluation(path)
    return ev is None or ev.get("epoch") != newest_epoch(run_dir / CHECKPOINTS)


def eval_path(run_dir: Path, key: str, raw: bool = False) -> Path:
    """Where a sweep puts the evaluation of ``run_dir`` with the evaluation ``key`` (``raw``: of the raw weights of
    a run with train.ema)."""
    return run_dir / "eval" / f"sweep-{key}{RAW_SUFFIX if raw else ''}.json"


class SweepRunner:
    """Runs a plan's trainings and evaluations as child processes; resumable and interruptible."""

    def __init__(self, plan: SweepPlan, out: Path, jobs: int = 1, log: Callable[[str], None] = print,
                 python: str = sys.executable) -> None:
        self.plan, self.out, self.jobs, self.log, self.python = plan, Path(out), jobs, log, python
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = False
        self.signals = 0

    def eval_path(self, name: str, raw: bool = False) -> Path:
        return eval_path(self.out / RUNS / name, self.plan.eval.key(), raw)

    def check(self) -> None:
        """Refuse to reuse a folder whose runs were trained with another config or for more epochs than planned
        (before anything starts)."""
        from .engine.rundir import last_epoch, read_metrics

        for name, raw in self.plan.runs.items():
            config = self.out / RUNS / name / "config.yaml"
            if config.is_file():
                diff = _same_config(load_yaml(config), raw)
                if diff:
                    raise ConfigError(f"run {self.out / RUNS / name} was trained with another config: {diff}. "
                                      f"Use another --out, or remove that run folder to train it again.")
                done = last_epoch(read_metrics(self.out / RUNS / name))
                planned = raw["train"]["epochs"]  # the plan holds checked configs (Config.to_dict)
                if done > planned:  # the plan's one schedule: a longer-trained run would be compared as if it had it
                    raise ConfigError(f"run {self.out / RUNS / name} has trained {done} epochs, more than the "
                                      f"{planned} planned: a sweep trains its runs to one schedule. Plan --epochs "
                                      f"{done} or more, or use another --out.")

    def write_plan(self) -> None:
        from .engine.checkpoint import atomic_write_bytes

        try:
            (self.out / LOGS).mkdir(parents=True, exist_ok=True)
            (self.out / RUNS).mkdir(exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the sweep folder {self.out}: {e.strerror or e}.") from None
        atomic_write_bytes(self.out / PLAN, yaml.safe_dump(self.plan.to_dict(), sort_keys=False).encode())

    def _spawn(self, args: list[str], log_path: Path, threads: int) -> int:
        env = child_env(threads)
        env[PARENT_ENV] = str(os.getpid())
        with open(log_path, "a") as log_file:
            log_file.write(f"\n$ iaat {' '.join(args)}\n")
            log_file.flush()
            # Own session: a Ctrl-C on the terminal reaches the sweep only, which forwards exactly one signal
            # (a run that receives two stops without saving its current step).
            child = subprocess.Popen([self.python, "-m", "iaat", *args], stdout=log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
            with self._lock:
                if self.stopping:
                    child.send_signal(signal.SIGTERM)
                self._children.add(child)
            try:
                return child.wait()
            finally:
                with self._lock:
                    self._children.discard(child)

    def forward(self, signum: int) -> None:
        """Ask every running child to stop (they save their state) and start nothing new."""
        with self._lock:
            self.stopping = True
            self.signals += 1
            for child in self._children:
                try:
                    child.send_signal(signal.SIGTERM)
                except OSError:
                    pass

    def run_one(self, name: str, threads: int) -> RunStatus:
        status = RunStatus(name)
        run_dir = self.out / RUNS / name
        status.log = self.out / LOGS / f"{name}.log"
        start = time.time()
        cfg = config_from_dict(copy.deepcopy(self.plan.runs[name]))
        summary = run_dir / "summary.json"
        try:
            done = summary.is_file() and json.loads(summary.read_text()).get("epochs", 0) >= cfg.train.epochs
        except (OSError, json.JSONDecodeError, AttributeError):
            done = False  # unreadable: `iaat train --resume` decides from the checkpoints
        if done:
            status.trained = "skipped"
        elif self.stopping:
            return status
        else:
            if (run_dir / "config.yaml").is_file():
                status.trained = "resumed"
                args = ["train", "--resume", "--out", str(run_dir), "--no-progress",
                        "--set", f"train.epochs={cfg.train.epochs}", "--set", f"train.device={cfg.train.device}"]
                if cfg.data.data_dir:
                    args += ["--set", f"data.data_dir={cfg.data.data_dir}"]
            else:
                status.trained = "started"
                config_path = self.out / LOGS / f"{name}.config.yaml"
                config_path.write_text(yaml.safe_dump(self.plan.runs[name], sort_keys=False))
                args = ["train", "--config", str(config_path), "--out", str(run_dir), "--no-progress"]
            self.log(f"[{name}] training ({status.trained}; log {status.log})")
            code = self._spawn(args, status.log, threads)
            if code != 0:
                status.trained = "interrupted" if self.stopping else "failed"
                if not self.stopping:
                    _err(_tail(status.log))
                status.seconds = time.time() - start
                return status
            status.trained = "done" if status.trained == "started" else status.trained
        # a run with train.ema is evaluated twice: its averaged weights (what iaat eval uses) and its raw ones
        trained_now = status.trained in ("done", "resumed")
        for raw in (False, True) if cfg.train.ema else (False,):
            out = self.eval_path(name, raw)
            stale = stale_evaluation(out, run_dir)
            if out.is_file() and not stale:
                status.evaluated = status.evaluated or "skipped"
                continue
            if stale:  # of earlier weights: the run was trained further since
                out.unlink()
                out.with_suffix(".md").unlink(missing_ok=True)
            if stale or trained_now:  # else a cut evaluation's state is resumed
                out.with_name(out.name + ".state.npz").unlink(missing_ok=True)
            if self.stopping:
                break
            self.log(f"[{name}] evaluating{' the raw weights' if raw else ''} ({' '.join(self.plan.eval.args())})")
            args = ["eval", str(run_dir), "--out", str(out), "--no-progress", *self.plan.eval.args(),
                    *(["--raw"] if raw else [])]
            if cfg.data.data_dir:
                args += ["--data-dir", str(cfg.data.data_dir)]
            if cfg.train.device != "auto":
                args += ["--device", cfg.train.device]
            code = self._spawn(args, status.log, threads)
            status.evaluated = "done" if code == 0 else ("interrupted" if self.stopping else "failed")
            if status.evaluated == "failed":
                _err(_tail(status.log))
            if code != 0:
                break
        status.seconds = time.time() - start
        return status

    def run(self, only: Optional[list[str]] = None) -> list[RunStatus]:
        names = [n for n in self.plan.runs if not only or n in only]
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        results: list[RunStatus] = []

        def one(name: str) -> RunStatus:
            status = self.run_one(name, threads)
            if status.trained in ("failed", "interrupted") or status.evaluated in ("failed", "interrupted"):
                what = status.trained if status.trained in ("failed", "interrupted") else status.evaluated
                _err(f"[{name}] {what}; see {status.log}")
            elif status.trained == "skipped" and status.evaluated == "skipped":
                self.log(f"[{name}] already trained and evaluated")
            elif status.trained:
                self.log(f"[{name}] training {status.trained}, evaluation {status.evaluated or 'not run'} "
                         f"({status.seconds:.0f} s)")
            return status

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for status in pool.map(one, names):
                results.append(status)
        return results


def check_selection(plan: SweepPlan, jobs: int, only: Optional[list[str]]) -> list[str]:
    """The runs ``--only`` selects (all without it), after checking it and ``--jobs``."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}.")
    unknown = [n for n in only or [] if n not in plan.runs]
    if unknown:
        raise ConfigError(f"--only: no run named {', '.join(unknown)} in this sweep; runs: {', '.join(plan.runs)}.")
    return [n for n in plan.runs if not only or n in only]


def run_sweep(plan: SweepPlan, out: Path, jobs: int = 1, only: Optional[list[str]] = None,
              log: Callable[[str], None] = print) -> int:
    """Run (or resume) a sweep; returns the process exit code (0 when every run is trained and evaluated)."""
    check_selection(plan, jobs, only)
    out = Path(out)
    runner = SweepRunner(plan, out, jobs=jobs, log=log)
    runner.check()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the sweep folder {out}: {e.strerror or e}.") from None
    lock = _lock(out)
    try:
        runner.write_plan()
        return _run_locked(runner, plan, out, jobs, only, log)
    finally:
        if lock is not None:
            lock.close()


def _run_locked(runner: SweepRunner, plan: SweepPlan, out: Path, jobs: int, only: Optional[list[str]],
                log: Callable[[str], None]) -> int:
    chosen = f"{len(only)} of its {len(plan.runs)} runs (--only)" if only else f"{len(plan.runs)} runs"
    log(f"sweep of {chosen} into {out} ({jobs} at a time); plan in {out / PLAN}")
    note = oversubscription(jobs, min(jobs, len(only or plan.runs)))
    if note:
        _err(f"warning: {note}")

    def handler(signum: int, frame: object) -> None:
        os.write(2, f"iaat: {signal.Signals(signum).name} received; stopping the running trainings (they save "
                    f"their state) and starting nothing new\n".encode())
        runner.forward(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        results = runner.run(only)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if runner.stopping:
        _err("iaat: sweep interrupted; run the same command again to continue where it stopped")
        return 130
    failed = [r for r in results if "failed" in (r.trained, r.evaluated)]
    if failed:
        _err(f"iaat: error: {len(failed)} run(s) failed: " + ", ".join(f"{r.name} (log {r.log})" for r in failed))
        return 1
    log(f"sweep finished: {len(results)} runs trained and evaluated; make the report (into {out / 'report'}) with: "
        f"iaat report {out}")
    return 0
