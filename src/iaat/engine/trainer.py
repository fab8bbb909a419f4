"""The method-agnostic training loop.

Per step (:func:`_train_epoch`, one screen): loader → (x, y, idx) on the device →
:func:`forward_backward` (``method.objective``, which calls the PGD kernel; with ``train.awp`` the
weights perturbed; the loss; backward; the weights restored) → optimiser step → EMA update. Per epoch
(:func:`_end_epoch`): held-out evaluation (clean + PGD-k), one JSON line in ``metrics.jsonl``, the
method's per-sample arrays, an atomic checkpoint with the full state (model, optimiser, schedule,
AMP scaler, method state, every RNG state, epoch). On the CPU a resumed run ends bitwise equal to
an uninterrupted one with the same seed.

Stopping: SIGINT/SIGTERM finish the current step, save the exact mid-epoch state to
``checkpoints/interrupt.pt`` (:func:`_save_interrupt`) and raise
:class:`~iaat.errors.TrainingInterrupted`; a resumed run (:func:`_restore`) replays the epoch's batch
order up to that step and continues from there. A NaN/inf loss stops the run without saving anything.

Under ``torchrun`` (see :mod:`iaat.distributed`) the same loop runs on every rank with the
model in DistributedDataParallel; ``train.batch_size`` is the global batch, rank 0 alone
writes files, and the ranks agree after every step on whether to stop.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import distributed
from ..attacks.pgd import attack_mode, check_logits
from ..awp import AWP, awp_settings
from ..config import Config, build_method
from ..config import notes as config_notes
from ..data import DeviceLoader
from ..data.loader import BatchPlan
from ..data.folder import FolderImages, FolderLoader
from ..errors import CheckpointError, ConfigError, IaatError, TrainingInterrupted, first_line
from ..ema import EMA
from ..evaluation.attacks import AttackSpec
from ..evaluation.checks import outputs_are_probabilities
from ..evaluation.robustness import accuracy
from ..methods import Method
from ..methods.base import StepOutput
from ..models.registry import architecture
from ..models.state import load_model_state
from ..units import format_size
from . import rundir
from .checkpoint import (checkpoint_path, interrupt_path, newest_epoch, prune, remove_checkpoint, resume_point,
                         save_checkpoint)
from .rng import rng_state, seed_everything, set_rng_state

from .board import Board, require_tensorboard
from .schedule import lr_at
from .setup import (attack_autocast_dtype, autocast_context, autocast_dtype, choose_threads, compile_model,
                    deterministic_cuda, model_from_config, prepare_data, prepare_model, resolve_device, split_notes)
from .stopping import StopOnSignal


def train(cfg: Config, run_dir: Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); returns the last metrics row.

    Everything that can fail on user input (data, model, method, existing folder) is
    checked before the run folder is created or touched. A resume may change only
    ``config.RESUMABLE_KEYS`` (epochs, device, threads, the data's folder, ...) from the
    run's ``config.yaml``; any other change is refused.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM, after saving the state (see the module docstring).
        IaatError: on bad input, a non-finite loss, or a failed write (:class:`~iaat.errors.OutputError`).
    """
    run_dir = Path(run_dir)
    threads_before = torch.get_num_threads()  # a caller's process gets its own count back
    # and its random streams (a search over runs draws from them between runs); not a torchrun worker's, whose
    # process ends with the run
    rng_before = rng_state() if "WORLD_SIZE" not in os.environ else None
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info, dist_device = distributed.init(cfg.train.device)
    try:
        if resume:
            rundir.check_resumable(run_dir)
            note = rundir.check_resume_config(run_dir, cfg)
            if note and info.is_main:
                warnings.warn(note, stacklevel=2)
        else:
            rundir.check_new_run_dir(run_dir)
        distributed.barrier(info)  # every rank has looked at the folder before rank 0 creates it
        device = dist_device or resolve_device(cfg.train.device)
        # train.threads (None: all cores, or one on a busy machine); config.yaml records the count it ran with
        on_cpu = device.type == "cpu" and "WORLD_SIZE" not in os.environ  # torchrun's ranks keep their own
        notes: list[str] = []  # the busy-machine note waits until the setup's checks have passed
        cfg = replace(cfg, train=replace(cfg.train, threads=choose_threads(cfg.train.threads, on_cpu, notes.append)),
                      data=replace(cfg.data, data_dir=_anchored(cfg.data.data_dir)))
        with deterministic_cuda(cfg.train.deterministic and device.type == "cuda"):
            return _train(cfg, run_dir, resume, log if info.is_main else (lambda _: None), device, info, notes)
    except Exception as e:
        if cfg.train.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise ConfigError(f"train.compile: torch.compile failed ({type(e).__name__}: {first_line(e, 300)}). Set "
                              f"train.compile=false (on CPU it needs a working C++ compiler); resume with "
                              f"--resume --set train.compile=false.") from None
        raise
    finally:
        torch.set_num_threads(threads_before)
        if rng_before is not None:
            set_rng_state(rng_before)
        if owns_group:
            distributed.shutdown()


