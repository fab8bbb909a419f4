"""ImageNet-C: ``<corruption>/<severity 1..5>/<wnid>/<image>`` folders, decoded with Pillow severity by severity."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ...data import ImageSet
from ...data.folder import IMAGE_EXTENSIONS
from ...data.folder import image_files as _image_files
from ...data.folder import pillow as _pillow
from ...data.folder import read_image as _read_image
from ...data.folder import read_images
from ...data.folder import subfolders as _subfolders
from ...errors import DataError
from .common import CIFAR_C_CORRUPTIONS, SEVERITIES, CorruptionItem, CorruptionSets

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
