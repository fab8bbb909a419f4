"""Small generated data in the official CIFAR python layout, for tests that must not download."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def class_images(n: int, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 32x32 RGB images: each class is a bright square at its own place and colour, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = rng.integers(0, 80, size=(n, 3, 32, 32)).astype(np.int32)
    for c in range(num_classes):
        r, col = divmod(c % 16, 4)
        members = y == c
        x[members, c % 3, 8 * r:8 * r + 8, 8 * col:8 * col + 8] += 150
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_cifar10_folder(root: Path, train_per_batch: int = 100, n_test: int = 200, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` with 5 train batches and a test batch (not the official md5s)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = class_images(5 * train_per_batch + n_test, seed=seed)
    for k in range(5):
        sl = slice(k * train_per_batch, (k + 1) * train_per_batch)
        _dump(folder / f"data_batch_{k + 1}", x[sl], y[sl])
    _dump(folder / "test_batch", x[5 * train_per_batch:], y[5 * train_per_batch:])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=2)
    return folder


def _dump(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": x.reshape(len(x), -1), "labels": [int(v) for v in y]}, f, protocol=2)


def config_method(name: str, num_train: int, attack: Optional[dict] = None, epochs: int = 10, **params):
    """A method built the way a config builds it: ``params`` and ``attack`` sizes in pixel units over 255."""
    from iaat.config import build_method, config_from_dict

    cfg = config_from_dict({"method": {"name": name, **params}, "attack": attack or {}, "train": {"epochs": epochs}})
    return build_method(cfg, num_train)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m iaat ARGS`` in a subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", "iaat", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def run_main(*args: str) -> tuple[Optional[int], str, str]:
    """Run ``iaat.cli.main(args)`` in this process (no interpreter start-up): ``(exit code, stdout, stderr)``.

    An exception escaping main() is what a user would see as a traceback: the exit code is then
    None and the traceback is appended to stderr.
    """
    from iaat.cli import main

    return call_main(main, args)


def call_main(main: Callable[[list[str]], Optional[int]], args: Sequence[str]) -> tuple[Optional[int], str, str]:
    """``main(args)`` with its output captured, as :func:`run_main` describes (any script's ``main(argv)``)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
        except Exception:
            code = None
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """:func:`run_main` shaped like :func:`run_cli`'s result, for CLI checks that need no process of their own
    (an exception escaping main() gives return code None and its traceback in stderr)."""
    code, out, err = run_main(*args)
    return subprocess.CompletedProcess(["iaat", *args], code, out, err)


def child_env() -> dict:
    """Environment for a CLI subprocess whose results must match this process bitwise (same thread count)."""
    import torch

    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}


TINY_ARGS = ["--dataset", "cifar10", "--model", "small_cnn", "--set", "model.width=8", "--set", "data.val_size=100",
             "--set", "attack.steps=3", "--batch-size", "50", "--no-progress", "--set", "optim.schedule=cosine",
             "--set", "data.download=false"]


def tiny_train_args(data_dir: Path, out: Path, epochs: int = 1, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data_dir), "--out", str(out), "--epochs", str(epochs), *TINY_ARGS, *extra]


def write_image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                       size: int = 64, seed: int = 0) -> Path:
    """A tiny ImageNet-layout folder (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG, a few PNGs): each class is a
    bright square of its own colour and place on noise, images of slightly different sizes around ``size``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = size + int(rng.integers(0, 17)), size + int(rng.integers(0, 17))
                img = rng.integers(0, 90, size=(h, w, 3)).astype(np.int32)
                top, left = (h // 3) * (c % 2), (w // 3) * (c // 2 % 2)
                img[top:top + h // 2, left:left + w // 2, c % 3] += 160
                ext = "png" if i % 4 == 3 else "JPEG"
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.{ext}")
    return root


@contextlib.contextmanager
def ctrl_c_at_step(method_cls: type, step: int):
    """Inside the block, the ``step``-th (1-based) call of ``method_cls.objective`` (one per training step) sends
    SIGINT to this process first: a Ctrl-C in the middle of that step."""
    import signal

    original, calls = method_cls.objective, {"n": 0}

    def objective_with_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    method_cls.objective = objective_with_ctrl_c
    try:
        yield
    finally:
        method_cls.objective = original