def build_step(cfg: Config, data, device: torch.device, info: distributed.DistInfo = distributed.SINGLE
               ) -> tuple[torch.nn.Module, torch.nn.Module, Method]:
    """The model and method of a run, set up as the training step uses them.

    Returns ``(model, net, method)``: ``model`` on the device in its ``train.channels_last`` layout
    (checkpoints and validation use it), ``net`` the module the training loss and the attacks run
    through (``model`` compiled with ``train.compile``, in DistributedDataParallel under torchrun;
    same weights), and the method with the attack's precision from ``train.attack_amp``. The step
    itself is ``with autocast_context(device, cfg.train.amp)(): method.compute(net, x, y, idx)``.
    """
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (it relies on gradient scaling); use bf16 or off.")
    if cfg.train.attack_amp == "fp16" and device.type == "cpu":
        raise ConfigError("train.attack_amp=fp16 is for GPUs: CPUs without fp16 arithmetic run it many times slower "
                          "than fp32 (see the README's fast-path section); use bf16 or off on the CPU.")
    model = model_from_config(cfg, data.splits)
    if info.enabled and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_model(model, cfg, device)
    method = build_method(cfg, len(data.train), attack_dtype=attack_autocast_dtype(cfg),
                          compiled=cfg.train.compile).to(device)
    shapes = None if method.varying_batches else False  # see compile_model
    # same initial weights everywhere: seeds, DDP broadcast
    net = _wrap_ddp(compile_model(model, cfg, dynamic=shapes), info, device)
    return model, net, method


@dataclass
class _EpochSums:
    """What an epoch accumulates on the device; saved in a mid-epoch checkpoint to finish the epoch exactly."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    first_bad: torch.Tensor  #: 1-based step of the first non-finite loss, -1 while all are finite
    n_seen: int = 0
    seconds: float = 0.0  #: training time spent in this epoch before the last interruption
    stats: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, device: torch.device) -> "_EpochSums":
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device),
                   torch.full((), -1, dtype=torch.long, device=device))

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "_EpochSums":
        return cls(state["loss_sum"].to(device), state["correct"].to(device), state["first_bad"].to(device),
                   int(state["n_seen"]), float(state["seconds"]), {k: v.to(device) for k, v in state["stats"].items()})

    @staticmethod
    def zeroed(state: dict) -> dict:
        """``state`` with nothing counted yet but its statistics' names and types."""
        return {**state, "loss_sum": torch.zeros_like(state["loss_sum"]), "correct": torch.zeros_like(state["correct"]),
                "first_bad": torch.full_like(state["first_bad"], -1), "n_seen": 0,
                "stats": {k: torch.zeros_like(torch.as_tensor(v)) for k, v in state["stats"].items()}}

    def state_dict(self, seconds: float) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "first_bad": self.first_bad,
                "n_seen": self.n_seen, "seconds": seconds, "stats": dict(self.stats)}

    def add(self, out: Any, y: torch.Tensor, step: int) -> None:
        """One step's loss, accuracy and method statistics; device-side only (the host reads them rarely)."""
        b = len(y)
        self.n_seen += b
        loss = out.loss.detach().float()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss),
                                     torch.full_like(self.first_bad, step + 1), self.first_bad)
        self.loss_sum += loss * b
        self.correct += (out.logits.detach().argmax(1) == y).sum()
        for k, v in out.stats.items():
            self.stats[k] = self.stats.get(k, 0) + v.detach()

    def reduce(self, info: distributed.DistInfo) -> None:
        """Sum over ranks in place (the sums of the whole global batch; a collective, all ranks call it)."""
        if not info.enabled:
            return
        distributed.all_reduce_(self.loss_sum, info)
        distributed.all_reduce_(self.correct, info)
        distributed.all_reduce_(self.first_bad, info, "max")
        n = torch.tensor([self.n_seen], dtype=torch.long, device=self.loss_sum.device)
        self.n_seen = int(distributed.all_reduce_(n, info).item())
        for key in sorted(self.stats):
            self.stats[key] = distributed.all_reduce_(torch.as_tensor(self.stats[key]).clone(), info)


