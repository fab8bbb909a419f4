"""The attacks of an evaluation: one spec type, a parser for ``kind:key=value,...`` strings, one runner.

Every white-box gradient attack (PGD-k with restarts, CW-inf, targeted PGD, MI-FGSM) is a call
of the one PGD kernel; DeepFool, AutoAttack and transfer attacks are the other kinds. The runner
returns per-sample results, so an evaluation can combine attacks sample by sample (worst case)
and resume after any batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
from torch import nn

from ..attacks import pgd, random_targets
from ..attacks.deepfool import deepfool
from ..attacks.pgd import default_step_size, project
from ..errors import ConfigError
from ..units import check_size, format_size, parse_size

KINDS = ("pgd", "cw", "mifgsm", "deepfool", "autoattack", "transfer")
AUTOATTACK_VERSIONS = {"standard": None, "quick": ["apgd-ce", "apgd-t"]}

# Keys a spec string may set, per kind (eps/norm everywhere).
_KEYS = {
    "pgd": {"steps", "restarts", "step_size", "loss", "targeted", "random_start"},
    "cw": {"steps", "restarts", "step_size"},
    "mifgsm": {"steps", "step_size", "momentum"},
    "deepfool": {"steps", "candidates", "overshoot"},
    "autoattack": {"version"},
    "transfer": {"steps", "restarts", "step_size", "loss", "source"},
}
_DEFAULTS = {"cw": {"steps": 40, "loss": "margin"}, "mifgsm": {"random_start": False}, "deepfool": {"steps": 50}}


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation; sizes in [0, 1] units.

    ``eps=None`` means "the radius of the evaluation" and is filled in by :meth:`at`.
    The first six fields keep the order of the original PGD-only spec.

    Example:
        >>> import iaat
        >>> iaat.AttackSpec(eps=8 / 255, steps=100, restarts=5).label
        'PGD-100x5@8/255'
        >>> iaat.AttackSpec(kind="autoattack", version="quick").at(4 / 255).label
        'AutoAttack-quick@4/255'
    """

    eps: Optional[float] = None
    steps: int = 10
    restarts: int = 1
    #: default 2.5 * eps / steps up to 10 steps, eps / 4 beyond (:func:`~iaat.attacks.pgd.default_step_size`);
    #: MI-FGSM: eps / steps
    step_size: Optional[float] = None
    norm: str = "linf"
    loss: str = "ce"
    kind: str = "pgd"
    targeted: bool = False  #: towards a uniformly random wrong label per sample
    random_start: bool = True
    momentum: float = 1.0  #: MI-FGSM's decay mu
    candidates: int = 10  #: DeepFool's candidate classes
    overshoot: float = 0.02  #: DeepFool
    #: AutoAttack: standard | quick (APGD-CE with 5 restarts, the default of AutoAttack's custom runs, + APGD-T on
    #: 9 target classes: standard without FAB-T and Square, and with more APGD-CE restarts)
    version: str = "standard"
    source: Optional[str] = None  #: transfer: the surrogate run folder or checkpoint
    #: stop attacking each sample at its first misclassified iterate (same verdicts, less work; one untargeted
    #: run without momentum only); not part of the label, since the results do not change
    stop_on_miss: bool = False

    def __post_init__(self) -> None:
        if self.kind == "cw":  # a name of attack strings only: the spec is PGD's with the margin loss
            raise ConfigError("CW is PGD with the margin loss: AttackSpec(loss='margin', steps=40), or the string "
                              "'cw'.")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown attack kind {self.kind!r}; choose from "
                              f"{', '.join(k for k in KINDS if k != 'cw')}.")
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"attack norm must be linf or l2, got {self.norm!r}.")
        if self.loss not in ("ce", "margin"):
            raise ConfigError(f"attack loss must be ce or margin, got {self.loss!r}.")
        if self.steps < (0 if self.kind in ("pgd", "transfer") else 1) or self.restarts < 1:
            raise ConfigError(f"{self.kind}: steps must be >= 1 (0 for pgd) and restarts >= 1, "
                              f"got steps={self.steps}, restarts={self.restarts}.")
        for name in ("eps", "step_size"):
            if getattr(self, name) is not None:  # a step of 0 would leave the attack where it starts
                check_size(getattr(self, name), name, norm=self.norm, allow_zero=name == "eps")
        if self.kind == "autoattack" and self.version not in AUTOATTACK_VERSIONS:
            raise ConfigError(f"AutoAttack version must be one of {', '.join(AUTOATTACK_VERSIONS)}, got {self.version!r}.")
        if self.kind == "transfer" and not self.source:
            raise ConfigError("a transfer attack needs source=RUN (the surrogate model), e.g. via --surrogate RUN.")
        if self.kind == "deepfool" and self.candidates < 2:
            raise ConfigError(f"DeepFool needs candidates >= 2, got {self.candidates}.")
        for name in ("momentum", "overshoot"):  # NaN would silently disable the attack
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{self.kind}: {name} must be a finite number >= 0, got {value!r}.")

    def at(self, eps: float) -> "AttackSpec":
        """This spec at radius ``eps`` unless it names its own."""
        return self if self.eps is not None else replace(self, eps=eps)

    @property
    def label(self) -> str:
        """A short name for tables and JSON keys, e.g. ``PGD-100x5@8/255``, ``CW-40@8/255``."""
        eps = "" if self.eps is None else "@" + format_size(self.eps) + ("" if self.norm == "linf" else "-l2")
        reps = f"x{self.restarts}" if self.restarts > 1 else ""
        if self.step_size is not None and self.kind != "deepfool":  # keeps fixed-step variants apart
            reps += f"-step{format_size(self.step_size)}"
        if self.kind == "autoattack":
            return f"AutoAttack-{self.version}{eps}"
        if self.kind == "deepfool":  # options other than the defaults keep variants apart
            steps = "" if self.steps == _DEFAULTS["deepfool"]["steps"] else f"-{self.steps}"
            extra = ("" if self.candidates == 10 else f"-c{self.candidates}") + (
                "" if self.overshoot == 0.02 else f"-overshoot{self.overshoot:g}")
            return f"DeepFool{steps}{extra}{eps}"
        # what the kernel's options change, where they differ from the kind's defaults (a spec string's)
        start = self.random_start != (self.kind != "mifgsm")
        extra = ("-targeted" if self.targeted else "") + (("-start" if self.random_start else "-nostart") * start)
        if self.kind == "mifgsm":
            mu = "" if self.momentum == 1.0 else f"-mu{self.momentum:g}"
            return f"MI-FGSM-{self.steps}{reps}{mu}{extra}{'-margin' * (self.loss == 'margin')}{eps}"
        if self.kind == "transfer":
            return f"transfer-PGD-{self.steps}{reps}{extra}{'-margin' * (self.loss == 'margin')}{eps}"
        name = "CW" if self.loss == "margin" else "PGD"
        return f"{name}-{self.steps}{reps}{extra}{eps}"


