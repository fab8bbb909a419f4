"""Common-corruption robustness: CIFAR-10-C / CIFAR-100-C files, ImageNet-C folders, an offline generator,
accuracy tables and mCE.

The corruptions and their five severities are those of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019). The generator reproduces the CIFAR parameters
of ``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness with torch operations. Its random
draws differ from the released files, and five of the nineteen corruptions (motion blur, snow, frost, elastic
transform, spatter need ImageMagick, OpenCV or image files) are not generated, so numbers on generated sets are
indicative and not comparable with published CIFAR-10-C results. ImageNet-C folders are read image by image
with Pillow, and evaluated ImageNet-C results carry the mCE (AlexNet-normalised corruption error).
"""

from __future__ import annotations

import io
import math
import numbers
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks.pgd import attack_mode
from ..data import ImageSet
from ..data.folder import IMAGE_EXTENSIONS
from ..data.folder import image_files as _image_files
from ..data.folder import pillow as _pillow
from ..data.folder import read_image as _read_image
from ..data.folder import read_images
from ..data.folder import subfolders as _subfolders
from ..errors import DataError

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

_DOWNLOAD_HINT = ("CIFAR-10-C is at https://zenodo.org/record/2535967 and CIFAR-100-C at "
                  "https://zenodo.org/record/3555552; extract the .tar so that the folder holds <corruption>.npy "
                  "files and labels.npy")

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


# --------------------------------------------------------------------------- CIFAR-10-C / CIFAR-100-C files


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


# --------------------------------------------------------------------------- ImageNet-C folders

_IMAGENET_C_HINT = ("ImageNet-C is at https://zenodo.org/record/2235448; extract its .tar files into one folder so "
                    "that it holds <corruption>/<severity 1..5>/<wnid>/<image>.JPEG")
