"""Common-corruption evaluation: CIFAR-C files, the torch generator, accuracy tables and mCE."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iaat.data import ImageSet
from iaat.errors import DataError
from iaat.evaluation.corruptions import (
    ALEXNET_ERRORS,
    BENCHMARK_CORRUPTIONS,
    CIFAR_C_CORRUPTIONS,
    GENERATED_CORRUPTIONS,
    evaluate_corruptions,
    generated_corruption_sets,
    is_imagenet_c,
    load_cifar_c,
    load_imagenet_c,
    mce,
    missing_corruptions,
)

N = 20  # images per severity in the generated CIFAR-C layouts
PRESENT = ("contrast", "gaussian_noise", "saturate")  # written in this (non-benchmark) order on purpose


def correct_count(name: str, severity: int) -> int:
    """How many of the N images of a (corruption, severity) block the PixelLabel model gets right."""
    return (3 * CIFAR_C_CORRUPTIONS.index(name) + 2 * severity) % (N + 1)


def write_cifar_c(folder: Path, names=PRESENT, n: int = N, seed: int = 0) -> dict:
    """Write a CIFAR-10-C layout: ``<name>.npy`` (5 n, 32, 32, 3) uint8 and ``labels.npy`` (5 n,) uint8.

    Pixel (0, 0) of the red plane holds the label for the first ``correct_count`` images of each block and the
    next class for the others, so PixelLabel's accuracy on every block is known exactly.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 10, 5 * n).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    arrays = {}
    for name in names:
        x = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        for severity in range(1, 6):
            lo = (severity - 1) * n
            k = correct_count(name, severity)
            x[lo:lo + n, 0, 0, 0] = labels[lo:lo + n]
            x[lo + k:lo + n, 0, 0, 0] = (labels[lo + k:lo + n] + 1) % 10
        np.save(folder / f"{name}.npy", x)
        arrays[name] = x
    arrays["labels"] = labels
    return arrays


class PixelLabel(nn.Module):
    """Predicts the class written in pixel (0, 0) of the first channel; records how it was called."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.seen = 0
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        self.seen += len(x)
        self.calls.append((self.training, torch.is_grad_enabled()))
        cls = (x[:, 0, 0, 0] * 255).round().long() % self.num_classes
        return F.one_hot(cls, self.num_classes).float()


def test_corruption_lists():
    assert len(CIFAR_C_CORRUPTIONS) == len(set(CIFAR_C_CORRUPTIONS)) == 19
    assert CIFAR_C_CORRUPTIONS[:15] == BENCHMARK_CORRUPTIONS
    assert set(CIFAR_C_CORRUPTIONS[15:]) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert set(ALEXNET_ERRORS) == set(BENCHMARK_CORRUPTIONS)
    assert list(GENERATED_CORRUPTIONS) == [c for c in CIFAR_C_CORRUPTIONS if c in GENERATED_CORRUPTIONS]
    required = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
                "brightness", "contrast", "saturate", "pixelate", "jpeg_compression"}
    assert required <= set(GENERATED_CORRUPTIONS)


# --------------------------------------------------------------------------- CIFAR-C folder


def test_load_cifar_c_yields_blocks_in_order(tmp_path):
    arrays = write_cifar_c(tmp_path / "CIFAR-10-C")
    sets = load_cifar_c(tmp_path / "CIFAR-10-C", n=7)
    assert sets.names == ["gaussian_noise", "contrast", "saturate"]  # benchmark order, not file order
    assert sets.missing == [c for c in CIFAR_C_CORRUPTIONS if c not in PRESENT]
    assert missing_corruptions(tmp_path / "CIFAR-10-C") == sets.missing
    assert sets.n == 7 and len(sets) == 15 and sets.comparable_with_cifar_c
    items = list(sets)
    assert [(name, sev) for name, sev, _ in items] == [(c, s) for c in sets.names for s in range(1, 6)]
    for name, severity, data in items:
        lo = (severity - 1) * N
        assert data.x.shape == (7, 3, 32, 32) and data.x.dtype == torch.uint8
        assert data.y.dtype == torch.int64
        expected = torch.from_numpy(arrays[name][lo:lo + 7]).permute(0, 3, 1, 2)
        assert torch.equal(data.x, expected)
        assert torch.equal(data.y, torch.from_numpy(arrays["labels"][lo:lo + 7].astype(np.int64)))


def test_load_cifar_c_takes_whole_blocks_by_default_and_caps_n(tmp_path):
    write_cifar_c(tmp_path, names=("fog",))
    assert [len(d) for _, _, d in load_cifar_c(tmp_path)] == [N] * 5
    capped = load_cifar_c(str(tmp_path), n=10 * N)
    assert capped.n == N and [len(d) for _, _, d in capped] == [N] * 5


def _data_error(call, *fragments) -> str:
    """``call()`` raises a DataError whose message holds every fragment; returns the message."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def _expect_error(folder, *fragments, n=None):
    return _data_error(lambda: load_cifar_c(folder, n=n), *fragments)


