"""The method interface the trainer talks to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..attacks import AttackResult, pgd


@dataclass(frozen=True)
class AttackSettings:
    """The training attack in [0, 1] units, parsed from the config's ``attack`` section."""

    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    autocast_dtype: Optional[torch.dtype] = None  #: the attacks' precision (``train.attack_amp``)
    compiled: bool = False  #: the torch.compile'd PGD update (``train.compile``)

    @classmethod
    def from_config(cls, cfg: Any, autocast_dtype: Optional[torch.dtype] = None) -> "AttackSettings":
        a = cfg.attack
        return cls(a.norm, cfg.eps, cfg.step_size, a.steps, a.random_start, autocast_dtype, cfg.train.compile)


@dataclass
class StepOutput:
    """One batch's loss for the optimiser plus what the trainer logs.

    Attributes:
        loss: scalar to backpropagate.
        logits: logits of the inputs the model was trained on (train accuracy).
        stats: per-batch *sums* of per-sample quantities on the device, e.g. ``{"eps": eps.sum()}``;
            the trainer divides by the sample count at the end of the epoch.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    stats: dict = field(default_factory=dict)


class Method:
    """Base class of a training method.

    Subclasses set ``name``, optionally a ``Params`` dataclass for their own config keys, and
    implement :meth:`loss`. Per-sample state (e.g. IAAT's epsilon memory) lives on the method
    and goes through :meth:`state_dict` into every checkpoint.
    """

    name: ClassVar[str] = ""

    @dataclass
    class Params:
        pass

    def __init__(self, params: Any, attack: AttackSettings, num_train: int, num_classes: int,
                 device: torch.device) -> None:
        self.params = params
        self.attack = attack
        self.num_train = num_train
        self.num_classes = num_classes
        self.device = device
        self.epoch = 0
        self.total_epochs: Optional[int] = None  #: set by the trainer (schedules over the whole run need it)

    @classmethod
    def parse_params(cls, raw: dict) -> Any:
        """Validate the config's ``method`` keys (besides ``name``) into ``cls.Params``."""
        from ..config import _build_section
        from ..errors import ConfigError

        if raw and not dataclasses.fields(cls.Params):
            raise ConfigError(f"method '{cls.name}' takes no parameters, got {', '.join(sorted(raw))}.")
        return _build_section(cls.Params, raw or {}, "method")

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""
        self.epoch = epoch

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def end_epoch(self, epoch: int, run_dir: Optional[Path]) -> dict:
        """Host-side metrics for ``metrics.jsonl`` after epoch ``epoch`` (0-based); may write files to run_dir."""
        return {}

    def merge_ranks(self, info: Any) -> None:
        """Under torchrun, after an epoch (or before a mid-epoch checkpoint): make the per-sample state that
        each rank updated for its own samples identical on every rank (see :func:`iaat.distributed.merge_rows`).
        ``info`` is the :class:`~iaat.distributed.DistInfo`; methods without per-sample state do nothing."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # Helpers shared by the adversarial methods.
    def attack_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Any = None,
                     steps: Optional[int] = None, step_size: Any = None, **kwargs: Any) -> AttackResult:
        """Run the shared PGD kernel with the training attack's settings (overridable per call)."""
        a = self.attack
        return pgd(model, x, y, a.eps if eps is None else eps, steps=a.steps if steps is None else steps,
                   step_size=a.step_size if step_size is None else step_size, norm=a.norm,
                   random_start=a.random_start, autocast_dtype=a.autocast_dtype, compiled=a.compiled, **kwargs)


def params_dict(params: Any) -> dict:
    return dataclasses.asdict(params)
