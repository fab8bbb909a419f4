"""DeepFool (Moosavi-Dezfooli et al., 2016): a minimal-perturbation attack by local linearisation.

Unlike PGD it does not maximise a loss inside a ball; it walks to the nearest linearised decision
boundary among the top candidate classes, so it is the one attack in the project that is not
a call of :func:`~iaat.attacks.pgd.pgd`. Evaluation uses it as a different kind of attacker and
reads the size of the perturbation it needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .pgd import attack_mode


@dataclass
class DeepFoolResult:
    """What :func:`deepfool` found.

    Attributes:
        x_adv: the images after the last step, in [0, 1].
        fooled: (B,) bool, ``x_adv`` is misclassified.
        size: (B,) the perturbation's L-inf or L2 norm (``inf`` where the sample was not fooled).
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    size: torch.Tensor


def _flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    v = v.flatten(1)
    return v.abs().amax(1) if norm == "linf" else v.norm(dim=1)


def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "linf", steps: int = 50,
             candidates: int = 10, overshoot: float = 0.02) -> DeepFoolResult:
    """Batched DeepFool against the true labels ``y``.

    Each step linearises ``f_k - f_y`` for the ``candidates`` classes with the highest clean
    logits and moves every not-yet-fooled sample to the closest linearised boundary (dual norm:
    L1 for L-inf, L2 for L2); the accumulated step is scaled by ``1 + overshoot``.

    Args:
        model: maps images in [0, 1] to logits; attacked in eval mode.
        x: images in [0, 1], (B, C, H, W).
        y: labels (B,).
        norm: ``"linf"`` or ``"l2"``.
        steps: maximum number of linearisation steps.
        candidates: number of classes (by clean logit, the true one included) considered.
        overshoot: relative overshoot that carries a sample across the boundary.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    x = x.detach()
    shape = (-1,) + (1,) * (x.ndim - 1)
    with attack_mode(model), torch.enable_grad():
        with torch.no_grad():
            logits = model(x)
        k = min(candidates, logits.shape[1])
        # Candidate classes other than the true one, by clean logit.
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        r_total = torch.zeros_like(x)
        x_adv = x
        for _ in range(steps):
            x_in = x_adv.clone().requires_grad_(True)
            out = model(x_in)
            active = out.argmax(1) == y
            if not bool(active.any()):  # one sync per step: DeepFool usually needs only a few
                break
            label_logit = out.gather(1, y[:, None]).squeeze(1)
            best_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
            best_step = torch.zeros_like(x)
            for j in range(k - 1):
                diff = out.gather(1, others[:, j:j + 1]).squeeze(1) - label_logit
                (w,) = torch.autograd.grad(diff.sum(), x_in, retain_graph=j < k - 2)
                gap = diff.detach().abs() + 1e-4
                if norm == "linf":
                    dual = w.flatten(1).abs().sum(1) + 1e-12
                    step = (gap / dual).view(shape) * w.sign()
                else:
                    dual = w.flatten(1).norm(dim=1) + 1e-12
                    step = (gap / dual ** 2).view(shape) * w
                dist = gap / dual
                closer = dist < best_dist
                best_dist = torch.where(closer, dist, best_dist)
                best_step = torch.where(closer.view(shape), step, best_step)
            r_total = r_total + best_step * active.view(shape).to(x.dtype)
            x_adv = (x + (1 + overshoot) * r_total).clamp(0, 1).detach()
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y
    size = torch.where(fooled, _flat_norm(x_adv - x, norm), torch.full_like(fooled, float("inf"), dtype=x.dtype))
    return DeepFoolResult(x_adv, fooled, size)
