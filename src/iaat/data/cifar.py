"""CIFAR-10/100 from the official python archive layout, with md5 checks and download."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from .imageset import DatasetSplits, ImageSet

# The official release (https://www.cs.toronto.edu/~kriz/cifar.html).
_SPECS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
        "train": {f"data_batch_{i}": m for i, m in enumerate([
            "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
            "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
            "482c414d41f54cd18b22e5b47cb7c3cb"], start=1)},
        "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
        "label_key": "labels",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
        "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        "label_key": "fine_labels",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

DEFAULT_ROOT = Path(os.environ.get("IAAT_DATA", Path.home() / ".cache" / "iaat"))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_data_dir(data_dir: Optional[str], expected: str, parent_hint: bool = False) -> None:
    """``--data-dir`` may be missing (a download creates it) but not a file: say so before a mkdir fails on it
    (``parent_hint``: name the file's folder, where a file of the data set is the likely mistake)."""
    if not data_dir:
        return
    path = Path(data_dir).expanduser()
    # the path itself, or a part of it that is a file (where mkdir would fail with "Not a directory")
    file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise DataError(f"--data-dir {data_dir}: {file} is a file, not a folder; pass {expected}"
                        + (f" (e.g. {file.parent})." if parent_hint and file == path else "."))


def find_folder(name: str, data_dir: Optional[str]) -> tuple[Optional[Path], list[Path]]:
    """Return the folder holding the batch files (``data_dir`` itself or its child) and the places looked."""
    spec = _SPECS[name]
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_ROOT
    first = next(iter(spec["train"]))
    candidates = [root, root / spec["folder"]]
    for c in candidates:
        if (c / first).is_file():
            return c, candidates
    return None, candidates


def _download(name: str, root: Path) -> Path:
    """Download and unpack the official archive into ``root``; on failure the folders it created are removed."""
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch(name, root)
    except BaseException:
        for folder in created:  # innermost first; only what this call made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fetch(name: str, root: Path) -> Path:
    spec = _SPECS[name]
    print(f"downloading {spec['url']} to {root} ...", flush=True)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".tar.gz.part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(spec["url"], timeout=30) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            os.unlink(tmp.name)
            raise DataError(f"could not download {spec['url']} ({e}).") from None
    archive = Path(tmp.name)
    try:
        if _md5(archive) != spec["archive_md5"]:
            raise DataError(f"the downloaded {spec['url']} has the wrong md5; not using it.")
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(spec["folder"] + "/")
                       and m.isfile() and ".." not in Path(m.name).parts]
            # only plain files inside the expected folder; and Python's "data" filter where it has one (3.12,
            # 3.11.4, 3.10.12), which 3.14 applies by default
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **safe)
    finally:
        archive.unlink(missing_ok=True)
    return root / spec["folder"]


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # The official files are Python 2 pickles of dicts, lists and one numpy array; a restricted
            # unpickler refuses anything else, so a crafted file cannot run code.
            return _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a readable CIFAR batch file ({e}).") from None


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        ("__builtin__", "bytes"), ("builtins", "bytes"),  # protocol-2 pickles write b"" (an empty array) as bytes()
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


#: (training, test) images of the official CIFAR-10 and CIFAR-100 releases
OFFICIAL_COUNTS = (50_000, 10_000)


def _load_split(folder: Path, files: dict, label_key: str, verify: list) -> ImageSet:
    xs, ys = [], []
    for fname, md5 in files.items():
        path = folder / fname
        if not path.is_file():
            raise DataError(f"{path} is missing: the folder {folder} is not a complete CIFAR python release.")
        if _md5(path) != md5:
            verify.append(fname)
        batch = _read_batch(path)
        if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
            raise DataError(f"{path} has no '{label_key}' or 'data' entry; is it the right CIFAR variant?")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' must be uint8 rows of 3072 values, got {data.dtype} {data.shape}.")
        try:
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: '{label_key}' must be integer class labels ({e}).") from None
        if labels.shape != (len(data),):
            raise DataError(f"{path}: {len(labels)} labels for {len(data)} images.")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def load_cifar(name: str, data_dir: Optional[str], download: bool = True) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 from ``data_dir`` (the batch folder or its parent).

    Missing and ``download`` → fetch the official archive (md5-checked). Offline and missing →
    a :class:`DataError` saying where it looked. Files whose md5 differs from the official
    release (e.g. a re-encoded copy) load with a warning.
    """
    spec = _SPECS[name]
    check_data_dir(data_dir, f"a '{spec['folder']}' folder or its parent", parent_hint=True)
    folder, looked = find_folder(name, data_dir)
    if folder is None:
        for other in (o for o in _SPECS if o != name):  # the other CIFAR there: a wrong --dataset, not a download
            found, _ = find_folder(other, data_dir)
            if found is not None:
                raise DataError(f"{found} holds {other}, not {name}: pass --dataset {other}, or --data-dir pointing "
                                f"at a '{spec['folder']}' folder or its parent.")
        if data_dir and not Path(data_dir).expanduser().exists():
            hint = f"the folder {data_dir} does not exist"
        else:
            hint = f"no {spec['folder']} files in {' or '.join(str(p) for p in looked)}"
        if not download:
            raise DataError(f"{name} not found: {hint}. Pass --data-dir pointing at a '{spec['folder']}' folder "
                            f"or its parent (or allow data.download).")
        try:
            folder = _download(name, looked[0])
        except DataError as e:
            raise DataError(f"{name} not found: {hint}, and downloading failed: {e} Pass --data-dir pointing at "
                            f"a '{spec['folder']}' folder or its parent, or run once with internet.") from None
    mismatched: list = []
    train = _load_split(folder, spec["train"], spec["label_key"], mismatched)
    test = _load_split(folder, spec["test"], spec["label_key"], mismatched)
    counts = (len(train.y), len(test.y))
    if mismatched:  # a re-encoded copy (e.g. JPEG) keeps the counts; a truncated or partial one says so here
        short = "" if counts == OFFICIAL_COUNTS else (
            f"; it holds {counts[0]:,} training and {counts[1]:,} test images, not the release's "
            f"{OFFICIAL_COUNTS[0]:,} and {OFFICIAL_COUNTS[1]:,}: incomplete or damaged")
        warnings.warn(f"{folder}: {', '.join(mismatched)} differ(s) from the official {name} release (md5){short}; "
                      "numbers on this copy are not comparable with published tables.", stacklevel=3)
    return DatasetSplits(name, train, test, spec["num_classes"], spec["mean"], spec["std"], str(folder))
