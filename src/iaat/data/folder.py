"""Image folders in the ImageFolder layout (``ROOT/train/<class>/<image>``, ``ROOT/val/<class>/<image>``), e.g. ImageNet.

Such data sets do not fit in memory as tensors, so images are decoded (Pillow, several threads:
Pillow releases the GIL while it decodes and resizes) when a batch needs them:

* :class:`FolderImages` stands in for the uint8 image tensor of an :class:`~iaat.data.ImageSet`:
  indexing it decodes those images with the evaluation preprocessing (short side resized to
  ``resize``, center crop ``image_size``, as torchvision's ``Resize`` + ``CenterCrop``), so every
  evaluation path works on folders unchanged;
* :class:`FolderLoader` is the training loader: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3,
  as torchvision's) and a horizontal flip per image, drawn from a generator seeded by (seed,
  epoch, sample), so an epoch is a pure function of the seed and the epoch whatever the number of
  worker threads, and resuming mid-epoch needs no loader state. It shards each global batch
  between torchrun ranks exactly as :class:`~iaat.data.DeviceLoader` does.

torchvision is not needed. Class indices follow the sorted class folder names (ImageNet's wnids),
as torchvision's ImageFolder.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import DataError
from .batch import to_unit
from .loader import BatchPlan

#: File endings read as images (those of torchvision's ImageFolder), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
READ_THREADS = min(8, os.cpu_count() or 1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the side images are read at where ``data.image_size`` is not given (ImageNet's)
DEFAULT_IMAGE_SIZE = 224


def pillow(purpose: str):
    """Pillow's ``Image`` module, or a clear error naming what needed it."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{purpose} needs Pillow: pip install Pillow (or pip install -e '.[dev]').") from None
    return Image