def test_load_cifar_c_folder_errors(tmp_path):
    _expect_error(tmp_path / "nowhere", "does not exist", str(tmp_path / "nowhere"), "zenodo")
    (tmp_path / "file").write_text("x")
    _expect_error(tmp_path / "file", "not a folder")
    with pytest.raises(DataError, match="does not exist"):
        missing_corruptions(tmp_path / "nowhere")
    write_cifar_c(tmp_path / "ok")
    (tmp_path / "ok" / "labels.npy").unlink()
    _expect_error(tmp_path / "ok", "labels.npy")
    empty = tmp_path / "empty"
    empty.mkdir()
    np.save(empty / "labels.npy", np.zeros(5 * N, dtype=np.uint8))
    _expect_error(empty, "none of the corruption files", "gaussian_noise.npy")
    write_cifar_c(tmp_path / "n")
    _expect_error(tmp_path / "n", "positive", n=0)


@pytest.mark.parametrize("array, fragments", [
    (np.zeros((5 * N, 3, 32, 32), np.uint8), ("uint8 images of shape (5 * N, 32, 32, 3)", "(100, 3, 32, 32)")),
    (np.zeros((5 * N, 32, 32), np.uint8), ("(100, 32, 32)",)),
    (np.zeros((5 * N, 32, 32, 3), np.float32), ("float32",)),
    (np.zeros((5 * N - 1, 32, 32, 3), np.uint8), ("99 images", "not divisible by 5")),
    (np.zeros((5 * (N + 1), 32, 32, 3), np.uint8), ("105 images", "100 labels")),
])
def test_load_cifar_c_rejects_malformed_files(tmp_path, array, fragments):
    write_cifar_c(tmp_path)
    np.save(tmp_path / "contrast.npy", array)
    message = _expect_error(tmp_path, *fragments)
    assert "contrast.npy" in message


def test_load_cifar_c_rejects_bad_labels_and_truncated_files(tmp_path):
    write_cifar_c(tmp_path)
    np.save(tmp_path / "labels.npy", np.zeros(5 * N - 2, np.uint8))
    _expect_error(tmp_path, "98 labels", "multiple of 5")
    np.save(tmp_path / "labels.npy", np.zeros(5 * N, np.float32))
    _expect_error(tmp_path, "integer labels")
    write_cifar_c(tmp_path)
    data = (tmp_path / "saturate.npy").read_bytes()
    (tmp_path / "saturate.npy").write_bytes(data[:len(data) // 2])
    _expect_error(tmp_path, "saturate.npy", "not a readable .npy")


# --------------------------------------------------------------------------- generated corruptions


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Textured float RGB images in [0, 1]: smooth gradients plus noise, away from the clipping bounds."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0.25, 0.75, 32)
    base = ramp[None, None, :, None] * rng.uniform(0.6, 1.0, (6, 3, 1, 1)) + ramp[None, None, None, :] * 0.2
    x = base + rng.normal(0, 0.12, (6, 3, 32, 32))
    return torch.from_numpy(np.round(x.clip(0, 1) * 255) / 255).float()


@pytest.mark.parametrize("name", list(GENERATED_CORRUPTIONS))
def test_generated_corruption_shape_range_determinism(images, name):
    fn = GENERATED_CORRUPTIONS[name]
    for severity in range(1, 6):
        out = fn(images.clone(), severity, torch.Generator().manual_seed(3))
        again = fn(images.clone(), severity, torch.Generator().manual_seed(3))
        assert out.shape == images.shape and out.dtype == images.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert torch.equal(out, again)
        assert (out - images).abs().mean() > 1e-3, f"{name} at severity {severity} leaves the image unchanged"
    with pytest.raises(DataError, match="severity"):
        fn(images, 6, torch.Generator())


MONOTONE = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
            "zoom_blur", "contrast", "brightness", "pixelate", "fog"]


@pytest.mark.parametrize("name", MONOTONE)
def test_generated_corruption_strength_grows_with_severity(images, name):
    fn = GENERATED_CORRUPTIONS[name]
    change = [float((fn(images, s, torch.Generator().manual_seed(0)) - images).abs().mean()) for s in range(1, 6)]
    assert all(a <= b for a, b in zip(change, change[1:])), change


def test_random_corruptions_depend_on_the_seed(images):
    for name in ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "fog"]:
        fn = GENERATED_CORRUPTIONS[name]
        a = fn(images, 3, torch.Generator().manual_seed(0))
        b = fn(images, 3, torch.Generator().manual_seed(1))
        assert not torch.equal(a, b), name


