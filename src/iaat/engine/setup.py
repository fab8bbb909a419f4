"""Build what a run needs from its config: device, data splits, model, method."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..config import Config
from ..data import DatasetSplits, ImageSet, load_dataset, make_train_val
from ..errors import ConfigError
from ..models import build_model
from ..threads import user_thread_count


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; explicit devices are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here; use --device cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available here; use --device cpu.")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{name}' is not one iaat runs on; use auto, cpu, cuda, cuda:N or mps.")
    return device


#: (threads, cores) pairs already warned about in this process (the demo's two runs ask again)
_SAID: set = set()


def choose_threads(requested: Optional[int], on_cpu: bool, log: Callable[[str], None] = print) -> Optional[int]:
    """Set PyTorch's CPU threads: ``requested``; else (on a CPU, when neither OMP_NUM_THREADS nor MKL_NUM_THREADS
    sets a count) one thread when the machine is busy (1-minute load average >= cores), where threads that wait
    for each other cost far more than they give. Returns the thread count in use on a CPU (None elsewhere)."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--threads must be >= 1, got {requested}.")
    if requested is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or requested
        if on_cpu and requested > cores and (requested, cores) not in _SAID:  # threads beyond the cores wait for
            _SAID.add((requested, cores))                                  # each other: slower, not faster
            log(f"iaat: warning: {requested} threads (--threads, train.threads) are more than the {cores} cores this "
                f"process may use; {cores} or fewer run faster")
        torch.set_num_threads(requested)
    elif on_cpu and user_thread_count() is None:
        cores = torch.get_num_threads()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if cores > 1 and load >= cores:
            torch.set_num_threads(1)
            log(f"iaat: the machine is busy (load {load:.1f} on {cores} cores): using 1 CPU thread, faster on a "
                f"busy machine; choose with --threads N (train.threads)")
    return torch.get_num_threads() if on_cpu else None


def autocast_dtype(amp: str) -> Optional[torch.dtype]:
    """``off`` | ``bf16`` | ``fp16`` → the autocast dtype (``None`` for full precision)."""
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def attack_autocast_dtype(cfg: Config) -> Optional[torch.dtype]:
    """The attacks' autocast dtype: ``train.attack_amp``, or ``train.amp`` when that is ``same``."""
    return autocast_dtype(cfg.train.amp if cfg.train.attack_amp == "same" else cfg.train.attack_amp)


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` in the memory layout ``train.channels_last`` asks for (in place; returns it).

    Only the model's tensors change layout: inputs stay in the plain layout, the first convolution
    produces channels_last activations from the channels_last weights, and the attacks' random
    starts are drawn exactly as without it.
    """
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, cfg: Config, dynamic: Optional[bool] = None) -> nn.Module:
    """``torch.compile(model, dynamic=dynamic)`` when ``train.compile`` is on (the returned wrapper shares its
    weights), else ``model``.

    ``dynamic=False`` suits methods whose batches keep their shape: the epoch's last, smaller batch then gets
    static graphs of its own, where torch's automatic dynamic shapes would recompile for it with a symbolic batch
    size and run every later step through those more general graphs. Methods that attack sub-batches of
    data-dependent size (IAAT, MMA) need ``None``, torch's default."""
    return torch.compile(model, dynamic=dynamic) if cfg.train.compile else model


@contextlib.contextmanager
def deterministic_cuda(enabled: bool) -> Iterator[None]:
    """``train.deterministic`` on CUDA: deterministic kernels only, no cuDNN autotuning; restored afterwards.

    ``CUBLAS_WORKSPACE_CONFIG`` must be set before cuBLAS makes its first handle, i.e. before any
    CUDA matmul of the process, which is why this wraps the whole of :func:`~iaat.engine.trainer.train`.
    """
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if saved[4] is None and torch.cuda.is_initialized():  # cuBLAS reads it once per process, maybe already
        warnings.warn("train.deterministic: this process used CUDA before CUBLAS_WORKSPACE_CONFIG was set, which "
                      "cuBLAS reads once: its matrix products may not be deterministic, or torch may refuse them. "
                      "Train in a fresh process, or set CUBLAS_WORKSPACE_CONFIG=:4096:8 before using CUDA.",
                      stacklevel=3)
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


def autocast_context(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = autocast_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class RunData:
    """The data set and the fixed split of its training images into train and held-out val."""

    splits: DatasetSplits
    train: ImageSet
    val: ImageSet
    train_indices: torch.Tensor  #: positions in the official training split
    val_indices: torch.Tensor


def prepare_data(cfg: Config) -> RunData:
    d = cfg.data
    splits = load_dataset(d.dataset, d.data_dir, d.download, image_size=d.image_size, resize=d.resize)
    train_idx, val_idx = make_train_val(splits.train.y, d.val_size, d.train_subset, d.split_seed)
    return RunData(splits, splits.train.subset(train_idx), splits.train.subset(val_idx), train_idx, val_idx)


def split_notes(cfg: Config, data: RunData) -> list[str]:
    """A held-out set larger than what training keeps (``data.val_size``'s default of 1,000 on a small data set)."""
    kept, held = len(data.train), len(data.val)
    if cfg.data.train_subset is not None or held <= kept:
        return []
    return [f"data: data.val_size={held} holds out more images than training keeps ({kept} of {kept + held}); "
            f"a smaller --set data.val_size=N trains on more"]


def model_from_config(cfg: Config, splits: DatasetSplits) -> nn.Module:
    m = cfg.model
    channels = splits.image_shape[0]
    mean, std = (splits.mean, splits.std) if m.normalize else (None, None)
    return build_model(m.name, splits.num_classes, channels, mean=mean, std=std, depth=m.depth, width=m.width)
