"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020) around any method's loss.

In each training step, after the method has crafted its training examples (``method.objective``):

1. every weight matrix and convolution kernel ``w_l`` gets the perturbation
   ``v_l = gamma * ||w_l|| * g_l / ||g_l||``, with ``g_l`` the gradient of the method's own loss at those
   examples with respect to ``w_l`` (one more forward and backward pass: the cost of AWP);
2. the step's forward and backward pass run at ``w + v``;
3. the weights go back to ``w`` before the optimiser step, which applies the gradient taken at ``w + v``.

As in the authors' code (csdongxian/AWP, ``utils_awp.py``): one normalised ascent step per layer, on
parameters with more than one dimension (BatchNorm scales and all biases stay as they are), with
BatchNorm in train mode for the ascent pass but its running statistics untouched (theirs: a proxy copy
of the model; here the model's buffers are saved and restored around that pass). Their defaults:
``gamma`` 0.01 and no warm-up for AT-style losses (AT-AWP), ``gamma`` 0.005 after 9 plain epochs for
TRADES-style losses (TRADES-AWP: their 1-based ``epoch >= 10``); :func:`default_awp` picks by method.

One deliberate difference: theirs removes the perturbation after the optimiser step, so SGD's weight
decay (and through it the momentum) sees ``w + v``; here it is removed before the step, so the step is
the one the optimiser would take at ``w`` with the perturbed gradient (a difference of
``lr * weight_decay * v`` per step). Under torchrun each process takes the ascent step on its own share
of the batch (no all-reduce for it). The ascent's loss is the method's own, so AWP wraps every method:
``-CE`` on the adversarial examples for PGD-AT (their AT-AWP), TRADES' ``-(CE + beta * KL)`` for TRADES
(their TRADES-AWP), the weighted loss of GAIRAT and IAAT's loss at each sample's radius.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .errors import ConfigError
from .methods.base import Objective

#: Added to a gradient's norm before dividing by it (the authors' ``EPS``).
EPS = 1e-20
#: The authors' defaults: (gamma, plain epochs before AWP starts) for AT-style and TRADES-style losses.
AT_DEFAULTS = (0.01, 0)
TRADES_DEFAULTS = (0.005, 9)
#: Methods whose loss is TRADES-like (a KL term to the clean prediction): they get TRADES-AWP's defaults (MART
#: by that likeness: the authors' code has no MART script).
TRADES_STYLE = ("trades", "mart")


def default_awp(method_name: str, train_loss: str = "ce") -> tuple[float, int]:
    """The authors' ``(gamma, warmup_epochs)`` for a method: TRADES-AWP's for TRADES-style losses, else AT-AWP's.

    Example:
        >>> from iaat.awp import default_awp
        >>> default_awp("pgd_at"), default_awp("trades")
        ((0.01, 0), (0.005, 9))
    """
    return TRADES_DEFAULTS if method_name in TRADES_STYLE or train_loss == "trades" else AT_DEFAULTS


class AWP:
    """Adversarial weight perturbation of ``model``'s weight matrices and kernels, for any training loop.

    Args:
        model: the model being trained (its unwrapped ``nn.Module``; its parameters are perturbed in place).
        gamma: the perturbation's size relative to each layer's weight norm (0.01 AT-style, 0.005 TRADES-style).
        warmup_epochs: plain epochs before AWP starts (:meth:`active`; :meth:`applied` takes the epoch to know).
        scaler: an fp16 loop's ``torch.amp.GradScaler``: the ascent pass's loss is scaled as the step's is, since
            its float16 gradient would underflow to 0 where the loss is small (the direction, all that AWP takes
            of it, is the same); a layer whose scaled gradient overflows is not perturbed in that step.

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method, awp = iaat.PGDAT(eps=8 / 255, steps=3), iaat.AWP(model, gamma=0.01)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> epoch = 0
        >>> objective = method.objective(model, x, y)  # the attack, once
        >>> with awp.applied(objective, epoch=epoch):  # the weights at w + v inside, back at w after
        ...     objective(model).loss.backward()
        >>> optimizer.step()
    """

    def __init__(self, model: nn.Module, gamma: float = 0.01, warmup_epochs: int = 0,
                 scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if not 0.0 < gamma < 1.0:
            raise ConfigError(f"the AWP gamma is the perturbation's size relative to each layer's weights, in (0, 1) "
                              f"(0.01 for AT-style, 0.005 for TRADES-style losses), got {gamma}.")
        if warmup_epochs < 0:
            raise ConfigError(f"the AWP warm-up must be >= 0 epochs, got {warmup_epochs}.")
        self.model, self.gamma, self.warmup_epochs = model, float(gamma), int(warmup_epochs)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        perturbed = [(name, p) for name, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
        if not perturbed:
            raise ConfigError("AWP perturbs weight matrices and convolution kernels; this model has none to train.")
        self.names = [name for name, _ in perturbed]
        self.params = [p for _, p in perturbed]

    def active(self, epoch: int) -> bool:
        """Whether AWP applies at 0-based ``epoch`` (after ``warmup_epochs`` plain ones)."""
        return epoch >= self.warmup_epochs

    def perturbation(self, objective: Objective, net: Optional[nn.Module] = None) -> list[torch.Tensor]:
        """Each perturbed parameter's ``v_l = gamma * ||w_l|| * g_l / (||g_l|| + EPS)`` for the loss ``objective``
        (evaluated through ``net``, by default the model: e.g. its compiled form, never a DDP wrapper)."""
        if not callable(objective):
            raise ConfigError(f"AWP takes the step's objective, a function of the weights "
                              f"(method.objective(model, x, y, index)), not its value; got {type(objective).__name__}.")
        net = self.model if net is None else net
        buffers = [b.detach().clone() for b in self.model.buffers()]
        trained = [w for w in self.params if w.requires_grad]  # a layer frozen since construction: not perturbed
        try:
            loss = objective(net).loss
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            found = dict(zip(map(id, trained), torch.autograd.grad(loss, trained, allow_unused=True) if trained else ()))
            grads = [found.get(id(w)) for w in self.params]
        finally:
            with torch.no_grad():  # BatchNorm's running statistics as they were: the ascent pass is not a step
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        out = []
        for w, g in zip(self.params, grads):
            if g is None:  # not used by this loss: not perturbed
                out.append(torch.zeros_like(w))
                continue
            g = g.detach().to(w.dtype)
            norm = g.norm()
            v = self.gamma * w.detach().norm() / (norm + EPS) * g
            out.append(v if self.scaler is None else torch.where(torch.isfinite(norm), v, torch.zeros_like(v)))
        return out

    def perturb(self, objective: Objective, net: Optional[nn.Module] = None) -> Callable[[], None]:
        """Move the weights to ``w + v``; returns the function that puts them back to exactly ``w``. Whatever the
        epoch: the caller consults :meth:`active` (:meth:`applied` does, given the epoch)."""
        v = self.perturbation(objective, net)
        saved = [w.detach().clone() for w in self.params]
        with torch.no_grad():
            for w, dv in zip(self.params, v):
                w.add_(dv)
        # Autocast keeps its bf16/fp16 copies of the weights for the whole region, blind to changes in place:
        # without this the step's forward would run at the cached unperturbed weights.
        torch.clear_autocast_cache()

        def restore() -> None:
            with torch.no_grad():
                for w, s in zip(self.params, saved):
                    w.copy_(s)
            torch.clear_autocast_cache()
        return restore

    @contextmanager
    def applied(self, objective: Objective, net: Optional[nn.Module] = None, *,
                epoch: Optional[int] = None) -> Iterator[None]:
        """The weights at ``w + v`` inside the block (run the step's forward and backward there), at ``w`` after.

        ``epoch`` (0-based): before ``warmup_epochs`` the block runs at ``w``, with no ascent pass (:meth:`active`);
        required when there are warm-up epochs, which a block without it would skip."""
        if epoch is None and self.warmup_epochs:
            raise ConfigError(f"this AWP starts after {self.warmup_epochs} plain epoch(s): pass the 0-based epoch, "
                              f"awp.applied(objective, epoch=epoch), so that it stays off before then.")
        if epoch is not None and not self.active(epoch):
            yield
            return
        restore = self.perturb(objective, net)
        try:
            yield
        finally:
            restore()


def awp_settings(awp: object, warmup: Optional[int], method_name: str, train_loss: str = "ce") -> tuple[float, int]:
    """``(gamma, warmup_epochs)`` from the config's ``train.awp`` (``auto`` or a gamma) and ``train.awp_warmup``.

    Example:
        >>> from iaat.awp import awp_settings
        >>> awp_settings("auto", None, "trades"), awp_settings(0.02, None, "iaat"), awp_settings("auto", 3, "pgd_at")
        ((0.005, 9), (0.02, 0), (0.01, 3))
    """
    gamma, default_warmup = default_awp(method_name, train_loss)
    return (gamma if awp == "auto" else float(awp)), (default_warmup if warmup is None else int(warmup))