@dataclass
class _Session:
    """Everything one training run holds while it runs."""

    cfg: Config
    run_dir: Path
    device: torch.device
    info: distributed.DistInfo
    log: Callable[[str], None]
    data: Any
    model: torch.nn.Module  #: the weights (checkpoints and validation use it)
    net: torch.nn.Module  #: what the step runs through: model, compiled and/or in DistributedDataParallel
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Any
    global_sizes: list  #: images per step of the global batch (a rank's share of the loss weighs by it)
    global_step: int = 0
    start_epoch: int = 0
    start_step: int = 0  #: steps of start_epoch already done (a mid-epoch resume)
    partial: Optional[dict] = None  #: the interrupted epoch's sums
    board: Optional[Board] = None  #: TensorBoard event files (train.tensorboard, rank 0)
    ema: Optional[EMA] = None  #: averaged weights (train.ema)
    awp: Optional[AWP] = None  #: adversarial weight perturbation (train.awp)
    config_saved: bool = True  #: config.yaml says what this session runs with (a resume rewrites it at its first save)
    held_out_pending: bool = False  #: a signal cut the held-out evaluation of the newest checkpointed epoch short

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / rundir.CHECKPOINTS

    def set_lr(self, progress: float) -> float:
        lr = lr_at(self.cfg.optim, progress, self.cfg.train.epochs, self.cfg.train.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def _anchored(data_dir: Optional[str]) -> Optional[str]:
    """A relative data folder as an absolute path, so that the run's config.yaml finds it from any working
    directory (eval, report, resume); ``~/...`` stays as written, for the home directory of whoever reads it."""
    if not data_dir or data_dir.startswith("~") or os.path.isabs(data_dir):  # "" (like None): the default root
        return data_dir
    return os.path.abspath(data_dir)


def _train(cfg: Config, run_dir: Path, resume: bool, log: Callable[[str], None], device: torch.device,
           info: distributed.DistInfo = distributed.SINGLE, notes: Sequence[str] = ()) -> dict:
    s = _setup(cfg, run_dir, device, info, log)
    if not resume and cfg.train.init_from:
        _init_from(s, Path(cfg.train.init_from))
    if resume:
        _refuse_restart(s)  # before the lock, which would add its file
    # one training per run folder: a second (a re-queued job, a resume while a sweep trains it) would write the
    # same epochs twice
    with rundir.exclusive(run_dir) if info.is_main else contextlib.nullcontext():
        if resume:
            _restore(s)
        elif info.is_main:
            rundir.check_new_run_dir(run_dir)  # again, now that no other training can start in it meanwhile
            rundir.create_run_dir(run_dir, cfg)
            rundir.write_split(run_dir, s.data.train_indices.numpy(), s.data.val_indices.numpy())
        distributed.barrier(info)
        return _run(s, notes)


def _run(s: _Session, notes: Sequence[str]) -> dict:
    """The epochs from where the run stands, then summary.json; returns the last metrics row."""
    cfg, run_dir, info, device, log = s.cfg, s.run_dir, s.info, s.device, s.log
    if s.start_epoch >= cfg.train.epochs and not s.held_out_pending:
        log(f"{run_dir} already finished {s.start_epoch} epochs (asked for {cfg.train.epochs}); nothing to do.")
        rows = rundir.read_metrics(run_dir)
        return rows[-1] if rows else {}
    log(_summary(s))
    for note in [*notes, *config_notes(cfg), *split_notes(cfg, s.data), *s.method.take_notes()]:
        log(note)
    if cfg.train.tensorboard and info.is_main:
        s.board = Board(run_dir, purge_step=s.start_epoch + 1)

    last_row: dict = {}
    launcher = "torchrun ... -m iaat train" if info.enabled else "iaat train"
    with StopOnSignal(f"resume with {launcher} --out {shlex.quote(str(run_dir))} --resume",
                      escalate=not info.enabled) as stop:
        if s.held_out_pending:
            last_row = _complete_held_out(s, stop)
        for epoch in range(s.start_epoch, cfg.train.epochs):
            first = s.start_step if epoch == s.start_epoch else 0
            t0 = time.perf_counter()
            resumed = first and s.partial
            sums = _EpochSums.from_state(s.partial, device) if resumed else _EpochSums.zeros(device)
            lr = _train_epoch(s, epoch, first, sums, stop, t0)
            last_row = _end_epoch(s, epoch, sums, lr, t0, stop)
            # the last epoch's signal too, where it cut the held-out evaluation short: the run is not finished
            if stop.agreed(info, device) and (
                    epoch + 1 < cfg.train.epochs or s.held_out_pending):
                raise TrainingInterrupted(f"interrupted ({stop.name}) after epoch {epoch + 1}; state saved to "
                                          f"{checkpoint_path(s.ckpt_dir, epoch + 1)}; {stop.resume_hint}", stop.signum)
    if info.is_main:
        rundir.write_json(run_dir / rundir.SUMMARY, {"epochs": cfg.train.epochs, "last": last_row})
    if s.board is not None:
        s.board.close()
    distributed.barrier(info)
    return last_row


def _train_epoch(s: _Session, epoch: int, first_step: int, sums: _EpochSums, stop: StopOnSignal, t0: float) -> float:
    """Train one epoch from step ``first_step``; returns the last learning rate."""
    cfg, method, optimizer, scaler = s.cfg, s.method, s.optimizer, s.scaler
    steps = len(s.loader)
    amp = autocast_context(s.device, cfg.train.amp)
    method.start_epoch(epoch)
    s.model.train()
    bar = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not (cfg.train.progress and s.info.is_main), unit="batch", dynamic_ncols=True)
    lr = lr_at(cfg.optim, epoch, cfg.train.epochs, cfg.train.batch_size)
    for step, (x, y, idx) in enumerate(s.loader.epoch(epoch, first_step), start=first_step):
        lr = s.set_lr(epoch + step / steps)
        optimizer.zero_grad(set_to_none=True)
        backward = functools.partial(_backward, s, scaler, len(y), step)
        out = forward_backward(method, s.net, x, y, idx, amp, s.awp if s.awp and s.awp.active(epoch) else None,
                               backward)
        scaler.step(optimizer)
        scaler.update()
        if s.ema is not None:
            s.ema.update(s.model)
        s.global_step += 1
        sums.add(out, y, step)
        if stop.agreed(s.info, s.device):
            _save_interrupt(s, epoch, step, sums, lr, stop, bar, t0)
        if (step + 1) % min(cfg.train.log_interval, max(1, steps // 10)) == 0 or step + 1 == steps:
            _check_finite(s, sums, epoch, bar)
            bar.set_postfix(loss=f"{sums.loss_sum.item() / sums.n_seen:.3f}",
                            acc=f"{sums.correct.item() / sums.n_seen:.3f}", lr=f"{lr:.4g}")
        bar.update(1)
    bar.close()
    return lr


def forward_backward(method: Method, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                     amp: Callable, awp: Optional[AWP], backward: Callable[[torch.Tensor], None]) -> StepOutput:
    """One step up to the optimiser: the method's attack and loss under ``amp()``, then ``backward(loss)``; with
    ``awp``, the forward and backward run at the perturbed weights, which are back in place when this returns."""
    restore = None
    try:
        with amp():
            objective = method.objective(net, x, y, idx)
            if awp is not None:  # the ascent pass is no training step: no DDP all-reduce for it
                restore = awp.perturb(objective, distributed.unwrap(net))
            out = objective(net)
        backward(out.loss)
    finally:
        if restore is not None:  # back to w before the optimiser step (and before any checkpoint)
            restore()
    return out


def _backward(s: _Session, scaler: torch.amp.GradScaler, batch: int, step: int, loss: torch.Tensor) -> None:
    scaler.scale(_rank_share(s, loss, batch, step)).backward()


def _rank_share(s: _Session, loss: torch.Tensor, batch: int, step: int) -> torch.Tensor:
    """Under torchrun DDP averages over ranks: weigh each rank's loss by its share of the global batch."""
    if not s.info.enabled:
        return loss
    return loss * (s.info.world_size * batch / s.global_sizes[step])


def _end_epoch(s: _Session, epoch: int, sums: _EpochSums, lr: float, t0: float, stop: StopOnSignal) -> dict:
    """Merge the ranks, evaluate, then write the metrics row, the method's arrays and the epoch checkpoint."""
    cfg, info = s.cfg, s.info
    train_seconds = sums.seconds + time.perf_counter() - t0
    s.method.merge_ranks(info)  # every rank holds the full per-sample state from here on
    distributed.broadcast_buffers(s.model, info)  # rank 0's BatchNorm statistics are the model's
    if s.ema is not None:
        distributed.broadcast_buffers(s.ema.module, info)
    sums.reduce(info)
    n = max(sums.n_seen, 1)
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums.loss_sum.item() / n, "train_acc": sums.correct.item() / n,
           **{f"train_{k}": (v.item() if torch.is_tensor(v) else v) / n for k, v in sums.stats.items()},
           **s.method.end_epoch()}
    due = ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs) and len(s.data.val) > 0
    s.held_out_pending = due and not _held_out(s, epoch, stop, row)
    if s.held_out_pending:
        s.log(f"iaat: the held-out evaluation of epoch {epoch + 1} was cut short ({stop.name}); it runs when the "
              f"run resumes")
    row["train_seconds"] = train_seconds
    row["images_per_second"] = sums.n_seen / train_seconds if train_seconds > 0 else None
    row["seconds"] = time.perf_counter() - t0

    # Arrays and metrics first, then the checkpoint: a crash in between leaves a row that resuming drops; a failed
    # checkpoint write takes the row back so metrics.jsonl never runs ahead of the checkpoints.
    state = {**_payload(s, epoch + 1, lr), "held_out_pending": s.held_out_pending}
    if info.is_main:
        arrays = s.method.epoch_arrays()
        rundir.write_epoch_arrays(s.run_dir, epoch + 1, arrays)
        if s.board is not None:
            s.board.epoch(epoch + 1, row, arrays)
        size = rundir.metrics_size(s.run_dir)
        rundir.append_metrics(s.run_dir, row)
        try:
            save_checkpoint(checkpoint_path(s.ckpt_dir, epoch + 1), state)
        except BaseException:
            rundir.rollback_metrics(s.run_dir, size)
            raise
        _save_config(s)
        remove_checkpoint(interrupt_path(s.ckpt_dir))  # now older than the newest epoch checkpoint
        prune(s.ckpt_dir, cfg.train.keep_checkpoints)
    distributed.barrier(info)
    s.log(_format_row(row, s.method.log_keys))
    return row


