"""Sanity checks that say when robustness numbers should not be believed.

In the spirit of AutoAttack's ``checks.py`` and Carlini et al.'s evaluation checklist: stronger
attacks must not report higher robustness than weaker ones, robustness falls with eps, an
unbounded attack breaks nearly everything, transfer attacks are weaker than white-box ones, and
the model is a deterministic function with useful input gradients. A failed check does not stop
the evaluation; it marks the result ``suspicious`` with the reason.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import attack_mode, check_logits
from ..errors import DataError
from ..units import format_size

#: Accuracy an attack at half the pixel range may leave before the evaluation is suspicious.
LARGE_EPS_MAX_ACCURACY = 0.05
#: Share of clean-correct images with an exactly zero input gradient that signals gradient masking.
ZERO_GRADIENT_MAX_SHARE = 0.1
#: Within how far (L-inf, [0, 1] units) of each image the second input gradient of the consistency check is taken.
GRADIENT_PROBE_DISTANCE = 0.5 / 255
#: Median cosine between the input gradients at an image and at a point that near below which the gradients are
#: shattered (noise at the scale of an attack's step). Trained and untrained CNNs give 0.99 or more; a model with a
#: tiny high-frequency term added to its logits (Athalye et al.'s shattered gradients) about 0.
GRADIENT_MIN_COSINE = 0.5


#: AutoAttack this far below the strongest PGD: PGD is misled (Croce & Hein's sign of gradient masking). Sound models
#: show a few points (the README's CPU PGD-AT model: 3.6).
AUTOATTACK_MAX_GAP = 0.10

#: A model whose accuracy rises by this much when its inputs are standardised expects normalised inputs.
NORMALISED_INPUT_GAIN = 0.25


def check_model_fits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     inputs: bool = True) -> None:
    """Before any attack: the model must give one logit per class of the data and, with ``inputs``, must not
    look as if it expected normalised inputs (much more accurate on standardised images than on [0, 1] ones;
    not asked of a model that normalises inside with a dataset's statistics, see :func:`normalises_inside`).

    Raises:
        ConfigError: the model returns no logits tensor (a tuple, a dict).
        DataError: naming what was seen and the fix.
    """
    with attack_mode(model), torch.no_grad():
        logits = model(x)
        if not torch.is_tensor(logits):  # a tuple or dict: the error that says to wrap the model
            check_logits(logits, y, labels=False)
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise DataError(f"the model outputs shape {tuple(logits.shape)} for {len(x)} images, but the data has "
                            f"{num_classes} classes: it needs one logit per class (check --dataset / --num-classes).")
        if not inputs or len(x) < 32 or normalises_inside(model):
            return
        mean = x.mean(dim=(0, *range(2, x.ndim)), keepdim=True)
        std = x.std(dim=(0, *range(2, x.ndim)), keepdim=True).clamp_min(1e-6)
        raw = float((logits.argmax(1) == y).float().mean())
        standardised = float((model((x - mean) / std).argmax(1) == y).float().mean())
    if standardised >= raw + NORMALISED_INPUT_GAIN:
        raise DataError(f"the model classifies {100 * raw:.0f}% of the first {len(x)} images correctly as [0, 1] "
                        f"images but {100 * standardised:.0f}% once they are standardised: it expects normalised "
                        f"inputs. Put the normalisation inside it (iaat.NormalizedModel(net, mean, std)), so that "
                        f"attack radii are in pixel space; or skip this check with --no-checks.")


def normalises_inside(model: nn.Module) -> bool:
    """``model`` standardises its input itself: it holds an :class:`~iaat.NormalizedModel`'s normalisation (also in
    a traced TorchScript module or a ``torch.export`` program) with a mean or std other than 0 and 1. Such a model
    takes [0, 1] images by construction, whatever a weak model's accuracy on standardised ones suggests; the identity
    normalisation ``iaat.build_model`` puts around a user's net says nothing about what the net expects.

    >>> import iaat, torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    >>> normalises_inside(iaat.NormalizedModel(net, (0.5,) * 3, (0.25,) * 3))
    True
    >>> normalises_inside(iaat.NormalizedModel(net, (0.0,) * 3, (1.0,) * 3)), normalises_inside(net)
    (False, False)
    """
    from ..models.normalize import Normalize

    for name, m in model.named_modules():
        # a torch.export program (.pt2) keeps the submodule's name ("normalize"), not its class
        if isinstance(m, Normalize) or getattr(m, "original_name", None) == Normalize.__name__ \
                or name.rsplit(".", 1)[-1] == "normalize":
            mean, std = getattr(m, "mean", None), getattr(m, "std", None)
            if torch.is_tensor(mean) and torch.is_tensor(std) and bool((mean != 0).any() or (std != 1).any()):
                return True
    return False


def tolerance(n: int) -> float:
    """Slack for comparing two attacks on the same n images: a few samples' worth, at least half a point."""
    return max(0.005, 3.0 / max(n, 1))


