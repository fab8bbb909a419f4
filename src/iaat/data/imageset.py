"""Images and labels held as tensors: one split (:class:`ImageSet`) and a data set's splits (:class:`DatasetSplits`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import DataError
from .batch import to_unit


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) and int64 labels (N,); x may be lazy (:class:`~iaat.data.folder.FolderImages`).

    Evaluation also takes float images in [0, 1] (:func:`iaat.evaluate` on a user's tensors); training needs uint8.
    As a map-style dataset, ``images[i]`` is ``(image in [0, 1] as float32, label)``, so it can be wrapped in
    :class:`iaat.IndexedDataset` for a plain DataLoader.

    Example:
        >>> images = ImageSet(torch.full((2, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([3, 5]))
        >>> x, y = images[1]
        >>> x.dtype, float(x.max()), int(y)
        (torch.float32, 1.0, 5)
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not (self.x.dtype == torch.uint8 or self.x.is_floating_point()) or self.x.ndim != 4:
            raise DataError(f"images must be uint8 (or float in [0, 1]) of shape (N, C, H, W), got {self.x.dtype} "
                            f"{tuple(self.x.shape)}.")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise DataError(f"labels must have shape ({len(self.x)},), got {tuple(self.y.shape)}.")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.x[index] if torch.is_tensor(self.x) else self.x[index][0]  # lazy images decode a batch of one
        return to_unit(image), self.y[index]

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        if not torch.is_tensor(self.x):  # lazy images (an image folder): select without decoding
            return ImageSet(self.x.select(indices), self.y[indices])
        return ImageSet(self.x[indices], self.y[indices])


@dataclass
class DatasetSplits:
    """The official train and test splits of a data set plus what a model needs to know."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple
    std: tuple
    source: str  #: human-readable provenance, e.g. the folder it was read from
    classes: Optional[list] = None  #: each output's class name, where the data names them (image folders)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train.x.shape[1:])
