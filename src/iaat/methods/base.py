"""The method interface: how a batch becomes a loss, in any training loop.

A method is a small dataclass: the training attack (``eps``, ``step_size``, ``steps``, ``norm``,
``random_start``), what it must know about the run (``num_train``, ``epochs``) and its own keyword
arguments, every size a float in [0, 1] image units. The trainer drives it exactly as a user's
own loop does::

    method.start_epoch(epoch)                     # before each epoch's first batch (0-based)
    loss = method.loss(model, x, y, index)        # x in [0, 1]; index: positions in the training set
    stats = method.end_epoch()                    # host-side numbers for logging

A method works in two phases: :meth:`Method.prepare` attacks the batch (and updates per-sample state),
and returns the batch's *objective*, the training loss as a function of the weights at those fixed
training examples. ``method.compute`` evaluates it once on the model; a part that needs the loss at
other weights, such as adversarial weight perturbation (:class:`iaat.AWP`), evaluates it again there
without a second attack.

Per-sample state (IAAT's radius memory) lives on the method and goes through
:meth:`Method.state_dict` / :meth:`Method.load_state_dict`, so it can be saved in any format.
Configs write sizes in pixel units over 255; :func:`iaat.config.build_method` converts them
before a method is constructed, so a method only ever sees [0, 1] units.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from ..attacks import AttackResult, pgd
from ..attacks.pgd import (attack_mode, check_autocast_dtype, check_batch_types, check_batch_values, check_logits,
                           default_step_size)
from ..errors import ConfigError
from ..schema import check_type, field_default
from ..units import LINF_EPS, check_size, format_size, python_scalar

#: Field metadata of a size: [0, 1] units here, pixel units over 255 in configs.
SIZE = {"size": True}


def size(default: Optional[float]) -> Any:
    """A dataclass field holding a size in [0, 1] image units, for a method's own keys: a config writes it in pixel
    units over 255 (``--set method.radius=4`` is 4/255), the Python API in [0, 1] units, checked as ``eps`` is. A
    plain ``float`` key is taken as written.

    Example:
        >>> import dataclasses, iaat
        >>> @dataclasses.dataclass(eq=False, kw_only=True)
        ... class SmallerRadius(iaat.Method):
        ...     radius: float = iaat.size(4 / 255)  #: the training attack's radius
        >>> SmallerRadius(radius=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        iaat.errors.ConfigError: radius=4 is larger than 1, the whole [0, 1] pixel range: ...
    """
    return field(default=default, metadata=SIZE)


@dataclass
class StepOutput:
    """One batch's loss for the optimiser plus what the trainer logs.

    Attributes:
        loss: scalar to backpropagate.
        logits: logits of the inputs the model was trained on (train accuracy).
        stats: per-batch *sums* of per-sample quantities on the device, e.g. ``{"radius": eps.sum()}``;
            the trainer divides by the sample count at the end of the epoch.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    stats: dict = field(default_factory=dict)


#: A batch's training loss as a function of the weights: ``objective(model) -> StepOutput`` (see ``Method.prepare``).
Objective = Callable[[nn.Module], StepOutput]


@dataclass(eq=False, kw_only=True)
class Method:
    """Base class of a training method (subclasses implement :meth:`prepare`).

    Args:
        eps: radius of the training attack, [0, 1] units (8/255).
        step_size: PGD step, [0, 1] units (default as :func:`iaat.pgd`: 2.5 * eps / steps up to 10 steps, 2/255
            at 8/255 and 10 steps as in Madry et al. and the IAAT paper; eps / 4 beyond). The TRADES, MART, MAIL,
            FAT and GAIRAT code trains with 0.007 at eps 0.031 (the MART and MAIL presets here say so).
        steps: PGD iterations (10).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start each attack uniformly inside the ball.
        num_train: number of training samples (methods with per-sample state need it).
        epochs: total number of epochs (schedules over the whole run need it).
        attack_dtype: autocast dtype of the attacks (``torch.bfloat16``, ...), ``None`` for full precision.
        compiled: use the ``torch.compile``d PGD update.

    Example:
        >>> import iaat, torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> method = iaat.PGDAT(eps=8 / 255, steps=3)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> method.loss(model, x, y).backward()
    """

    name: ClassVar[str] = ""
    needs_index: ClassVar[bool] = False  #: keeps per-sample state: ``loss`` needs each sample's index
    needs_epoch: ClassVar[bool] = False  #: depends on the epoch: ``start_epoch`` must come first
    log_keys: ClassVar[tuple] = ()  #: metrics worth the console line of every epoch (e.g. IAAT's mean radius)
    #: attacks sub-batches of data-dependent size (a compiled model then needs dynamic shapes)
    varying_batches: ClassVar[bool] = False

    eps: float = size(LINF_EPS)
    step_size: Optional[float] = size(None)
    steps: int = 10
    norm: str = "linf"
    random_start: bool = True
    num_train: Optional[int] = None
    epochs: Optional[int] = None
    attack_dtype: Optional[torch.dtype] = None
    compiled: bool = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f.name if f.name in BASE_FIELDS else f"method.{f.name}"
            value = check_type(getattr(self, f.name), hints[f.name], where)
            # NaN never; inf only where a field says so (GAIR's lambdas)
            if isinstance(value, float) and not math.isfinite(value) and not (
                    math.isinf(value) and f.metadata.get("infinite")):
                raise ConfigError(f"{where} must be a number, got nan." if math.isnan(value) else
                                  f"{where} must be finite, got {value}.")
            setattr(self, f.name, value)
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"norm must be 'linf' or 'l2', got {self.norm!r}.")
        check_autocast_dtype(self.attack_dtype, "attack_dtype")
        for f in dataclasses.fields(self):
            if f.metadata.get("size") and getattr(self, f.name) is not None:
                setattr(self, f.name, check_size(getattr(self, f.name), f.name, norm=self.norm))
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}.")
        if self.step_size is None:
            self.step_size = default_step_size(self.eps, self.steps)
        elif self.step_size == 0 and self.steps > 0:
            raise ConfigError("step_size must be positive: a step of 0 leaves the attack at its random start.")
        for key in ("num_train", "epochs"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}.")
        self.epoch: Optional[int] = None  #: set by start_epoch
        self._input_checked = self._model_checked = self._notes_taken = False

    # -- what a training loop calls ----------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Call before each epoch's first batch, with the 0-based epoch number."""
        epoch = python_scalar(epoch)  # torch.tensor(2), np.int64(2)
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ConfigError(f"start_epoch takes the 0-based epoch number (a whole number >= 0), got {epoch!r}.")
        self.epoch = int(epoch)
        if not self._notes_taken:  # a loop of one's own learns what the trainer prints when it starts
            for note in self.take_notes():
                warnings.warn(note, stacklevel=2)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The batch's training loss (scalar) for images ``x`` in [0, 1], labels ``y``, training-set ``index``."""
        return self.compute(model, x, y, index).loss

    def compute(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> StepOutput:
        """The batch's loss together with the logits it came from and per-sample statistics (sums)."""
        return self.objective(model, x, y, index)(model)

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  index: Optional[torch.Tensor] = None) -> Objective:
        """Attack the batch once; return its training loss as a function of the weights (an :data:`Objective`).

        Example:
            >>> import iaat, torch
            >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
            >>> objective = iaat.PGDAT(eps=8 / 255, steps=3).objective(model, torch.rand(4, 3, 8, 8),
            ...                                                        torch.tensor([0, 1, 2, 3]))
            >>> out = objective(model)  # the loss at the current weights; call again at others (AWP)
            >>> out.loss.backward()
        """
        self._check_call(x, y, index)
        y = y.long()  # int32 labels (numpy's, a collated array's) as the losses and per-sample writes take them
        if not self._model_checked and len(x):  # once: logits, and labels below their number (eval mode, no grad:
            with torch.no_grad(), attack_mode(model, inputs=x) as plain:  # no BatchNorm update, no random draw)
                check_logits(plain(x), y, labels=True)
            self._model_checked = True
        self.follow(x.device)
        return self.prepare(model, x, y, index)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                index: Optional[torch.Tensor]) -> Objective:
        """The method itself (subclasses): attack ``x`` with ``model``, update per-sample state, and return the
        loss at those training examples as a function of the weights. Called after the inputs were checked.
        The objective may be called more than once (AWP calls it at perturbed weights first); each call
        returns a fresh :class:`StepOutput`, and what it writes to per-sample state the last call decides."""
        raise NotImplementedError

    def end_epoch(self) -> dict:
        """Host-side numbers after an epoch (sizes in [0, 1] units), e.g. IAAT's radius statistics."""
        return {}

    def epoch_arrays(self) -> dict[str, torch.Tensor]:
        """Per-sample arrays to keep after every epoch (the trainer writes ``RUN/<key>/epoch_NNNN.npy``)."""
        return {}

    def notes(self) -> list[str]:
        """Lines worth printing when training starts (e.g. a warmup radius other than ``eps``); subclasses add
        theirs to these."""
        if self.norm == "l2" and self.eps == LINF_EPS:
            return [f"{self.name or type(self).__name__}: eps {format_size(self.eps)} under l2 is the L-inf default; "
                    f"L2 radii are larger (CIFAR-10's usual: 0.5, i.e. 127.5/255)"]
        return []

    def take_notes(self) -> list[str]:
        """:meth:`notes`, for a loop that prints them itself (the trainer): the first :meth:`start_epoch` then
        does not warn them again, as it does where nobody took them."""
        self._notes_taken = True
        return self.notes()

    def own_params(self) -> dict:
        """This method's own keyword arguments and their values ([0, 1] units), without the attack's."""
        return {f.name: getattr(self, f.name) for f in own_fields(type(self))}

    # -- per-sample state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The per-sample state (e.g. IAAT's radius memory), as CPU tensors."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def to(self, device: torch.device) -> "Method":
        """Move the per-sample state to ``device`` (returns ``self``)."""
        for key, value in list(vars(self).items()):
            if torch.is_tensor(value):
                setattr(self, key, value.to(device))
        return self

    def follow(self, device: torch.device) -> None:
        """Have the per-sample state on the batches' ``device`` (a loop that moves the model and data to a GPU
        after building the method); methods without per-sample state do nothing."""

    def merge_ranks(self, info: Any) -> None:
        """Under torchrun, after an epoch (or before a mid-epoch checkpoint): make the per-sample state that
        each rank updated for its own samples identical on every rank (see :func:`iaat.distributed.merge_rows`).
        ``info`` is the :class:`~iaat.distributed.DistInfo`; methods without per-sample state do nothing."""

    # -- helpers of the adversarial methods --------------------------------------------------------------
    def attack_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Any = None,
                     steps: Optional[int] = None, step_size: Any = None, **kwargs: Any) -> AttackResult:
        """Run the shared PGD kernel with the training attack's settings (overridable per call); the inputs were
        checked on the first batch (:meth:`objective`), so the step stays free of host syncs."""
        if isinstance(eps, (int, float)) and self.norm == "linf" and eps > 1:  # a key of one's own method, most likely
            raise ConfigError(f"{type(self).__name__}.attack_batch got eps={eps:g}, larger than 1: the kernel takes "
                              f"sizes in [0, 1] units. A method's key that holds a size is declared with "
                              f"iaat.size(default), which converts a config's pixel units (4 means 4/255); a plain "
                              f"float key is taken as written.")
        return pgd(model, x, y, self.eps if eps is None else eps, steps=self.steps if steps is None else steps,
                   step_size=self.step_size if step_size is None else step_size, norm=self.norm,
                   random_start=self.random_start, autocast_dtype=self.attack_dtype, compiled=self.compiled,
                   check_inputs=False, **kwargs)

    def _check_call(self, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor]) -> None:
        who = type(self).__name__
        if self.needs_epoch and self.epoch is None:
            raise ConfigError(f"{who}.loss was called before start_epoch: call method.start_epoch(epoch) before each "
                              f"epoch's first batch ({who} changes with the epoch, e.g. warmup and schedules).")
        if not (torch.is_tensor(x) and torch.is_tensor(y) and x.ndim >= 2 and y.shape == (len(x),)):
            raise ConfigError(f"{who}.loss takes images x of shape (B, C, H, W) and labels y of shape (B,), got "
                              f"{_shape(x)} and {_shape(y)}.")
        if not len(x):  # a Python int: no host sync. Else a NaN loss (a mean over nothing) or a crash in a method
            raise ConfigError(f"{who}.loss got an empty batch (0 images): a training loss needs at least one image; "
                              f"skip empty batches.")
        if index is None:
            if self.needs_index:
                raise ConfigError(f"{who} keeps state per training sample and needs each sample's index: call "
                                  f"loss(model, x, y, index); iaat.IndexedDataset(dataset) makes a DataLoader yield "
                                  f"(x, y, index).")
        elif not torch.is_tensor(index) or index.shape != y.shape:
            raise ConfigError(f"index must be a tensor of shape ({len(y)},) (one position per sample), got "
                              f"{_shape(index)}.")
        check_batch_types(x, y, f"{who}.loss")
        if not self._input_checked and len(x):  # once: a host sync; the usual mistake shows on the first batch
            check_batch_values(x, y, f"{who}.loss")
            self._input_checked = True