def subfolders(path: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``path``."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def image_files(path: Path) -> list[str]:
    """Sorted paths, relative to ``path``, of the image files (:data:`IMAGE_EXTENSIONS`) in it and its sub-folders,
    as torchvision's ImageFolder finds them; hidden files and folders (``._x.jpg``, ``.ipynb_checkpoints``) are
    left out."""
    found = []
    for folder, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        inner = Path(folder).relative_to(path)
        found += [str(inner / f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def open_rgb(image_cls, file: Path):
    try:
        with image_cls.open(file) as img:
            if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip at 255
                grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
                return image_cls.fromarray(grey).convert("RGB")
            return img.convert("RGB")  # decodes the whole file, so damaged data fails here
    except (OSError, ValueError, SyntaxError, image_cls.DecompressionBombError) as exc:
        raise DataError(f"cannot read the image {file} ({exc}); the file is damaged or not an image, "
                        "download or extract it again.") from None


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def read_image(image_cls, file: Path, image_size: int, resize: Optional[int]) -> torch.Tensor:
    """One image as uint8 (3, image_size, image_size): RGB, torchvision's Resize(resize) then CenterCrop(image_size)."""
    img = open_rgb(image_cls, file)
    w, h = img.size
    if resize is not None and min(w, h) != resize:
        # As torchvision's Resize(int) on PIL images: short side to `resize`, long side truncated, bilinear.
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        img = img.resize(size, image_cls.BILINEAR)
        w, h = img.size
    if min(w, h) < image_size:
        raise DataError(f"the image {file} is {w}x{h} pixels{' after resizing' if resize else ''}, smaller than "
                        f"image_size {image_size}.")
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))  # torchvision's CenterCrop
    return _to_tensor(img.crop((left, top, left + image_size, top + image_size)))


def random_resized_crop(image_cls, file: Path, image_size: int, generator: torch.Generator,
                        scale: tuple = (0.08, 1.0), ratio: tuple = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip, drawn from ``generator``; uint8 (3, S, S)."""
    img = open_rgb(image_cls, file)
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(u[2] * (h - ch + 1))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # fall back to a center crop of the allowed aspect ratio
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    img = img.resize((image_size, image_size), image_cls.BILINEAR, box=box)
    if bool(torch.rand(1, generator=generator) < 0.5):
        img = img.transpose(image_cls.FLIP_LEFT_RIGHT)
    return _to_tensor(img)


def scan_split(root: Path, classes: Optional[Sequence[str]] = None) -> tuple[list[Path], torch.Tensor, list[str]]:
    """The image files of one split folder ``root/<class>/...`` and their labels (sorted class names)."""
    if not root.is_dir():
        raise DataError(f"{root} is missing: an image folder data set needs ROOT/train/<class>/<image> and "
                        f"ROOT/val/<class>/<image> (the ImageNet layout).")
    found = subfolders(root)
    if not found:
        raise DataError(f"{root} holds no class folders (expected {root}/<class>/<image>).")
    training = classes is None  # this split defines the classes
    classes = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in set(classes)]
    if unknown:
        raise DataError(f"{root} has class folders the training split lacks: {', '.join(unknown[:5])}.")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        names = image_files(root / name)
        if not names and training:  # it would still be a class, with an output no image trains
            raise DataError(f"{root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): add some or remove "
                            f"the folder (class indices follow the sorted folder names).")
        files += [root / name / f for f in names]
        labels += [label] * len(names)
    if not files:
        raise DataError(f"the class folders of {root} hold no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files, torch.tensor(labels, dtype=torch.long), classes


class FolderImages:
    """A lazy (N, 3, S, S) uint8 "tensor" of image files: indexing decodes (evaluation preprocessing).

    Supports what the evaluation code does with image tensors: ``len``, ``shape``, ``x[a:b]`` and
    ``x[index_tensor]`` (both decode and return a real tensor), and :meth:`select` for a lazy subset.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, files: Sequence[Path], image_size: int, resize: Optional[int]) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), 3, self.image_size, self.image_size))

    def select(self, indices: Union[torch.Tensor, Sequence[int]]) -> "FolderImages":
        idx = indices.tolist() if torch.is_tensor(indices) else list(indices)
        return FolderImages([self.files[i] for i in idx], self.image_size, self.resize)

    def __getitem__(self, key: Union[slice, int, torch.Tensor, Sequence[int]]) -> torch.Tensor:
        if isinstance(key, slice):
            idx = list(range(*key.indices(len(self.files))))
        else:
            idx = key.tolist() if torch.is_tensor(key) else key
            idx = [idx] if isinstance(idx, numbers.Integral) else list(idx)  # np.int64 from a sampler too
        image_cls = pillow("reading image folders")
        return read_images([self.files[i] for i in idx], self.image_size,
                           lambda f: read_image(image_cls, f, self.image_size, self.resize))


def read_images(files: Sequence[Path], image_size: int, read_one: Callable[[Path], torch.Tensor]) -> torch.Tensor:
    """``read_one`` of every file into one uint8 (len(files), 3, image_size, image_size) tensor, by a few threads.

    After a failed image the rest are not read (the error is raised at once).
    """
    x = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)

    def fill(i: int) -> None:
        x[i] = read_one(files[i])

    if len(files) <= 1:
        for i in range(len(files)):
            fill(i)
        return x
    pool = ThreadPoolExecutor(min(READ_THREADS, len(files)))
    try:
        for _ in pool.map(fill, range(len(files))):
            pass
    finally:
        pool.shutdown(cancel_futures=True)
    return x


def _sample_generator(seed: int, epoch: int, sample: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + sample * 104_729 + 12_345) % (2**63 - 1))
    return g