def test_pixelate_matches_pillow(images):
    Image = pytest.importorskip("PIL.Image")
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for severity, c in enumerate([0.95, 0.9, 0.85, 0.75, 0.65], start=1):
        side = int(32 * c)
        ref = np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.BOX).resize((32, 32), Image.BOX))
                        for p in pixels])
        out = GENERATED_CORRUPTIONS["pixelate"](images, severity, torch.Generator())
        assert np.array_equal((out * 255).round().permute(0, 2, 3, 1).numpy(), ref)


def test_blurs_match_scipy(images):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = images.double()
    for severity, sigma in enumerate([0.4, 0.6, 0.7, 0.8, 1.0], start=1):  # skimage's gaussian = scipy's, 'nearest'
        ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest")
        out = GENERATED_CORRUPTIONS["gaussian_blur"](x, severity, torch.Generator())
        assert np.allclose(out.numpy(), ref.clip(0, 1), atol=1e-9)
    # zoom_blur's centre zoom is scipy.ndimage.zoom (order 1) of the centre crop, as make_cifar_c.py's clipped_zoom.
    img = x[0].permute(1, 2, 0).numpy()
    acc = img.copy()
    factors = np.arange(1, 1.11, 0.01)
    for z in factors:
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        zoomed = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (zoomed.shape[0] - 32) // 2
        acc += zoomed[trim:trim + 32, trim:trim + 32]
    out = GENERATED_CORRUPTIONS["zoom_blur"](x[:1], 2, torch.Generator())
    assert np.allclose(out[0].permute(1, 2, 0).numpy(), (acc / (len(factors) + 1)).clip(0, 1), atol=1e-9)


def test_hsv_corruptions_on_known_pixels():
    grey = torch.full((1, 3, 1, 1), 0.5)
    black = torch.zeros(1, 3, 1, 1)
    g = torch.Generator()
    # skimage gives grey pixels hue 0 (red): a saturation shift tints them red.
    assert torch.allclose(GENERATED_CORRUPTIONS["saturate"](grey, 5, g).flatten(), torch.tensor([0.5, 0.4, 0.4]))
    assert torch.allclose(GENERATED_CORRUPTIONS["brightness"](black, 5, g).flatten(), torch.full((3,), 0.3))
    colour = torch.tensor([0.4, 0.2, 0.1]).view(1, 3, 1, 1)  # V = 0.4, S = 0.75
    assert torch.allclose(GENERATED_CORRUPTIONS["brightness"](colour, 2, g).flatten(), torch.tensor([0.5, 0.25, 0.125]))
    # S' = 0.1 * 0.75: each channel keeps V and moves towards it.
    expected = 0.4 - (0.4 - torch.tensor([0.4, 0.2, 0.1])) * 0.1
    assert torch.allclose(GENERATED_CORRUPTIONS["saturate"](colour, 2, g).flatten(), expected)


