"""CIFAR loading, class-balanced splits and the device-resident loader."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import class_images, write_cifar10_folder
from iaat.data import DeviceLoader, ImageSet, augment_batch, balanced_indices, load_dataset, make_train_val
from iaat.errors import DataError

# --------------------------------------------------------------------------- CIFAR-10 folder loading


def _load_quietly(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_dataset("cifar10", str(path), download=False, **kw)


@pytest.mark.parametrize("which", ["parent", "folder"])
def test_cifar10_loads_from_parent_or_folder(tiny_cifar, which):
    path = tiny_cifar if which == "parent" else tiny_cifar / "cifar-10-batches-py"
    splits = _load_quietly(path)
    assert splits.name == "cifar10" and splits.num_classes == 10
    assert splits.train.x.shape == (500, 3, 32, 32) and splits.train.x.dtype == torch.uint8
    assert splits.test.x.shape == (200, 3, 32, 32) and splits.test.x.dtype == torch.uint8
    assert splits.train.y.dtype == torch.int64 and splits.test.y.dtype == torch.int64
    assert splits.image_shape == (3, 32, 32)
    assert Path(splits.source) == tiny_cifar / "cifar-10-batches-py"
    # Pixels and labels arrive in file order and in the official R, G, B plane layout.
    x, y = class_images(700)
    assert torch.equal(splits.train.x, torch.from_numpy(x[:500]))
    assert torch.equal(splits.test.x, torch.from_numpy(x[500:]))
    assert torch.equal(splits.train.y, torch.from_numpy(y[:500]))
    assert torch.equal(splits.test.y, torch.from_numpy(y[500:]))


def test_md5_mismatch_warns(tiny_cifar):
    with pytest.warns(UserWarning, match="md5") as record:
        load_dataset("cifar10", str(tiny_cifar), download=False)
    message = str(record[0].message)
    assert "data_batch_1" in message and "test_batch" in message
    assert "it holds 500 training and 200 test images, not the release's 50,000 and 10,000" in message


def test_missing_folder_names_where_it_looked(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("cifar10", str(missing), download=False)
    assert str(missing) in str(info.value)
    assert not missing.exists()  # download=False must not create anything


def test_empty_folder_names_both_places_looked(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-batches-py" in message


def test_missing_test_batch_raises(tmp_path):
    folder = write_cifar10_folder(tmp_path, train_per_batch=10, n_test=10)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        _load_quietly(tmp_path)


def test_digits_read_directly_equal_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    from iaat.data.datasets import _digits_arrays

    images, target = _digits_arrays()
    bunch = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)


def test_unknown_dataset_raises():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def _rows(n: int) -> np.ndarray:
    return np.zeros((n, 3072), np.uint8)


BAD_BATCHES = {
    "no_labels": {"data": _rows(10)},
    "no_data": {"labels": [0] * 10},
    "wrong_width": {"data": np.zeros((10, 3000), np.uint8), "labels": [0] * 10},
    "wrong_ndim": {"data": np.zeros((10, 3, 32, 32), np.uint8), "labels": [0] * 10},
    "wrong_dtype": {"data": np.zeros((10, 3072), np.float32), "labels": [0] * 10},
    "too_few_labels": {"data": _rows(10), "labels": [0] * 9},
    "label_out_of_range": {"data": _rows(10), "labels": [10] * 10},
    "negative_label": {"data": _rows(10), "labels": [-1] * 10},
    "a_list": [1, 2, 3],
    # Batches that unpickle to something other than a dict with integer labels.
    "an_int": 5,
    "none": None,
    "a_string": "data labels",
    "string_labels": {"data": _rows(10), "labels": ["a"] * 10},
    "none_labels": {"data": _rows(10), "labels": None},
}


@pytest.mark.parametrize("name", sorted(BAD_BATCHES))
def test_malformed_batch_raises_data_error(tmp_path, name):
    folder = write_cifar10_folder(tmp_path, train_per_batch=10, n_test=10)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(BAD_BATCHES[name], f, protocol=2)
    with pytest.raises(DataError):
        _load_quietly(tmp_path)


@pytest.mark.parametrize("content", ["garbage", "truncated", "empty"])
def test_unreadable_batch_raises_data_error(tmp_path, content):
    folder = write_cifar10_folder(tmp_path, train_per_batch=10, n_test=10)
    good = (folder / "data_batch_1").read_bytes()
    data = {"garbage": b"\x00not a pickle" * 10, "truncated": good[: len(good) // 2], "empty": b""}[content]
    (folder / "data_batch_3").write_bytes(data)
    with pytest.raises(DataError, match="data_batch_3"):
        _load_quietly(tmp_path)


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
@pytest.mark.parametrize("where", ["whole_file", "labels_entry"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, payload, where):
    folder = write_cifar10_folder(tmp_path / "data", train_per_batch=10, n_test=10)
    marker = tmp_path / "pwned"
    evil = payload(marker)
    obj = evil if where == "whole_file" else {"data": _rows(10), "labels": evil}
    # Sanity: the payload does run when unpickled naively.
    pickle.loads(pickle.dumps(evil, protocol=2))
    assert marker.exists()
    marker.unlink()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(DataError, match="refusing"):
        _load_quietly(tmp_path / "data")
    assert not marker.exists()


def test_official_numpy1_module_names_load(tmp_path):
    """The official files reference numpy.core.multiarray (numpy 1.x); they must stay loadable."""
    folder = write_cifar10_folder(tmp_path, train_per_batch=10, n_test=10)
    path = folder / "data_batch_4"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    splits = _load_quietly(tmp_path)
    assert splits.train.x.shape == (50, 3, 32, 32)


# --------------------------------------------------------------------------- splits

def _labels(n: int = 1000, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def _spread(labels: torch.Tensor, idx: torch.Tensor, num_classes: int = 10) -> int:
    counts = torch.bincount(labels[idx], minlength=num_classes)
    return int(counts.max() - counts.min())


@pytest.mark.parametrize("val_size,train_subset", [(0, None), (7, None), (100, None), (123, 50), (100, 333),
                                                   (250, 750)])
def test_make_train_val_balanced_disjoint_deterministic(val_size, train_subset):
    labels = _labels()
    train, val = make_train_val(labels, val_size, train_subset, split_seed=1)
    again = make_train_val(labels, val_size, train_subset, split_seed=1)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(val) == val_size
    assert len(train) == (len(labels) - val_size if train_subset is None else train_subset)
    assert train.dtype == torch.long and val.dtype == torch.long
    assert len(set(train.tolist()) | set(val.tolist())) == len(train) + len(val)  # disjoint, no repeats
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    if val_size:
        assert _spread(labels, val) <= 1
    if train_subset is not None:
        assert _spread(labels, train) <= 1
    else:
        assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))


def test_make_train_val_depends_on_seed_and_keeps_val_fixed():
    labels = _labels()
    _, val_a = make_train_val(labels, 100, None, split_seed=0)
    _, val_b = make_train_val(labels, 100, None, split_seed=1)
    assert not torch.equal(val_a, val_b)
    # The held-out images do not depend on the training subset.
    for subset in (None, 10, 500, 900):
        assert torch.equal(make_train_val(labels, 100, subset, split_seed=0)[1], val_a)


@pytest.mark.parametrize("val_size,train_subset", [(1000, None), (1200, None), (100, 901), (0, 1001)])
def test_make_train_val_too_many_raises(val_size, train_subset):
    with pytest.raises(DataError):
        make_train_val(_labels(), val_size, train_subset, split_seed=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 300), num_classes=st.integers(2, 12), seed=st.integers(0, 2**16),
       excluded=st.integers(0, 50))
def test_balanced_indices_properties(n, num_classes, seed, excluded):
    labels = _labels(400, num_classes, seed)
    exclude = torch.arange(excluded)
    idx = balanced_indices(labels, n, torch.Generator().manual_seed(seed), exclude=exclude)
    again = balanced_indices(labels, n, torch.Generator().manual_seed(seed), exclude=exclude)
    assert torch.equal(idx, again)
    assert len(idx) == n and len(set(idx.tolist())) == n
    assert torch.all(idx >= excluded)
    assert _spread(labels, idx, num_classes) <= 1


def test_balanced_indices_fills_from_other_classes_when_one_is_short():
    labels = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(1, 10).repeat(100)])
    idx = balanced_indices(labels, 50, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts[0] == 3 and counts.sum() == 50
    assert int(counts[1:].max() - counts[1:].min()) <= 1


def test_balanced_indices_too_many_raises():
    labels = _labels(100)
    with pytest.raises(DataError, match="only 90"):
        balanced_indices(labels, 91, torch.Generator().manual_seed(0), exclude=torch.arange(10))


def test_balanced_indices_differs_between_seeds():
    labels = _labels()
    a = balanced_indices(labels, 100, torch.Generator().manual_seed(0))
    b = balanced_indices(labels, 100, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------- DeviceLoader

def _image_set(n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.randint(0, 10, (n,), generator=g))


# (n, batch size): tail 0, tail 1 (folded into the previous batch), tail > 1, one sample, one batch + 1.
SIZES = [(20, 5), (21, 5), (23, 5), (1, 5), (6, 5), (4, 5), (0, 5)]


@pytest.mark.parametrize("n,bs", SIZES)
@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_covers_every_index_once(n, bs, shuffle):
    data = _image_set(n)
    loader = DeviceLoader(data, bs, torch.device("cpu"), shuffle=shuffle, seed=3)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches)
    seen = torch.cat([idx for _, _, idx in batches]) if batches else torch.zeros(0, dtype=torch.long)
    assert torch.equal(seen.sort().values, torch.arange(n))
    if not shuffle:
        assert torch.equal(seen, torch.arange(n))
    for x, y, idx in batches:
        assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
        assert len(x) >= min(2, n)  # never a lone sample unless the split has one
        assert torch.equal(x, data.x[idx].float() / 255)
        assert torch.equal(y, data.y[idx])


def test_loader_iterates_like_epoch_zero():
    loader = DeviceLoader(_image_set(23), 5, torch.device("cpu"), seed=1)
    a = [idx for _, _, idx in loader]
    b = [idx for _, _, idx in loader.epoch(0)]
    assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("augment", [False, True])
def test_loader_batches_are_a_function_of_seed_and_epoch(augment):
    data = _image_set(50)

    def run(seed, epoch):
        loader = DeviceLoader(data, 8, torch.device("cpu"), augment=augment, seed=seed)
        return list(loader.epoch(epoch))

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))

    assert same(run(0, 2), run(0, 2))
    assert not same(run(0, 2), run(0, 3))
    assert not same(run(0, 2), run(1, 2))


@pytest.mark.parametrize("n,bs,world", [(23, 6, 2), (42, 6, 3), (9, 4, 2), (33, 8, 4)])
@pytest.mark.parametrize("augment", [False, True])
def test_loader_shards_split_each_global_batch(n, bs, world, augment):
    """Step by step, the ranks' batches together are the 1-process batch: same images, crops and flips."""
    data = _image_set(n)
    whole = list(DeviceLoader(data, bs, torch.device("cpu"), seed=0, augment=augment).epoch(1))
    parts = []
    for rank in range(world):
        loader = DeviceLoader(data, bs, torch.device("cpu"), seed=0, augment=augment, shard=(rank, world))
        parts.append(list(loader.epoch(1)))
        assert len(loader) == len(parts[-1]) == len(whole)
    for step, (x, y, idx) in enumerate(whole):
        shards = [p[step] for p in parts]
        assert all(len(s[2]) >= 2 for s in shards)
        for rank, (xs, ys, ids) in enumerate(shards):
            assert torch.equal(ids, idx[rank::world])
            assert torch.equal(xs, x[rank::world]) and torch.equal(ys, y[rank::world])


