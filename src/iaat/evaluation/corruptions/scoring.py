"""Scoring a model on corruption sets: accuracy per (corruption, severity) and ImageNet-C's mCE."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...attacks.pgd import attack_mode
from ...data import ImageSet
from ...data.batch import to_unit
from ...errors import DataError
from .common import BENCHMARK_CORRUPTIONS, SEVERITIES, CorruptionItem

def _is_fraction(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1  # NaN fails too


def _is_list(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 1 or (
        isinstance(value, Sequence) and not isinstance(value, (str, bytes)))


def _check_done(done: Optional[Mapping[str, Sequence]]) -> dict[str, list]:
    if done is None:
        return {}
    if not isinstance(done, Mapping):
        raise DataError(f"done must map corruption names to lists of accuracies, got {type(done).__name__}.")
    out = {}
    for name, accs in done.items():
        if not _is_list(accs) or len(accs) > len(SEVERITIES):
            raise DataError(f"done[{name!r}] must be a list of at most 5 accuracies (severity 1 first), got {accs!r}.")
        for acc in accs:
            if acc is not None and not _is_fraction(acc):
                raise DataError(f"done[{name!r}] holds {acc!r}, which is not an accuracy in [0, 1] (or None).")
        out[name] = [None if acc is None else float(acc) for acc in accs]
    return out


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def evaluate_corruptions(model: nn.Module, sets: Iterable[CorruptionItem], *, source: Optional[str] = None,
                         comparable_with_cifar_c: Optional[bool] = None, imagenet_c: Optional[bool] = None,
                         batch_size: int = 256,
                         device: Optional[torch.device] = None, progress: bool = False,
                         done: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
                         on_result: Optional[Callable[[str, int, float], None]] = None) -> dict:
    """Top-1 accuracy of ``model`` on every (corruption, severity) of ``sets``, in eval mode and without gradients.

    Args:
        model: maps float images in [0, 1] (N, C, H, W) to logits.
        sets: ``(name, severity, ImageSet)`` items, e.g. from :func:`load_cifar_c` or
            :func:`generated_corruption_sets`.
        source: provenance for the report (default: ``sets.source`` when it has one).
        comparable_with_cifar_c: whether the numbers may be compared with published CIFAR-C results
            (default: ``sets.comparable_with_cifar_c`` when it has one, else False).
        imagenet_c: whether ``sets`` are ImageNet-C's, which adds the mCE to the result (default:
            ``sets.imagenet_c`` when it has one, else False).
        batch_size: images per forward pass.
        device: where the model runs (default: that of its parameters, or the CPU).
        progress: show a tqdm bar over the sets.
        done: finished results ``{name: [acc for severity 1, 2, ...]}`` of an earlier, interrupted run; those
            (name, severity) pairs are not evaluated again and their accuracies are reported as given.
        on_result: called as ``on_result(name, severity, accuracy)`` after each newly evaluated pair, so the
            caller can save ``done`` and resume later.

    Returns:
        ``{"source", "comparable_with_cifar_c", "per_corruption": {name: {"severity": [a1..a5], "mean"}},
        "mean", "benchmark_mean", "n"}``: ``mean`` over all corruptions and severities present,
        ``benchmark_mean`` over the 15 benchmark corruptions (None unless all 15 are complete), ``n`` images
        per severity (None if every pair came from ``done``). A severity never seen is None in its list.
        ImageNet-C results add ``"imagenet_c": True``, ``"CE"`` (:func:`mce`'s corruption error of each benchmark
        corruption with all 5 severities, from top-1 errors ``1 - accuracy``) and ``"mCE"`` (their mean, None
        unless all 15 benchmark corruptions are complete, with the reason in ``"mCE_note"``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    finished = _check_done(done)
    if source is None:
        source = getattr(sets, "source", "unspecified")
    if comparable_with_cifar_c is None:
        comparable_with_cifar_c = bool(getattr(sets, "comparable_with_cifar_c", False))
    if imagenet_c is None:
        imagenet_c = bool(getattr(sets, "imagenet_c", False))
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    accs: dict[str, list[Optional[float]]] = {}
    n_images: Optional[int] = None
    total = len(sets) if hasattr(sets, "__len__") else None
    bar = tqdm(sets, total=total, desc="corruptions", disable=not progress, leave=False, unit="set")
    with attack_mode(model), torch.no_grad(), bar:
        for item in bar:
            if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], ImageSet)):
                raise DataError(f"sets must yield (name, severity, ImageSet) tuples, got {type(item).__name__}.")
            name, severity, data = item
            if severity not in SEVERITIES:
                raise DataError(f"{name}: severity must be in 1..5, got {severity!r}.")
            row = accs.setdefault(name, [None] * len(SEVERITIES))
            previous = finished.get(name, [])
            if severity <= len(previous) and previous[severity - 1] is not None:
                row[severity - 1] = previous[severity - 1]
                continue
            if len(data) == 0:
                raise DataError(f"{name} at severity {severity} holds no images.")
            bar.set_postfix_str(f"{name} {severity}")
            correct = torch.zeros((), dtype=torch.long, device=device)
            for lo in range(0, len(data), batch_size):
                x = to_unit(data.x[lo:lo + batch_size], device)
                y = data.y[lo:lo + batch_size].to(device)
                correct += (model(x).argmax(1) == y).sum()
            acc = correct.item() / len(data)
            row[severity - 1] = acc
            n_images = len(data) if n_images is None else n_images
            if on_result is not None:
                on_result(name, severity, acc)
    per = {name: {"severity": row, "mean": _mean(row)} for name, row in accs.items()}
    complete = all(name in accs and None not in accs[name] for name in BENCHMARK_CORRUPTIONS)
    result = {
        "source": source,
        "comparable_with_cifar_c": comparable_with_cifar_c,
        "per_corruption": per,
        "mean": _mean(a for row in accs.values() for a in row),
        "benchmark_mean": _mean(a for name in BENCHMARK_CORRUPTIONS for a in accs[name]) if complete else None,
        "n": n_images,
    }
    if imagenet_c:
        result.update(_imagenet_c_mce(accs))
    return result