def probe_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Checks on one batch that need the model itself: determinism, side effects, input gradients, outputs."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    with attack_mode(model):
        with torch.no_grad():
            first, second = model(x), model(x)
        inp = x.clone().requires_grad_(True)
        logits = model(inp)
        if logits.requires_grad:
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), inp, allow_unused=True)
        else:  # the output does not depend differentiably on the input at all
            grad = None
        grad = torch.zeros_like(inp) if grad is None else grad
        ok = logits.detach().argmax(1) == y
        zero = (grad.flatten(1).abs().amax(1) == 0) & ok
        cosine = _gradient_consistency(model, x[ok & ~zero], y[ok & ~zero], grad[ok & ~zero])
    changed = [k for k, v in model.named_buffers() if k in buffers and not torch.equal(v, buffers[k])]
    return {
        "max_logit_change": float((first - second).abs().max()) if len(x) else 0.0,
        "buffers_changed": changed,
        "zero_gradient_share": float(zero.sum()) / max(1, int(ok.sum())),
        "outputs_are_probabilities": outputs_are_probabilities(first),
        "gradient_cosine": cosine,
    }


def _gradient_consistency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> Optional[float]:
    """Median cosine between each image's input gradient ``grad`` and the one at a random point within
    :data:`GRADIENT_PROBE_DISTANCE` of it (L-inf; its own generator: the evaluation's random streams stay as they are);
    None without images to probe."""
    if not len(x):
        return None
    g = torch.Generator(device=x.device).manual_seed(0)
    near = (x + (2 * torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) - 1) * GRADIENT_PROBE_DISTANCE)
    inp = near.clamp(0, 1).requires_grad_(True)
    (other,) = torch.autograd.grad(F.cross_entropy(model(inp).float(), y, reduction="sum"), inp, allow_unused=True)
    if other is None:
        return None
    # each gradient scaled to a largest entry of 1 first: a confident model's gradients are tiny (a margin of 30
    # gives norms near 1e-13), below the eps that cosine_similarity clamps the norms to
    a, b = (g.flatten(1).double() / g.flatten(1).double().abs().amax(1, keepdim=True).clamp_min(1e-300)
            for g in (grad, other))
    return float(F.cosine_similarity(a, b, dim=1).median())


def outputs_are_probabilities(outputs: torch.Tensor) -> bool:
    """Whether a batch of model outputs looks like softmax probabilities (rows in [0, 1] summing to 1), not logits:
    cross-entropy on them saturates, so attacks and training get little gradient.

    >>> outputs_are_probabilities(torch.tensor([[0.2, 0.8]])), outputs_are_probabilities(torch.tensor([[2.0, -1.0]]))
    (True, False)
    """
    probs = outputs.detach().float()
    return bool(len(probs)) and bool(((probs >= 0) & (probs <= 1)).all()) and bool(
        torch.allclose(probs.sum(1), torch.ones(len(probs), device=probs.device), atol=1e-4))


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def at_chance(clean: float, n: int, num_classes: Optional[int]) -> bool:
    """Clean accuracy no better than guessing: within three standard errors of 1/classes (or below it)."""
    if not num_classes or n <= 0:
        return False
    chance = 1.0 / num_classes
    return clean <= chance + 3 * (chance * (1 - chance) / n) ** 0.5


def run_checks(result: dict, probe: dict, large_eps: Optional[tuple] = None) -> list[dict]:
    """All checks over an evaluation result; each ``{"name", "passed", "detail"}``."""
    n, clean = result["n"], result["clean"]
    tol = tolerance(n)
    attacks = result["attacks"]
    classes = result.get("num_classes")
    checks = [
        _check("better than chance", not at_chance(clean, n, classes),
               f"clean accuracy {100 * clean:.1f}% on {n} images" + (f", chance {100 / classes:.1f}%" if classes else "")
               + (" (an untrained or broken model: every robustness number is meaningless)"
                  if at_chance(clean, n, classes) else "")),
        _check("deterministic", probe["max_logit_change"] <= 1e-5,
               f"two forward passes of the same batch differ by {probe['max_logit_change']:.3g} in the logits"
               + ("" if probe["max_logit_change"] <= 1e-5 else " (randomised model: use EOT attacks)")),
        _check("eval mode without side effects", not probe["buffers_changed"],
               "no buffer changed in eval mode" if not probe["buffers_changed"]
               else f"buffers changed during evaluation: {', '.join(probe['buffers_changed'][:5])}"),
        _check("useful input gradients", probe["zero_gradient_share"] <= ZERO_GRADIENT_MAX_SHARE,
               f"{100 * probe['zero_gradient_share']:.1f}% of correctly classified images have an all-zero input "
               "gradient" + ("" if probe["zero_gradient_share"] <= ZERO_GRADIENT_MAX_SHARE
                             else " (gradient masking: gradient attacks cannot move them)")),
        _consistent_gradients(probe.get("gradient_cosine")),
        _check("logits, not probabilities", not probe["outputs_are_probabilities"],
               "the model outputs " + ("probabilities (softmax saturates the attack loss)"
                                       if probe["outputs_are_probabilities"] else "unnormalised logits")),
    ]
    # (no "attacks at or below clean" check: only clean-correct images are attacked, so it could not fail)
    checks += _stronger_not_higher(attacks, tol)
    checks += _against_whitebox(attacks, tol)
    eps_curve = result.get("curves", {}).get("eps")
    if eps_curve:
        accs = [p["accuracy"] for p in eps_curve["points"]]
        rises = [(format_size(a["eps"]), format_size(b["eps"]))
                 for a, b in zip(eps_curve["points"], eps_curve["points"][1:]) if b["accuracy"] > a["accuracy"] + tol]
        checks.append(_check("non-increasing in eps", not rises,
                             f"accuracy over eps {', '.join(f'{100 * a:.1f}' for a in accs)}"
                             + ("" if not rises else f"; rises between {rises}")))
    if large_eps is not None:
        spec, res = large_eps
        checks.append(_check("near zero at a very large eps", res["accuracy"] <= LARGE_EPS_MAX_ACCURACY,
                             f"{spec.label} (no random start) leaves {100 * res['accuracy']:.1f}% "
                             f"(expected <= {100 * LARGE_EPS_MAX_ACCURACY:.0f}%)"))
    return checks


