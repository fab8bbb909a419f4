"""Projected gradient descent (Madry et al.) under L-inf or L2, batched with per-sample radii.

This is the only attack loop in the project: training methods (PGD-AT, IAAT, GAIRAT,
FAT) and evaluation (PGD-k with restarts, CW loss, targeted) all call :func:`pgd`.
Besides the adversarial batch it returns, per sample, whether the final iterate is still
classified correctly and GAIRAT's kappa, so no caller ever re-runs an attack to learn them.

Evaluation reads two more things from it: ``first_miss``, the first iterate that was
misclassified (so one PGD-K run gives the accuracy under PGD-k for every k <= K), and, with
``momentum``, MI-FGSM's accumulated, L1-normalised gradient (Dong et al., 2018).

Habits: the model is in eval mode during the attack and its mode is restored afterwards;
gradients are taken with ``torch.autograd.grad`` w.r.t. the perturbation only, so no
parameter ever receives a ``.grad``; the step loop has no host synchronisation (except with
``stop_on_miss``, which counts the samples still standing once per step to shrink the batch).

Precision: the kernel sets its own autocast state (``autocast_dtype``, or none at all), whatever
the caller's context, so attack and training precision are chosen separately. Under fp16 the
objective is multiplied by a fixed power of two before the backward pass so that small input
gradients do not underflow to zero; a step uses only the gradient's sign (L-inf) or direction
(L2, MI-FGSM's normalised sum), which a constant factor leaves unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import unwrap
from ..errors import ConfigError, first_line
from ..units import check_size, check_size_range, default_radius, format_size, python_scalar

Radius = Union[float, torch.Tensor]

#: fp16 attacks: the objective's factor before the backward pass (only the gradient's direction is used)
FP16_OBJECTIVE_SCALE = 1024.0


@dataclass
class AttackResult:
    """What one call of :func:`pgd` found.

    Attributes:
        x_adv: adversarial images in [0, 1], same shape as the input.
        correct: (B,) bool, the final iterate is still classified as the true label
            (``None`` when the caller asked for no final check).
        kappa: (B,) int64, how many of the K iterates x_0..x_{K-1} (the start and every
            iterate a gradient was taken at) were classified correctly: GAIRAT's kappa.
        logits: (B, classes) logits of the final iterate in eval mode, or ``None``.
        loss: (B,) the attack objective at the final iterate, or ``None``.
        first_miss: (B,) int64, index k of the first iterate x_k (k = 0..K, x_K the final one)
            classified wrongly, minimum over restarts; K + 1 if none was (the final iterate
            counts only when it was checked).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> res = iaat.pgd(model, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), eps=8 / 255, steps=5)
        >>> res.x_adv.shape, res.kappa.shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4]))
        >>> bool(torch.equal(res.robust, res.first_miss > 5))  # robust: no iterate misclassified
        True
    """

    x_adv: torch.Tensor
    correct: Optional[torch.Tensor]
    kappa: torch.Tensor
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    first_miss: Optional[torch.Tensor] = None
    steps: int = 0

    @property
    def robust(self) -> torch.Tensor:
        """(B,) bool: no checked iterate of any restart was misclassified (the strict evaluation criterion)."""
        return self.first_miss > self.steps


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval flag back as it was when the block ends. ``model.train(flag)`` would set one
    flag on all of them, undoing a caller's mix (a BatchNorm frozen in eval mode inside a training model, dropout
    left on in an evaluated one).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> _ = model[1].eval()  # frozen statistics while the rest trains
        >>> with modes_kept(model):
        ...     _ = model.eval()
        >>> model.training, model[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool = True, inputs: Optional[torch.Tensor] = None
                ) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for an attack (BatchNorm statistics untouched), with its parameters frozen,
    then restore both (each submodule's mode as it was: :func:`modes_kept`).

    Yields the model to attack: the module itself, taken out of a DistributedDataParallel wrapper
    (an attack needs input gradients only, and must not sync parameter gradients or buffers:
    the ranks may run different numbers of attacks per step). The parameters' ``requires_grad`` is off
    meanwhile: eager autograd would skip their gradients anyway, but a ``torch.compile``d backward computes
    every gradient its graph has, which made each attack step a third dearer. With ``inputs``, a model that fails
    on them because its weights are of another float type or on another device is an error that says so.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model must be a torch.nn.Module (an attack puts it in eval mode and back), got "
                          f"{type(model).__name__}; wrap a function in an nn.Module.")
    model = unwrap(model)
    params = list(model.parameters())
    if any(p.is_inference() for p in params):  # built inside inference mode (its buffers then are too)
        raise ConfigError("the model was built inside torch.inference_mode(): its weights are inference tensors, "
                          "which cannot take part in the gradients an attack needs; build or load it outside "
                          "inference mode.")
    trainable = [p for p in params if p.requires_grad]
    with modes_kept(model):
        if eval_mode:
            model.eval()
        try:
            for p in trainable:
                p.requires_grad_(False)
            yield model
        except RuntimeError as e:
            mismatch = _weights_mismatch(model, inputs, e)
            if mismatch is None:
                raise
            raise ConfigError(f"{mismatch} (the model failed with: {first_line(e, 160)})") from None
        finally:
            for p in trainable:
                p.requires_grad_(True)


#: What torch says when a layer's weights and its input differ in type or device.
_MISMATCH = re.compile(r"dtype|scalar type|type \(|same device", re.IGNORECASE)


def _weights_mismatch(model: nn.Module, x: Optional[torch.Tensor], error: RuntimeError) -> Optional[str]:
    """What keeps ``model`` from taking ``x``, where ``error`` is torch's complaint about that: weights on another
    device or of another float type (or None: the error is another one, or the model converts its input itself)."""
    from ..models.precision import Float32View

    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if (weight is None or x is None or isinstance(model, Float32View) or isinstance(error, torch.cuda.OutOfMemoryError)
            or not _MISMATCH.search(str(error))):
        return None
    if weight.device != x.device:
        return f"the model's weights are on {weight.device}, the images on {x.device}: move one to the other"
    if weight.dtype in (torch.float16, torch.bfloat16) and x.dtype != weight.dtype:
        return (f"the model's weights are {weight.dtype}, the images {x.dtype}: keep the images float32 and run the "
                f"model under autocast (autocast_dtype={weight.dtype}), or attack a float32 copy of the model")
    if weight.dtype != x.dtype:
        return (f"the model's weights are {weight.dtype}, the images {x.dtype}: convert the images "
                f"(x.to({weight.dtype})) or the model (model.to({x.dtype}))")
    return None


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Carlini-Wagner margin per sample, to be maximised by the attacker.

    Untargeted: ``max_{j != y} z_j - z_y``; targeted at t: ``z_t - max_{j != t} z_j``.
    """
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return label_logit - others if targeted else others - label_logit