def _imagenet_c_mce(accs: Mapping[str, Sequence[Optional[float]]]) -> dict:
    """The mCE entries of an ImageNet-C result from accuracies ``{name: [acc at severity 1..5]}``."""
    whole = [name for name in BENCHMARK_CORRUPTIONS if name in accs and None not in accs[name]]
    # Top-1 error is 1 - accuracy; mce() normalises it by AlexNet's.
    scores = mce({name: [1.0 - a for a in accs[name]] for name in whole}) if whole else {"CE": {}}
    out = {"imagenet_c": True, "CE": scores["CE"], "mCE": None}
    if len(whole) == len(BENCHMARK_CORRUPTIONS):
        out["mCE"] = scores["mCE"]
        return out
    absent = [name for name in BENCHMARK_CORRUPTIONS if name not in accs]
    partial = [f"{name} (severity {', '.join(str(s) for s, a in zip(SEVERITIES, accs[name]) if a is None)})"
               for name in BENCHMARK_CORRUPTIONS if name in accs and name not in whole]
    reasons = [f"missing {', '.join(absent)}"] if absent else []
    reasons += [f"incomplete {', '.join(partial)}"] if partial else []
    out["mCE_note"] = (f"mCE needs all {len(BENCHMARK_CORRUPTIONS)} benchmark corruptions at severities 1..5; "
                       f"{'; '.join(reasons)}.")
    return out


# --------------------------------------------------------------------------- ImageNet-C mCE

#: AlexNet's top-1 error on ImageNet-C per benchmark corruption, averaged over the 5 severities (fractions),
#: from Hendrycks & Dietterich's code (also used by AugMix's imagenet.py to normalise corruption errors).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}


def mce(errors: Mapping[str, Sequence[float]]) -> dict:
    """Corruption errors normalised by AlexNet's (Hendrycks & Dietterich's mCE), as fractions.

    ``CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}`` with the model's top-1 errors ``E`` at severities 1..5;
    since :data:`ALEXNET_ERRORS` holds AlexNet's mean over severities, the denominator is 5 times it. ``mCE``
    is the mean of ``CE_c`` over the corruptions given; multiply by 100 for the paper's percentages (AlexNet
    itself scores 1.0, i.e. 100%). Errors are ``1 - accuracy``, e.g. of :func:`evaluate_corruptions`.

    Returns:
        ``{"mCE": float, "CE": {name: float}, "complete": whether all 15 benchmark corruptions were given}``.
    """
    if not isinstance(errors, Mapping) or not errors:
        raise DataError("mce needs a non-empty mapping {corruption: [error at severity 1..5]}.")
    ce = {}
    for name, errs in errors.items():
        if name not in ALEXNET_ERRORS:
            raise DataError(f"mce has no AlexNet baseline for '{name}'; known: {', '.join(ALEXNET_ERRORS)}.")
        if not _is_list(errs) or len(errs) != len(SEVERITIES):
            raise DataError(f"mce needs 5 errors (severity 1..5) for '{name}', got {errs!r}.")
        for e in errs:
            if not _is_fraction(e):
                raise DataError(f"errors for '{name}' must be fractions in [0, 1], got {e!r}.")
        # fsum and 5 * e are both correctly rounded, so AlexNet's own errors give exactly 1.0.
        ce[name] = math.fsum(float(e) for e in errs) / (len(SEVERITIES) * ALEXNET_ERRORS[name])
    return {"mCE": math.fsum(ce.values()) / len(ce), "CE": ce, "complete": set(ce) == set(ALEXNET_ERRORS)}
