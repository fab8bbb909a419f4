"""Data-parallel training under ``torchrun``: process group, ranks, and the few collectives the trainer needs.

``iaat train`` started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process
group torchrun describes: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the
CPU. Everything here is a no-op for a single process, so the trainer calls these helpers
unconditionally and a 1-process run is the same program as before.

What stays consistent across ranks, and how:

* data: every rank draws the same epoch permutation; each global batch is split between the
  ranks (see :class:`~iaat.data.DeviceLoader`), so ``train.batch_size`` is the *global* batch;
* gradients: DistributedDataParallel averages them; the trainer scales each rank's loss by
  its share of the global batch, so the update equals the 1-process update on that batch;
* per-sample state (IAAT's epsilon memory): each rank updates the samples it saw and
  :func:`merge_rows` gives every rank the full state at the end of the epoch;
* files: only rank 0 writes run files and checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def env_world() -> DistInfo:
    """The job layout torchrun put in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}.")
    return DistInfo(rank, world, local)


def init(device_name: str) -> tuple[DistInfo, Optional[torch.device]]:
    """Join torchrun's process group if there is one; returns the layout and this rank's device.

    ``device_name`` is ``train.device``: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when CUDA
    is available (backend NCCL); ``cpu`` uses gloo. The device is ``None`` when not distributed
    (the caller resolves it as usual).
    """
    info = env_world()
    if not info.enabled:
        return info, None
    if dist.is_initialized():  # e.g. a launcher that already set it up
        return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank), _device(device_name, info)
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun.")
    device = _device(device_name, info)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # DistributedDataParallel imports torch._dynamo on first use; imported after the group exists, dynamo
    # keeps references to it (torch 2.13), so destroy_process_group() would not free it: its gloo threads
    # would live into interpreter shutdown, where one can abort the process (SIGABRT after a finished run).
    importlib.import_module("torch._dynamo")  # not `import torch._dynamo`: that would make `torch` local here
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            **({"device_id": device} if device.type == "cuda" else {}))
    return info, device


def _device(name: str, info: DistInfo) -> torch.device:
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                              f"visible; use --nproc_per_node <= {torch.cuda.device_count()}.")
        return torch.device("cuda", info.local_rank)
    if name in ("auto", "cpu"):
        return torch.device("cpu")
    if name == "cuda":
        raise ConfigError("device 'cuda' requested but CUDA is not available here; use --device cpu.")
    raise ConfigError(f"under torchrun use --device auto, cuda or cpu (each process takes cuda:LOCAL_RANK); "
                      f"got '{name}'.")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over ranks; returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def largest(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest of every rank's ``value`` (one small collective; a host sync)."""
    if not info.enabled:
        return value
    t = torch.tensor([int(value)], device=device)
    return int(all_reduce_(t, info, "max").item())


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, e.g. before evaluating or saving."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def gather_objects(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj`` on every rank (picklable objects; small ones only)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def merge_rows(values: torch.Tensor, touched: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Per-sample state after an epoch in which each sample was updated by exactly one rank.

    ``values`` is this rank's copy (N, ...) and ``touched`` (N,) marks the rows this rank
    updated. Returns the merged state, identical on every rank: the updating rank's row where
    one did, the old row elsewhere. Summing zeros is exact, so no rounding creeps in.
    """
    if not info.enabled:
        return values
    mask = touched.view(-1, *([1] * (values.dim() - 1)))
    summed = all_reduce_(torch.where(mask, values, torch.zeros_like(values)), info)
    count = all_reduce_(touched.to(torch.int32), info).view_as(mask)
    if bool((count > 1).any()):
        raise RuntimeError("a sample was updated by more than one rank in one epoch; the shards overlap")
    return torch.where(count > 0, summed, values)


def active() -> bool:
    """Whether a process group of more than one process is up (for code that holds no :class:`DistInfo`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks when a process group is up (autograd does not flow through it)."""
    return _reduced(t, "SUM")


def global_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over ranks when a process group is up (autograd does not flow through it)."""
    return _reduced(t, "MAX")


def _reduced(t: torch.Tensor, op: str) -> torch.Tensor:
    if active():
        t = t.detach().clone()
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (attacks and evaluation use it directly)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