def _parse_value(key: str, text: str, norm: str) -> object:
    types = {f.name: f.type for f in fields(AttackSpec)}
    try:
        if key in ("eps", "step_size"):
            return parse_size(text, key, max_unit=1.0 if norm == "linf" else 64.0)
        if key in ("steps", "restarts", "candidates"):
            return int(text)
        if key in ("momentum", "overshoot"):
            return float(text)
        if key in ("targeted", "random_start"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"attack option {key}={text!r} is not a valid {types.get(key, 'value')}.") from None
    return text


def parse_attack(text: str, source: Optional[str] = None, norm: str = "linf") -> AttackSpec:
    """Parse ``kind[:key=value,...]``, e.g. ``pgd:steps=100,restarts=5``, ``cw``, ``autoattack:version=quick``.

    Sizes (``eps``, ``step_size``) are pixels over 255 or fractions ``a/b`` like everywhere in the CLI, in the
    spec's ``norm=`` or else ``norm`` (the evaluation's). ``source``: the surrogate of a transfer attack that names
    none (``--surrogate``).
    """
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"unknown attack {kind!r} in {text!r}; choose from {', '.join(KINDS)}.")
    items = [item for item in rest.split(",") if item.strip()] if rest else []
    raw = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ConfigError(f"attack option {item!r} in {text!r} must look like key=value.")
        allowed = _KEYS[kind] | {"eps", "norm"}
        if key not in allowed:
            raise ConfigError(f"{kind} has no option {key!r}; it takes {', '.join(sorted(allowed))}.")
        raw[key] = value.strip()
    norm = raw.setdefault("norm", norm)
    values = {k: _parse_value(k, v, norm) for k, v in raw.items()}
    base = dict(_DEFAULTS.get(kind, {}))
    base.update(values)
    if kind == "transfer" and source is not None:
        base.setdefault("source", str(source))
    kind_field = "pgd" if kind == "cw" else kind
    return AttackSpec(kind=kind_field, **base)


# --------------------------------------------------------------------------- running