def _refuse_restart(s: _Session) -> None:
    """A run without checkpoints whose records say it trained epochs (its checkpoints were deleted or moved):
    starting over would erase those records. A first epoch cut between its metrics row and its checkpoint leaves
    one row and no checkpoint, and starts over as before."""
    run_dir = s.run_dir
    if newest_epoch(s.ckpt_dir) is not None or interrupt_path(s.ckpt_dir).is_file():
        return
    done = max((r["epoch"] for r in rundir.read_metrics(run_dir) if isinstance(r.get("epoch"), int)), default=0)
    if done > 1 or (run_dir / rundir.SUMMARY).is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint in {rundir.CHECKPOINTS}/, but its metrics.jsonl or "
                              f"summary.json record {done} trained epoch{'s' * (done != 1)}: resuming would start "
                              f"over and erase them. Restore the checkpoints, or train into a new --out. Nothing "
                              f"was changed.")


def _held_out(s: _Session, epoch: int, stop: StopOnSignal, row: dict) -> bool:
    """Put the held-out accuracies of the model (and of its average) after ``epoch`` into ``row``; False where a
    signal cut the evaluation short."""
    for prefix, model in (("", s.model), ("ema_", s.ema.module if s.ema is not None else None)):
        if model is None:
            continue
        held_out = _validate(s, epoch, stop, model)
        if held_out is None:
            return False
        row[f"{prefix}val_clean_acc"], row[f"{prefix}val_pgd{s.cfg.train.eval_steps}_acc"] = held_out
    return True


def _complete_held_out(s: _Session, stop: StopOnSignal) -> dict:
    """The held-out evaluation a signal cut short at the end of the epoch this run resumes after, run again from the
    weights it ended with (its own random stream: the numbers an uninterrupted run logged) and written into that
    epoch's row of metrics.jsonl."""
    epoch = s.start_epoch
    row = next((r for r in rundir.read_metrics(s.run_dir) if r.get("epoch") == epoch), {"epoch": epoch})
    if not _held_out(s, epoch - 1, stop, row):
        raise TrainingInterrupted(f"interrupted ({stop.name}) in the held-out evaluation of epoch {epoch}; "
                                  f"{stop.resume_hint}", stop.signum)
    if s.info.is_main:
        rundir.replace_metrics_row(s.run_dir, row)
        if s.board is not None:  # the epoch's other numbers reached the board before the cut
            s.board.epoch(epoch, {k: v for k, v in row.items() if "val_" in k}, {})
    s.held_out_pending = False
    s.log(f"the held-out evaluation of epoch {epoch}, cut short before: " + _format_row(row, s.method.log_keys))
    return row