def kl_per_sample(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) per sample, in float32: TRADES' attack objective and the
    per-sample term of the weighted TRADES losses.

    >>> kl_per_sample(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])).round(decimals=4)
    tensor([0.0000, 0.4338])
    """
    ref = F.log_softmax(reference.float(), dim=1)
    return (ref.exp() * (ref - F.log_softmax(logits.float(), dim=1))).sum(1)


def _objective(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], loss: "str | Callable",
               reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample objective the attack maximises."""
    if callable(loss):  # a method's own objective (MMA's soft margin, CAT's smoothed labels), untargeted
        return _per_sample(loss(logits.float(), y), y)
    if loss == "kl":  # TRADES: KL(p_reference || p(x + delta))
        return kl_per_sample(reference, logits)
    if loss == "ce":
        if target is None:
            return F.cross_entropy(logits.float(), y, reduction="none")
        return -F.cross_entropy(logits.float(), target, reduction="none")
    if loss == "margin":
        return margin_loss(logits.float(), y if target is None else target, targeted=target is not None)
    raise ConfigError(f"unknown attack loss {loss!r}; use 'ce', 'margin' or 'kl'.")


def _per_sample(value: object, y: torch.Tensor) -> torch.Tensor:
    """A loss function's value, checked to hold one value per sample (its shape only: no host sync). A mean over
    the batch would still give gradients, but no restart could pick per sample; a (B, C) one sums over classes."""
    if not (torch.is_tensor(value) and value.shape == y.shape):
        got = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else f"a {type(value).__name__}"
        raise ConfigError(f"a loss function must return one value per sample, shape ({len(y)},), got {got}: "
                          f"reduce over the classes, not over the batch (e.g. F.cross_entropy(..., reduction='none')).")
    return value