class FolderLoader(BatchPlan):
    """Training batches ``(x, y, index)`` from a :class:`FolderImages` set, decoded and augmented on the host.

    The interface and the batch plan of :class:`~iaat.data.DeviceLoader` (same permutation, same sharding of
    each global batch between ranks, same folding of a last batch too small for BatchNorm). With ``augment``
    every image gets its own RandomResizedCrop + flip; without, the evaluation preprocessing. The next
    batch is decoded in the background while the current one trains.
    """

    def __init__(self, data, batch_size: int, device: torch.device, *, shuffle: bool = True, augment: bool = True,
                 seed: int = 0, shard: Optional[tuple[int, int]] = None) -> None:
        if not isinstance(data.x, FolderImages):
            raise TypeError("FolderLoader reads image folders; use DeviceLoader for tensors")
        # The permutation is drawn on the CPU: the indices pick files, and must not depend on the device.
        super().__init__(len(data.y), batch_size, torch.device("cpu"), shuffle=shuffle, seed=seed, shard=shard)
        self.images, self.y = data.x, data.y
        self.target = torch.device(device)
        self.augment = augment

    def _decode(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        image_cls = pillow("reading image folders")
        size = self.images.image_size
        files = [self.images.files[i] for i in idx.tolist()]
        if not self.augment:
            return read_images(files, size, lambda f: read_image(image_cls, f, size, self.images.resize))
        gens = {f: _sample_generator(self.seed, epoch, i) for f, i in zip(files, idx.tolist())}
        return read_images(files, size, lambda f: random_resized_crop(image_cls, f, size, gens[f]))

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one epoch from step ``start`` on (deterministic in ``seed`` and ``epoch``)."""
        plan = [self._mine(idx) for idx in self._plan(epoch)[1][start:]]
        with ThreadPoolExecutor(1) as prefetch:
            pending = prefetch.submit(self._decode, plan[0], epoch) if plan else None
            for k, idx in enumerate(plan):
                x = pending.result()
                if k + 1 < len(plan):
                    pending = prefetch.submit(self._decode, plan[k + 1], epoch)
                x = to_unit(x, self.target, non_blocking=True)
                yield x, self.y[idx].to(self.target), idx.to(self.target)

    __iter__ = epoch


def _warn_if_upscaled(first: Path, image_size: int) -> None:
    """A warning where the first training image is less than half the default size: small images (CIFAR-sized ones,
    say) would be enlarged many times over, which costs time and memory quadratically for no detail."""
    try:
        with pillow("reading image folders").open(first) as image:  # the header only
            width, height = image.size
    except OSError:  # an unreadable image is named where it is decoded
        return
    if 2 * max(width, height) <= image_size:
        warnings.warn(f"the images are small ({first.name}: {width}x{height} px) and are read at {image_size} px, the "
                      f"default data.image_size; set --set data.image_size={min(width, height)} to use them at about "
                      f"their own size.", stacklevel=2)


def load_image_folder(data_dir: Optional[str], image_size: Optional[int] = None, resize: Optional[int] = None):
    """``ROOT/train`` and ``ROOT/val`` as :class:`~iaat.data.DatasetSplits` of lazy images (ImageNet statistics),
    read at ``image_size`` (default 224, with a warning where the images are less than half of that)."""
    from .imageset import DatasetSplits, ImageSet

    if not data_dir:
        raise DataError("data.dataset=imagefolder needs --data-dir ROOT with ROOT/train/<class>/<image> and "
                        "ROOT/val/<class>/<image>.")
    from .cifar import check_data_dir

    check_data_dir(data_dir, "the folder ROOT that holds train/ and val/")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist: pass the folder ROOT that holds train/<class>/<image> "
                        f"and val/<class>/<image>.")
    train_files, train_y, classes = scan_split(root / "train")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        _warn_if_upscaled(train_files[0], image_size)
    resize = resize if resize is not None else int(round(image_size * 256 / 224))
    if resize < image_size:
        raise DataError(f"data.resize ({resize}) must be >= data.image_size ({image_size}).")
    val_files, val_y, _ = scan_split(root / "val", classes)
    train = ImageSet(FolderImages(train_files, image_size, resize), train_y)
    test = ImageSet(FolderImages(val_files, image_size, resize), val_y)
    source = (f"image folders {root} ({len(classes)} classes; train: RandomResizedCrop {image_size} + flip; "
              f"evaluation: short side {resize}, center crop {image_size})")
    return DatasetSplits("imagefolder", train, test, len(classes), IMAGENET_MEAN, IMAGENET_STD, source, classes)
