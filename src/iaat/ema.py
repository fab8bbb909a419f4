"""An exponential moving average of a model's weights (``train.ema``), for any training loop.

After every optimiser step the averaged copy moves towards the model: ``avg = d * avg + (1 - d) * w``.
The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` at update ``t`` (0-based), so the
first averages are not held back by the random initialisation (the schedule of TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``, used e.g. by imrahulr/adversarial_robustness_pytorch).

Parameters are averaged; buffers (BatchNorm's running mean and variance, its step count,
normalisation constants) are copied from the model at every update, so the averaged copy uses the
statistics of the current weights' activations rather than an average over older ones.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, first_line

#: The checkpoint entries of a run that keeps averaged weights.
EMA_KEY = "ema_model"
EMA_UPDATES_KEY = "ema_updates"


class EMA:
    """Averaged weights of ``model``; call :meth:`update` after each optimiser step, evaluate ``ema.module``.

    Args:
        model: the model being trained (its unwrapped ``nn.Module``, not a DDP or compiled wrapper).
        decay: the decay once warmed up (0.999 is usual for a few hundred steps per epoch).
        warmup: use ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (True).

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Linear(4, 2)
        >>> ema = iaat.EMA(model, decay=0.999)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.rand(8, 4)).sum().backward(); optimizer.step()
        >>> ema.update(model)  # after every optimiser step
        >>> ema.module(torch.rand(3, 4)).shape  # the averaged model, in eval mode
        torch.Size([3, 2])
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"the EMA decay must be in (0, 1), e.g. 0.999, got {decay}.")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.module = copy.deepcopy(model).eval()
        self._shapes = _shapes(self.module)
        self._checked = False
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged parameters towards ``model``'s; copy its buffers."""
        if not self._checked:  # once: pairs are made by position, so another model would be averaged silently
            if _shapes(model) != self._shapes:
                raise ConfigError("EMA.update got a model whose parameters and buffers differ in number or shape "
                                  "from those of the model the EMA was built from: pass that same model.")
            self._checked = True
        d = self.current_decay()
        averaged = list(self.module.parameters())
        if averaged:  # one kernel per dtype and device on a GPU, not three per tensor
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, [w.detach() for w in model.parameters()], alpha=1 - d)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.updates += 1

    def state_dict(self) -> dict:
        return {EMA_KEY: self.module.state_dict(), EMA_UPDATES_KEY: self.updates}

    def load_state_dict(self, state: dict, where: Optional[str] = None) -> None:
        """Restore from :meth:`state_dict` (e.g. a checkpoint's entries); ``where`` names the file in errors."""
        if EMA_KEY not in state:
            raise CheckpointError(f"{where or 'the state'} holds no averaged weights ('{EMA_KEY}'): it was written "
                                  f"without train.ema.")
        try:
            self.module.load_state_dict(state[EMA_KEY])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"the averaged weights in {where or 'the state'} do not fit this model "
                                  f"({first_line(e)}).") from None
        self.updates = int(state.get(EMA_UPDATES_KEY, 0))


def _shapes(model: nn.Module) -> tuple:
    return (tuple(p.shape for p in model.parameters()), tuple(b.shape for b in model.buffers()))