def random_targets(y: torch.Tensor, num_classes: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly random label different from ``y`` for every sample."""
    offset = torch.randint(1, num_classes, y.shape, device=y.device, generator=generator)
    return (y + offset) % num_classes


def default_step_size(eps: Radius, steps: int) -> Radius:
    """The PGD step when none is given: ``2.5 * eps / steps`` up to 10 steps (Madry et al.: enough to cross the
    ball 2.5 times; 2/255 at 8/255 and 10 steps), ``eps / 4`` beyond. A longer attack keeps the step of the usual
    PGD-20/-100/-1000 evaluations (2/255 at 8/255, the IAAT authors' too) instead of shrinking it to 0.02/255 at
    1,000 steps, where it would only repeat PGD-10 in finer steps.

    >>> from iaat.attacks.pgd import default_step_size
    >>> [round(255 * default_step_size(8 / 255, k), 2) for k in (1, 5, 10, 100, 1000)]
    [20.0, 4.0, 2.0, 2.0, 2.0]
    """
    return 2.5 * eps / steps if 0 < steps <= 10 else eps / 4


def _as_radius(value: Radius, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, 1, 1) float tensor from a float or a (B,) tensor."""
    if isinstance(value, torch.Tensor):
        t = value.to(dtype=like.dtype, device=like.device)
        t = t.expand(batch) if t.ndim == 0 else t
    else:  # a fill: a number copied to the GPU as a tensor would make the host wait for the device
        t = torch.full((batch,), float(value), dtype=like.dtype, device=like.device)
    if t.shape != (batch,):
        raise ValueError(f"per-sample radius must have shape ({batch},), got {tuple(t.shape)}")
    return t.view(batch, *([1] * (like.ndim - 1)))


def _l2_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: str, init_std: Optional[float] = None) -> torch.Tensor:
    if init_std is not None:  # TRADES starts from a small Gaussian instead of the uniform ball
        return init_std * torch.randn_like(x)
    if norm == "linf":
        return (torch.rand_like(x) * 2 - 1) * eps
    direction = torch.randn_like(x)
    direction = direction / (_l2_norm(direction) + 1e-12)
    radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
    return direction * radius.view_as(eps) * eps


def project(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project onto the eps ball, then keep x + delta inside [0, 1]."""
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        delta = delta * torch.clamp(eps / (_l2_norm(delta) + 1e-12), max=1.0)
    return (x + delta).clamp_(0.0, 1.0) - x


def _advance(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
             norm: str, moving: Optional[torch.Tensor], noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One ascent step along the gradient's sign (L-inf) or direction (L2) plus ``noise``, masked by ``moving``,
    then projected."""
    if norm == "linf":
        step = alpha * grad.sign()
    else:
        step = alpha * grad / (_l2_norm(grad) + 1e-12)
    if noise is not None:
        step = step + noise
    if moving is not None:
        step = step * moving.view(-1, *([1] * (x.ndim - 1))).to(step.dtype)
    return project(delta + step, x, eps, norm)


_compiled_advance = None


def _advance_fn(compiled: bool):
    """:func:`_advance`, or its ``torch.compile``d form (one fused kernel on GPUs), built on first use."""
    global _compiled_advance
    if not compiled:
        return _advance
    if _compiled_advance is None:
        _compiled_advance = torch.compile(_advance, dynamic=True)
    return _compiled_advance


@dataclass(frozen=True)
class _Run:
    """The settings of one PGD run that stay fixed across its restarts (see :func:`pgd` for their meaning)."""

    steps: int
    norm: str
    random_start: bool
    clamp_start: bool
    loss: "str | Callable"
    early_stop_tau: Optional[int]
    init_std: Optional[float]
    momentum: float
    objective_scale: float
    autocast: Callable[[], contextlib.AbstractContextManager]
    advance: Callable[..., torch.Tensor]
    stop_on_miss: bool
    check_labels: bool = False  #: labels against the model's outputs at the first step (a host sync)
    step_noise: float = 0.0


def _run_settings(device_type: str, *, steps: int = 10, norm: str = "linf", random_start: bool = True,
                  clamp_start: bool = True, loss: "str | Callable" = "ce", early_stop_tau: Optional[int] = None,
                  init_std: Optional[float] = None, momentum: float = 0.0,
                  autocast_dtype: Optional[torch.dtype] = None, compiled: bool = False,
                  stop_on_miss: bool = False, check_labels: bool = False, step_noise: float = 0.0) -> _Run:
    """:func:`pgd`'s arguments of the same names as the :class:`_Run` of its restarts, on ``device_type``."""
    if autocast_dtype is not None:
        autocast = lambda: torch.autocast(device_type, dtype=autocast_dtype)  # noqa: E731
    else:  # full precision, also when called inside the training step's autocast region
        autocast = lambda: torch.autocast(device_type, enabled=False)  # noqa: E731
    objective_scale = FP16_OBJECTIVE_SCALE if autocast_dtype == torch.float16 else 1.0
    return _Run(steps, norm, random_start, clamp_start, loss, early_stop_tau, init_std, momentum, objective_scale,
                autocast, _advance_fn(compiled), stop_on_miss, check_labels, step_noise)


def _one_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
             target: Optional[torch.Tensor], reference: Optional[torch.Tensor], s: _Run):
    """One PGD run: ``(x_adv, kappa, first_miss)``, each over the whole batch.

    With ``stop_on_miss`` a sample leaves the batch at its first misclassified iterate, which becomes its
    ``x_adv``: the remaining steps run on the samples still classified correctly only (one host sync per
    step to count them), and the survivors' final iterates are checked here (``first_miss`` = K if wrong).
    """
    batch, steps = x.shape[0], s.steps
    delta = _random_start(x, eps, s.norm, s.init_std) if s.random_start else torch.zeros_like(x)
    if s.clamp_start:
        delta = project(delta, x, eps, s.norm)
    kappa = torch.zeros(batch, dtype=torch.long, device=x.device)
    first_miss = torch.full((batch,), steps + 1, dtype=torch.long, device=x.device)
    velocity = torch.zeros_like(x) if s.momentum else None
    if s.early_stop_tau is not None:  # FAT: misclassified iterates a sample may still step from; stopped for good
        budget = torch.full((batch,), s.early_stop_tau, dtype=torch.long, device=x.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=x.device)
    if s.stop_on_miss:  # results of the samples that left; ``rows``: where the still-attacked ones belong
        out_x, out_kappa, out_miss = x.clone(), kappa.clone(), first_miss.clone()
        rows = torch.arange(batch, device=x.device)
    for k in range(steps):
        delta.requires_grad_(True)
        with s.autocast():
            logits = model(x + delta)
        if k == 0:
            check_logits(logits, y, s.check_labels)
            if target is not None:
                check_logits(logits, target, s.check_labels, "target classes")
        objective = _objective(logits, y, target, s.loss, reference)
        (grad,) = torch.autograd.grad(objective.sum() * s.objective_scale, delta)
        delta = delta.detach()
        correct = logits.detach().argmax(1) == y
        first_miss = torch.where(~correct & (first_miss > steps), torch.full_like(first_miss, k), first_miss)
        if s.early_stop_tau is not None:
            # FAT's PGD-K-tau: a misclassified iterate spends one of tau; one with none left ends the sample's
            # attack there. A stopped sample's later (frozen) iterates count no more.
            wrong = ~correct & ~stopped
            stopped = stopped | (wrong & (budget == 0))
            budget = budget - (wrong & (budget > 0)).long()
            correct = correct & ~stopped
        kappa += correct
        missed = int((~correct).sum()) if s.stop_on_miss else 0  # the step's one host sync
        if missed:
            # missed rows first, each part in row order (a stable sort): both index lists from that one count
            order = torch.argsort(correct.to(torch.uint8), stable=True)
            gone, keep = order[:missed], order[missed:]
            out_x[rows[gone]] = x[gone] + delta[gone]
            out_kappa[rows[gone]], out_miss[rows[gone]] = kappa[gone], first_miss[gone]
            if len(keep) == 0:
                return out_x, out_kappa, out_miss
            x, y, eps, alpha, delta, grad, kappa, first_miss, rows = (
                t[keep] for t in (x, y, eps, alpha, delta, grad, kappa, first_miss, rows))
            velocity = velocity[keep] if velocity is not None else None
            reference = reference[keep] if reference is not None else None
        if velocity is not None:  # MI-FGSM: accumulate the L1-normalised gradient
            velocity = s.momentum * velocity + grad / (grad.abs().flatten(1).mean(1).view_as(eps) + 1e-12)
            grad = velocity
        moving = ~stopped if s.early_stop_tau is not None else None
        noise = s.step_noise * torch.randn_like(delta) if s.step_noise else None
        delta = s.advance(delta, grad, x, eps, alpha, s.norm, moving, noise)
    if not s.stop_on_miss:
        return (x + delta).detach(), kappa, first_miss
    with torch.no_grad(), s.autocast():  # the survivors' final iterates
        wrong = model(x + delta).argmax(1) != y
    out_x[rows] = x + delta
    out_kappa[rows] = kappa
    out_miss[rows] = torch.where(wrong, torch.full_like(first_miss, steps), first_miss)
    return out_x, out_kappa, out_miss


def outside_inference_mode(attack: Callable) -> Callable:
    """Run ``attack`` with inference mode off and its tensor arguments made in inference mode copied out of it: an
    attack needs gradients, which a caller's ``torch.inference_mode()`` switches off (and inference tensors cannot
    join autograd)."""
    def normal(value):
        return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value

    @functools.wraps(attack)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled() and not any(
                isinstance(v, torch.Tensor) and v.is_inference() for v in (*args, *kwargs.values())):
            return attack(*args, **kwargs)  # the usual call (every training step): as it is
        with torch.inference_mode(False):
            return attack(*map(normal, args), **{k: normal(v) for k, v in kwargs.items()})
    return run


@outside_inference_mode
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Radius, *, steps: int = 10,
        step_size: Optional[Radius] = None, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        target: Optional[torch.Tensor] = None, loss: "str | Callable" = "ce", early_stop_tau: Optional[int] = None,
        final_check: bool = True, eval_mode: bool = True, reference: Optional[torch.Tensor] = None,
        init_std: Optional[float] = None, autocast_dtype: Optional[torch.dtype] = None,
        momentum: float = 0.0, compiled: bool = False, stop_on_miss: bool = False,
        clamp_start: bool = True, check_inputs: bool = True, step_noise: float = 0.0) -> AttackResult:
    """Run PGD on a batch with a per-sample radius.

    Args:
        model: maps images in [0, 1] to logits.
        x: images in [0, 1], shape (B, C, H, W).
        y: true labels (B,).
        eps: radius in [0, 1] units, a float or a (B,) tensor (per-sample radii). A float above 1 under
            L-inf (``eps=8`` meant as 8/255) is an error.
        steps: number of gradient steps K (0 returns the start point).
        step_size: step in [0, 1] units, float or (B,) tensor; default :func:`default_step_size` (2.5 * eps / steps
            up to 10 steps, eps / 4 beyond).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start uniformly inside the ball (else at x).
        restarts: independent runs; each sample keeps its successful run, else its highest objective.
        target: labels to move towards (targeted attack); ``None`` for untargeted.
        loss: ``"ce"`` (cross-entropy), ``"margin"`` (Carlini-Wagner), ``"kl"`` (TRADES: KL divergence
            from the softmax of ``reference`` logits, usually the clean logits), or a function
            ``loss(logits, y) -> (B,)`` of a method's own per-sample objective (untargeted; logits in fp32).
        early_stop_tau: friendly AT's PGD-K-tau (Zhang et al., 2020, Alg. 1): a sample may step on from ``tau``
            misclassified iterates; at a misclassified iterate with none left, its attack ends there (that
            iterate is its ``x_adv``; ``kappa`` counts its correct iterates up to then).
        final_check: classify the final iterate (needed for ``correct``; forced with restarts > 1).
        eval_mode: attack the model in eval mode (default; BatchNorm statistics stay untouched).
        reference: logits the ``"kl"`` loss compares against.
        init_std: start from ``init_std * N(0, 1)`` noise instead of the uniform ball (TRADES uses 0.001).
        autocast_dtype: run the model under autocast with this dtype (bf16/fp16), gradients in fp32;
            ``None`` runs it in full precision even inside a caller's autocast region.
        momentum: MI-FGSM's decay factor mu (0 = plain PGD): steps follow the running sum of
            L1-normalised gradients.
        compiled: use the ``torch.compile``d step-and-project update (``train.compile``).
        stop_on_miss: end each sample's attack at its first misclassified iterate, which becomes its
            ``x_adv``, and run the remaining steps on the other samples only (a smaller batch: the cost
            falls with every sample that breaks). ``correct`` then means that no iterate, the final one
            included, was misclassified; ``kappa`` counts the iterates before the first miss; ``logits``
            and ``loss`` are ``None``. One run of an untargeted attack without FAT's early stop.
        clamp_start: project the random start onto the ball and into [0, 1] before the first gradient
            (default); ``False`` takes the first gradient at the unclamped start, as the IAAT authors'
            attack does (their clamp follows each step), for IAAT's ``compat: authors`` only.
        step_noise: the std of Gaussian noise added to every step before the projection, in [0, 1] units (0 =
            plain PGD): FAT's ``omega``, which the FAT authors add to escape local maxima (0.001 in FAT.py).
        check_inputs: check that ``x`` lies in [0, 1], that radii given as tensors are sizes in [0, 1]
            units, not pixel levels, and that labels are below the model's number of outputs (two host
            synchronisations; the training methods check their first batch themselves and pass ``False``,
            keeping the training step free of them).

    Returns:
        An :class:`AttackResult`.

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> res = iaat.pgd(model, x, y, eps=8 / 255, steps=10)
        >>> bool(((res.x_adv - x).abs().max() <= 8 / 255 + 1e-6) and res.x_adv.min() >= 0)
        True
        >>> res.robust.shape  # no iterate misclassified, per sample
        torch.Size([4])
    """
    steps = check_steps(steps)  # a 0-d tensor as its number, before any use of it
    _check_arguments(x, y, eps, step_size, norm, steps, restarts, loss, reference, stop_on_miss, target,
                     early_stop_tau, step_noise)
    check_autocast_dtype(autocast_dtype, "autocast_dtype")
    if check_inputs:
        check_batch_values(x, y, "pgd", (("eps", eps), ("step_size", step_size)), norm)
    batch = x.shape[0]
    x, y = x.detach(), y.long()  # cross-entropy and gather take int64 labels
    target = None if target is None else target.long()
    eps_t = _as_radius(eps, batch, x)
    alpha = default_step_size(eps_t, steps) if step_size is None else _as_radius(step_size, batch, x)
    run = _run_settings(x.device.type, steps=steps, norm=norm, random_start=random_start, clamp_start=clamp_start,
                        loss=loss, early_stop_tau=early_stop_tau, init_std=init_std, momentum=momentum,
                        autocast_dtype=autocast_dtype, compiled=compiled, stop_on_miss=stop_on_miss,
                        check_labels=check_inputs, step_noise=step_noise)
    autocast = run.autocast
    final_check = final_check or restarts > 1

    best: Optional[AttackResult] = None
    with attack_mode(model, eval_mode, inputs=x) as model, torch.enable_grad():
        for _ in range(restarts):
            x_adv, kappa, run_miss = _one_run(model, x, y, eps_t, alpha, target, reference, run)
            if stop_on_miss:
                return AttackResult(x_adv, run_miss > steps, kappa, first_miss=run_miss, steps=steps)
            if not final_check:
                return AttackResult(x_adv, None, kappa, first_miss=run_miss, steps=steps)
            with torch.no_grad(), autocast():
                logits = model(x_adv).float()
            correct = logits.argmax(1) == y
            run_miss = torch.where(~correct & (run_miss > steps), torch.full_like(run_miss, steps), run_miss)
            res = AttackResult(x_adv, correct, kappa, logits, _objective(logits, y, target, loss, reference),
                               run_miss, steps)
            best = res if best is None else _better_of(best, res, target)
    return best


