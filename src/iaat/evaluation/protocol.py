"""A full robustness evaluation: attacks, sweeps, corruptions and sanity checks, resumable per batch.

Only images the model classifies correctly when clean are attacked (the others can never count
as robust), each attack's batches have their own seed, and the per-sample results of every
finished batch are saved, so an interrupted evaluation resumes where it stopped and gives the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.pgd import attack_mode
from ..data import ImageSet, to_unit
from ..errors import ConfigError
from ..models.precision import float32_view
from ..units import format_size
from .attacks import AttackSpec, parse_attack, require_autoattack, run_attack, spec_summary
from .checks import check_model_fits, probe_model, run_checks
from .presets import DEFAULT_EPS_SWEEP, DEFAULT_STEPS_SWEEP, PROTOCOLS
from .state import EvalState

def curve_x(name: str, point: dict) -> str:
    """A curve point's x value as printed text: eps in pixel units over 255, steps as they are."""
    return f"{point['eps'] * 255:g}" if name == "eps" else f"{point['steps']}"


@dataclass
class EvalPlan:
    """What one evaluation runs. ``attacks`` have their eps filled in."""

    attacks: list[AttackSpec]
    eps: float  #: the main radius (sweeps, checks and the worst case refer to it)
    norm: str = "linf"
    eps_sweep: list[float] = field(default_factory=list)
    sweep_steps: int = 10  #: PGD steps of each eps-sweep point
    steps_sweep: list[int] = field(default_factory=list)
    steps_sweep_step: Optional[float] = None  #: fixed step of the steps sweep (default eps / 4)
    corruptions: Optional[str] = None  #: a CIFAR-10-C style folder, or "generated"
    checks: bool = True
    protocol: Optional[str] = None

    def eps_sweep_attack(self, eps: float) -> AttackSpec:
        """The attack of one eps-sweep point."""
        return AttackSpec(eps=eps, steps=self.sweep_steps, norm=self.norm)

    def steps_sweep_attack(self) -> AttackSpec:
        """The one fixed-step PGD run whose per-iterate record gives the whole steps curve."""
        step = self.steps_sweep_step if self.steps_sweep_step is not None else self.eps / 4
        return AttackSpec(eps=self.eps, steps=max(self.steps_sweep), step_size=step, norm=self.norm)

    def stages(self) -> list[AttackSpec]:
        """Every attack run: main attacks, sweep points, the steps sweep, the check attack."""
        out = list(self.attacks)
        main = {s.label for s in self.attacks}
        for e in self.eps_sweep:
            spec = self.eps_sweep_attack(e)
            if e > 0 and spec.label not in main:
                out.append(spec)
        if self.steps_sweep:
            out.append(self.steps_sweep_attack())
        if self.checks:
            out.append(large_eps_attack(self.norm))
        return out


def large_eps_attack(norm: str) -> AttackSpec:
    """An attack that should break nearly every image: PGD-20 from the clean image at half the pixel range.

    No random start, so a model with zero input gradients (gradient masking) visibly survives it. Each
    image leaves the attack at its first misclassified iterate: most break within a few steps.
    """
    eps = 0.5 if norm == "linf" else 16.0
    return AttackSpec(eps=eps, steps=20, norm=norm, random_start=False, stop_on_miss=True)


