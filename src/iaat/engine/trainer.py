"""The method-agnostic training loop.

Per step: loader → (x, y, idx) on the device → ``method.loss`` (which calls the PGD
kernel) → optimiser step. Per epoch: held-out evaluation (clean + PGD-k), one JSON line
in ``metrics.jsonl``, an atomic checkpoint with the full state (model, optimiser,
schedule, AMP scaler, method state, every RNG state, epoch). On the CPU a resumed run
ends bitwise equal to an uninterrupted one with the same seed.

Stopping: SIGINT/SIGTERM finish the current step, save the exact mid-epoch state to
``checkpoints/interrupt.pt`` and raise :class:`~iaat.errors.TrainingInterrupted`; a
resumed run replays the epoch's batch order up to that step and continues from there.
A NaN/inf loss stops the run without saving anything.

Under ``torchrun`` (see :mod:`iaat.distributed`) the same loop runs on every rank with the
model in DistributedDataParallel; ``train.batch_size`` is the global batch, rank 0 alone
writes files, and the ranks agree after every step on whether to stop.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import distributed
from ..config import Config
from ..data import DeviceLoader
from ..data.folder import FolderImages, FolderLoader
from ..errors import CheckpointError, ConfigError, IaatError, OutputError, TrainingInterrupted
from ..evaluation import AttackSpec, evaluate
from ..methods import AttackSettings, Method, build_method
from . import rundir
from .checkpoint import (checkpoint_path, interrupt_path, latest_valid, prune, remove_checkpoint, resume_point,
                         save_checkpoint)
from .rng import rng_state, seed_everything, set_rng_state
from .schedule import lr_at
from .setup import (attack_autocast_dtype, autocast_context, autocast_dtype, compile_model, load_model_state,
                    model_from_config, prepare_data, prepare_model, resolve_device)


def _to_host(stats: dict, n: int) -> dict:
    return {k: (v.item() if torch.is_tensor(v) else v) / max(n, 1) for k, v in stats.items()}


@contextlib.contextmanager
def deterministic_cuda(enabled: bool) -> Iterator[None]:
    """``train.deterministic`` on CUDA: deterministic kernels only, no cuDNN autotuning; restored afterwards.

    ``CUBLAS_WORKSPACE_CONFIG`` must be set before cuBLAS makes its first handle, i.e. before any
    CUDA matmul of the process, which is why this wraps the whole of :func:`train`.
    """
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


class StopOnSignal:
    """SIGINT/SIGTERM handlers (main thread only) that ask the training loop to stop after the current step.

    A second signal stops at once by raising :class:`TrainingInterrupted` wherever the loop is
    (checkpoint writes are atomic, so the last checkpoint stays intact). The previous handlers
    are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, resume_hint: str, escalate: bool = True) -> None:
        self.signum: Optional[int] = None
        self.resume_hint = resume_hint
        # Under torchrun a Ctrl-C reaches each worker twice (from the terminal and forwarded by the agent),
        # so there a repeated signal does not escalate; the agent kills workers that do not stop in time.
        self.escalate = escalate
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and not self.escalate:
            return
        if self.signum is not None:
            raise TrainingInterrupted(f"interrupted again ({name}): stopped at once without saving the current "
                                      f"step; the last checkpoint is intact; {self.resume_hint}", signum)
        self.signum = signum
        # os.write, not print: a handler may run in the middle of a print to the same stream.
        os.write(2, f"iaat: {name} received; stopping after the current step (send it again to stop at "
                    f"once)\n".encode())


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

    def state_dict(self, seconds: float) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "first_bad": self.first_bad,
                "n_seen": self.n_seen, "seconds": seconds, "stats": dict(self.stats)}

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


def _check_finite(sums: _EpochSums, epoch: int, ckpt_dir: Path, bar: tqdm,
                  info: distributed.DistInfo = distributed.SINGLE) -> None:
    bad = int(distributed.all_reduce_(sums.first_bad.clone(), info, "max"))
    if bad > 0:
        bar.close()
        raise IaatError(f"the training loss became NaN/inf at epoch {epoch + 1}, step {bad}; stopping "
                        f"without saving. The last good checkpoint in {ckpt_dir} is intact. Try a "
                        f"lower learning rate or train.amp=off.")