def _consistent_gradients(cosine: Optional[float]) -> dict:
    near = f"at a random point within {format_size(GRADIENT_PROBE_DISTANCE)}"
    if cosine is None:
        return _check("consistent input gradients", True, "no correctly classified image with a gradient to probe")
    passed = cosine >= GRADIENT_MIN_COSINE
    return _check("consistent input gradients", passed,
                  f"the input gradients at the correctly classified images and {near} agree with median cosine "
                  f"{cosine:.2f}" + ("" if passed else " (shattered gradients: gradient attacks follow noise and "
                                                       "overstate robustness; a transfer attack or AutoAttack's "
                                                       "Square tells more)"))


def _strength(a: dict) -> Optional[tuple]:
    """A comparable PGD family key and its strength (steps, restarts), or None for other attacks."""
    if a["kind"] != "pgd" or a.get("targeted") or not a.get("random_start", True) or a.get("step_size"):
        return None
    return (a["eps"], a["norm"], a["loss"]), (a["steps"], a["restarts"])


def _stronger_not_higher(attacks: dict, tol: float) -> list[dict]:
    """Within one PGD family (same eps, norm, loss), more steps and restarts must not give higher accuracy."""
    bad, compared = [], 0
    items = [(k, a, _strength(a)) for k, a in attacks.items()]
    items = [(k, a, s) for k, a, s in items if s is not None]
    for k1, a1, (fam1, (st1, r1)) in items:
        for k2, a2, (fam2, (st2, r2)) in items:
            if fam1 == fam2 and st2 >= st1 and r2 >= r1 and (st2, r2) != (st1, r1):
                compared += 1
                if a2["accuracy"] > a1["accuracy"] + tol:
                    bad.append(f"{k2} {100 * a2['accuracy']:.1f}% > {k1} {100 * a1['accuracy']:.1f}%")
    if not compared:
        return []
    return [_check("stronger PGD not higher", not bad,
                   f"{compared} pairs compared" + ("" if not bad else ": " + "; ".join(bad)))]


def _against_whitebox(attacks: dict, tol: float) -> list[dict]:
    """AutoAttack not above PGD; transfer (black-box) not below white-box PGD, at the same eps."""
    out = []
    pgd_at: dict = {}  # the strongest PGD per radius and norm
    for a in attacks.values():
        if a["kind"] == "pgd":
            at = (a["eps"], a.get("norm"))
            pgd_at[at] = min(pgd_at.get(at, 1.0), a["accuracy"])
    for k, a in attacks.items():
        ref = pgd_at.get((a["eps"], a.get("norm")))
        if ref is None:
            continue
        eps = format_size(a["eps"])
        if a["kind"] == "autoattack":
            out.append(_check("AutoAttack not above PGD", a["accuracy"] <= ref + tol,
                              f"{k} {100 * a['accuracy']:.1f}% vs strongest PGD at {eps} {100 * ref:.1f}%"))
            gap = ref - a["accuracy"]
            out.append(_check("PGD close to AutoAttack", gap <= AUTOATTACK_MAX_GAP + tol,
                              f"{k} is {100 * gap:.1f} points below the strongest PGD at {eps}"
                              + ("" if gap <= AUTOATTACK_MAX_GAP + tol else
                                 " (PGD's gradients mislead it: gradient masking, or too weak a PGD; trust AutoAttack, "
                                 "not PGD, for this model)")))
        if a["kind"] == "transfer":
            out.append(_check("transfer not below white-box", a["accuracy"] >= ref - tol,
                              f"{k} {100 * a['accuracy']:.1f}% vs strongest PGD at {eps} {100 * ref:.1f}%"
                              + ("" if a["accuracy"] >= ref - tol else " (white-box gradients are weaker than "
                                 "a surrogate's: gradient masking)")))
    return out