def _setup(cfg: Config, run_dir: Path, device: torch.device, info: distributed.DistInfo,
           log: Callable[[str], None]) -> _Session:
    """Data, model, method, optimiser and loader, in the order that fixes the random streams of a seed."""
    _check_distributed(cfg, info, device)
    if cfg.train.tensorboard:
        require_tensorboard()  # before anything is written
    seed_everything(cfg.train.seed)
    data = prepare_data(cfg)
    if info.enabled and len(data.train) < 2 * info.world_size:  # a rank with one image (or none) breaks BatchNorm
        raise ConfigError(f"the training set has {len(data.train)} image(s), too few to give each of the "
                          f"{info.world_size} processes 2; train on more (data.train_subset) or on fewer processes.")
    model, net, method = build_step(cfg, data, device, info)
    _probe_model(model, data, device, warn=info.is_main)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    loader_cls = FolderLoader if isinstance(data.train.x, FolderImages) else DeviceLoader
    loader = loader_cls(data.train, cfg.train.batch_size, device, shuffle=True, augment=cfg.data.augment,
                        seed=cfg.train.seed, shard=(info.rank, info.world_size) if info.enabled else None)
    if info.rank > 0:  # different random starts on every rank (rank 0 keeps the 1-process stream)
        seed_everything(_rank_seed(cfg.train.seed, info.rank, 0))
    return _Session(cfg, run_dir, device, info, log, data, model, net, method, optimizer, scaler, loader,
                    loader.global_batch_sizes(), ema=EMA(model, cfg.train.ema) if cfg.train.ema else None,
                    awp=build_awp(cfg, model, scaler))


def _probe_model(model: torch.nn.Module, data, device: torch.device, warn: bool = True) -> None:
    """Classify two training images before anything is written: a model that cannot take the data set's images or
    gives another number of logits than it has classes is an error naming the mismatch (eval mode, no gradient: no
    statistic changes and no random number is drawn)."""
    from ..data import to_unit

    if not len(data.train):
        return
    x = to_unit(data.train.x[:2], device)
    shape, classes = tuple(x.shape[1:]), data.splits.num_classes
    try:
        with torch.no_grad(), attack_mode(model, inputs=x) as plain:
            logits = plain(x)
    except (RuntimeError, ValueError) as e:
        if isinstance(e, (torch.cuda.OutOfMemoryError, ConfigError)):
            raise
        raise ConfigError(f"the model fails on the data set's images of shape {shape} ({type(e).__name__}: "
                          f"{first_line(e, 200)}); check that it takes {shape[0]}-channel {shape[1]}x{shape[2]} "
                          f"images.") from None
    check_logits(logits, torch.zeros(len(x), dtype=torch.long), labels=False)
    if logits.shape[1] != classes:
        raise ConfigError(f"the model gives {logits.shape[1]} logits per image, but the data set has {classes} "
                          f"classes: it needs one logit per class (a factory is called with num_classes={classes} "
                          f"where it takes that argument).")
    if warn and outputs_are_probabilities(logits):
        warnings.warn("the model's outputs look like probabilities (each row in [0, 1], summing to 1), not logits: "
                      "the training losses and attacks take logits, and cross-entropy on probabilities gives them "
                      "little gradient; remove the model's final softmax.", stacklevel=2)


def build_awp(cfg: Config, model: torch.nn.Module, scaler: Optional[torch.amp.GradScaler] = None) -> Optional[AWP]:
    """The run's adversarial weight perturbation of ``model`` (train.awp, train.awp_warmup), or None."""
    if cfg.train.awp is None:
        return None
    gamma, warmup = awp_settings(cfg.train.awp, cfg.train.awp_warmup, cfg.method.name,
                                 cfg.method.params.get("train_loss", "ce"))
    return AWP(model, gamma, warmup, scaler)