def run_attack(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
               surrogate: Optional[nn.Module] = None,
               autocast_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Attack one batch of clean-correct images; per-sample results.

    Returns a dict with ``robust`` ((B,) bool: no misclassification found) and, where the
    attack knows it, ``first_miss`` (PGD kernel: the first misclassified iterate) or ``size``
    (DeepFool: the perturbation it needed, ``inf`` if it failed).
    """
    eps = spec.eps
    if eps is None:
        raise ValueError("attack spec without eps; call spec.at(eps) first")
    target = random_targets(y, num_classes) if spec.targeted else None
    if spec.kind in ("pgd", "mifgsm"):
        step = spec.step_size
        momentum = 0.0
        if spec.kind == "mifgsm":
            step = attack_step(spec)
            momentum = spec.momentum
        stop = spec.stop_on_miss and spec.restarts == 1 and target is None and not momentum
        res = pgd(model, x, y, eps, steps=spec.steps, step_size=step, norm=spec.norm, restarts=spec.restarts,
                  loss=spec.loss, target=target, random_start=spec.random_start, momentum=momentum,
                  autocast_dtype=autocast_dtype, stop_on_miss=stop, final_check=not stop)
        return {"robust": res.robust, "first_miss": res.first_miss}
    if spec.kind == "deepfool":
        res = deepfool(model, x, y, norm=spec.norm, steps=spec.steps, candidates=spec.candidates,
                       overshoot=spec.overshoot)
        # Accuracy at eps: the DeepFool direction, cut back to the eps ball.
        radius = torch.full((len(x),) + (1,) * (x.ndim - 1), eps, dtype=x.dtype, device=x.device)
        delta = project(res.x_adv - x, x, radius, spec.norm)
        with torch.no_grad():
            robust = model(x + delta).argmax(1) == y
        return {"robust": robust, "size": res.size}
    if spec.kind == "transfer":
        if surrogate is None:
            raise ValueError("transfer attack without a surrogate model")
        res = pgd(surrogate, x, y, eps, steps=spec.steps, step_size=spec.step_size, norm=spec.norm,
                  restarts=spec.restarts, loss=spec.loss, target=target, random_start=spec.random_start,
                  final_check=False, autocast_dtype=autocast_dtype)
        with torch.no_grad():
            robust = model(res.x_adv).argmax(1) == y
        return {"robust": robust}
    if spec.kind == "autoattack":
        return {"robust": _autoattack(spec, model, x, y)}
    raise ValueError(f"unknown attack kind {spec.kind!r}")


def require_autoattack():
    """The ``AutoAttack`` class of the ``pyautoattack`` distribution, or a clear error when missing."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ConfigError("AutoAttack needs the optional extra: pip install 'iaat[autoattack]' (the pyautoattack "
                          "distribution of the authors' code); or leave autoattack out of the attacks.") from None
    return AutoAttack


def _autoattack(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import logging

    AutoAttack = require_autoattack()
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    attacks = AUTOATTACK_VERSIONS[spec.version]
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from the evaluation's per-batch seed
    aa = AutoAttack(model, eps=spec.eps, norm="Linf" if spec.norm == "linf" else "L2", device=x.device, seed=seed,
                    version="custom" if attacks else "standard", attacks=attacks)
    aa.verbose = False
    with torch.no_grad():
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return model(x_adv).argmax(1) == y


def spec_summary(spec: AttackSpec) -> dict:
    """The spec's fields for JSON, without options that do not apply to its kind; for the PGD kernel's attacks
    also ``step``, the step it ran with (``step_size`` is ``None`` where that was the default)."""
    keep = {"eps", "norm", "kind"} | _KEYS[spec.kind]
    out = {k: v for k, v in asdict(spec).items() if k in keep}
    if "step_size" in keep and spec.eps is not None:
        out["step"] = attack_step(spec)
    return out


def long_default_step(kind: str, steps: int, step_size: Optional[float]) -> bool:
    """A PGD attack of over 10 steps at the default step: eps / 4, where evaluations made before that default took
    2.5 * eps / steps (0.2/255 for PGD-100 at 8/255). Takes a spec's fields or those of its JSON entry.

    >>> from iaat.evaluation.attacks import long_default_step
    >>> long_default_step("pgd", 100, None), long_default_step("pgd", 10, None), long_default_step("mifgsm", 20, None)
    (True, False, False)
    """
    return kind in ("pgd", "transfer") and step_size is None and steps > 10


def attack_step(spec: AttackSpec) -> float:
    """The step a PGD-kernel attack of ``spec`` (at its eps) takes: its own, or the default."""
    if spec.step_size is not None:
        return spec.step_size
    return spec.eps / spec.steps if spec.kind == "mifgsm" else default_step_size(spec.eps, spec.steps)