def test_generated_corruption_sets_uint8_and_reproducible():
    rng = np.random.default_rng(2)
    data = ImageSet(torch.from_numpy(rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)),
                    torch.arange(12) % 10)
    sets = generated_corruption_sets(data, n=9, seed=5)
    assert sets.names == list(GENERATED_CORRUPTIONS) and len(sets) == 5 * len(GENERATED_CORRUPTIONS)
    assert not sets.comparable_with_cifar_c and "motion_blur" in sets.missing and sets.n == 9
    items = list(sets)
    assert [(name, sev) for name, sev, _ in items] == [(c, s) for c in GENERATED_CORRUPTIONS for s in range(1, 6)]
    for name, severity, out in items:
        assert out.x.shape == (9, 3, 32, 32) and out.x.dtype == torch.uint8
        assert torch.equal(out.y, data.y[:9])
        assert not torch.equal(out.x, data.x[:9]), (name, severity)
    # A subset of names, generated again, gives the same images; another seed gives other noise.
    again = {(n, s): d.x for n, s, d in generated_corruption_sets(data, ["shot_noise", "contrast"], n=9, seed=5)}
    first = {(n, s): d.x for n, s, d in items}
    assert all(torch.equal(x, first[key]) for key, x in again.items())
    other = next(iter(generated_corruption_sets(data, ["shot_noise"], n=9, seed=6)))[2]
    assert not torch.equal(other.x, first[("shot_noise", 1)])
    # uint8 -> float -> uint8 rounds to the nearest level: contrast keeps the channel means up to rounding.
    contrast = first[("contrast", 3)].float()
    assert torch.allclose(contrast.mean((2, 3)), data.x[:9].float().mean((2, 3)), atol=0.5)


def test_generated_corruption_sets_errors():
    data = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match="cannot generate motion_blur"):
        generated_corruption_sets(data, ["motion_blur"])
    with pytest.raises(DataError, match="saturate needs RGB"):
        generated_corruption_sets(data, ["saturate"])
    with pytest.raises(DataError, match="positive"):
        generated_corruption_sets(data, ["contrast"], n=0)
    with pytest.raises(DataError, match="no images"):
        generated_corruption_sets(data.subset(torch.arange(0)), ["contrast"])
    grey = [name for name, _, _ in generated_corruption_sets(data, ["contrast", "jpeg_compression"])]
    assert grey == ["contrast"] * 5 + ["jpeg_compression"] * 5


# --------------------------------------------------------------------------- evaluation


def test_evaluate_corruptions_exact_accuracies(tmp_path):
    write_cifar_c(tmp_path)
    model = PixelLabel().train()
    seen = []
    result = evaluate_corruptions(model, load_cifar_c(tmp_path), batch_size=6,
                                  on_result=lambda *args: seen.append(args))
    names = ["gaussian_noise", "contrast", "saturate"]
    expected = {c: [correct_count(c, s) / N for s in range(1, 6)] for c in names}
    assert seen == [(c, s, expected[c][s - 1]) for c in names for s in range(1, 6)]
    assert list(result["per_corruption"]) == names
    for c in names:
        assert result["per_corruption"][c]["severity"] == expected[c]
        assert result["per_corruption"][c]["mean"] == pytest.approx(sum(expected[c]) / 5)
    assert result["mean"] == pytest.approx(sum(sum(v) for v in expected.values()) / 15)
    assert result["n"] == N and result["benchmark_mean"] is None
    assert result["comparable_with_cifar_c"] is True and str(tmp_path) in result["source"]
    assert model.training and model.seen == 15 * N
    assert all(call == (False, False) for call in model.calls)  # eval mode, no gradients
    assert len(model.calls) == 15 * math.ceil(N / 6)