def _restore(s: _Session) -> None:
    """Continue from the newest valid checkpoint (an interrupt.pt mid-epoch, else an epoch checkpoint)."""
    cfg, info = s.cfg, s.info
    path, ckpt = resume_point(s.ckpt_dir)
    if ckpt is not None:
        _check_resume_data(ckpt, path, cfg, s.data)
        _check_resume_split(s)
        load_model_state(s.model, ckpt["model"], str(path), cfg.model.name, ckpt.get("model_name", "?"))
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.scaler.load_state_dict(ckpt["scaler"])
        s.method.load_state_dict(ckpt["method"])
        if s.ema is not None:
            s.ema.load_state_dict(ckpt, str(path))
        s.start_epoch, s.global_step = ckpt["epoch"], ckpt["global_step"]
        s.start_step, s.partial = int(ckpt.get("step", 0)), ckpt.get("partial")
        if s.start_step:
            _check_batch_plan(s, int(ckpt.get("world_size", 1)), path)
            _check_batch_draws(s, ckpt, path)
        s.held_out_pending = bool(ckpt.get("held_out_pending")) and not s.start_step
        _restore_rng(ckpt, cfg, info, s.start_epoch, s.log)
        buffers = ckpt.get("buffers_ranks")
        if buffers is not None and len(buffers) == info.world_size:
            for name, buf in s.model.named_buffers():
                buf.copy_(buffers[info.rank][name])
        if info.rank > 0 and s.partial is not None:  # rank 0's saved sums are the whole job's; the others count
            s.partial = _EpochSums.zeroed(s.partial)  # from 0, with the same statistics: all reduce the same keys
        where = f"epoch {s.start_epoch + 1} step {s.start_step}" if s.start_step else f"epoch {s.start_epoch} done"
        s.log(f"resuming {s.run_dir} from {path.name} ({where})")
    else:
        s.log(f"no checkpoint in {s.ckpt_dir} yet; starting {s.run_dir} from epoch 1")
    distributed.barrier(info)  # every rank has read the checkpoint before rank 0 tidies the folder
    if info.is_main:
        rundir.prepare_resume(s.run_dir)
        s.config_saved = False
        if not (s.run_dir / rundir.SPLIT).is_file():  # a first start killed before writing it
            rundir.write_split(s.run_dir, s.data.train_indices.numpy(), s.data.val_indices.numpy())
        rundir.truncate_metrics(s.run_dir, s.start_epoch)


def _init_from(s: _Session, path: Path) -> None:
    """Start from other weights (train.init_from): a run, a checkpoint, an exported model of this architecture."""
    from ..models.files import file_format, load_exported
    from .runs import load_run

    with torch.random.fork_rng(devices=[]):  # rebuilding a model draws its initial weights: not from the run's stream
        if file_format(path) in ("run", "checkpoint"):
            source, cfg, _, _ = load_run(path)
            meta = {"architecture": {"name": cfg.model.name, "depth": cfg.model.depth, "width": cfg.model.width}}
        else:
            source, meta = load_exported(path)
    arch = meta.get("architecture") or {}
    m = s.cfg.model
    theirs = architecture(arch.get("name"), arch.get("depth"), arch.get("width"))
    ours = architecture(m.name, m.depth, m.width)
    if arch and theirs != ours:
        raise CheckpointError(f"train.init_from {path} holds a {_architecture(*theirs)} but this run trains a "
                              f"{_architecture(*ours)}; set --model (and model.depth/width) to the same architecture.")
    load_model_state(s.model, source.state_dict(), str(path), m.name, arch.get("name", "?"))
    if s.ema is not None:  # the average starts from the weights it starts from
        s.ema = EMA(s.model, s.cfg.train.ema)
    s.log(f"starting from the weights of {path}")


def _summary(s: _Session) -> str:
    """One line that says what this run trains, on what, and how (before the first epoch)."""
    cfg = s.cfg
    method = cfg.method.name + (f" ({', '.join(f'{k}={v}' for k, v in cfg.method.params.items())})"
                                if cfg.method.params else "")
    attack = (f"PGD-{cfg.attack.steps} {cfg.attack.norm} eps {format_size(cfg.eps)} step "
              f"{format_size(cfg.step_size)}") if cfg.method.name != "clean" else "no attack"
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n != 1 else ''}" if s.device.type == "cpu" else ""
    return (f"training {method} | {cfg.model.name} on {cfg.data.dataset}: {len(s.data.train):,} images, "
            f"{len(s.data.val):,} held out | {attack}\n  {cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''} "
            f"of {len(s.loader)} steps, batch "
            f"{cfg.train.batch_size}, lr {cfg.optim.lr:g} {cfg.optim.schedule}"
            f"{f', weight average (EMA) {cfg.train.ema:g}' if cfg.train.ema else ''}{_awp_summary(s.awp)} | "
            f"{s.device}{threads} | {s.run_dir} "
            f"(every setting: iaat train ... --print-config)")


def _awp_summary(awp: Optional[AWP]) -> str:
    if awp is None:
        return ""
    start = f" from epoch {awp.warmup_epochs + 1}" if awp.warmup_epochs else ""
    return f", weight perturbation (AWP) gamma {awp.gamma:g}{start}"


def _architecture(name: str, depth: Optional[int], width: Optional[int]) -> str:
    return name + (f" of depth {depth}" if depth else "") + (f" of width {width}" if width else "")


def _payload(s: _Session, epoch_done: int, lr: float) -> dict:
    """The checkpoint (a collective under torchrun: every rank's RNG state goes in)."""
    cfg, info, data = s.cfg, s.info, s.data
    rng = rng_state()
    ranks = distributed.gather_objects(rng, info)
    return {
        "iaat_version": __version__,
        "epoch": epoch_done,
        "global_step": s.global_step,
        "model_name": cfg.model.name,
        "method_name": cfg.method.name,
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": {"schedule": cfg.optim.schedule, "lr": lr},  # the LR is a pure function of progress
        "scaler": s.scaler.state_dict(),
        "method": s.method.state_dict(),
        **(s.ema.state_dict() if s.ema is not None else {}),
        "rng": rng,
        **({"rng_ranks": ranks, "world_size": info.world_size} if info.enabled else {}),
        "config": cfg.to_dict(),
        "data": {"dataset": cfg.data.dataset, **_data_facts(data), "source": data.splits.source},
        "batch_draws": "cpu",  # the loader's order, crops and flips (drawn on a GPU before this key was written)
    }