def _check_resume_data(ckpt: dict, path: Path, cfg: Config, data) -> None:
    """The checkpoint must come from this method and data (``--data-dir`` may change on resume)."""
    if ckpt.get("method_name") != cfg.method.name:
        raise CheckpointError(f"{path} was written by method '{ckpt.get('method_name')}', "
                              f"but this run uses '{cfg.method.name}'.")
    info = ckpt.get("data") or {}
    now = {"num_classes": data.splits.num_classes, "image_shape": list(data.splits.image_shape),
           "train_size": len(data.train)}
    for key, value in now.items():
        if key in info and info[key] != value:
            raise CheckpointError(f"{path} was trained on data with {key} {info[key]}, but the data now has "
                                  f"{value}; resume with the data the run started with (check --data-dir).")


def train(cfg: Config, run_dir: Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); returns the last metrics row.

    Everything that can fail on user input (data, model, method, existing folder) is
    checked before the run folder is created or touched.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM, after saving the state (see the module docstring).
        IaatError: on bad input, a non-finite loss, or a failed write (:class:`~iaat.errors.OutputError`).
    """
    run_dir = Path(run_dir)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info, dist_device = distributed.init(cfg.train.device)
    try:
        if resume:
            rundir.check_resumable(run_dir)
        else:
            rundir.check_new_run_dir(run_dir)
        distributed.barrier(info)  # every rank has looked at the folder before rank 0 creates it
        device = dist_device or resolve_device(cfg.train.device)
        with deterministic_cuda(cfg.train.deterministic and device.type == "cuda"):
            return _train(cfg, run_dir, resume, log if info.is_main else (lambda _: None), device, info)
    except Exception as e:
        if cfg.train.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"train.compile: torch.compile failed ({type(e).__name__}: {first[:300]}). Set "
                              f"train.compile=false (on CPU it needs a working C++ compiler); resume with "
                              f"--resume --set train.compile=false.") from None
        raise
    finally:
        if owns_group:
            distributed.shutdown()


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


def build_step(cfg: Config, data, device: torch.device, info: distributed.DistInfo = distributed.SINGLE
               ) -> tuple[torch.nn.Module, torch.nn.Module, Method]:
    """The model and method of a run, set up as the training step uses them.

    Returns ``(model, net, method)``: ``model`` on the device in its ``train.channels_last`` layout
    (checkpoints and validation use it), ``net`` the module the training loss and the attacks run
    through (``model`` compiled with ``train.compile``, in DistributedDataParallel under torchrun;
    same weights), and the method with the attack's precision from ``train.attack_amp``. The step
    itself is ``with autocast_context(device, cfg.train.amp)(): method.loss(net, x, y, idx)``.
    """
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (it relies on gradient scaling); use bf16 or off.")
    if cfg.train.attack_amp == "fp16" and device.type == "cpu":
        raise ConfigError("train.attack_amp=fp16 is for GPUs: CPUs without fp16 arithmetic run it many times slower "
                          "than fp32 (25x on this project's 2-core test machine); use bf16 or off on the CPU.")
    model = model_from_config(cfg, data.splits)
    if info.enabled and cfg.train.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_model(model, cfg, device)
    attack = AttackSettings.from_config(cfg, attack_autocast_dtype(cfg))
    method = build_method(cfg.method.name, cfg.method.params, attack, len(data.train), data.splits.num_classes, device)
    method.total_epochs = cfg.train.epochs
    net = _wrap_ddp(compile_model(model, cfg), info, device)  # same initial weights everywhere: seeds, DDP broadcast
    return model, net, method


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % (2**63 - 1)


def _train(cfg: Config, run_dir: Path, resume: bool, log: Callable[[str], None], device: torch.device,
           info: distributed.DistInfo = distributed.SINGLE) -> dict:
    _check_distributed(cfg, info, device)
    seed_everything(cfg.train.seed)
    data = prepare_data(cfg)
    model, net, method = build_step(cfg, data, device, info)
    amp_dtype = autocast_dtype(cfg.train.amp)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    loader_cls = FolderLoader if isinstance(data.train.x, FolderImages) else DeviceLoader
    loader = loader_cls(data.train, cfg.train.batch_size, device, shuffle=True, augment=cfg.data.augment,
                        seed=cfg.train.seed, shard=(info.rank, info.world_size) if info.enabled else None)
    global_sizes = loader.global_batch_sizes()
    if info.rank > 0:  # different random starts on every rank (rank 0 keeps the 1-process stream)
        seed_everything(_rank_seed(cfg.train.seed, info.rank, 0))

    start_epoch, start_step, global_step, partial = 0, 0, 0, None
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    if resume:
        path, ckpt = resume_point(ckpt_dir)
        if ckpt is not None:
            _check_resume_data(ckpt, path, cfg, data)
            load_model_state(model, ckpt["model"], str(path), cfg.model.name, ckpt.get("model_name", "?"))
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            method.load_state_dict(ckpt["method"])
            start_epoch, global_step = ckpt["epoch"], ckpt["global_step"]
            start_step, partial = int(ckpt.get("step", 0)), ckpt.get("partial")
            _restore_rng(ckpt, cfg, info, start_epoch, log)
            buffers = ckpt.get("buffers_ranks")
            if buffers is not None and len(buffers) == info.world_size:
                for name, buf in model.named_buffers():
                    buf.copy_(buffers[info.rank][name])
            if info.rank > 0:
                partial = None  # rank 0's saved sums are the whole job's
            where = f"epoch {start_epoch + 1} step {start_step}" if start_step else f"epoch {start_epoch} done"
            log(f"resuming {run_dir} from {path.name} ({where})")
        else:
            log(f"no checkpoint in {ckpt_dir} yet; starting {run_dir} from epoch 1")
        distributed.barrier(info)  # every rank has read the checkpoint before rank 0 tidies the folder
        if info.is_main:
            rundir.prepare_resume(run_dir)
            if not (run_dir / rundir.SPLIT).is_file():  # a first start killed before writing it
                rundir.write_split(run_dir, data.train_indices.numpy(), data.val_indices.numpy())
            rundir.truncate_metrics(run_dir, start_epoch)
    elif info.is_main:
        rundir.create_run_dir(run_dir, cfg)
        rundir.write_split(run_dir, data.train_indices.numpy(), data.val_indices.numpy())
    distributed.barrier(info)

    epochs = cfg.train.epochs
    steps_per_epoch = len(loader)
    amp_ctx = autocast_context(device, cfg.train.amp)
    eval_spec = AttackSpec(cfg.eps, cfg.train.eval_steps, 1, cfg.step_size, cfg.attack.norm)
    last_row: dict = {}
    if start_epoch >= epochs:
        log(f"{run_dir} already finished {start_epoch} epochs (asked for {epochs}); nothing to do.")
        rows = rundir.read_metrics(run_dir)
        return rows[-1] if rows else {}

    def payload(epoch_done: int, lr: float) -> dict:
        """The checkpoint (a collective under torchrun: every rank's RNG state goes in)."""
        rng = rng_state()
        ranks = distributed.gather_objects(rng, info)
        return {
            "iaat_version": __version__,
            "epoch": epoch_done,
            "global_step": global_step,
            "model_name": cfg.model.name,
            "method_name": cfg.method.name,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"schedule": cfg.optim.schedule, "lr": lr},  # the LR is a pure function of progress
            "scaler": scaler.state_dict(),
            "method": method.state_dict(),
            "rng": rng,
            **({"rng_ranks": ranks, "world_size": info.world_size} if info.enabled else {}),
            "config": cfg.to_dict(),
            "data": {"dataset": cfg.data.dataset, "num_classes": data.splits.num_classes,
                     "image_shape": list(data.splits.image_shape),
                     "train_size": len(data.train), "source": data.splits.source},
        }

    launcher = "torchrun ... -m iaat train" if info.enabled else "iaat train"
    with StopOnSignal(f"resume with {launcher} --out {shlex.quote(str(run_dir))} --resume",
                      escalate=not info.enabled) as stop:
        for epoch in range(start_epoch, epochs):
            skip = start_step if epoch == start_epoch else 0
            t0 = time.perf_counter()
            method.start_epoch(epoch)
            model.train()
            sums = _EpochSums.from_state(partial, device) if skip and partial else _EpochSums.zeros(device)
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (cfg.train.progress and info.is_main), leave=False, unit="batch",
                       dynamic_ncols=True)
            lr = lr_at(cfg.optim, epoch, epochs, cfg.train.batch_size)
            for step, (x, y, idx) in enumerate(loader.epoch(epoch, skip), start=skip):
                lr = lr_at(cfg.optim, epoch + step / steps_per_epoch, epochs, cfg.train.batch_size)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with amp_ctx():
                    out = method.loss(net, x, y, idx)
                loss_to_step = out.loss
                if info.enabled:  # DDP averages over ranks; weigh each rank by its share of the global batch
                    loss_to_step = out.loss * (info.world_size * len(y) / global_sizes[step])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss_to_step).backward()
                scaler.step(optimizer)
                scaler.update()
                global_step += 1

                b = len(y)
                sums.n_seen += b
                loss = out.loss.detach().float()
                # Device-side bookkeeping only; the host reads it once per log interval.
                sums.first_bad = torch.where((sums.first_bad < 0) & ~torch.isfinite(loss),
                                             torch.full_like(sums.first_bad, step + 1), sums.first_bad)
                sums.loss_sum += loss * b
                sums.correct += (out.logits.detach().argmax(1) == y).sum()
                for k, v in out.stats.items():
                    sums.stats[k] = sums.stats.get(k, 0) + v.detach()
                if distributed.any_rank(stop.signum is not None, info, device):
                    _check_finite(sums, epoch, ckpt_dir, bar, info)
                    bar.close()
                    method.merge_ranks(info)
                    sums.reduce(info)
                    state = payload(epoch, lr)
                    if info.enabled:  # mid-epoch the ranks' BatchNorm statistics differ (each saw its own batches)
                        state["buffers_ranks"] = distributed.gather_objects(
                            {k: v.detach().cpu() for k, v in model.named_buffers()}, info)
                    state["step"] = step + 1  # steps done in epoch `epoch` (0-based); the next one is step + 1
                    state["partial"] = sums.state_dict(sums.seconds + time.perf_counter() - t0)
                    ipath = interrupt_path(ckpt_dir)
                    if info.is_main:
                        save_checkpoint(ipath, state)
                    distributed.barrier(info)  # nobody exits (and makes torchrun stop the rest) before it is saved
                    raise TrainingInterrupted(f"interrupted ({stop.name}) at epoch {epoch + 1} step {step + 1} of "
                                              f"{steps_per_epoch}; state saved to {ipath}; {stop.resume_hint}",
                                              stop.signum)
                if (step + 1) % cfg.train.log_interval == 0 or step + 1 == steps_per_epoch:
                    _check_finite(sums, epoch, ckpt_dir, bar, info)
                    bar.set_postfix(loss=f"{sums.loss_sum.item() / sums.n_seen:.3f}",
                                    acc=f"{sums.correct.item() / sums.n_seen:.3f}", lr=f"{lr:.4g}")
                bar.update(1)
            bar.close()
            train_seconds = sums.seconds + time.perf_counter() - t0
            method.merge_ranks(info)  # every rank holds the full per-sample state from here on
            distributed.broadcast_buffers(model, info)  # rank 0's BatchNorm statistics are the model's
            sums.reduce(info)
            n_seen = sums.n_seen

            row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums.loss_sum.item() / max(n_seen, 1),
                   "train_acc": sums.correct.item() / max(n_seen, 1), **{f"train_{k}": v for k, v in
                                                                        _to_host(sums.stats, n_seen).items()}}
            try:
                row.update(method.end_epoch(epoch, run_dir if info.is_main else None))
            except OSError as e:  # a method's own files (e.g. IAAT's radii); atomic writes raise OutputError
                raise OutputError(f"could not write the {cfg.method.name} files of epoch {epoch + 1} in {run_dir}: "
                                  f"{e}. Is the disk full or the folder read-only?") from None
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
                if len(data.val) > 0:
                    clean, robust = _validate(model, data.val, eval_spec, cfg, device, amp_dtype, info)
                    row["val_clean_acc"] = clean
                    row[f"val_pgd{cfg.train.eval_steps}_acc"] = robust
            row["train_seconds"] = train_seconds
            row["images_per_second"] = n_seen / train_seconds if train_seconds > 0 else None
            row["seconds"] = time.perf_counter() - t0

            # Metrics first, then the checkpoint: a crash in between leaves a row that resuming drops; a failed
            # checkpoint write takes the row back so metrics.jsonl never runs ahead of the checkpoints.
            state = payload(epoch + 1, lr)
            path = checkpoint_path(ckpt_dir, epoch + 1)
            if info.is_main:
                size = rundir.metrics_size(run_dir)
                rundir.append_metrics(run_dir, row)
                try:
                    save_checkpoint(path, state)
                except BaseException:
                    rundir.rollback_metrics(run_dir, size)
                    raise
                remove_checkpoint(interrupt_path(ckpt_dir))  # now older than the newest epoch checkpoint
                prune(ckpt_dir, cfg.train.keep_checkpoints)
            distributed.barrier(info)
            log(_format_row(row))
            last_row = row
            if distributed.any_rank(stop.signum is not None, info, device) and epoch + 1 < epochs:
                raise TrainingInterrupted(f"interrupted ({stop.name}) after epoch {epoch + 1}; state saved to "
                                          f"{path}; {stop.resume_hint}", stop.signum)

    if info.is_main:
        rundir.write_json(run_dir / rundir.SUMMARY, {"epochs": epochs, "last": last_row})
    distributed.barrier(info)
    return last_row


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