def _success(res: AttackResult, target: Optional[torch.Tensor]) -> torch.Tensor:
    return (res.logits.argmax(1) == target) if target is not None else ~res.correct


def _better_of(best: AttackResult, new: AttackResult, target: Optional[torch.Tensor]) -> AttackResult:
    """Per sample, the successful restart, else the one with the higher objective; first misses: the earliest."""
    ok_best, ok_new = _success(best, target), _success(new, target)
    better = (ok_new & ~ok_best) | ((ok_new == ok_best) & (new.loss > best.loss))
    pick = lambda a, b: torch.where(better.view(-1, *([1] * (a.ndim - 1))), b, a)  # noqa: E731
    return AttackResult(pick(best.x_adv, new.x_adv), pick(best.correct, new.correct), pick(best.kappa, new.kappa),
                        pick(best.logits, new.logits), pick(best.loss, new.loss),
                        torch.minimum(best.first_miss, new.first_miss), best.steps)


def check_steps(steps: object) -> int:
    """``steps`` as an int: a whole number >= 0, a 0-d integer tensor or a NumPy integer taken as the number."""
    value = python_scalar(steps)  # torch.tensor(3), np.int64(3)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"steps must be a whole number >= 0, got {steps!r}.")
    return int(value)


def _check_arguments(x, y, eps, step_size, norm, steps, restarts, loss, reference, stop_on_miss, target,
                     early_stop_tau, step_noise=0.0):
    """Clear errors for arguments the kernel would otherwise run with silently (sizes in pixel units) or crash on;
    none needs a host synchronisation. ``steps`` comes checked (:func:`check_steps`)."""
    if norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    if not (torch.is_tensor(x) and torch.is_tensor(y) and x.ndim >= 2 and y.shape == (len(x),)):
        raise ConfigError(f"pgd takes images x of shape (B, C, H, W) in [0, 1] and labels y of shape (B,), got "
                          f"{getattr(x, 'shape', type(x).__name__)} and {getattr(y, 'shape', type(y).__name__)}.")
    check_batch_types(x, y, "pgd")
    for name, value in (("eps", eps), ("step_size", step_size)):
        if value is not None and not torch.is_tensor(value):  # what a person types; tensors are checked by values
            check_size(value, name, norm=norm)
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}.")
    if step_noise:  # a std in [0, 1] units, like the sizes
        check_size(step_noise, "step_noise", norm=norm)
    if not callable(loss) and loss not in ("ce", "margin", "kl"):
        raise ConfigError(f"unknown attack loss {loss!r}; use 'ce', 'margin', 'kl' or a function.")
    if target is not None and not (torch.is_tensor(target) and target.shape == y.shape and not (
            target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)):
        raise ConfigError(f"target must be integer class indices of shape ({len(y)},) like y, got "
                          f"{getattr(target, 'dtype', type(target).__name__)} of {getattr(target, 'shape', '')}.")
    if callable(loss) and target is not None:
        raise ConfigError("an attack loss given as a function is untargeted: pass target=None")
    if loss == "kl" and reference is None:
        raise ConfigError("the 'kl' loss needs reference logits")
    if stop_on_miss and (restarts > 1 or target is not None or early_stop_tau is not None):
        raise ConfigError("stop_on_miss is for one untargeted run without early_stop_tau")