def _save_interrupt(s: _Session, epoch: int, step: int, sums: _EpochSums, lr: float, stop: StopOnSignal, bar: tqdm,
                    t0: float) -> None:
    """A signal arrived: save the exact state after ``step`` to interrupt.pt, then raise TrainingInterrupted."""
    info = s.info
    _check_finite(s, sums, epoch, bar)
    bar.close()
    s.method.merge_ranks(info)
    sums.reduce(info)
    state = _payload(s, epoch, lr)
    if info.enabled:  # mid-epoch the ranks' BatchNorm statistics differ (each saw its own batches)
        state["buffers_ranks"] = distributed.gather_objects(
            {k: v.detach().cpu() for k, v in s.model.named_buffers()}, info)
    state["step"] = step + 1  # steps done in epoch `epoch` (0-based); the next one is step + 1
    state["partial"] = sums.state_dict(sums.seconds + time.perf_counter() - t0)
    path = interrupt_path(s.ckpt_dir)
    if info.is_main:
        save_checkpoint(path, state)
        stop.saved()
        _save_config(s)
    distributed.barrier(info)  # nobody exits (and makes torchrun stop the rest) before it is saved
    raise TrainingInterrupted(f"interrupted ({stop.name}) at epoch {epoch + 1} step {step + 1} of {len(s.loader)}; "
                              f"state saved to {path}; {stop.resume_hint}", stop.signum)


def _save_config(s: _Session) -> None:
    """After a resumed run's first checkpoint, rewrite config.yaml with what the resume changed (epochs, threads,
    ...): after it, so that a resume that fails before it leaves the folder as it was."""
    if not s.config_saved:
        rundir.write_config(s.run_dir, s.cfg)
        s.config_saved = True


def _check_finite(s: _Session, sums: _EpochSums, epoch: int, bar: tqdm) -> None:
    bad = int(distributed.all_reduce_(sums.first_bad.clone(), s.info, "max"))
    if bad > 0:
        bar.close()
        saved = (f"The last good checkpoint in {s.ckpt_dir} is intact." if newest_epoch(s.ckpt_dir) is not None
                 else "No checkpoint had been written yet.")
        raise IaatError(f"the training loss became NaN/inf at epoch {epoch + 1}, step {bad}; stopping "
                        f"without saving. {saved} Try a lower learning rate or train.amp=off (or check the "
                        f"method's settings).")


def _data_facts(data) -> dict:
    """What a checkpoint records of its data and a resume must find again (class names where the data has them;
    the training labels in the order of the per-sample state, which another copy of the data in another image order
    would change)."""
    labels = hashlib.sha256(data.train.y.cpu().numpy().astype("<i8").tobytes()).hexdigest()[:16]
    return {"num_classes": data.splits.num_classes, "image_shape": list(data.splits.image_shape),
            "train_size": len(data.train), "train_labels_sha256": labels,
            **({"classes": data.splits.classes} if data.splits.classes else {})}


def _check_resume_data(ckpt: dict, path: Path, cfg: Config, data) -> None:
    """The checkpoint must come from this method and data (``--data-dir`` may change on resume)."""
    if ckpt.get("method_name") != cfg.method.name:
        raise CheckpointError(f"{path} was written by method '{ckpt.get('method_name')}', "
                              f"but this run uses '{cfg.method.name}'.")
    info = ckpt.get("data") or {}
    for key, value in _data_facts(data).items():
        if key in info and info[key] != value:
            raise CheckpointError(f"{path} was trained on data with {key} {info[key]}, but the data now has "
                                  f"{value}; resume with the data the run started with (check --data-dir).")


def _check_resume_split(s: _Session) -> None:
    """The training images, in the order of the per-sample state, must be those the run started with: another
    split (other split keys, or another torch drawing it) would give each radius to another image. (A copy of the
    data in another image order changes the checkpoint's training-label digest: :func:`_check_resume_data`.)"""
    if not (s.run_dir / rundir.SPLIT).is_file():  # a first start killed before writing it
        return
    saved = rundir.read_train_indices(s.run_dir)
    now = s.data.train_indices.numpy()
    if saved.shape != now.shape or not (saved == now).all():
        raise CheckpointError(f"the training images drawn now differ from those in {s.run_dir / rundir.SPLIT}, "
                              f"which the run's per-sample state follows: resume with the data the run started "
                              f"with (check --data-dir) and the same data.split_seed, val_size and train_subset.")


def _check_distributed(cfg: Config, info: distributed.DistInfo, device: torch.device) -> None:
    if not info.enabled:
        return
    if cfg.train.batch_size < 2 * info.world_size:
        raise ConfigError(f"train.batch_size is the global batch: {cfg.train.batch_size} cannot give each of the "
                          f"{info.world_size} processes 2 images or more; raise it to >= {2 * info.world_size}.")
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA (torch.nn.SyncBatchNorm has no CPU implementation); "
                          "drop it for gloo/CPU runs.")


def _wrap_ddp(model: torch.nn.Module, info: distributed.DistInfo, device: torch.device) -> torch.nn.Module:
    """The model the training loss runs through: DistributedDataParallel over ``model`` under torchrun."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _check_batch_plan(s: _Session, saved_world: int, path: Path) -> None:
    """A mid-epoch resume on another number of processes continues the epoch's batches only where both cut it
    alike: a last batch under 2 images per process is folded into the one before, so the plans may differ."""
    plan = BatchPlan(len(s.data.train), s.cfg.train.batch_size, torch.device("cpu"),
                     shard=(0, saved_world) if saved_world > 1 else None)
    if saved_world == s.info.world_size or plan.global_batch_sizes() == s.global_sizes:
        return
    raise CheckpointError(f"{path} stopped epoch {s.start_epoch + 1} after step {s.start_step} of its batches for "
                          f"{saved_world} process(es); with {s.info.world_size} the epoch is cut into other batches "
                          f"(its last one, under 2 images per process, folds into the one before), so going on would "
                          f"skip or repeat images. Resume with {saved_world} process(es), or {_from_epoch_start(s, path)}.")


def _from_epoch_start(s: _Session, path: Path) -> str:
    """The other way on from a mid-epoch checkpoint that cannot be continued: from the epoch's start."""
    back = f"resume from the end of epoch {s.start_epoch}" if s.start_epoch else "start the run over"
    return f"remove {path} to {back} (its {s.start_step} steps are then trained again)"