def test_evaluate_corruptions_resumes_from_done(tmp_path):
    write_cifar_c(tmp_path)
    model = PixelLabel()
    seen = []
    done = {"gaussian_noise": [0.5, 0.25, 1.0, 0.0, 0.75], "contrast": [0.125, None]}
    result = evaluate_corruptions(model, load_cifar_c(tmp_path), done=done, source="mine",
                                  comparable_with_cifar_c=False, on_result=lambda *args: seen.append(args))
    assert [(c, s) for c, s, _ in seen] == [("contrast", s) for s in range(2, 6)] + [("saturate", s) for s in range(1, 6)]
    assert model.seen == 9 * N
    assert result["per_corruption"]["gaussian_noise"]["severity"] == done["gaussian_noise"]
    contrast = result["per_corruption"]["contrast"]["severity"]
    assert contrast == [0.125] + [correct_count("contrast", s) / N for s in range(2, 6)]
    assert result["source"] == "mine" and result["comparable_with_cifar_c"] is False
    with pytest.raises(DataError, match="accuracy"):
        evaluate_corruptions(model, load_cifar_c(tmp_path), done={"contrast": [1.5]})
    with pytest.raises(DataError, match="at most 5"):
        evaluate_corruptions(model, load_cifar_c(tmp_path), done={"contrast": [0.1] * 6})


def test_evaluate_corruptions_constant_model_on_generated_sets():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

        def forward(self, x):
            return self.bias.expand(len(x), 3)

    y = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2])  # three of eight are class 0
    data = ImageSet(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), y)
    result = evaluate_corruptions(Constant(), generated_corruption_sets(data, ["gaussian_noise", "pixelate"]))
    assert result["per_corruption"]["gaussian_noise"]["severity"] == [3 / 8] * 5
    assert result["mean"] == 3 / 8 and result["n"] == 8
    assert result["comparable_with_cifar_c"] is False and "generated" in result["source"]


def test_evaluate_corruptions_rejects_bad_items():
    with pytest.raises(DataError, match="tuples"):
        evaluate_corruptions(PixelLabel(), [("contrast", 1, torch.zeros(2, 3, 4, 4))])
    data = ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="severity"):
        evaluate_corruptions(PixelLabel(), [("contrast", 6, data)])


# --------------------------------------------------------------------------- mCE


def test_mce_of_alexnet_is_one():
    result = mce({name: [err] * 5 for name, err in ALEXNET_ERRORS.items()})
    assert result["mCE"] == 1.0 and result["complete"]
    assert all(ce == 1.0 for ce in result["CE"].values())


def test_mce_hand_computed():
    result = mce({"gaussian_noise": [0.5] * 5, "brightness": np.array([0.1, 0.2, 0.3, 0.4, 0.5])})
    ce_noise = 2.5 / (5 * 0.886428)
    ce_bright = 1.5 / (5 * 0.564592)
    assert result["CE"] == {"gaussian_noise": pytest.approx(ce_noise), "brightness": pytest.approx(ce_bright)}
    assert result["mCE"] == pytest.approx((ce_noise + ce_bright) / 2) and not result["complete"]


@pytest.mark.parametrize("errors, fragment", [
    ({"speckle_noise": [0.1] * 5}, "no AlexNet baseline"),
    ({"fog": [0.1] * 4}, "5 errors"),
    ({"fog": [0.1, 0.2, 0.3, 0.4, 1.5]}, "fractions"),
    ({"fog": [0.1, 0.2, 0.3, 0.4, float("nan")]}, "fractions"),
    ({}, "non-empty"),
])
def test_mce_rejects_bad_input(errors, fragment):
    with pytest.raises(DataError, match=fragment):
        mce(errors)


# --------------------------------------------------------------------------- ImageNet-C folders

IMAGENET_PRESENT = ("fog", "speckle_noise", "gaussian_noise")  # loaded in benchmark order
#: Files per wnid, in the order they are written (not sorted); the loader sorts classes and file names.
IMAGENET_FILES = {"n02": ["y.jpg", "x.png"], "n01": ["c.png", "a.JPEG", "b.png"],
                  "n03": ["4.png", "2.png", "3.JPEG", "1.png"]}
#: (label, rank of the file name within its class) in the interleaved order: image 0 of every class, then 1, ...
IMAGENET_ORDER = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (2, 2), (2, 3)]


def imagenet_colour(label: int, rank: int, severity: int) -> tuple[int, int, int]:
    """The flat colour of an image: red codes the class, green the file's rank, blue the severity."""
    return 40 + 60 * label, 30 + 50 * rank, 20 + 40 * severity