def check_autocast_dtype(value: object, name: str) -> None:
    """An attack's autocast dtype: ``torch.bfloat16``, ``torch.float16`` or None (full precision)."""
    if value is not None and value not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"{name} must be torch.bfloat16, torch.float16 or None (full precision), got {value!r}.")


def check_logits(logits: object, y: torch.Tensor, labels: bool, what: str = "labels") -> None:
    """Logits of shape (B, classes) (shapes only); with ``labels``, also labels (``what``) in [0, classes) (a host
    sync, and before the loss: on a GPU a label out of range is a device-side assert, not an error)."""
    if not (torch.is_tensor(logits) and logits.ndim == 2 and len(logits) == len(y)):
        got = f"a tensor of shape {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
        raise ConfigError(f"the model must return logits of shape (B, classes), got {got}; wrap a model that "
                          f"returns a tuple or dict in a module that returns the logits alone.")
    if not (labels and len(y)):
        return
    lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host sync
    if hi >= logits.shape[1]:
        raise ConfigError(f"{what} go up to {hi}, but the model has {logits.shape[1]} outputs.")
    if lo < 0:
        raise ConfigError(f"{what} must be >= 0, got {lo}.")


def check_batch_types(x: torch.Tensor, y: torch.Tensor, who: str) -> None:
    """Float images and integer labels (dtypes only: no host synchronisation); ``who`` names the caller."""
    if not x.is_floating_point():
        raise ConfigError(f"{who} takes float images in [0, 1], got {x.dtype}: divide 8-bit images by 255 first.")
    if x.dtype in (torch.float16, torch.bfloat16):  # x + delta would round past the eps ball: 8/255 is not a step
        raise ConfigError(f"{who} takes float32 or float64 images, got {x.dtype}, in which x + delta rounds outside "
                          f"the eps ball; pass x.float() and run the model in half precision under autocast "
                          f"(autocast_dtype=torch.bfloat16, or train.amp).")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ConfigError(f"{who} takes integer class labels (torch.long), got {y.dtype}.")


