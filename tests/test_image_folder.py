"""Image folders (the ImageNet layout), the ImageNet ResNets, and the ImageNet recipe end to end on tiny data."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, run_main, write_image_folder
from iaat.data import load_dataset
from iaat.data.folder import FolderImages, FolderLoader
from iaat.errors import DataError

pytest.importorskip("PIL", reason="image folders are decoded with Pillow")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


def test_folder_splits_labels_and_lazy_images(folder):
    splits = load_dataset("imagefolder", str(folder), image_size=48, resize=56)
    assert splits.num_classes == 3 and len(splits.train) == 24 and len(splits.test) == 12
    assert isinstance(splits.train.x, FolderImages) and splits.image_shape == (3, 48, 48)
    assert sorted(splits.train.y.tolist()) == sorted([0, 1, 2] * 8)
    x = splits.test.x[0:5]
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 48, 48)
    assert torch.equal(splits.test.x[3], x[3:4])  # a plain index decodes one image, as a batch of one
    assert torch.equal(splits.test.x[np.int64(3)], x[3:4])  # a sampler's NumPy index too
    sub = splits.test.subset(torch.tensor([4, 0]))
    assert isinstance(sub.x, FolderImages)  # selecting does not decode
    assert torch.equal(sub.x[0:2], splits.test.x[torch.tensor([4, 0])])
    # the colour of each class's square survives decoding: the class mean of its channel is the highest
    for c in range(3):
        imgs = splits.train.x[torch.nonzero(splits.train.y == c).squeeze(1)].float()
        assert imgs[:, c % 3].mean() > imgs[:, (c + 1) % 3].mean() + 20


def test_images_in_sub_folders_of_a_class_are_found_hidden_ones_are_not(tmp_path):
    """As torchvision's ImageFolder: every image under a class folder counts, however deep; unlike it, hidden
    folders (.ipynb_checkpoints) are no classes and hidden files (macOS ._x.JPEG) no images."""
    root = write_image_folder(tmp_path / "nested", train_per_class=2, val_per_class=1, size=16)
    first = root / "train" / "n00000000"
    (first / "more" / "deeper").mkdir(parents=True)
    shutil.copy(first / "img_000.JPEG", first / "more" / "deeper" / "img_009.JPEG")
    shutil.copy(first / "img_000.JPEG", first / "._img_000.JPEG")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (first / ".hidden").mkdir()
    shutil.copy(first / "img_000.JPEG", first / ".hidden" / "img_010.JPEG")
    splits = load_dataset("imagefolder", str(root), image_size=16)
    assert splits.num_classes == 3 and torch.bincount(splits.train.y).tolist() == [3, 2, 2]
    assert [str(f.relative_to(first)) for f in splits.train.x.files[:3]] == [
        "img_000.JPEG", "img_001.JPEG", "more/deeper/img_009.JPEG"]


def test_small_images_read_at_the_default_size_are_warned_of(tmp_path):
    """32-px images read at 224 px would cost 49 times the compute for no detail: a warning names the key; an
    image_size given, or images near the default size, pass quietly."""
    small = write_image_folder(tmp_path / "small", train_per_class=1, val_per_class=1, size=32)
    with pytest.warns(UserWarning, match=r"images are small \(img_000.JPEG: \d+x\d+ px\) and are read at 224 px.*"
                                         r"--set data.image_size=\d+"):
        assert load_dataset("imagefolder", str(small)).image_shape == (3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("imagefolder", str(small), image_size=32)
        large = write_image_folder(tmp_path / "large", train_per_class=1, val_per_class=1, size=120)
        load_dataset("imagefolder", str(large))


def test_folder_loader_is_seeded_resumable_and_sharded(folder):
    splits = load_dataset("imagefolder", str(folder), image_size=32, resize=40)
    cpu = torch.device("cpu")

    full = list(FolderLoader(splits.train, 6, cpu, seed=1).epoch(2))
    again = list(FolderLoader(splits.train, 6, cpu, seed=1).epoch(2))
    other = list(FolderLoader(splits.train, 6, cpu, seed=1).epoch(3))
    assert len(full) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    assert not torch.equal(full[0][0], other[0][0])
    assert torch.equal(torch.cat([i for _, _, i in full]).sort().values, torch.arange(24))
    tail = list(FolderLoader(splits.train, 6, cpu, seed=1).epoch(2, 2))
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(tail, full[2:]))
    for rank in range(2):
        part = list(FolderLoader(splits.train, 6, cpu, seed=1, shard=(rank, 2)).epoch(2))
        for (xs, ys, ids), (x, y, idx) in zip(part, full):
            assert torch.equal(ids, idx[rank::2]) and torch.equal(xs, x[rank::2]) and torch.equal(ys, y[rank::2])
    plain = list(FolderLoader(splits.train, 6, cpu, seed=1, augment=False).epoch(2))
    assert torch.equal(plain[0][0], splits.train.x[plain[0][2]].float() / 255)  # no augmentation: evaluation crops


def _with_an_empty_class(root: Path) -> Path:
    write_image_folder(root, classes=2, train_per_class=2, val_per_class=1, size=16)
    (root / "train" / "empty").mkdir()  # a class with no images would still get an output and a label
    return root


@pytest.mark.parametrize("make,message", [
    (lambda root: root, "train is missing"),
    (lambda root: root / "nowhere", "nowhere does not exist: pass the folder ROOT"),
    (lambda root: (root / "train" / "a").mkdir(parents=True) or root, "holds? no images"),
    (_with_an_empty_class, r"train/empty holds no images"),
])
def test_bad_folders_are_clear_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_dataset("imagefolder", str(make(tmp_path)))


def test_imagenet_resnets_have_the_published_sizes():
    from iaat.models import build_model

    sizes = {"resnet50": 25.557032, "resnet101": 44.549160, "resnet152": 60.192808}  # torchvision, 1000 classes
    for name, millions in sizes.items():
        model = build_model(name, 1000)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=1e-6)
    assert build_model("resnet50", 3)(torch.rand(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.slow
def test_imagenet_recipe_end_to_end(folder, tmp_path):
    """configs/imagenet_resnet50_iaat.yaml on 3 classes of images resized to 36 px and cropped to 32 (the
    recipe's plumbing, not its resolution): two epochs (warmup, then Alg. 2 with PGD-1 selection and PGD-2
    training), then a targeted evaluation and its report."""
    run = tmp_path / "in-r50"
    code, out, err = run_main(
        "train", "--config", str(REPO / "configs" / "imagenet_resnet50_iaat.yaml"), "--data-dir", str(folder),
        "--out", str(run), "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--amp", "off", "--no-progress",
        "--set", "data.image_size=32", "--set", "data.resize=36", "--set", "data.val_size=6",
        "--set", "method.warmup_epochs=1", "--set", "method.selection_steps=1", "--set", "attack.steps=2",
        "--set", "optim.warmup_epochs=1", "--set", "train.eval_every=1", "--set", "train.eval_steps=2")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["radius_mean"] == pytest.approx(16 / 255)  # warmup at eps_w 16/255 ([0, 1] units)
    assert rows[1]["radius_min"] >= (4 - 1e-4) / 255  # clipped below at 4/255
    assert rows[1]["train_up"] + rows[1]["train_same"] + rows[1]["train_down"] == pytest.approx(1)
    assert rows[0]["lr"] < rows[1]["lr"] <= 0.1 * 8 / 256 + 1e-12  # warmup to the linearly scaled rate
    assert (run / "radii" / "epoch_0002.npy").is_file()

    report = tmp_path / "eval.json"
    code, out, err = run_main("eval", str(run), "--attack", "pgd:steps=3,targeted=true", "--eps", "4", "16",
                              "--device", "cpu", "--no-progress", "--out", str(report))
    assert code == 0, err
    result = json.loads(report.read_text())
    assert result["n"] == 12
    labels = [k for k in result["attacks"]]
    assert labels == ["PGD-3-targeted@4/255", "PGD-3-targeted@16/255"], labels
    for stats in result["attacks"].values():
        assert 0 <= stats["accuracy"] <= result["clean"]
    assert report.with_suffix(".md").is_file()

    # generated corruptions work on image folders too (the images to corrupt are decoded once)
    report = tmp_path / "corruptions.json"
    code, out, err = run_main("eval", str(run), "--corruptions", "generated", "--n", "6",
                              "--device", "cpu", "--no-progress", "--no-checks", "--out", str(report))
    assert code == 0, err
    assert 0 <= json.loads(report.read_text())["corruptions"]["mean"] <= 1

    # its report, with the images that got the smallest and largest radii read from the folder
    code, out, err = run_main("report", str(run), "--out", str(tmp_path / "report"), "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "report" / "report.md").is_file()

    # a folder with the same number of classes in another order: each output would score another class
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    first = sorted(p.name for p in (other / "train").iterdir())[0]
    for split in ("train", "val"):
        (other / split / first).rename(other / split / "zzz")
    code, out, err = run_main("eval", str(run), "--data-dir", str(other), "--steps", "1", "--n", "6",
                              "--device", "cpu", "--no-progress")
    assert code != 0 and "whose outputs are the classes" in err and "zzz" in err
    code, out, err = run_main("train", "--out", str(run), "--resume", "--epochs", "3", "--data-dir", str(other),
                              "--device", "cpu", "--no-progress")
    assert code != 0 and "classes" in err and "zzz" in err
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    code, out, err = run_main("export", str(run), "--out", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    classes = json.loads((tmp_path / "m.safetensors.json").read_text())["classes"]
    assert classes == sorted(p.name for p in (folder / "train").iterdir())  # which output is which class
    code, out, err = run_main("eval", str(tmp_path / "m.safetensors"), "--data-dir", str(other), "--dataset",
                              "imagefolder", "--steps", "1", "--n", "6", "--device", "cpu", "--no-progress")
    assert code != 0 and "whose outputs are the classes" in err
    code, out, err = run_main("eval", str(tmp_path / "m.safetensors"), "--data-dir", str(folder), "--dataset",
                              "imagefolder", "--steps", "1", "--n", "6", "--device", "cpu", "--no-progress")
    assert code == 0, err  # at its own input size (32 px), not the folder's default 224


def test_runs_of_two_image_folders_are_two_data_sets_to_a_report():
    from types import SimpleNamespace

    from iaat.reporting.collect import _data_set

    def record(dataset, data_dir):
        return SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(dataset=dataset, data_dir=data_dir)))

    assert _data_set(record("imagefolder", "/data/a")) != _data_set(record("imagefolder", "/data/b"))
    assert _data_set(record("imagefolder", "/data/a")) == _data_set(record("imagefolder", "/data/a/"))
    assert _data_set(record("cifar10", "/x")) == _data_set(record("cifar10", "/y")) == "cifar10"


def test_a_16_bit_grey_png_keeps_its_values(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey at 255 (a white image); the values are scaled to 8 bits instead."""
    import numpy as np
    from PIL import Image

    from iaat.data.folder import open_rgb

    values = np.full((4, 4), 200 * 257, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    rgb = np.asarray(open_rgb(Image, tmp_path / "g16.png"))
    assert rgb.shape == (4, 4, 3) and (rgb == 200).all()