def _check_batch_draws(s: _Session, ckpt: dict, path: Path) -> None:
    """A mid-epoch checkpoint of a GPU run from before the loader drew its batches on the CPU: the rest of that
    epoch would follow another order (repeating some images, skipping others)."""
    if "batch_draws" in ckpt or "cuda" not in ckpt.get("rng", {}) or ckpt["config"]["train"]["device"] == "cpu":
        return
    raise CheckpointError(f"{path} stopped epoch {s.start_epoch + 1} after step {s.start_step} of batches that an "
                          f"earlier iaat drew on the GPU; this one draws them on the CPU, so going on would skip or "
                          f"repeat images: {_from_epoch_start(s, path)}.")


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % (2**63 - 1)


def _restore_rng(ckpt: dict, cfg: Config, info: distributed.DistInfo, epoch: int, log: Callable[[str], None]) -> None:
    """This rank's RNG state from a checkpoint; exact when the number of processes is the same as when saved."""
    ranks = ckpt.get("rng_ranks")
    saved_world = int(ckpt.get("world_size", 1))
    if ranks is not None and len(ranks) == info.world_size:
        set_rng_state(ranks[info.rank])
        return
    set_rng_state(ckpt["rng"])
    if saved_world != info.world_size:
        log(f"note: the checkpoint was written by {saved_world} process(es), this run has {info.world_size}: data "
            f"order and the epsilon memory carry over, the random streams of the attacks do not (not bitwise "
            f"equal to an uninterrupted run).")
    if info.rank > 0:
        seed_everything(_rank_seed(cfg.train.seed, info.rank, epoch))


def _validate(s: _Session, epoch: int, stop: StopOnSignal, model: torch.nn.Module) -> Optional[tuple[float, float]]:
    """Held-out clean and PGD accuracy of ``model`` (the run's, or its averaged copy); under torchrun each rank
    evaluates every world_size-th image.

    A signal ends it after the current batch (``None``: skipped); under torchrun on every rank, once the ranks
    meet at its end (a signal may reach some of them only, which then wait for the others' shares). Its attacks
    draw from a random stream of their own, so the training's stream is the same whether it ran to the end,
    stopped early or was skipped.
    """
    devices = [s.device.index if s.device.index is not None else torch.cuda.current_device()] \
        if s.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_rank_seed(s.cfg.train.seed + 1, s.info.rank, epoch))
        return _held_out_accuracy(s, stop, model)


def _held_out_accuracy(s: _Session, stop: StopOnSignal, model: torch.nn.Module) -> Optional[tuple[float, float]]:
    cfg, info, val, device = s.cfg, s.info, s.data.val, s.device
    spec = AttackSpec(cfg.eps, cfg.train.eval_steps, 1, cfg.step_size, cfg.attack.norm)
    part = val.subset(torch.arange(info.rank, len(val), info.world_size)) if info.enabled else val
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    # small batches on a CPU: faster there (they stay in cache) and a Ctrl-C waits for one batch only
    batch_size = max(256, cfg.train.batch_size) if device.type == "cuda" else 64
    res: Optional[dict] = {}
    if len(part) > 0:
        res = accuracy(model, part, [spec], batch_size=batch_size, device=device,
                       progress=cfg.train.progress and info.is_main, desc="val",
                       autocast_dtype=autocast_dtype(cfg.train.amp), stop=lambda: stop.signum is not None)
        if res is not None:
            counts += torch.tensor([res["clean"], res["attacks"][spec.label]["accuracy"]], dtype=torch.float64,
                                   device=device) * len(part)
    # Under torchrun the ranks meet here, each with its share done or cut after a batch by a signal (torchrun's
    # agent kills them 30 s after forwarding one): a cut on any rank, which a signal may reach alone, skips the
    # numbers on all of them
    cut = stop.agreed(info, device) if info.enabled else res is None
    if cut:
        return None
    distributed.all_reduce_(counts, info)
    clean, robust = (counts / len(val)).tolist()
    return clean, robust


def _format_row(row: dict, method_keys: tuple = ()) -> str:
    """The console line of an epoch: losses, the method's key numbers (sizes over 255), held-out accuracy."""
    parts = [f"epoch {row['epoch']}"]
    for key in ("train_loss", "train_acc"):
        if key in row:  # a row rebuilt from a lost line holds only what was evaluated again
            parts.append(f"{key} {row[key]:.4f}")
    for key in method_keys:
        if isinstance(row.get(key), (int, float)):
            value = row[key]
            parts.append(f"{key} {format_size(value)}" if "radius" in key else f"{key} {value:.4g}")
    for key, value in row.items():
        if key.startswith(("val_", "ema_val_")) and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    if row.get("images_per_second"):
        parts.append(f"{row['images_per_second']:.0f} img/s")
    return " | ".join(parts)