def test_loader_shard_needs_two_images_per_rank():
    with pytest.raises(ValueError, match="2 images"):
        DeviceLoader(_image_set(20), 5, torch.device("cpu"), shard=(0, 3))


def test_augment_batch_keeps_shape_and_is_seeded():
    x = _image_set(16).x
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    c = augment_batch(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_flip_only_flips_or_keeps_each_image():
    x = _image_set(64).x
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(out[flipped], x[flipped].flip(3))


def test_augment_without_flip_and_padding_is_identity():
    x = _image_set(8).x
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), padding=0, flip=False), x)


def test_augment_crop_is_a_window_of_the_zero_padded_image():
    x = _image_set(32).x
    pad = 4
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=pad, flip=False)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = []
    for o, p in zip(out, padded):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(o, p[:, dy:dy + 8, dx:dx + 8])]
        assert found, "every output is a crop of the padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # offsets vary


# --------------------------------------------------------------------------- the real CIFAR-10 (JPEG-75 copy)

def test_real_cifar10_loads_with_md5_warning(real_cifar):
    with pytest.warns(UserWarning, match="md5") as record:
        splits = load_dataset("cifar10", str(real_cifar), download=False)
    assert "incomplete" not in str(record[0].message)  # re-encoded, not cut
    assert splits.train.x.shape == (50000, 3, 32, 32) and splits.train.x.dtype == torch.uint8
    assert splits.test.x.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(splits.train.y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(splits.test.y), torch.full((10,), 1000))
    # Real photos, not a constant: per-channel means near the published CIFAR-10 ones.
    means = splits.train.x[:5000].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor(splits.mean), atol=0.02)