def _validate(model: torch.nn.Module, val, spec: AttackSpec, cfg: Config, device: torch.device,
              amp_dtype: Optional[torch.dtype], info: distributed.DistInfo) -> tuple[float, float]:
    """Held-out clean and PGD accuracy; under torchrun each rank evaluates every world_size-th image."""
    part = val.subset(torch.arange(info.rank, len(val), info.world_size)) if info.enabled else val
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    if len(part) > 0:
        res = evaluate(model, part, [spec], batch_size=max(256, cfg.train.batch_size), device=device,
                       progress=cfg.train.progress and info.is_main, desc="val", autocast_dtype=amp_dtype)
        counts += torch.tensor([res["clean"], res["attacks"][spec.label]["accuracy"]], dtype=torch.float64,
                               device=device) * len(part)
    distributed.all_reduce_(counts, info)
    clean, robust = (counts / len(val)).tolist()
    return clean, robust


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key in ("train_loss", "train_acc"):
        parts.append(f"{key} {row[key]:.4f}")
    for key, value in row.items():
        if key.startswith("val_") and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    if row.get("images_per_second"):
        parts.append(f"{row['images_per_second']:.0f} img/s")
    return " | ".join(parts)


def load_run_config(path: Path) -> Config:
    """The config of a run folder (its config.yaml) or of a checkpoint file, without building the model."""
    from ..config import config_from_dict, load_yaml
    from .checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir():
        if not (path / rundir.CONFIG).is_file():
            raise CheckpointError(f"{path} is not a run folder: no {rundir.CONFIG} in it.")
        return config_from_dict(load_yaml(path / rundir.CONFIG))
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file).")
    return config_from_dict(load_checkpoint(path)["config"])


