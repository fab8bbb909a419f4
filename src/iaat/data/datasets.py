"""The registry of data sets, each loaded whole as uint8 tensors of shape (N, C, H, W)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..errors import DataError
from .imageset import DatasetSplits, ImageSet


def _check_labels(split: ImageSet, num_classes: int, where: str) -> None:
    if len(split) == 0:
        raise DataError(f"{where} holds no images.")
    lo, hi = int(split.y.min()), int(split.y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{where} has labels in [{lo}, {hi}], outside 0..{num_classes - 1}.")


def _load_cifar10(data_dir: Optional[str], download: bool, **_: object) -> DatasetSplits:
    from .cifar import load_cifar

    return load_cifar("cifar10", data_dir, download)


def _load_cifar100(data_dir: Optional[str], download: bool, **_: object) -> DatasetSplits:
    from .cifar import load_cifar

    return load_cifar("cifar100", data_dir, download)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images 0..16 of shape (1797, 8, 8), labels), read from the file it bundles.

    Reading ``sklearn/datasets/data/digits.csv.gz`` directly spares every process that trains on digits the
    second that importing scikit-learn takes; ``load_digits`` is the fallback should that file ever move.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise DataError("the 'digits' data set needs scikit-learn: pip install scikit-learn")
    bundled = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if bundled.is_file():
        table = np.loadtxt(bundled, delimiter=",")  # 64 pixel columns, then the label
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1]  # labels as floats; the caller makes them int64
    from sklearn.datasets import load_digits  # pragma: no cover - a scikit-learn that moved its data

    bunch = load_digits()  # pragma: no cover
    return bunch.images, bunch.target  # pragma: no cover


def _load_digits(data_dir: Optional[str], download: bool, **_: object) -> DatasetSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download)."""
    images, target = _digits_arrays()
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = target.astype(np.int64)
    # A fixed shuffle so that the 300 test digits are spread over all writers.
    order = np.random.default_rng(0).permutation(len(x))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    train, test = ImageSet(x[300:], y[300:]), ImageSet(x[:300], y[:300])
    mean = (float(train.x.float().mean() / 255),)
    std = (float(train.x.float().std() / 255),)
    return DatasetSplits("digits", train, test, 10, mean, std, "scikit-learn load_digits (bundled)")


def _load_imagefolder(data_dir: Optional[str], download: bool, image_size: Optional[int] = None,
                      resize: Optional[int] = None) -> DatasetSplits:
    from .folder import load_image_folder

    return load_image_folder(data_dir, image_size, resize)


DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "digits": _load_digits,
    "imagefolder": _load_imagefolder,
}


def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = True, *,
                 image_size: Optional[int] = None, resize: Optional[int] = None) -> DatasetSplits:
    """Load a registered data set's train and test splits as uint8 tensors on the CPU (lazy for image folders).

    ``image_size`` and ``resize`` (short side before the center crop) apply to image folders only.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; known: {', '.join(sorted(DATASETS))}.")
    splits = DATASETS[name](data_dir, download, image_size=image_size, resize=resize)
    _check_labels(splits.train, splits.num_classes, f"the {name} training split")
    _check_labels(splits.test, splits.num_classes, f"the {name} test split")
    return splits
