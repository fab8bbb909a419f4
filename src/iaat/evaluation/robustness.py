"""Clean accuracy and PGD-k accuracy with restarts on a fixed set of images."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks import pgd
from ..attacks.pgd import attack_mode
from ..data import ImageSet
from ..units import format_size


@dataclass(frozen=True)
class AttackSpec:
    """One white-box attack of an evaluation, sizes in [0, 1] units."""

    eps: float
    steps: int = 10
    restarts: int = 1
    step_size: Optional[float] = None  #: default 2.5 * eps / steps (Madry et al.)
    norm: str = "linf"
    loss: str = "ce"

    @property
    def label(self) -> str:
        loss = "" if self.loss == "ce" else f"-{self.loss}"
        return f"pgd{self.steps}x{self.restarts}{loss}@{self.norm}:{format_size(self.eps)}"


def evaluate(model: nn.Module, data: ImageSet, attacks: Sequence[AttackSpec] = (), *, batch_size: int = 256,
             device: Optional[torch.device] = None, progress: bool = False, desc: str = "eval",
             autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """Accuracy of ``model`` on clean ``data`` and under each attack.

    A sample counts as robust under an attack only if it is also classified correctly when
    clean, so every robust accuracy is at most the clean accuracy.

    Returns:
        ``{"n": N, "clean": acc, "attacks": {label: {"accuracy": acc, **spec}}, "seconds": s}``.
    """
    device = device or next(model.parameters()).device
    n = len(data)
    clean_correct = torch.zeros((), dtype=torch.long, device=device)
    robust = {spec.label: torch.zeros((), dtype=torch.long, device=device) for spec in attacks}
    start = time.perf_counter()
    batches = range(0, n, batch_size)
    with attack_mode(model):
        for lo in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
            x = data.x[lo:lo + batch_size].to(device).float().div_(255.0)
            y = data.y[lo:lo + batch_size].to(device)
            with torch.no_grad():
                ok = model(x).argmax(1) == y
            clean_correct += ok.sum()
            for spec in attacks:
                res = pgd(model, x, y, spec.eps, steps=spec.steps, step_size=spec.step_size, norm=spec.norm,
                          restarts=spec.restarts, loss=spec.loss, autocast_dtype=autocast_dtype)
                robust[spec.label] += (ok & res.correct).sum()
    out = {"n": n, "clean": clean_correct.item() / max(n, 1), "attacks": {}}
    for spec in attacks:
        out["attacks"][spec.label] = {"accuracy": robust[spec.label].item() / max(n, 1), **asdict(spec)}
    out["seconds"] = time.perf_counter() - start
    return out