def write_imagenet_c(root: Path, names=IMAGENET_PRESENT, files=IMAGENET_FILES) -> Path:
    """Write a tiny ImageNet-C layout of flat-coloured 40x50 images (JPEG, PNG, one RGBA) plus files to skip."""
    Image = pytest.importorskip("PIL.Image")
    wnids = sorted(files)
    for name in names:
        for severity in range(1, 6):
            for wnid, file_names in files.items():
                folder = root / name / str(severity) / wnid
                folder.mkdir(parents=True)
                ranks = {f: r for r, f in enumerate(sorted(file_names))}
                for f in file_names:
                    img = Image.new("RGB", (40, 50), imagenet_colour(wnids.index(wnid), ranks[f], severity))
                    if f == "x.png":
                        img = img.convert("RGBA")  # the loader converts to RGB
                    img.save(folder / f)
                (folder / "notes.txt").write_text("not an image")
                (folder / ".hidden.png").write_bytes(b"not read")
    (root / "README.txt").write_text("ImageNet-C")
    return root


def test_is_imagenet_c(tmp_path):
    root = write_imagenet_c(tmp_path / "ImageNet-C")
    assert is_imagenet_c(root) and is_imagenet_c(str(root))
    write_cifar_c(tmp_path / "CIFAR-10-C", names=("fog",), n=2)
    assert not is_imagenet_c(tmp_path / "CIFAR-10-C")
    assert not is_imagenet_c(tmp_path / "nowhere")
    assert not is_imagenet_c(tmp_path / "ImageNet-C" / "README.txt")
    (tmp_path / "other" / "fog" / "train").mkdir(parents=True)
    assert not is_imagenet_c(tmp_path / "other")
    assert missing_corruptions(root) == [c for c in CIFAR_C_CORRUPTIONS if c not in IMAGENET_PRESENT]


def assert_flat(x: torch.Tensor, colour, tolerance: int = 4) -> None:
    """Every pixel of the uint8 (3, H, W) image is ``colour`` (up to JPEG's rounding)."""
    diff = (x.int() - torch.tensor(colour).view(3, 1, 1)).abs().max()
    assert diff <= tolerance, (x[:, 0, 0].tolist(), colour)


def test_load_imagenet_c_shapes_labels_and_interleaved_order(tmp_path):
    root = write_imagenet_c(tmp_path)
    sets = load_imagenet_c(root, image_size=16, resize=20)
    assert sets.names == ["gaussian_noise", "fog", "speckle_noise"]
    assert sets.missing == [c for c in CIFAR_C_CORRUPTIONS if c not in IMAGENET_PRESENT]
    assert sets.n == 9 and len(sets) == 15 and sets.imagenet_c and not sets.comparable_with_cifar_c
    assert str(root) in sets.source and "9 of 9" in sets.source
    items = list(sets)
    assert [(name, sev) for name, sev, _ in items] == [(c, s) for c in sets.names for s in range(1, 6)]
    for _, severity, data in items:
        assert data.x.shape == (9, 3, 16, 16) and data.x.dtype == torch.uint8 and data.y.dtype == torch.int64
        assert data.y.tolist() == [label for label, _ in IMAGENET_ORDER]
        for x, (label, rank) in zip(data.x, IMAGENET_ORDER):
            assert_flat(x, imagenet_colour(label, rank, severity))
    # n takes the first images of the interleaved order, so every class appears; larger n is capped.
    first = next(load_imagenet_c(root, n=4, image_size=16, resize=20))[2]
    assert first.y.tolist() == [0, 1, 2, 0]
    assert torch.equal(first.x, items[0][2].x[:4])
    assert load_imagenet_c(root, n=100, image_size=16, resize=20).n == 9


def test_load_imagenet_c_class_names(tmp_path):
    root = write_imagenet_c(tmp_path, names=("fog",))
    data = next(load_imagenet_c(root, image_size=8, resize=None, class_names=["n03", "n99", "n01", "n02"]))[2]
    assert data.y.tolist() == [{0: 2, 1: 3, 2: 0}[label] for label, _ in IMAGENET_ORDER]
    with pytest.raises(DataError, match="not in class_names") as info:
        load_imagenet_c(root, class_names=["n01", "n02"])
    assert "n03" in str(info.value) and "n01" not in str(info.value).split("(")[-1]