def load_run(path: Path, device: Optional[torch.device] = None):
    """Load the model of a run folder (its newest valid checkpoint) or of one checkpoint file.

    Returns ``(model, cfg, checkpoint_path, checkpoint)``, the model in eval mode on ``device``.
    """
    from ..config import config_from_dict, load_yaml
    from ..models import build_model
    from .checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir():
        cfg_path = path / rundir.CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} is not a run folder: no {rundir.CONFIG} in it.")
        ckpt_path, ckpt = latest_valid(path / rundir.CHECKPOINTS)
        if ckpt is None:
            raise CheckpointError(f"no valid checkpoint in {path / rundir.CHECKPOINTS}.")
        cfg = config_from_dict(load_yaml(cfg_path))
    elif path.exists():
        ckpt_path, ckpt = path, load_checkpoint(path)
        cfg = config_from_dict(ckpt["config"])
    else:
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file).")
    info = ckpt.get("data", {})
    channels = (info.get("image_shape") or [3])[0]
    # Normalisation constants are buffers in the state dict, so placeholders are overwritten on load.
    model = build_model(cfg.model.name, info.get("num_classes", 10), channels, depth=cfg.model.depth,
                        width=cfg.model.width)
    load_model_state(model, ckpt["model"], str(ckpt_path), cfg.model.name, ckpt.get("model_name", "?"))
    model.to(device or torch.device("cpu")).eval()
    return model, cfg, ckpt_path, ckpt