def check_batch_values(x: torch.Tensor, y: torch.Tensor, who: str, sizes: tuple = (), norm: str = "linf") -> None:
    """The checks that read tensor values (one host synchronisation for all): images in [0, 1], labels >= 0, and
    each ``(name, value)`` of ``sizes`` given as a tensor finite and >= 0, and at most 1 under L-inf (else pixel
    levels, ``8`` meant as 8/255)."""
    if not len(x):
        return
    sizes = [(name, v) for name, v in sizes if torch.is_tensor(v) and v.numel()]
    stats = [x.min(), x.max(), y.min()] + [f(v.detach()) for _, v in sizes for f in (torch.min, torch.max)]
    lo, hi, label, *bounds = torch.stack([t.float().to(x.device) for t in stats]).tolist()
    check_image_range(lo, hi, who)
    if label < 0:
        raise ConfigError(f"{who} takes class labels >= 0, got {int(label)}.")
    for (name, _), (smallest, largest) in zip(sizes, zip(bounds[::2], bounds[1::2])):
        check_size_range(name, smallest, largest, norm)


def check_image_range(lo: float, hi: float, who: str) -> None:
    """Refuse images whose smallest and largest values ``lo``, ``hi`` leave [0, 1] or are NaN (NaN logits would
    classify as class 0, and count as correct and robust wherever the label is 0)."""
    if math.isnan(lo) or math.isnan(hi):
        raise ConfigError(f"{who} got images holding NaN values; images must be finite values in [0, 1].")
    if lo < 0 or hi > 1:
        raise ConfigError(f"{who} takes images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]: normalise inside the "
                          f"model (iaat.NormalizedModel(net, mean, std)), not in the data.")