def test_load_imagenet_c_resize_and_crop_like_torchvision(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    portrait = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))  # 40 wide, 50 high
    landscape = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8))  # grey, 50 wide
    for severity in range(1, 6):
        folder = tmp_path / "contrast" / str(severity) / "n05"
        folder.mkdir(parents=True)
        portrait.save(folder / "a.png")
        landscape.save(folder / "b.png")
    x = next(load_imagenet_c(tmp_path, image_size=16, resize=20))[2].x
    # Resize(20): short side 20, long side int(20 * 50 / 40) = 25; CenterCrop(16): offsets round(4.5) = 4 and 2.
    expected = [portrait.resize((20, 25), Image.BILINEAR).crop((2, 4, 18, 20)),
                landscape.convert("RGB").resize((25, 20), Image.BILINEAR).crop((4, 2, 20, 18))]
    for got, ref in zip(x, expected):
        assert torch.equal(got, torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    uncropped = next(load_imagenet_c(tmp_path, image_size=16, resize=None))[2].x
    assert torch.equal(uncropped[0], torch.from_numpy(np.array(portrait.crop((12, 17, 28, 33)))).permute(2, 0, 1))
    with pytest.raises(DataError, match="smaller than image_size 48"):
        next(load_imagenet_c(tmp_path, image_size=48, resize=None))


def _imagenet_error(folder, *fragments, iterate=False, **kwargs):
    def call():
        sets = load_imagenet_c(folder, **{"image_size": 16, "resize": 20, **kwargs})
        if iterate:
            list(sets)

    return _data_error(call, *fragments)


def test_load_imagenet_c_folder_errors(tmp_path):
    _imagenet_error(tmp_path / "nowhere", "does not exist", str(tmp_path / "nowhere"), "zenodo")
    (tmp_path / "file").write_text("x")
    _imagenet_error(tmp_path / "file", "not a folder")
    (tmp_path / "odd" / "my_blur" / "1" / "n01").mkdir(parents=True)
    _imagenet_error(tmp_path / "odd", "none of the ImageNet-C corruption folders", "my_blur", "<severity 1..5>")
    (tmp_path / "empty" / "fog" / "1" / "n01").mkdir(parents=True)
    for severity in range(2, 6):
        (tmp_path / "empty" / "fog" / str(severity) / "n01").mkdir(parents=True)
    _imagenet_error(tmp_path / "empty", "hold no images")

    root = write_imagenet_c(tmp_path / "ok")
    _imagenet_error(root, "positive", n=0)
    _imagenet_error(root, "image_size", image_size=0)
    _imagenet_error(root, "resize", resize=8)
    _imagenet_error(root, "list of wnids", class_names="n01")


def test_load_imagenet_c_layout_errors(tmp_path):
    root = write_imagenet_c(tmp_path / "a")
    shutil.rmtree(root / "fog" / "3")
    _imagenet_error(root, str(root / "fog" / "3"), "is missing", "fog has 1, 2, 4, 5")

    root = write_imagenet_c(tmp_path / "b")
    shutil.rmtree(root / "speckle_noise" / "2" / "n02")
    _imagenet_error(root, str(root / "speckle_noise" / "2"), "lacks n02", str(root / "gaussian_noise" / "1"))
    root = write_imagenet_c(tmp_path / "c")
    (root / "fog" / "4" / "n07").mkdir()
    _imagenet_error(root, str(root / "fog" / "4"), "adds n07")


def test_load_imagenet_c_bad_images(tmp_path):
    root = write_imagenet_c(tmp_path / "a")
    bad = root / "fog" / "2" / "n03" / "3.JPEG"
    bad.write_bytes(b"not a jpeg")
    sets = load_imagenet_c(root, image_size=16, resize=20)  # images are read lazily
    with pytest.raises(DataError, match="cannot read the image") as info:
        list(sets)
    assert str(bad) in str(info.value)

    root = write_imagenet_c(tmp_path / "b")
    (root / "fog" / "4" / "n01" / "a.JPEG").unlink()
    _imagenet_error(root, str(root / "fog" / "4"), "holds 8 images", "holds 9", iterate=True)
    assert sum(1 for _ in load_imagenet_c(root, n=8, image_size=16, resize=20)) == 15  # 8 images suffice for n=8


def test_load_imagenet_c_without_pillow(tmp_path, monkeypatch):
    root = write_imagenet_c(tmp_path, names=("fog",))
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    _imagenet_error(root, "needs Pillow", "pip install")


class ColourLabel(nn.Module):
    """Reads the class from the red level of :func:`imagenet_colour`; always right on the tiny ImageNet-C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = ((x[:, 0, 8, 8] * 255 - 40) / 60).round().long().clamp(0, 2)
        return F.one_hot(cls, 3).float()


def test_evaluate_imagenet_c_folder_reports_missing_mce(tmp_path):
    root = write_imagenet_c(tmp_path)
    result = evaluate_corruptions(ColourLabel(), load_imagenet_c(root, n=6, image_size=16, resize=20), batch_size=4)
    assert result["imagenet_c"] is True and result["comparable_with_cifar_c"] is False and result["n"] == 6
    assert list(result["per_corruption"]) == ["gaussian_noise", "fog", "speckle_noise"]
    assert result["mean"] == 1.0 and result["benchmark_mean"] is None
    assert result["mCE"] is None and result["CE"] == {"gaussian_noise": 0.0, "fog": 0.0}
    note = result["mCE_note"]
    assert "15 benchmark corruptions" in note and "shot_noise" in note and "jpeg_compression" in note
    assert "gaussian_noise" not in note and "speckle_noise" not in note
    # CIFAR results keep their keys.
    write_cifar_c(tmp_path / "cifar", names=("fog",), n=4)
    cifar = evaluate_corruptions(PixelLabel(), load_cifar_c(tmp_path / "cifar"))
    assert not {"mCE", "CE", "mCE_note", "imagenet_c"} & set(cifar)


class FakeImageNetC(list):
    """A list of (name, severity, ImageSet) items marked as ImageNet-C, as load_imagenet_c's sets are."""

    imagenet_c = True
    source = "fake ImageNet-C"


def fake_imagenet_c(names, skip=()) -> FakeImageNetC:
    """Four images per (corruption, severity), of which PixelLabel gets 5 - severity right (100% .. 0%)."""
    items = FakeImageNetC()
    for name in names:
        for severity in range(1, 6):
            if (name, severity) in skip:
                continue
            y = torch.tensor([3, 1, 4, 1])
            x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
            x[:, 0, 0, 0] = (y + (torch.arange(4) >= 5 - severity)) % 10
            items.append((name, severity, ImageSet(x, y)))
    return items


def test_evaluate_imagenet_c_mce_hand_computed():
    result = evaluate_corruptions(PixelLabel(), fake_imagenet_c(BENCHMARK_CORRUPTIONS + ("saturate",)))
    assert result["per_corruption"]["fog"]["severity"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # Errors 0, .25, .5, .75, 1 sum to 2.5, so CE_c = 2.5 / (5 * AlexNet's mean error).
    expected = {name: 2.5 / (5 * err) for name, err in ALEXNET_ERRORS.items()}
    assert result["CE"] == pytest.approx(expected) and set(result["CE"]) == set(BENCHMARK_CORRUPTIONS)
    assert result["mCE"] == pytest.approx(sum(expected.values()) / 15) and "mCE_note" not in result
    assert result["benchmark_mean"] == pytest.approx(0.5) and result["source"] == "fake ImageNet-C"
    # A plain list counts as ImageNet-C when told so; a resumed run with a severity never seen has no mCE.
    sets = list(fake_imagenet_c([c for c in BENCHMARK_CORRUPTIONS if c != "frost"], skip={("snow", 5)}))
    partial = evaluate_corruptions(PixelLabel(), sets, imagenet_c=True, done={"fog": [0.5] * 5})
    assert partial["mCE"] is None and "frost" not in partial["CE"] and "snow" not in partial["CE"]
    assert partial["CE"]["fog"] == pytest.approx(2.5 / (5 * ALEXNET_ERRORS["fog"]))
    assert "missing frost" in partial["mCE_note"] and "incomplete snow (severity 5)" in partial["mCE_note"]
    assert "mCE" not in evaluate_corruptions(PixelLabel(), sets)