_SEVERITY_FOLDERS = frozenset(str(s) for s in SEVERITIES)
def _few(names: Sequence[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def is_imagenet_c(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` is in the ImageNet-C layout ``<corruption>/<severity 1..5>/<wnid>/<image>``.

    True when a sub-folder holds severity sub-folders named 1..5; a CIFAR-C folder holds ``.npy`` files instead.
    A missing or unreadable folder is False (the loaders report it).
    """
    path = Path(folder).expanduser()
    try:
        return path.is_dir() and any(_SEVERITY_FOLDERS.intersection(_subfolders(path / sub)) for sub in _subfolders(path))
    except OSError:
        return False


def load_imagenet_c(folder: Union[str, Path], n: Optional[int] = None, image_size: int = 224,
                    resize: Optional[int] = 256, class_names: Optional[Sequence[str]] = None) -> CorruptionSets:
    """Read an ImageNet-C folder (``<corruption>/<severity 1..5>/<wnid>/<image>.JPEG``), one severity at a time.

    The folder layout (corruption, severity and class folders) is validated up front; the images of each
    (corruption, severity) are decoded with Pillow when the iterator reaches it, converted to RGB, resized so
    the short side is ``resize`` and center-cropped to ``image_size`` (the standard ImageNet evaluation
    preprocessing, as AugMix evaluates ImageNet-C; ``resize=None`` only crops, as Hendrycks' ``test.py``).
    Images are held in memory per severity: 50,000 images of 224x224 take 7.5 GB, so ``n`` bounds memory too.

    Args:
        folder: the folder holding the extracted corruption folders (any of :data:`CIFAR_C_CORRUPTIONS`; other
            sub-folders are ignored).
        n: use the first ``n`` images of each severity (all when None or larger). Images are ordered by class
            (sorted wnid) then file name, interleaved across classes (image 0 of every class, then image 1,
            ...), so a small ``n`` still mixes the classes.
        image_size: side of the square crop.
        resize: the short side images are resized to before cropping (None: no resizing).
        class_names: the model's wnids by class index (e.g. its training ImageFolder's classes); by default
            the sorted wnid folders are classes 0, 1, ... as torchvision's ImageFolder numbers them.

    Returns:
        A :class:`CorruptionSets` yielding ``(name, severity, ImageSet)`` with images uint8 (n, 3, image_size,
        image_size), in the order of :data:`CIFAR_C_CORRUPTIONS`, marked ``imagenet_c`` and not comparable
        with CIFAR-C.

    Raises:
        DataError: the folder is missing, holds no corruption folders, a corruption lacks a severity folder, the
            class folders differ between severities or a wnid is not in ``class_names``, a severity holds no or
            too few images, an image cannot be read, or Pillow is not installed.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"the ImageNet-C folder {path} {what}. {_IMAGENET_C_HINT}.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"n must be a positive number of images per severity, got {n!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}.")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < image_size):
        raise DataError(f"resize must be None or an integer >= image_size ({image_size}), got {resize!r}.")
    if isinstance(class_names, (str, bytes)):
        raise DataError("class_names must be a list of wnids, not a single string.")
    image_cls = _pillow("reading ImageNet-C images")

    names = [name for name in CIFAR_C_CORRUPTIONS if (path / name).is_dir()]
    if not names:
        found = _subfolders(path)
        raise DataError(f"{path} holds none of the ImageNet-C corruption folders ({_few(list(CIFAR_C_CORRUPTIONS), 3)}); "
                        f"its sub-folders are: {_few(found) or 'none'}. {_IMAGENET_C_HINT}.")
    reference: Optional[Path] = None
    classes: list[str] = []
    for name in names:
        for severity in SEVERITIES:
            sev_path = path / name / str(severity)
            if not sev_path.is_dir():
                present = sorted(_SEVERITY_FOLDERS.intersection(_subfolders(path / name)))
                raise DataError(f"{sev_path} is missing: every corruption needs severity folders 1..5, {name} has "
                                f"{', '.join(present) or 'none'}; the extraction is incomplete. {_IMAGENET_C_HINT}.")
            found = _subfolders(sev_path)
            if reference is None:
                if not found:
                    raise DataError(f"{sev_path} holds no class (wnid) folders. {_IMAGENET_C_HINT}.")
                reference, classes = sev_path, found
            elif found != classes:
                lacks = [c for c in classes if c not in set(found)]
                extra = [c for c in found if c not in set(classes)]
                parts = ([f"lacks {_few(lacks)}"] if lacks else []) + ([f"adds {_few(extra)}"] if extra else [])
                raise DataError(f"the class folders of {sev_path} differ from those of {reference}: {'; '.join(parts)}. "
                                "Every severity must hold the same wnid folders; the extraction is incomplete or mixes "
                                "releases.")
    if class_names is None:
        labels = {wnid: i for i, wnid in enumerate(classes)}
    else:
        index: dict[str, int] = {}
        for i, wnid in enumerate(class_names):
            index.setdefault(str(wnid), i)
        unknown = [wnid for wnid in classes if wnid not in index]
        if unknown:
            raise DataError(f"{len(unknown)} class folders of {reference} are not in class_names ({_few(unknown)}); "
                            "the model was trained on other classes than ImageNet-C holds.")
        labels = {wnid: index[wnid] for wnid in classes}

    def listing(sev_path: Path) -> list[tuple[Path, int]]:
        """The (file, label) pairs of a severity folder, interleaved across classes."""
        try:
            per_class = [([sev_path / wnid / f for f in _image_files(sev_path / wnid)], labels[wnid]) for wnid in classes]
        except OSError as exc:
            raise DataError(f"cannot list the images in {sev_path} ({exc}).") from None
        longest = max(len(files) for files, _ in per_class)
        return [(files[r], label) for r in range(longest) for files, label in per_class if r < len(files)]

    total = len(listing(reference))
    if total == 0:
        raise DataError(f"the class folders of {reference} hold no images ({', '.join(IMAGE_EXTENSIONS)}). "
                        f"{_IMAGENET_C_HINT}.")
    take = total if n is None else min(n, total)

    def read(files: list[Path]) -> torch.Tensor:
        """The images of ``files`` as uint8 (len(files), 3, image_size, image_size), read by a few threads."""
        return read_images(files, image_size, lambda f: _read_image(image_cls, f, image_size, resize))

    def items() -> Iterator[CorruptionItem]:
        for name in names:
            for severity in SEVERITIES:
                sev_path = path / name / str(severity)
                files = listing(sev_path)
                # With n, a severity only needs n images; without, it must hold as many as the first one.
                if len(files) < take or (n is None and len(files) != total):
                    raise DataError(f"{sev_path} holds {len(files)} images but {reference} holds {total}; "
                                    "the extraction is incomplete.")
                files = files[:take]
                y = torch.tensor([label for _, label in files], dtype=torch.int64)
                yield name, severity, ImageSet(read([file for file, _ in files]), y)

    crop = f"short side resized to {resize}, " if resize is not None else ""
    source = (f"ImageNet-C folders in {path} (first {take} of {total} per severity, {crop}"
              f"center crop {image_size})")
    return CorruptionSets(items(), names, take, source, comparable_with_cifar_c=False, imagenet_c=True)


# --------------------------------------------------------------------------- generated corruptions
#
# Each function maps float images in [0, 1] of shape (N, C, H, W) to corrupted ones of the same shape. The
# parameter tables are make_cifar_c.py's; comments note where its numpy/skimage/cv2/PIL behaviour is mirrored.

CorruptionFn = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _level(table: Sequence, severity: int):
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= len(table):
        raise DataError(f"severity must be an integer in 1..{len(table)}, got {severity!r}.")
    return table[severity - 1]


def _randn(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _rand(shape: Sequence[int], x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, dtype=x.dtype, device=x.device)


def _per_channel(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a single-channel 2-D filter ``fn`` ((M, 1, H, W) -> (M, 1, H', W')) to every channel."""
    n, c, h, w = x.shape
    out = fn(x.reshape(n * c, 1, h, w))
    return out.reshape(n, c, *out.shape[-2:])


def _gaussian_filter(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage.filters.gaussian of each channel: scipy's kernel (radius int(4 sigma + 0.5)), 'nearest' edges."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.pad(z, (radius, radius, radius, radius), mode="replicate")
        z = F.conv2d(z, k.view(1, 1, -1, 1))
        return F.conv2d(z, k.view(1, 1, 1, -1))

    return _per_channel(x, blur)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive N(0, c^2) noise."""
    c = _level([0.04, 0.06, 0.08, 0.09, 0.10], severity)
    return (x + c * _randn(x, generator)).clamp_(0, 1)


def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson (photon) noise: Poisson(c x) / c."""
    c = _level([500, 250, 100, 75, 50], severity)
    return (torch.poisson(x * c, generator=generator) / c).clamp_(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt-and-pepper noise: each value becomes 0 or 1 (even odds) with probability c, as skimage's 's&p'."""
    c = _level([0.01, 0.02, 0.03, 0.05, 0.07], severity)
    flipped = _rand(x.shape, x, generator) < c
    salt = (_rand(x.shape, x, generator) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


def speckle_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Multiplicative noise x + x N(0, c^2)."""
    c = _level([0.06, 0.1, 0.12, 0.16, 0.2], severity)
    return (x + x * c * _randn(x, generator)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur with standard deviation c pixels."""
    c = _level([0.4, 0.6, 0.7, 0.8, 1.0], severity)
    return _gaussian_filter(x, c).clamp_(0, 1)


def _cv2_gaussian_kernel(ksize: int, sigma: float) -> torch.Tensor:
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return k / k.sum()


@lru_cache(maxsize=None)
def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """make_cifar_c.py's anti-aliased disk, cropped to where it is non-zero (the zeros would not change a sum)."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _cv2_gaussian_kernel(ksize, alias_blur)
    p = ksize // 2  # cv2.GaussianBlur's default border is reflect-101, as torch's 'reflect'
    disk = F.conv2d(F.pad(disk[None, None], (p, p, p, p), mode="reflect"), (g[:, None] * g[None, :])[None, None])[0, 0]
    rows = torch.nonzero(disk.abs().sum(1)).flatten()
    r = int(max(half - rows.min(), rows.max() - half))
    return disk[half - r:half + r + 1, half - r:half + r + 1]


def defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Convolution with an anti-aliased disk (cv2.filter2D, reflect-101 edges)."""
    radius, alias = _level([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)], severity)
    kernel = _disk(float(radius), float(alias)).to(x)
    r = kernel.shape[0] // 2
    if r >= min(x.shape[-2:]):
        raise DataError(f"defocus_blur needs images larger than {r} pixels, got {tuple(x.shape[-2:])}.")
    return _per_channel(x, lambda z: F.conv2d(F.pad(z, (r, r, r, r), mode="reflect"), kernel[None, None])).clamp_(0, 1)


def glass_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur, local pixel shuffling, Gaussian blur again.

    make_cifar_c.py "swaps" pixel rows with ``a[i], a[j] = a[j], a[i]`` on numpy views, which copies
    ``a[j]`` into ``a[i]`` and leaves ``a[j]`` alone; with its offsets in {-1, 0} and its bottom-right to
    top-left scan every copy reads a not-yet-written pixel, so one pass is a parallel gather.
    """
    sigma, delta, iterations = _level([(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)], severity)
    n, c, h, w = x.shape
    # np.uint8(... * 255) truncates; the epsilon keeps exact 8-bit levels from dropping through rounding error.
    x = torch.floor(_gaussian_filter(x, sigma) * 255 + 1e-4).clamp_(0, 255) / 255
    rows = torch.arange(delta + 1, h - delta + 1, device=x.device)  # range(h - delta, delta, -1), any order
    cols = torch.arange(delta + 1, w - delta + 1, device=x.device)
    if len(rows) == 0 or len(cols) == 0:
        raise DataError(f"glass_blur needs images larger than {2 * delta + 1} pixels, got {(h, w)}.")
    batch = torch.arange(n, device=x.device)[:, None, None]
    for _ in range(iterations):
        # np.random.randint(-delta, delta) excludes delta: offsets are -delta..delta-1.
        shape = (n, len(rows), len(cols))
        dy = torch.randint(-delta, delta, shape, generator=generator, device=x.device)
        dx = torch.randint(-delta, delta, shape, generator=generator, device=x.device)
        src = x[batch, :, rows[:, None] + dy, cols[None, :] + dx]  # (n, rows, cols, c)
        x = x.clone()
        x[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = src.permute(0, 3, 1, 2)
    return _gaussian_filter(x, sigma).clamp_(0, 1)


def _zoom_centre(x: torch.Tensor, factor: float) -> torch.Tensor:
    """make_cifar_c.py's clipped_zoom: crop the centre, zoom it back up linearly (scipy zoom, order 1)."""
    size = x.shape[-2:]
    crops = [int(math.ceil(s / factor)) for s in size]
    tops = [(s - ch) // 2 for s, ch in zip(size, crops)]
    crop = x[..., tops[0]:tops[0] + crops[0], tops[1]:tops[1] + crops[1]]
    out_size = [int(round(ch * factor)) for ch in crops]  # scipy's output shape
    # scipy.ndimage.zoom (grid_mode=False) maps the corner pixels onto each other, i.e. align_corners=True.
    zoomed = F.interpolate(crop, size=out_size, mode="bilinear", align_corners=True)
    trims = [(o - s) // 2 for o, s in zip(out_size, size)]
    return zoomed[..., trims[0]:trims[0] + size[0], trims[1]:trims[1] + size[1]]


def zoom_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Average of the image and centre zooms by 1, 1.01, ... (np.arange's float steps included)."""
    stop = _level([1.06, 1.11, 1.16, 1.21, 1.26], severity)
    factors = np.arange(1, stop, 0.01)
    out = x.clone()
    for factor in factors:
        out += _zoom_centre(x, float(factor))
    return (out / (len(factors) + 1)).clamp_(0, 1)


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, like: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Diamond-square height maps (n, mapsize, mapsize) in [0, 1], as make_cifar_c.py's plasma_fractal."""
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64, device=like.device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: torch.Tensor) -> torch.Tensor:
        # The original scales a uniform(-wibble, wibble) draw by wibble once more; kept as is.
        return a / 4 + wibble * (torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(squares)
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= wibbledecay
    m -= m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True).clamp_min(1e-12)


def fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """A plasma-fractal haze added to every channel, rescaled to keep the image's brightest value."""
    strength, decay = _level([(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)], severity)
    n, _, h, w = x.shape
    mapsize = 1 << (max(h, w, 2) - 1).bit_length()  # smallest power of two >= the image side
    haze = _plasma_fractal(n, mapsize, decay, x, generator)[:, None, :h, :w].to(x.dtype)
    top = x.amax((1, 2, 3), keepdim=True)
    return ((x + strength * haze) * top / (top + strength)).clamp_(0, 1)


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Add c to the HSV value channel.

    With hue and saturation fixed every RGB channel scales by V'/V (skimage's rgb2hsv/hsv2rgb round trip);
    a black pixel (V = 0, hence S = 0) turns grey V'.
    """
    c = _level([0.05, 0.1, 0.15, 0.2, 0.3], severity)
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new).clamp_(0, 1)


def saturate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Scale and shift the HSV saturation, S' = clip(a S + b); RGB images only.

    With V and hue fixed each channel is V - (V - c) S'/S. Grey pixels (S = 0) have hue 0 in skimage, so a
    positive shift b tints them red: (V, V (1 - S'), V (1 - S')).
    """
    a, b = _level([(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)], severity)
    if x.shape[1] != 3:
        raise DataError(f"saturate needs RGB images (3 channels), got {x.shape[1]}.")
    v = x.amax(1, keepdim=True)
    spread = v - x.amin(1, keepdim=True)
    s = torch.where(v > 0, spread / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * a + b).clamp(0, 1)
    coloured = v - (v - x) * s_new / s.clamp_min(1e-12)
    red_hue = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    grey = v - v * s_new * red_hue
    return torch.where(s > 0, coloured, grey).clamp_(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pull every channel towards its mean over the image by the factor c."""
    c = _level([0.75, 0.5, 0.4, 0.3, 0.15], severity)
    means = x.mean((2, 3), keepdim=True)
    return ((x - means) * c + means).clamp_(0, 1)


@lru_cache(maxsize=None)
def _pil_box_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The (out_size, in_size) weights of Pillow's BOX resampling along one axis (Resample.c precompute_coeffs)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        for j in range(lo, hi):
            t = (j - centre + 0.5) / filterscale
            weights[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = weights[i].sum()
        if total > 0:
            weights[i] /= total
    return weights


def _pil_box_resize(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's Image.resize(..., BOX) of 8-bit levels 0..255: a horizontal then a vertical pass, each rounded
    half up to whole levels as Pillow's fixed-point code does."""
    h, w = levels.shape[-2:]
    if (h, w) == tuple(size):
        return levels
    levels = torch.floor(levels @ _pil_box_matrix(w, size[1]).to(levels).T + 0.5)
    return torch.floor(_pil_box_matrix(h, size[0]).to(levels) @ levels + 0.5)


def pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Box-downsample to a fraction c of the side and box-upsample back (Pillow's BOX filter on 8-bit images)."""
    c = _level([0.95, 0.9, 0.85, 0.75, 0.65], severity)
    h, w = x.shape[-2:]
    levels = (x * 255).round().clamp_(0, 255)  # Pillow resizes 8-bit images; exact levels keep its ties exact
    small = _pil_box_resize(levels, (max(int(h * c), 1), max(int(w * c), 1)))
    return (_pil_box_resize(small, (h, w)) / 255).clamp_(0, 1)


def jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Save each image as a JPEG of quality c with Pillow's defaults and decode it again."""
    quality = _level([80, 65, 58, 50, 40], severity)
    image_cls = _pillow("the jpeg_compression corruption")
    if x.shape[1] not in (1, 3):
        raise DataError(f"jpeg_compression needs grey or RGB images (1 or 3 channels), got {x.shape[1]}.")
    pixels = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, img in enumerate(pixels):
        buffer = io.BytesIO()
        image_cls.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(image_cls.open(buffer)).reshape(img.shape)
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255


#: Corruptions the generator implements, in the order of :data:`CIFAR_C_CORRUPTIONS`.
GENERATED_CORRUPTIONS: dict[str, CorruptionFn] = {
    fn.__name__: fn for fn in sorted(
        [gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, zoom_blur, fog, brightness, contrast,
         pixelate, jpeg_compression, speckle_noise, gaussian_blur, saturate],
        key=lambda fn: CIFAR_C_CORRUPTIONS.index(fn.__name__))
}


def _seed_for(seed: int, name: str, severity: int) -> int:
    """A seed per (corruption, severity) that does not depend on which other corruptions are generated."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), severity]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def generated_corruption_sets(data: ImageSet, names: Optional[Iterable[str]] = None, n: Optional[int] = None,
                              seed: int = 0, chunk_size: int = 1000) -> CorruptionSets:
    """Corrupt (the first ``n`` images of) ``data`` at severities 1..5 with :data:`GENERATED_CORRUPTIONS`.

    Deterministic for a given ``seed``: each (corruption, severity) draws from its own generator, so a subset
    of ``names`` gives the same images as the full run. Images are uint8 in and out, rounded to the nearest
    level (the released files truncate with ``np.uint8``, half a level darker on average).

    Args:
        data: clean images, uint8 (N, C, H, W).
        names: corruptions to generate (default: all of :data:`GENERATED_CORRUPTIONS`).
        n: use the first ``n`` images (all when None or larger than N).
        seed: base seed.
        chunk_size: images corrupted at once (bounds memory; part of what the seed reproduces).

    Returns:
        A :class:`CorruptionSets` yielding ``(name, severity, ImageSet)``, labelled as not comparable with
        CIFAR-C; its ``missing`` lists the CIFAR-C corruptions it leaves out.
    """
    if not isinstance(data, ImageSet):
        raise DataError(f"data must be an ImageSet, got {type(data).__name__}.")
    if len(data) == 0:
        raise DataError("data holds no images to corrupt.")
    names = list(GENERATED_CORRUPTIONS) if names is None else list(names)
    unknown = [name for name in names if name not in GENERATED_CORRUPTIONS]
    if unknown or not names:
        raise DataError(f"cannot generate {', '.join(unknown) or 'an empty list of corruptions'}; "
                        f"known: {', '.join(GENERATED_CORRUPTIONS)}.")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"n must be a positive number of images, got {n!r}.")
    if not torch.is_tensor(data.x):  # an image folder: decode the images to corrupt once
        data = ImageSet(data.x[:n], data.y[:n])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise DataError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    channels = data.x.shape[1]
    if "saturate" in names and channels != 3:
        raise DataError(f"saturate needs RGB images (3 channels), got {channels}; leave it out of names.")
    if "jpeg_compression" in names:
        _pillow("the jpeg_compression corruption")  # fail now, not after the other corruptions have run
    take = len(data) if n is None else min(n, len(data))
    clean = data.subset(torch.arange(take))

    def items() -> Iterator[CorruptionItem]:
        for name in names:
            fn = GENERATED_CORRUPTIONS[name]
            for severity in SEVERITIES:
                generator = torch.Generator(device=clean.x.device).manual_seed(_seed_for(seed, name, severity))
                out = torch.empty_like(clean.x)
                for lo in range(0, take, chunk_size):
                    x = clean.x[lo:lo + chunk_size].float().div_(255)
                    out[lo:lo + chunk_size] = fn(x, severity, generator).mul(255).round_().clamp_(0, 255).to(torch.uint8)
                yield name, severity, ImageSet(out, clean.y.clone())

    return CorruptionSets(items(), names, take, f"generated with torch (seed {seed}, {take} images per severity)",
                          comparable_with_cifar_c=False)


# --------------------------------------------------------------------------- evaluation


def _is_fraction(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1  # NaN fails too


def _is_list(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 1 or (
        isinstance(value, Sequence) and not isinstance(value, (str, bytes)))


def _check_done(done: Optional[Mapping[str, Sequence]]) -> dict[str, list]:
    if done is None:
        return {}
    if not isinstance(done, Mapping):
        raise DataError(f"done must map corruption names to lists of accuracies, got {type(done).__name__}.")
    out = {}
    for name, accs in done.items():
        if not _is_list(accs) or len(accs) > len(SEVERITIES):
            raise DataError(f"done[{name!r}] must be a list of at most 5 accuracies (severity 1 first), got {accs!r}.")
        for acc in accs:
            if acc is not None and not _is_fraction(acc):
                raise DataError(f"done[{name!r}] holds {acc!r}, which is not an accuracy in [0, 1] (or None).")
        out[name] = [None if acc is None else float(acc) for acc in accs]
    return out


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def evaluate_corruptions(model: nn.Module, sets: Iterable[CorruptionItem], *, source: Optional[str] = None,
                         comparable_with_cifar_c: Optional[bool] = None, imagenet_c: Optional[bool] = None,
                         batch_size: int = 256,
                         device: Optional[torch.device] = None, progress: bool = False,
                         done: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
                         on_result: Optional[Callable[[str, int, float], None]] = None) -> dict:
    """Top-1 accuracy of ``model`` on every (corruption, severity) of ``sets``, in eval mode and without gradients.

    Args:
        model: maps float images in [0, 1] (N, C, H, W) to logits.
        sets: ``(name, severity, ImageSet)`` items, e.g. from :func:`load_cifar_c` or
            :func:`generated_corruption_sets`.
        source: provenance for the report (default: ``sets.source`` when it has one).
        comparable_with_cifar_c: whether the numbers may be compared with published CIFAR-C results
            (default: ``sets.comparable_with_cifar_c`` when it has one, else False).
        imagenet_c: whether ``sets`` are ImageNet-C's, which adds the mCE to the result (default:
            ``sets.imagenet_c`` when it has one, else False).
        batch_size: images per forward pass.
        device: where the model runs (default: that of its parameters, or the CPU).
        progress: show a tqdm bar over the sets.
        done: finished results ``{name: [acc for severity 1, 2, ...]}`` of an earlier, interrupted run; those
            (name, severity) pairs are not evaluated again and their accuracies are reported as given.
        on_result: called as ``on_result(name, severity, accuracy)`` after each newly evaluated pair, so the
            caller can save ``done`` and resume later.

    Returns:
        ``{"source", "comparable_with_cifar_c", "per_corruption": {name: {"severity": [a1..a5], "mean"}},
        "mean", "benchmark_mean", "n"}``: ``mean`` over all corruptions and severities present,
        ``benchmark_mean`` over the 15 benchmark corruptions (None unless all 15 are complete), ``n`` images
        per severity (None if every pair came from ``done``). A severity never seen is None in its list.
        ImageNet-C results add ``"imagenet_c": True``, ``"CE"`` (:func:`mce`'s corruption error of each benchmark
        corruption with all 5 severities, from top-1 errors ``1 - accuracy``) and ``"mCE"`` (their mean, None
        unless all 15 benchmark corruptions are complete, with the reason in ``"mCE_note"``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    finished = _check_done(done)
    if source is None:
        source = getattr(sets, "source", "unspecified")
    if comparable_with_cifar_c is None:
        comparable_with_cifar_c = bool(getattr(sets, "comparable_with_cifar_c", False))
    if imagenet_c is None:
        imagenet_c = bool(getattr(sets, "imagenet_c", False))
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    accs: dict[str, list[Optional[float]]] = {}
    n_images: Optional[int] = None
    total = len(sets) if hasattr(sets, "__len__") else None
    bar = tqdm(sets, total=total, desc="corruptions", disable=not progress, leave=False, unit="set")
    with attack_mode(model), torch.no_grad(), bar:
        for item in bar:
            if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], ImageSet)):
                raise DataError(f"sets must yield (name, severity, ImageSet) tuples, got {type(item).__name__}.")
            name, severity, data = item
            if severity not in SEVERITIES:
                raise DataError(f"{name}: severity must be in 1..5, got {severity!r}.")
            row = accs.setdefault(name, [None] * len(SEVERITIES))
            previous = finished.get(name, [])
            if severity <= len(previous) and previous[severity - 1] is not None:
                row[severity - 1] = previous[severity - 1]
                continue
            if len(data) == 0:
                raise DataError(f"{name} at severity {severity} holds no images.")
            bar.set_postfix_str(f"{name} {severity}")
            correct = torch.zeros((), dtype=torch.long, device=device)
            for lo in range(0, len(data), batch_size):
                x = data.x[lo:lo + batch_size].to(device).float().div_(255.0)
                y = data.y[lo:lo + batch_size].to(device)
                correct += (model(x).argmax(1) == y).sum()
            acc = correct.item() / len(data)
            row[severity - 1] = acc
            n_images = len(data) if n_images is None else n_images
            if on_result is not None:
                on_result(name, severity, acc)
    per = {name: {"severity": row, "mean": _mean(row)} for name, row in accs.items()}
    complete = all(name in accs and None not in accs[name] for name in BENCHMARK_CORRUPTIONS)
    result = {
        "source": source,
        "comparable_with_cifar_c": comparable_with_cifar_c,
        "per_corruption": per,
        "mean": _mean(a for row in accs.values() for a in row),
        "benchmark_mean": _mean(a for name in BENCHMARK_CORRUPTIONS for a in accs[name]) if complete else None,
        "n": n_images,
    }
    if imagenet_c:
        result.update(_imagenet_c_mce(accs))
    return result


def _imagenet_c_mce(accs: Mapping[str, Sequence[Optional[float]]]) -> dict:
    """The mCE entries of an ImageNet-C result from accuracies ``{name: [acc at severity 1..5]}``."""
    whole = [name for name in BENCHMARK_CORRUPTIONS if name in accs and None not in accs[name]]
    # Top-1 error is 1 - accuracy; mce() normalises it by AlexNet's.
    scores = mce({name: [1.0 - a for a in accs[name]] for name in whole}) if whole else {"CE": {}}
    out = {"imagenet_c": True, "CE": scores["CE"], "mCE": None}
    if len(whole) == len(BENCHMARK_CORRUPTIONS):
        out["mCE"] = scores["mCE"]
        return out
    absent = [name for name in BENCHMARK_CORRUPTIONS if name not in accs]
    partial = [f"{name} (severity {', '.join(str(s) for s, a in zip(SEVERITIES, accs[name]) if a is None)})"
               for name in BENCHMARK_CORRUPTIONS if name in accs and name not in whole]
    reasons = [f"missing {', '.join(absent)}"] if absent else []
    reasons += [f"incomplete {', '.join(partial)}"] if partial else []
    out["mCE_note"] = (f"mCE needs all {len(BENCHMARK_CORRUPTIONS)} benchmark corruptions at severities 1..5; "
                       f"{'; '.join(reasons)}.")
    return out


# --------------------------------------------------------------------------- ImageNet-C mCE

#: AlexNet's top-1 error on ImageNet-C per benchmark corruption, averaged over the 5 severities (fractions),
#: from Hendrycks & Dietterich's code (also used by AugMix's imagenet.py to normalise corruption errors).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}


def mce(errors: Mapping[str, Sequence[float]]) -> dict:
    """Corruption errors normalised by AlexNet's (Hendrycks & Dietterich's mCE), as fractions.

    ``CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}`` with the model's top-1 errors ``E`` at severities 1..5;
    since :data:`ALEXNET_ERRORS` holds AlexNet's mean over severities, the denominator is 5 times it. ``mCE``
    is the mean of ``CE_c`` over the corruptions given; multiply by 100 for the paper's percentages (AlexNet
    itself scores 1.0, i.e. 100%). Errors are ``1 - accuracy``, e.g. of :func:`evaluate_corruptions`.

    Returns:
        ``{"mCE": float, "CE": {name: float}, "complete": whether all 15 benchmark corruptions were given}``.
    """
    if not isinstance(errors, Mapping) or not errors:
        raise DataError("mce needs a non-empty mapping {corruption: [error at severity 1..5]}.")
    ce = {}
    for name, errs in errors.items():
        if name not in ALEXNET_ERRORS:
            raise DataError(f"mce has no AlexNet baseline for '{name}'; known: {', '.join(ALEXNET_ERRORS)}.")
        if not _is_list(errs) or len(errs) != len(SEVERITIES):
            raise DataError(f"mce needs 5 errors (severity 1..5) for '{name}', got {errs!r}.")
        for e in errs:
            if not _is_fraction(e):
                raise DataError(f"errors for '{name}' must be fractions in [0, 1], got {e!r}.")
        # fsum and 5 * e are both correctly rounded, so AlexNet's own errors give exactly 1.0.
        ce[name] = math.fsum(float(e) for e in errs) / (len(SEVERITIES) * ALEXNET_ERRORS[name])
    return {"mCE": math.fsum(ce.values()) / len(ce), "CE": ce, "complete": set(ce) == set(ALEXNET_ERRORS)}