class PGD:
    """A PGD attack that holds its settings: ``PGD(model, eps=8/255, steps=10)(x, y)`` returns ``x_adv``.

    Sizes in [0, 1] image units; ``eps`` 8/255 where not given under L-inf (under L2 it must be given); any
    other keyword of :func:`pgd` (``norm``, ``restarts``, ``loss``,
    ``target``, ``autocast_dtype``, ...) is passed on. :meth:`run` returns the whole
    :class:`AttackResult` (per-sample ``robust``, ``first_miss``, ``kappa``).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> attack = iaat.PGD(model, eps=8 / 255, steps=10, step_size=2 / 255)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> x_adv = attack(x, y)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
        True
    """

    def __init__(self, model: nn.Module, eps: Optional[float] = None, steps: int = 10,
                 step_size: Optional[float] = None, **options) -> None:
        unknown = sorted(set(options) - _PGD_OPTIONS)
        if unknown:
            raise ConfigError(f"PGD got unknown option(s) {', '.join(unknown)}; it takes those of iaat.pgd: "
                              f"{', '.join(sorted(_PGD_OPTIONS))}.")
        norm = options.get("norm", "linf")
        eps = default_radius(eps, norm, "PGD")
        for name, value in (("eps", eps), ("step_size", step_size)):
            if value is not None and not torch.is_tensor(value):  # per-sample radii: checked by pgd, per batch
                check_size(value, name, norm=norm)
        steps = check_steps(steps)
        self.model, self.eps, self.steps, self.step_size, self.options = model, eps, steps, step_size, options

    def run(self, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """The attack's full result on the batch (see :func:`pgd`)."""
        return pgd(self.model, x, y, self.eps, steps=self.steps, step_size=self.step_size, **self.options)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y).x_adv

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        eps = f"<{tuple(self.eps.shape)} radii>" if torch.is_tensor(self.eps) else format_size(self.eps)
        return f"PGD(eps={eps}, steps={self.steps}, step_size={self.step_size}{extra})"


#: the keyword arguments :class:`PGD` passes on to :func:`pgd`
_PGD_OPTIONS = frozenset(inspect.signature(pgd).parameters) - {"model", "x", "y", "eps", "steps", "step_size"}
