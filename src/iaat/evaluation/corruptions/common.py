"""What every part of the corruption benchmark shares: the severities, the corruption names and the
:class:`CorruptionSets` iterator the loaders and the generator return."""

from __future__ import annotations

from typing import Iterator, Sequence

from ...data import ImageSet

SEVERITIES = (1, 2, 3, 4, 5)

#: The 15 corruptions of the benchmark (means and mCE are reported over these).
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 held-out corruptions released with CIFAR-10-C / CIFAR-100-C.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
#: All 19 file names (without ``.npy``) of CIFAR-10-C and CIFAR-100-C.
CIFAR_C_CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS

CorruptionItem = tuple[str, int, ImageSet]


class CorruptionSets(Iterator[CorruptionItem]):
    """An iterator over ``(corruption, severity, ImageSet)`` that also says what it holds.

    Attributes:
        names: the corruptions it yields, in order, each with severities 1..5.
        missing: corruptions of :data:`CIFAR_C_CORRUPTIONS` it does not hold (warn the user about these).
        n: images per (corruption, severity).
        source: human-readable provenance for reports.
        comparable_with_cifar_c: whether the images are the released CIFAR-C files (not generated ones).
        imagenet_c: whether the images are ImageNet-C's (:func:`evaluate_corruptions` then reports the mCE).
    """

    def __init__(self, items: Iterator[CorruptionItem], names: Sequence[str], n: int, source: str,
                 comparable_with_cifar_c: bool, imagenet_c: bool = False) -> None:
        self._items = items
        self.names = list(names)
        self.missing = [name for name in CIFAR_C_CORRUPTIONS if name not in self.names]
        self.n = n
        self.source = source
        self.comparable_with_cifar_c = comparable_with_cifar_c
        self.imagenet_c = imagenet_c

    def __len__(self) -> int:
        return len(self.names) * len(SEVERITIES)

    def __next__(self) -> CorruptionItem:
        return next(self._items)