def _shape(t: Any) -> str:
    return f"shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__


BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(Method))
COMPAT_MODES = ("none", "authors")


@dataclass(kw_only=True)
class CompatParams:
    """The key of methods that document deliberate differences from their authors' code (IAAT, GAIRAT)."""

    compat: str = "none"  #: none | authors: compute exactly as the authors' code, differences included

    def check_compat(self) -> None:
        if self.compat not in COMPAT_MODES:
            raise ConfigError(f"method.compat must be none or authors, got {self.compat!r}.")


def refuse_unless(params: Any, applies: bool, setting: str, keys: tuple) -> None:
    """Refuse ``keys`` of ``params`` (a method or a dataclass of its keys) set to other than their defaults while
    ``setting``, the one they apply with, is off: such a key would have no effect, silently."""
    if applies:
        return
    defaults = {f.name: field_default(f) for f in dataclasses.fields(params)}
    changed = [key for key in keys if getattr(params, key) != defaults[key]]
    if changed:
        raise ConfigError(f"method.{changed[0]} applies with method.{setting} only and has no effect without it; set "
                          f"that too, or drop {', '.join('method.' + key for key in changed)}.")


def own_fields(cls: type) -> list:
    """The dataclass fields a method adds to the base's: its own config keys, those it declares itself first
    (then those of its mixins, e.g. IAAT's GAIR keys)."""
    fields = [f for f in dataclasses.fields(cls) if f.name not in BASE_FIELDS]
    declared = set(cls.__dict__.get("__annotations__", {}))
    return [f for f in fields if f.name in declared] + [f for f in fields if f.name not in declared]
