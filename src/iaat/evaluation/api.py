"""``evaluate``: the evaluation protocol on any model and tensors, its numbers as a plain dict."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..attacks import attack_mode
from ..attacks.pgd import check_image_range, check_logits, outside_inference_mode
from ..data import ImageSet, to_unit
from ..errors import ConfigError, first_line
from ..model_files import load_model
from ..models.precision import float32_view
from ..units import check_size, default_radius, python_scalar
from .attacks import AttackSpec
from .presets import PROTOCOLS
from .protocol import build_plan, run_evaluation


@outside_inference_mode  # attacks need gradients, which a caller's inference mode would switch off
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             attacks: Optional[Sequence[Union[str, AttackSpec]]] = None, eps: Optional[Union[float, Sequence[float]]] = None,
             protocol: Optional[str] = None, norm: str = "linf", eps_sweep: Optional[Sequence[float]] = None,
             steps_sweep: Optional[Sequence[int]] = None, checks: bool = True, batch_size: int = 256,
             device: Optional[torch.device] = None, seed: int = 0, progress: bool = False,
             surrogate: Optional[Union[nn.Module, str, Path]] = None, per_sample: bool = False) -> dict:
    """Clean and robust accuracy of any model on images ``x`` in [0, 1] with labels ``y``.

    Only images classified correctly when clean are attacked; a sample counts as robust only if
    no iterate of any restart of any attack misclassified it. The sanity checks of ``iaat eval``
    run too (``checks=False`` leaves them out) and say when the numbers should not be believed. It runs with gradients
    on inside a caller's ``torch.inference_mode()`` too, and leaves the caller's random generators as they were.

    Args:
        model: maps images in [0, 1] to logits (normalisation inside, e.g. :class:`iaat.NormalizedModel`); weights
            in float64 are fine (attacked in float32, cast at the model's input), and so are float16 and bfloat16
            ones (evaluated as a float32 copy of the same weights, whose gradients do not underflow).
        x: images in [0, 1], float (B, C, H, W), or uint8 pixels.
        y: labels (B,).
        attacks: attack specs as ``iaat eval --attack`` writes them (``"pgd:steps=100,restarts=5"``, ``"cw"``,
            ``"autoattack:version=quick"``) or :class:`~iaat.evaluation.AttackSpec` objects, or one; default PGD-20
            and CW-40. A size written inside a spec string is text, read as on the command line (8 or 8/255).
            A ``"transfer"`` attack is crafted on ``surrogate``, or on the run or model file its ``source=`` names.
        eps: the radius, or several (each attack without its own radius runs at each), [0, 1] units; default
            8/255 under L-inf, required under L2.
        protocol: a named protocol (``quick``, ``paper``, ``full``) whose attacks come first.
        norm: ``linf`` or ``l2``.
        eps_sweep, steps_sweep: accuracy over these radii (PGD-10) / PGD step counts (one run gives all).
        checks: run the sanity checks.
        batch_size, device, seed, progress: how it runs (device: the model's).
        surrogate: the model transfer attacks are crafted on (``iaat eval --surrogate``): a module on the evaluation's
            device, or a run folder or model file read with :func:`iaat.load_model`; a transfer attack from it is
            added unless ``attacks`` has one.
        per_sample: also return ``per_sample``, per image a boolean tensor of shape (n,) each: ``clean`` (classified
            correctly), robust under each attack by its label, and ``worst_case`` (under every attack at the main
            radius): to relate robustness to anything else known per image (radii, classes, corruptions).

    Returns:
        ``{"n", "clean", "eps", "norm", "attacks": {label: {"accuracy", ...}}, "worst_case", "curves",
        "checks", "suspicious", "suspicious_reasons", "seconds", ...}``, every size in [0, 1] units. Each of these
        keys is always there: with no attack at the main radius (the first eps), ``worst_case`` is the clean
        accuracy over no attacks (``"over": []``); with ``checks=False``, ``checks`` and ``suspicious_reasons``
        are empty and ``suspicious`` is False (nothing was checked).

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
    _check_module(model)
    eps = python_scalar(default_radius(eps, norm, "evaluate"))  # torch.tensor(8 / 255), np.float32(8 / 255)
    data = _image_set(x, y)
    shape = tuple(getattr(eps, "shape", ()))  # radii to evaluate at each, not one per image (IAAT's memory)
    if len(shape) > 1 or (shape and shape[0] == len(data) > 1):
        raise ConfigError(f"eps takes a radius or a list of radii, each evaluated over all images, got an array of "
                          f"shape {shape} for {len(data)} images: per-sample radii go to iaat.pgd(model, x, y, "
                          f"eps=radii), whose result says which images held; a sweep of {len(data)} radii, as a list.")
    radii = [eps] if isinstance(eps, (int, float, str)) or not hasattr(eps, "__iter__") else list(eps)
    radii = [check_size(e, "eps", norm=norm) for e in radii]
    sweep = [check_size(e, "eps_sweep", norm=norm) for e in eps_sweep] if eps_sweep is not None else None
    if isinstance(attacks, (str, AttackSpec)):
        attacks = [attacks]  # one attack given on its own
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    source, surrogates = _given_surrogate(surrogate, model, device)
    model = float32_view(model)
    num_classes = _num_classes(model, data, device)
    if attacks is None:
        attacks = [] if protocol else list(PROTOCOLS["quick"])
    plan = build_plan(eps=radii, protocol=protocol, attacks=attacks, norm=norm, surrogate=source, eps_sweep=sweep,
                      steps_sweep=steps_sweep, checks=checks)
    for spec in plan.attacks:  # transfer attacks whose spec names its own source: loaded as iaat eval does
        if spec.kind == "transfer" and spec.source not in surrogates:
            surrogates[spec.source] = load_model(spec.source, device)
    fingerprint = {"n": len(data), "seed": seed, "stages": [s.label for s in plan.stages()]}
    result = run_evaluation(model, data, plan, num_classes=num_classes, fingerprint=fingerprint,
                            batch_size=batch_size, device=device, seed=seed, progress=progress, surrogates=surrogates,
                            per_sample=per_sample)
    if per_sample:
        result["per_sample"] = {k: torch.from_numpy(v.astype(bool)) for k, v in result["per_sample"].items()}
    return _with_every_key(result)


def _check_module(model: object) -> None:
    """The errors of an attack for a model that is no ``nn.Module`` (a function) or whose weights cannot take
    gradients, raised before its parameters are read."""
    with attack_mode(model):
        pass


def _num_classes(model: nn.Module, data: ImageSet, device: torch.device) -> int:
    """The model's number of outputs, from its logits on the first image; labels beyond them are an error."""
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
    return num_classes


#: The source of transfer attacks from a surrogate given as a module (their entries in the result name it).
_SURROGATE_MODULE = "<surrogate module>"


def _given_surrogate(surrogate: Optional[Union[nn.Module, str, Path]], model: nn.Module,
                     device: torch.device) -> tuple[Optional[str], dict[str, nn.Module]]:
    """``evaluate``'s surrogate as the source its transfer attacks name, and the source → model map of the protocol."""
    if surrogate is None:
        return None, {}
    if isinstance(surrogate, (str, Path)):
        return str(surrogate), {str(surrogate): load_model(surrogate, device)}
    if not isinstance(surrogate, nn.Module):
        raise ConfigError(f"surrogate must be an nn.Module or the path of a run folder or model file, got "
                          f"{type(surrogate).__name__}; wrap a function in an nn.Module.")
    if surrogate is model:
        raise ConfigError("the surrogate is the evaluated model itself; a transfer attack needs an independently "
                          "trained model.")
    return _SURROGATE_MODULE, {_SURROGATE_MODULE: surrogate}


def _with_every_key(result: dict) -> dict:
    """``result`` with the keys the protocol leaves out when they do not apply (its JSON's readers take a missing
    ``worst_case`` for "no attack at the main radius" and missing ``checks`` for "not checked"; a Python caller gets
    every documented key)."""
    result.setdefault("worst_case", {"accuracy": result["clean"], "over": []})
    result.setdefault("checks", [])
    result.setdefault("suspicious", False)
    result.setdefault("suspicious_reasons", [])
    return result


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
