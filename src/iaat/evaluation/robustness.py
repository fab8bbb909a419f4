"""Clean accuracy and attack accuracy on a fixed set of images, in one pass (the trainer's validation, the demo).

The full protocol (restarts, sweeps, checks, resume) is :mod:`.protocol`; both count a sample as
robust only if it is correct when clean and no attack iterate misclassifies it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.pgd import attack_mode
from ..data import ImageSet, to_unit
from .attacks import AttackSpec, run_attack, spec_summary


def accuracy(model: nn.Module, data: ImageSet, attacks: Sequence[AttackSpec] = (), *, batch_size: int = 256,
             device: Optional[torch.device] = None, progress: bool = False, desc: str = "eval",
             autocast_dtype: Optional[torch.dtype] = None, num_classes: Optional[int] = None,
             stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Accuracy of ``model`` on clean ``data`` and under each attack (specs with their eps set).

    ``stop`` is asked before every batch; when it says so the evaluation ends early and returns ``None``
    (the trainer's Ctrl-C during its end-of-epoch evaluation).

    Returns:
        ``{"n": N, "clean": acc, "attacks": {label: {"accuracy": acc, **spec}}, "seconds": s}``.
    """
    device = device or next(model.parameters()).device
    n = len(data)
    clean_correct = torch.zeros((), dtype=torch.long, device=device)
    robust = {spec.label: torch.zeros((), dtype=torch.long, device=device) for spec in attacks}
    start = time.perf_counter()
    with attack_mode(model):
        for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False, unit="batch"):
            if stop is not None and stop():
                return None
            x = to_unit(data.x[lo:lo + batch_size], device)
            y = data.y[lo:lo + batch_size].to(device)
            with torch.no_grad():
                logits = model(x)
            ok = logits.argmax(1) == y
            clean_correct += ok.sum()
            hit = ok.nonzero().squeeze(1) if attacks else None  # only these can count as robust: attack them alone
            if attacks and len(hit):
                for spec in attacks:
                    out = run_attack(spec, model, x[hit], y[hit], num_classes=num_classes or logits.shape[1],
                                     autocast_dtype=autocast_dtype)
                    robust[spec.label] += out["robust"].sum()
    out = {"n": n, "clean": clean_correct.item() / max(n, 1), "attacks": {}}
    for spec in attacks:
        out["attacks"][spec.label] = {"accuracy": robust[spec.label].item() / max(n, 1), **spec_summary(spec)}
    out["seconds"] = time.perf_counter() - start
    return out