def build_plan(*, eps: Sequence[float], protocol: Optional[str] = None, attacks: Sequence[Union[str, AttackSpec]] = (),
               norm: str = "linf", surrogate: Optional[str] = None, corruptions: Optional[str] = None,
               eps_sweep: Optional[Sequence[float]] = None, steps_sweep: Optional[Sequence[int]] = None,
               checks: bool = True) -> EvalPlan:
    """Combine a named protocol, extra attacks (spec strings or :class:`AttackSpec`) and options into a plan.

    Every attack without its own radius runs at each radius in ``eps``; the first is the main one.
    ``paper`` and ``full`` bring the eps and steps sweeps unless they are given explicitly.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}.")
    if not eps:
        raise ConfigError("an evaluation needs at least one eps.")
    texts = list(PROTOCOLS.get(protocol, [])) + list(attacks)
    for t in texts:
        if not isinstance(t, (str, AttackSpec)):
            raise ConfigError(f"attacks takes spec strings such as 'pgd:steps=10,restarts=5' or AttackSpec objects, "
                              f"got a {type(t).__name__}: an evaluation builds each attack from its spec (and runs it "
                              f"at every eps); iaat.PGD(model, eps=...) is for attacking batches yourself.")
    # a transfer attack of the list that names no source takes the surrogate's, and is then the one it adds
    specs = []
    for t in texts:  # a string takes the plan's norm unless it names one; an AttackSpec's default linf does too
        spec = parse_attack(t, source=surrogate, norm=norm) if isinstance(t, str) else (
            replace(t, norm=norm) if t.eps is None and t.norm == "linf" else t)
        if spec.eps is None and spec.norm != norm:  # the plan's radii are in the plan's norm
            raise ConfigError(f"{spec.label} names norm {spec.norm} but no eps, and would run at the {norm} radii "
                              f"given: give it its own (e.g. eps=128 in pixel units, eps=0.5 as an AttackSpec) or "
                              f"evaluate with norm {spec.norm} (norm={spec.norm!r}, --norm {spec.norm}).")
        specs.append(spec)
    if surrogate and not any(s.kind == "transfer" and s.source == str(surrogate) for s in specs):
        specs.append(AttackSpec(kind="transfer", source=str(surrogate), norm=norm))
    resolved: list[AttackSpec] = []
    for spec in specs:
        for e in ([spec.eps] if spec.eps is not None else eps):
            s = spec.at(e)
            same = next((r for r in resolved if r.label == s.label), None)
            if same is not None and _surrogate(same) != _surrogate(s):  # the label has every other option
                raise ConfigError(f"two attacks would both be reported as {s.label}, transfers from {same.source} and "
                                  f"from {s.source}: evaluate one surrogate per command.")
            if s.eps > 0 and same is None:
                resolved.append(s)
    if specs and eps[0] == 0 and any(spec.eps is None for spec in specs):
        warnings.warn("the first eps, the main radius (its worst case is the headline number), is 0, where an attack "
                      "leaves the images clean: " + ("list a positive radius first" if any(eps) else
                                                     "only the clean accuracy is reported"), stacklevel=2)
    if any(s.kind == "autoattack" for s in resolved):
        require_autoattack()  # fail before hours of other attacks, not after
    sweeps = protocol in ("paper", "full")
    return EvalPlan(
        attacks=resolved, eps=eps[0], norm=norm,
        eps_sweep=list(eps_sweep) if eps_sweep is not None else (default_eps_sweep(eps[0], norm) if sweeps else []),
        steps_sweep=sorted(set(steps_sweep)) if steps_sweep is not None else (
            list(DEFAULT_STEPS_SWEEP) if sweeps else []),
        corruptions=corruptions, checks=checks, protocol=protocol)


def default_eps_sweep(eps: float, norm: str) -> list[float]:
    """The eps sweep of the ``paper`` and ``full`` protocols: 0-16/255 in steps of 2/255 under L-inf (the IAAT paper's
    figure), 0 to twice the evaluation's radius in quarters of it under L2, where pixel radii would mean nothing.

    >>> from iaat.evaluation.protocol import default_eps_sweep
    >>> [round(255 * e) for e in default_eps_sweep(8 / 255, "linf")], default_eps_sweep(0.5, "l2")
    ([0, 2, 4, 6, 8, 10, 12, 14, 16], [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    """
    return list(DEFAULT_EPS_SWEEP) if norm == "linf" else [eps * k / 4 for k in range(9)]


def _surrogate(spec: AttackSpec) -> Optional[str]:
    return str(Path(spec.source).resolve()) if spec.source else None


def own_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """A block that may seed and draw from the CPU's and ``device``'s random generators, which get their states back
    after it: an evaluation inside a user's training loop must not reset the stream of its shuffles and attacks.
    Only that one accelerator is forked (forking every GPU is slow), so seed with :func:`seed_rng`."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else getattr(module, "current_device", lambda: 0)()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def seed_rng(seed: int, device: torch.device) -> None:
    """``torch.manual_seed`` for the generators :func:`own_rng` forks only (torch's would reseed every GPU); the
    same states, so the same draws, on the CPU and ``device``."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)


def _batch_seed(seed: int, label: str, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}/{label}/{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_evaluation(model: nn.Module, data: ImageSet, plan: EvalPlan, *, num_classes: int, fingerprint: dict,
                   state_path: Optional[Path] = None, batch_size: int = 256, device: Optional[torch.device] = None,
                   seed: int = 0, progress: bool = False, surrogates: Optional[dict[str, nn.Module]] = None,
                   corruption_sets: Optional[Callable[[], Iterable]] = None,
                   autocast_dtype: Optional[torch.dtype] = None, per_sample: bool = False) -> dict:
    """Run ``plan`` on ``data``; the result has ``n``, ``clean``, ``attacks`` (label → accuracy and spec),
    ``worst_case``, ``curves``, and, when asked, ``corruptions``, ``checks``/``suspicious`` and ``per_sample`` (per
    image, as boolean arrays: ``clean``, robust under each attack by label, and ``worst_case``).

    Args:
        fingerprint: identifies this evaluation; a state file with another fingerprint is refused.
        state_path: where per-batch progress is saved (``None``: not resumable).
        surrogates: source → model for transfer attacks.
        corruption_sets: returns the corruption sets (see :mod:`.corruptions`) for the corruption stage.
    """
    model = float32_view(model)
    surrogates = {k: float32_view(m) for k, m in (surrogates or {}).items()}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with own_rng(device):  # the per-batch seeds must not reset the caller's random stream
        state = EvalState(state_path, fingerprint)
        n = len(data)
        start = time.perf_counter()
        probe = None
        first_x, first_y = to_unit(data.x[:batch_size], device), data.y[:batch_size].to(device)
        check_model_fits(model, first_x, first_y, num_classes, inputs=plan.checks)
        if plan.checks:
            probe = probe_model(model, first_x, first_y)
        probe_seconds = time.perf_counter() - start

        with attack_mode(model):
            clean_ok = _clean_pass(state, model, data, batch_size, device)
            attacked = np.flatnonzero(clean_ok)
            batches = [attacked[lo:lo + batch_size] for lo in range(0, len(attacked), batch_size)]
            state.meta["attack_batches"] = len(batches)  # an attack with this many batches done went through every image
            for spec in plan.stages():
                _run_stage(state, spec, model, data, batches, n, device=device, seed=seed, num_classes=num_classes,
                           surrogate=surrogates.get(spec.source), progress=progress, autocast_dtype=autocast_dtype)

        result = {"n": n, "clean": float(clean_ok.mean()) if n else 0.0, "num_classes": num_classes, "eps": plan.eps,
                  "norm": plan.norm, "protocol": plan.protocol, "attacks": {}}
        for spec in plan.attacks:
            result["attacks"][spec.label] = _stage_result(state, spec, n)
        main = [s for s in plan.attacks if s.eps == plan.eps and s.norm == plan.norm]
        if main:
            worst = np.logical_and.reduce([state.arrays[f"{s.label}/robust"] for s in main])
            result["worst_case"] = {"accuracy": float(worst.mean()), "over": [s.label for s in main]}
        if per_sample:
            result["per_sample"] = {"clean": clean_ok.copy(), **{s.label: state.arrays[f"{s.label}/robust"].copy()
                                                                 for s in plan.attacks},
                                    "worst_case": worst if main else clean_ok.copy()}  # no attack at the radius
        result["curves"] = _curves(state, plan, result["clean"], n)
        if plan.corruptions and corruption_sets is not None:
            result["corruptions"] = _run_corruptions(state, model, corruption_sets, batch_size, device, progress)
        if plan.checks:
            check_spec = large_eps_attack(plan.norm)
            result["checks"] = run_checks(result, probe, large_eps=(check_spec, _stage_result(state, check_spec, n)))
            result["suspicious"] = any(not c["passed"] for c in result["checks"])
            result["suspicious_reasons"] = [c["detail"] for c in result["checks"] if not c["passed"]]
        result["seconds"] = _time_split(state, plan, probe_seconds, time.perf_counter() - start)
        result["resumed"] = state.resumed
        state.meta["finished"] = True
        state.save()
        return result


def finished_part(state_path: Path) -> dict[str, float]:
    """The accuracies an evaluation cut short had finished, read from its state file (``OUT.state.npz``): ``clean``
    once its clean pass was done, then each attack that went through every image; an attack cut midway is left out.
    """
    state = EvalState.read(state_path)
    if "clean_ok" not in state.arrays:
        return {}
    out = {"clean": float(state.arrays["clean_ok"].mean())}
    total = state.meta.get("attack_batches")
    for label, done in state.meta["progress"].items():
        if total is not None and done >= total:
            out[label] = float(state.arrays[f"{label}/robust"].mean())
    return out


def _clean_pass(state: EvalState, model: nn.Module, data: ImageSet, batch_size: int, device) -> np.ndarray:
    """Which images the model classifies correctly when clean (saved: a resumed evaluation reads it back)."""
    if "clean_ok" not in state.arrays:
        t0, ok = time.perf_counter(), []
        for lo in range(0, len(data), batch_size):
            x = to_unit(data.x[lo:lo + batch_size], device)
            with torch.no_grad():
                ok.append((model(x).argmax(1) == data.y[lo:lo + batch_size].to(device)).cpu())
        state.arrays["clean_ok"] = torch.cat(ok).numpy() if ok else np.zeros(0, dtype=bool)
        state.meta["clean_seconds"] = time.perf_counter() - t0
        state.save()
    return state.arrays["clean_ok"]


def _time_split(state: EvalState, plan: EvalPlan, probe_seconds: float, this_run: float) -> dict:
    """Seconds of the clean pass, of each attack, of the sanity checks and their share of the whole evaluation
    (over every session of a resumed one)."""
    attacks = dict(state.meta["seconds"])
    checks = {"model probes": probe_seconds}
    if plan.checks:
        label = large_eps_attack(plan.norm).label
        checks[label] = attacks.pop(label, 0.0)
    checks["total"] = sum(checks.values())
    clean = state.meta.get("clean_seconds", 0.0)
    whole = clean + sum(attacks.values()) + checks["total"]
    return {"this_run": this_run, "clean": clean, "attacks": attacks, "checks": checks,
            "checks_share": checks["total"] / whole if whole > 0 else 0.0}


def _run_stage(state: EvalState, spec: AttackSpec, model: nn.Module, data: ImageSet, batches: list, n: int, *,
               device, seed: int, num_classes: int, surrogate, progress: bool, autocast_dtype) -> None:
    label = spec.label
    if spec.kind == "transfer" and surrogate is None:
        raise ConfigError(f"{label}: no surrogate model was loaded for source {spec.source!r}; give it as "
                          f"iaat.evaluate(..., surrogate=MODEL_OR_RUN), or run_evaluation(..., surrogates={{source: "
                          f"model}}).")
    key = f"{label}/robust"
    if key not in state.arrays:
        state.arrays[key] = np.zeros(n, dtype=bool)
    done = state.done_batches(label)
    bar = tqdm(total=len(batches), initial=done, desc=label, disable=not progress, leave=False, unit="batch")
    for b in range(done, len(batches)):
        idx = batches[b]
        x = to_unit(data.x[idx], device)
        y = data.y[idx].to(device)
        seed_rng(_batch_seed(seed, label, b), device)
        t0 = time.perf_counter()
        out = run_attack(spec, model, x, y, num_classes=num_classes, surrogate=surrogate,
                         autocast_dtype=autocast_dtype)
        for name, values in out.items():
            arr_key = f"{label}/{name}"
            if arr_key not in state.arrays:
                fill = {"first_miss": -1, "size": np.nan}.get(name, False)
                state.arrays[arr_key] = np.full(n, fill, dtype=values.cpu().numpy().dtype)
            state.arrays[arr_key][idx] = values.cpu().numpy()
        state.finish_batch(label, b, time.perf_counter() - t0)
        bar.update(1)
    bar.close()


def _stage_result(state: EvalState, spec: AttackSpec, n: int) -> dict:
    label = spec.label
    out = {"accuracy": float(state.arrays[f"{label}/robust"].mean()) if n else 0.0, **spec_summary(spec),
           "seconds": state.meta["seconds"].get(label, 0.0)}
    sizes = state.arrays.get(f"{label}/size")
    if sizes is not None:
        found = sizes[np.isfinite(sizes)]
        out["median_size"] = float(np.median(found)) if found.size else None
        out["fooled_share"] = float(found.size / max(1, int(state.arrays["clean_ok"].sum())))
    return out


def _curves(state: EvalState, plan: EvalPlan, clean: float, n: int) -> dict:
    curves = {}
    if plan.eps_sweep:
        points = []
        for e in sorted(plan.eps_sweep):
            if e == 0:
                points.append({"eps": 0.0, "accuracy": clean})
                continue
            spec = plan.eps_sweep_attack(e)
            points.append({"eps": e, "accuracy": float(state.arrays[f"{spec.label}/robust"].mean())})
        curves["eps"] = {"attack": f"PGD-{plan.sweep_steps}", "points": points}
    if plan.steps_sweep:
        spec = plan.steps_sweep_attack()
        clean_ok = state.arrays["clean_ok"]
        # absent when no image was classified correctly, so none was attacked
        first_miss = state.arrays.get(f"{spec.label}/first_miss", np.full(n, -1))
        # PGD-k's strict accuracy: clean-correct and none of the iterates x_0..x_k misclassified.
        points = [{"steps": k, "accuracy": float((clean_ok & (first_miss > k)).mean()) if n else 0.0}
                  for k in plan.steps_sweep]
        curves["steps"] = {"eps": plan.eps, "step_size": spec.step_size, "points": points}
    return curves


def _run_corruptions(state: EvalState, model, corruption_sets, batch_size, device, progress) -> dict:
    from .corruptions import evaluate_corruptions

    sets = corruption_sets()
    done = {name: list(accs) for name, accs in state.meta["corruptions"].items()}

    def save(name: str, severity: int, acc: float) -> None:
        state.meta["corruptions"].setdefault(name, []).append(acc)
        state.save()

    return evaluate_corruptions(model, sets, batch_size=batch_size, device=device, progress=progress, done=done,
                                on_result=save)


def corruption_headline(corr: dict) -> tuple[str, float]:
    """The one corruption number of a result, with what it is the mean over: the 15 benchmark corruptions where
    all are there (the usual figure), else every corruption present."""
    kind = [] if corr.get("comparable_with_cifar_c") else ["ImageNet-C"] if corr.get("imagenet_c") else ["generated"]
    if corr.get("benchmark_mean") is not None:
        return ", ".join(kind + ["15 benchmark corruptions"]), corr["benchmark_mean"]
    return ", ".join(kind + [f"{len(corr['per_corruption'])} corruptions"]), corr["mean"]


def markdown_report(result: dict, title: str = "") -> str:
    """A Table-1 style markdown summary: natural accuracy, every attack, worst case, corruptions, checks."""
    # iaat.evaluate's result has a worst case over no attack and empty checks where the protocol's has none
    worst = result.get("worst_case") if (result.get("worst_case") or {}).get("over") else None
    cols = ["Natural"] + list(result["attacks"]) + ([f"all attacks at {format_size(result['eps'])}"] if worst else [])
    vals = [result["clean"]] + [a["accuracy"] for a in result["attacks"].values()]
    if worst:
        vals.append(worst["accuracy"])
    corr = result.get("corruptions")
    if corr:
        what, value = corruption_headline(corr)
        cols.append(f"Corruption ({what})")
        vals.append(value)
    lines = [f"# {title}" if title else "# Evaluation", "",
             f"{result['n']} images, eps {format_size(result['eps'])} ({result['norm']}); accuracy in %.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(f"{100 * v:.2f}" for v in vals) + " |", ""]
    if corr and corr.get("imagenet_c"):
        lines += [f"ImageNet-C mCE: {100 * corr['mCE']:.1f}%" if corr.get("mCE") is not None
                  else f"ImageNet-C mCE: n/a ({corr.get('mCE_note', '')})", ""]
    for name, curve in result.get("curves", {}).items():
        head = "eps (/255)" if name == "eps" else "PGD steps"
        xs = " | ".join(curve_x(name, p) for p in curve["points"])
        lines += [f"Accuracy over {head}:", "", f"| {head} | {xs} |",
                  "|---|" + "---|" * len(curve["points"]),
                  "| accuracy | " + " | ".join(f"{100 * p['accuracy']:.2f}" for p in curve["points"]) + " |", ""]
    if result.get("checks"):
        lines.append("Sanity checks: " + ("**SUSPICIOUS**" if result["suspicious"] else "all passed"))
        lines += [f"- {'ok' if c['passed'] else 'FAILED'}: {c['name']}: {c['detail']}" for c in result["checks"]]
    return "\n".join(lines) + "\n"
