"""Geometry-aware instance reweighting (GAIRAT, Zhang et al., ICLR 2021): the shared parts.

kappa (from the PGD kernel) counts how many of the K attack iterates were still classified
correctly: samples near the decision boundary have a small kappa and get a large weight.
Any method can mix in :class:`GairParams` and call :meth:`GairWeighting.weights`.

Differences from the authors' code (zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training:
GAIRAT.py, GAIR.py), each deliberate; the weight formula, its normalisation to mean 1, kappa over
the iterates x_0..x_{K-1} and the eval-mode attack with a clamped random start are theirs:

1. When the weights start: theirs from the 0-based epoch with ``(epoch + 1) >= begin_epoch``, i.e.
   after ``begin_epoch - 1`` plain epochs; here ``burn_in_epochs`` counts the plain epochs, so their
   ``begin_epoch: 60`` is ``burn_in_epochs: 59`` (as in ``configs/cifar10_wrn32_10_gairat.yaml``).
2. The ``linear`` lambda schedule: theirs is ``lam_max - (e / epochs) (lam_max - lam)`` with the 1-based
   epoch e over the whole run, from a hard-coded epoch 60 on (already half-way there), and NaN with
   their default ``lam_max = inf``; here lambda moves from ``lam_max`` to ``lam`` over the weighted epochs
   only, reaching ``lam`` at the last one, and an infinite ``lam_max`` is refused.
3. The ``piecewise`` schedule: in theirs the later drops are unreachable (the first ``if epoch >= 60``
   branch always wins), so it equals ``fixed``; here each drop applies from its milestone.
4. ``fixed``: theirs applies lambda from a hard-coded epoch 60 (uniform weights before, whatever
   ``begin_epoch`` says); here from ``burn_in_epochs`` on.

``compat: authors`` (GAIRAT, GAIR-FAT) computes as their code instead, all four included: weights from
``(epoch + 1) >= begin_epoch`` (their key, default 60) and lambda from their ``adjust_Lambda`` (a port of
it in ``tests/test_gairat.py`` checks every epoch).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .. import distributed
from ..attacks.pgd import check_steps
from ..errors import ConfigError
from .base import refuse_unless

WEIGHT_FUNCTIONS = ("tanh", "sigmoid", "discrete")
LAMBDA_SCHEDULES = ("fixed", "linear", "piecewise")


@dataclass(kw_only=True)
class GairParams:
    """GAIR keys of a method (a mixin of GAIRAT, GAIR-FAT and IAAT with ``weights="gair"``)."""

    weight_fn: str = "tanh"  #: tanh (the paper) | sigmoid | discrete
    #: lambda: lower values concentrate the weight on samples near the boundary (+inf: uniform weights)
    lam: float = field(default=-1.0, metadata={"infinite": True})
    lam_schedule: str = "fixed"  #: fixed | linear (lam_max → lam over the weighted epochs) | piecewise
    lam_max: float = field(default=math.inf, metadata={"infinite": True})  #: start of the linear schedule (finite there)
    lam_milestones: list = field(default_factory=list)  #: piecewise: 0-based epochs where lambda drops
    lam_drops: list = field(default_factory=list)  #: piecewise: lambda = lam - drop after each milestone
    burn_in_epochs: int = 0  #: plain (uniformly weighted) epochs before the weights start
    #: compat=authors only: the authors' begin_epoch, weights from their 1-based epoch begin_epoch on (default 60)
    begin_epoch: Optional[int] = None


def weighted_ce(logits: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy, optionally per-sample weighted (weights of 1 give exactly the unweighted mean)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    return ce.mean() if weights is None else (ce * weights).mean()


def gair_weights(kappa: torch.Tensor, steps: int, lam: float, fn: str = "tanh") -> torch.Tensor:
    """Per-sample weights from kappa, normalised to mean 1 over the (global) batch.

    tanh: (1 + tanh(lam + 5 (1 - kappa / (K // 2)))) / 2, K // 2 as the authors' code (2 kappa / K for even K);
    sigmoid: sigmoid(lam + 5 (1 - kappa / (K // 2))); discrete: (K + 1 - kappa) / (K + 1).
    ``lam = +inf`` gives uniform weights. ``kappa`` is what the PGD kernel returns (:class:`iaat.AttackResult`):
    counts in [0, steps], checked here (one host sync; the training methods skip the check, their kernel's
    kappa is in range by construction). An empty ``kappa`` gives no weights.

    Example:
        >>> import iaat, torch
        >>> iaat.gair_weights(torch.tensor([0, 5, 10]), steps=10, lam=-1.0)  # near the boundary weighs more
        tensor([2.6804e+00, 3.1961e-01, 1.6474e-05])
    """
    steps = check_steps(steps)  # the attack's K, as iaat.pgd takes it
    _check_kappa(kappa, steps)
    return weights_of_kappa(kappa, steps, lam, fn)


def _check_kappa(kappa: object, steps: int) -> None:
    """``kappa`` a (B,) tensor of counts in [0, steps]: outside, the formula gives negative weights (discrete) or
    weights of ~1e-14 (tanh) without a word."""
    if not torch.is_tensor(kappa) or kappa.ndim != 1:
        got = (f"shape {tuple(kappa.shape)}" if torch.is_tensor(kappa) else
               f"a {type(kappa).__name__}" + (" (wrap it in torch.tensor(...))" if isinstance(kappa, (list, tuple)) else ""))
        raise ConfigError(f"gair_weights takes kappa as a tensor of shape (B,), one count per sample (the kappa of "
                          f"iaat.pgd's AttackResult), got {got}.")
    if kappa.is_complex() or kappa.dtype == torch.bool:
        raise ConfigError(f"gair_weights takes kappa as counts (integers in [0, steps]), got {kappa.dtype}.")
    if not len(kappa):
        return
    lo, hi = torch.stack(torch.aminmax(kappa)).tolist()
    if not 0 <= lo <= hi <= steps:  # NaN fails too
        raise ConfigError(f"gair_weights takes kappa in [0, steps={steps}] (how many of the K={steps} attack "
                          f"iterates were classified correctly), got values in [{lo}, {hi}]: pass the steps of the "
                          f"attack that gave kappa.")


def weights_of_kappa(kappa: torch.Tensor, steps: int, lam: float, fn: str = "tanh") -> torch.Tensor:
    """:func:`gair_weights` without its checks of ``kappa`` and ``steps``, so without a host sync: the training
    methods' per-step path, where kappa comes from the kernel's ``steps``-step attack."""
    k = kappa.to(torch.get_default_dtype())
    half = max(steps // 2, 1)
    if fn in ("tanh", "sigmoid"):
        a = lam + (half - k) * 5.0 / half
        # tanh: (1 + tanh(a)) / 2 = sigmoid(2a). In logs, shifted by the (global) largest: exp of it is at most 1,
        # with a 1 somewhere, so a batch whose every weight underflows (lam = -45) still scales to mean 1, not NaN
        log_raw = F.logsigmoid(2.0 * a if fn == "tanh" else a)
        # an empty batch has no largest: -inf (the other ranks' under torchrun), which every rank must still send
        largest = log_raw.max() if len(log_raw) else log_raw.new_full((), -math.inf)
        return mean_one(torch.exp(log_raw - distributed.global_max(largest)))
    elif fn == "discrete":
        raw = (steps + 1 - k) / (steps + 1)
    else:
        raise ConfigError(f"unknown GAIR weight function {fn!r}; choose tanh, sigmoid or discrete.")
    return mean_one(raw)


def mean_one(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` scaled to mean 1 over the batch; under torchrun over the global batch (all ranks), as in a
    1-process run of that batch.

    Example:
        >>> import torch
        >>> from iaat.methods.gair import mean_one
        >>> mean_one(torch.tensor([1.0, 3.0]))
        tensor([0.5000, 1.5000])
    """
    count = torch.full((), float(len(raw)), dtype=raw.dtype, device=raw.device)  # a fill: no copy that syncs
    stats = distributed.global_sum(torch.stack([count, raw.sum()]))
    # every weight 0 (underflowed): no sample weighs more than another as far as float32 tells, so all weigh 1
    return torch.where(stats[1] > 0, raw * (stats[0] / stats[1]), torch.ones_like(raw))


class GairWeighting:
    """The lambda schedule and the weights of one run; ``p`` is anything with the :class:`GairParams` keys.

    ``authors=True`` (a method's ``compat: authors``) computes as GAIRAT.py does instead, where this module's
    docstring lists the differences: weights from ``(epoch + 1) >= begin_epoch``, and lambda from their
    ``adjust_Lambda(epoch + 1)`` (``lam_max`` until their hard-coded epoch 60, or 30 for runs under 110 epochs;
    then ``lam``, or for ``linear`` ``lam_max - (e / epochs) (lam_max - lam)`` at their 1-based epoch e).
    """

    def __init__(self, p: GairParams, authors: bool = False) -> None:
        self.check(p, authors)
        self.p, self.authors = p, authors
        self.begin_epoch = (60 if p.begin_epoch is None else p.begin_epoch) if authors else None

    @staticmethod
    def check(p: GairParams, authors: bool = False) -> None:
        if authors:
            if p.burn_in_epochs or p.lam_milestones or p.lam_drops:
                raise ConfigError("with method.compat=authors the GAIR weights start at the authors' method.begin_epoch "
                                  "(their 1-based epoch) and their piecewise lambda is hard-coded: drop "
                                  "method.burn_in_epochs, method.lam_milestones and method.lam_drops.")
            if p.begin_epoch is not None and p.begin_epoch < 0:
                raise ConfigError(f"method.begin_epoch must be >= 0, got {p.begin_epoch}.")
        elif p.begin_epoch is not None:
            raise ConfigError("method.begin_epoch is the authors' 1-based start of the GAIR weights, used with "
                              "method.compat=authors; here method.burn_in_epochs counts the plain epochs (their "
                              "begin_epoch - 1).")
        if p.weight_fn not in WEIGHT_FUNCTIONS:
            raise ConfigError(f"method.weight_fn must be one of {', '.join(WEIGHT_FUNCTIONS)}, got {p.weight_fn!r}.")
        if p.lam_schedule not in LAMBDA_SCHEDULES:
            raise ConfigError(f"method.lam_schedule must be one of {', '.join(LAMBDA_SCHEDULES)}, "
                              f"got {p.lam_schedule!r}.")
        if math.isnan(p.lam) or p.lam == -math.inf:
            raise ConfigError(f"method.lam must be a number or +inf (uniform weights), got {p.lam}.")
        if not authors:  # the authors' adjust_Lambda starts at lam_max whatever the schedule
            refuse_unless(p, p.lam_schedule == "linear", "lam_schedule=linear", ("lam_max",))
        refuse_unless(p, p.lam_schedule == "piecewise", "lam_schedule=piecewise", ("lam_milestones", "lam_drops"))
        if p.lam_schedule == "linear" and not math.isfinite(p.lam_max):
            raise ConfigError("method.lam_schedule=linear needs a finite method.lam_max (the start value); the "
                              "official code's default of inf makes every lambda NaN.")
        if p.lam_schedule == "piecewise" and len(p.lam_milestones) != len(p.lam_drops):
            raise ConfigError("method.lam_milestones and method.lam_drops must have the same length.")
        if p.burn_in_epochs < 0:
            raise ConfigError(f"method.burn_in_epochs must be >= 0, got {p.burn_in_epochs}.")

    def active(self, epoch: int) -> bool:
        if self.authors:
            return epoch + 1 >= self.begin_epoch
        return epoch >= self.p.burn_in_epochs

    def lam(self, epoch: int, total_epochs: Optional[int] = None) -> float:
        """Lambda at 0-based ``epoch`` (+inf, i.e. uniform, during the burn-in)."""
        p = self.p
        if self.authors:
            return self._authors_lam(epoch + 1, total_epochs)
        if not self.active(epoch):
            return math.inf
        if p.lam_schedule == "fixed":
            return p.lam
        if p.lam_schedule == "piecewise":
            order = sorted(range(len(p.lam_milestones)), key=lambda i: p.lam_milestones[i])
            passed = bisect.bisect_right([p.lam_milestones[i] for i in order], epoch)
            return p.lam - (p.lam_drops[order[passed - 1]] if passed else 0.0)
        if total_epochs is None:
            raise ValueError("the linear lambda schedule needs the total number of epochs")
        span = max(total_epochs - p.burn_in_epochs, 1)
        frac = min((epoch - p.burn_in_epochs + 1) / span, 1.0)
        return p.lam_max + frac * (p.lam - p.lam_max)

    def _authors_lam(self, e: int, total_epochs: Optional[int]) -> float:
        """GAIRAT.py's ``adjust_Lambda`` at their 1-based epoch ``e`` (their later piecewise drops are unreachable)."""
        p = self.p
        if total_epochs is None:
            raise ValueError("the authors' lambda schedule needs the total number of epochs")
        if e < (60 if total_epochs >= 110 else 30):
            return p.lam_max
        if p.lam_schedule == "linear":
            return p.lam_max - (e / total_epochs) * (p.lam_max - p.lam)
        return p.lam

    def weights(self, kappa: torch.Tensor, steps: int, epoch: int, total_epochs: Optional[int]) -> torch.Tensor:
        return weights_of_kappa(kappa, steps, self.lam(epoch, total_epochs), self.p.weight_fn)  # no host sync
