"""``evaluate``: the evaluation protocol on any model and tensors, its numbers as a plain dict."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..attacks import attack_mode
from ..attacks.pgd import check_image_range, check_logits
from ..data import ImageSet, to_unit
from ..errors import ConfigError, first_line
from ..models.precision import float32_view
from ..units import check_size, python_scalar
from .attacks import AttackSpec
from .presets import PROTOCOLS
from .protocol import build_plan, run_evaluation


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             attacks: Optional[Sequence[Union[str, AttackSpec]]] = None, eps: Union[float, Sequence[float]] = 8 / 255,
             protocol: Optional[str] = None, norm: str = "linf", eps_sweep: Optional[Sequence[float]] = None,
             steps_sweep: Optional[Sequence[int]] = None, checks: bool = True, batch_size: int = 256,
             device: Optional[torch.device] = None, seed: int = 0, progress: bool = False) -> dict:
    """Clean and robust accuracy of any model on images ``x`` in [0, 1] with labels ``y``.

    Only images classified correctly when clean are attacked; a sample counts as robust only if
    no iterate of any restart of any attack misclassified it. The sanity checks of ``iaat eval``
    run too (``checks=False`` leaves them out) and say when the numbers should not be believed.

    Args:
        model: maps images in [0, 1] to logits (normalisation inside, e.g. :class:`iaat.NormalizedModel`); weights
            in float64 are fine (attacked in float32, cast at the model's input), and so are float16 and bfloat16
            ones (evaluated as a float32 copy of the same weights, whose gradients do not underflow).
        x: images in [0, 1], float (B, C, H, W), or uint8 pixels.
        y: labels (B,).
        attacks: attack specs as ``iaat eval --attack`` writes them (``"pgd:steps=100,restarts=5"``, ``"cw"``,
            ``"autoattack:version=quick"``) or :class:`~iaat.evaluation.AttackSpec` objects, or one; default PGD-20
            and CW-40. A size written inside a spec string is text, read as on the command line (8 or 8/255).
        eps: the radius, or several (each attack without its own radius runs at each), [0, 1] units.
        protocol: a named protocol (``quick``, ``paper``, ``full``) whose attacks come first.
        norm: ``linf`` or ``l2``.
        eps_sweep, steps_sweep: accuracy over these radii (PGD-10) / PGD step counts (one run gives all).
        checks: run the sanity checks.
        batch_size, device, seed, progress: how it runs (device: the model's).

    Returns:
        ``{"n", "clean", "eps", "norm", "attacks": {label: {"accuracy", ...}}, "worst_case", "curves",
        "checks", "suspicious", "seconds", ...}``, every size in [0, 1] units.

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
        >>> res = iaat.evaluate(model, x, y, attacks=["pgd:steps=10"], eps=8 / 255, checks=False)
        >>> sorted(res["attacks"])
        ['PGD-10@8/255']
        >>> res["attacks"]["PGD-10@8/255"]["accuracy"] <= res["clean"]
        True
    """
    eps = python_scalar(eps)  # torch.tensor(8 / 255), np.float32(8 / 255)
    radii = [eps] if isinstance(eps, (int, float, str)) or not hasattr(eps, "__iter__") else list(eps)
    radii = [check_size(e, "eps", norm=norm) for e in radii]
    sweep = [check_size(e, "eps_sweep", norm=norm) for e in eps_sweep] if eps_sweep is not None else None
    if isinstance(attacks, (str, AttackSpec)):
        attacks = [attacks]  # one attack given on its own
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    data = _image_set(x, y)
    model = float32_view(model)
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    first = to_unit(data.x[:1], device)
    try:
        with torch.no_grad(), attack_mode(model) as plain:
            out = plain(first)
    except (RuntimeError, ValueError, TypeError) as e:  # e.g. other channels or image size than it was built for
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"the model fails on images of shape {tuple(first.shape[1:])} from x: "
                          f"{type(e).__name__}: {first_line(e, 200)}") from None
    check_logits(out, data.y[:1], labels=False)  # the labels' range is checked over all of them below
    num_classes = out.shape[-1]
    if int(data.y.min()) < 0 or int(data.y.max()) >= num_classes:
        raise ConfigError(f"labels must be class indices in [0, {num_classes - 1}] for a model with {num_classes} "
                          f"outputs, got labels from {int(data.y.min())} to {int(data.y.max())}.")
    if attacks is None:
        attacks = [] if protocol else list(PROTOCOLS["quick"])
    plan = build_plan(eps=radii, protocol=protocol, attacks=attacks, norm=norm, eps_sweep=sweep,
                      steps_sweep=steps_sweep, checks=checks)
    fingerprint = {"n": len(data), "seed": seed, "stages": [s.label for s in plan.stages()]}
    return run_evaluation(model, data, plan, num_classes=num_classes, fingerprint=fingerprint, batch_size=batch_size,
                          device=device, seed=seed, progress=progress)


def _image_set(x: torch.Tensor, y: torch.Tensor) -> ImageSet:
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise ConfigError(f"evaluate takes torch tensors, got {type(x).__name__} and {type(y).__name__}; convert "
                          f"arrays with torch.from_numpy (images as float in [0, 1] or uint8).")
    if not (torch.is_tensor(x) and torch.is_tensor(y) and x.ndim == 4 and y.shape == (len(x),) and len(x)):
        raise ConfigError(f"evaluate takes images x of shape (N, C, H, W) and labels y of shape (N,), N >= 1, got "
                          f"{getattr(x, 'shape', type(x).__name__)} and {getattr(y, 'shape', type(y).__name__)}.")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ConfigError(f"labels y must be integer class indices, got {y.dtype}.")
    if x.is_floating_point():
        check_image_range(float(x.min()), float(x.max()), "evaluate")
    return ImageSet(x.detach().cpu(), y.detach().cpu().long())
