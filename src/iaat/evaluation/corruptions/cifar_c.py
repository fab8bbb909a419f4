"""CIFAR-10-C / CIFAR-100-C: the released ``<corruption>.npy`` files, validated up front and read lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from ...data import ImageSet
from ...errors import DataError
from .common import CIFAR_C_CORRUPTIONS, SEVERITIES, CorruptionItem, CorruptionSets
from .imagenet_c import is_imagenet_c

_DOWNLOAD_HINT = ("CIFAR-10-C is at https://zenodo.org/record/2535967 and CIFAR-100-C at "
                  "https://zenodo.org/record/3555552; extract the .tar so that the folder holds <corruption>.npy "
                  "files and labels.npy")


def _folder(folder: Union[str, Path]) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"the CIFAR-C folder {path} {what}. {_DOWNLOAD_HINT}.")
    return path


def missing_corruptions(folder: Union[str, Path]) -> list[str]:
    """Names of :data:`CIFAR_C_CORRUPTIONS` that ``folder`` lacks, in benchmark order.

    A corruption is present as a ``<name>.npy`` file in a CIFAR-C folder and as a ``<name>`` sub-folder in an
    ImageNet-C folder (see :func:`is_imagenet_c`).
    """
    path = _folder(folder)
    if is_imagenet_c(path):
        return [name for name in CIFAR_C_CORRUPTIONS if not (path / name).is_dir()]
    return [name for name in CIFAR_C_CORRUPTIONS if not (path / f"{name}.npy").is_file()]


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # truncated file, bad header, pickled objects
        raise DataError(f"{path} is not a readable .npy array ({exc}); download it again. {_DOWNLOAD_HINT}.") from None


def load_cifar_c(folder: Union[str, Path], n: Optional[int] = None) -> CorruptionSets:
    """Read a CIFAR-10-C or CIFAR-100-C folder in the official layout, one (corruption, severity) at a time.

    Each ``<corruption>.npy`` holds uint8 images of shape (5 * N, H, W, 3) (32x32 and N = 10,000 in the
    release), severity 1 first, in blocks of N; ``labels.npy`` holds the (5 * N,) labels. Every file is
    validated up front (from its header, arrays are memory-mapped), so a bad folder fails before any model
    runs; images are read block by block as the iterator advances.

    Args:
        folder: the extracted ``CIFAR-10-C`` / ``CIFAR-100-C`` folder.
        n: use the first ``n`` images of each severity block (all N when None or larger than N).

    Returns:
        A :class:`CorruptionSets` yielding ``(name, severity, ImageSet)`` with images (n, 3, H, W), in the
        order of :data:`CIFAR_C_CORRUPTIONS`; its ``missing`` lists the corruptions without a file.

    Raises:
        DataError: the folder or ``labels.npy`` is missing, no corruption file is present, or a file has the
            wrong dtype, shape or length.
    """
    path = _folder(folder)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"n must be a positive number of images per severity, got {n!r}.")
    label_file = path / "labels.npy"
    if not label_file.is_file():
        raise DataError(f"{path} has no labels.npy, so it is not a complete CIFAR-C folder. {_DOWNLOAD_HINT}.")
    labels = _open_npy(label_file)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{label_file} must hold integer labels of shape (5 * N,), "
                        f"got {labels.dtype} {tuple(labels.shape)}.")
    total = len(labels)
    if total == 0 or total % len(SEVERITIES):
        raise DataError(f"{label_file} holds {total} labels, which is not a positive multiple of 5 "
                        "(one block of N labels per severity).")
    labels = np.array(labels, dtype=np.int64)  # small: read it whole
    if labels.min() < 0:
        raise DataError(f"{label_file} holds negative labels (smallest {labels.min()}).")
    block = total // len(SEVERITIES)

    names = [name for name in CIFAR_C_CORRUPTIONS if (path / f"{name}.npy").is_file()]
    if not names:
        raise DataError(f"{path} holds labels.npy but none of the corruption files "
                        f"({', '.join(f'{c}.npy' for c in CIFAR_C_CORRUPTIONS[:3])}, ...). {_DOWNLOAD_HINT}.")
    arrays: dict[str, np.ndarray] = {}
    image_shape = None
    for name in names:
        file = path / f"{name}.npy"
        arr = _open_npy(file)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise DataError(f"{file} must hold uint8 images of shape (5 * N, 32, 32, 3), "
                            f"got {arr.dtype} {tuple(arr.shape)}.")
        if len(arr) % len(SEVERITIES):
            raise DataError(f"{file} holds {len(arr)} images, which is not divisible by 5 "
                            "(one block of N images per severity); the file is incomplete.")
        if len(arr) != total:
            raise DataError(f"{file} holds {len(arr)} images but labels.npy holds {total} labels; "
                            "the files come from different releases or one is incomplete.")
        if image_shape is not None and arr.shape[1:] != image_shape:
            raise DataError(f"{file} holds images of shape {arr.shape[1:]}, the other files {image_shape}.")
        image_shape = arr.shape[1:]
        arrays[name] = arr
    take = block if n is None else min(n, block)

    def items() -> Iterator[CorruptionItem]:
        for name in names:
            for severity in SEVERITIES:
                lo = (severity - 1) * block
                x = torch.from_numpy(np.array(arrays[name][lo:lo + take]))  # copy out of the read-only map
                y = torch.from_numpy(labels[lo:lo + take].copy())
                yield name, severity, ImageSet(x.permute(0, 3, 1, 2).contiguous(), y)

    return CorruptionSets(items(), names, take, f"CIFAR-C files in {path} (first {take} of {block} per severity)",
                          comparable_with_cifar_c=True)
