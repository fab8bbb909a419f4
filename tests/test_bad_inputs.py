"""A catalogue of things a user can get wrong, as one parametrised test.

Each case must end with a non-zero exit, ``iaat: error:`` and a phrase naming the problem on
stderr, no traceback, and every file that existed before (the run folders and data under the
test's folder, and the shared generated CIFAR-10) byte-identical afterwards, with nothing added.
Cases run ``iaat.cli.main`` in this process unless they need a process of their own (a file-size
limit).
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, child_env, run_main, write_cifar10_folder
from iaat.engine.checkpoint import load_checkpoint, save_checkpoint
from iaat.methods.registry import METHODS
from iaat.models import build_model
from helpers import tiny_train_args
from test_cli import snapshot

NOBODY = 65534


@pytest.fixture(scope="module")
def base_run(tiny_cifar, tmp_path_factory) -> Path:
    """A finished 1-epoch pgd_at run that cases copy and then damage or misuse."""
    out = tmp_path_factory.mktemp("bad_inputs") / "base"
    code, _, err = run_main(*tiny_train_args(tiny_cifar, out, 1))
    assert code == 0, err
    return out


@dataclass
class Ctx:
    tmp: Path
    data: Path  #: parent of the shared generated cifar-10-batches-py
    base_run: Path
    extra_roots: list  #: folders outside tmp that a case creates and that must stay unchanged too

    def new_run(self, *extra: str) -> list[str]:
        """``iaat train`` of a new tiny run into tmp/new."""
        return tiny_train_args(self.data, self.tmp / "new", 1, *extra)

    def run(self) -> Path:
        """A copy of the finished base run."""
        run = self.tmp / "run"
        if not run.exists():
            shutil.copytree(self.base_run, run)
        return run

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def cifar(self, batches: dict, per_batch: int = 10) -> Path:
        """A small cifar-10 folder with some batch files replaced; returns its parent."""
        root = self.tmp / "cifar"
        folder = write_cifar10_folder(root, train_per_batch=per_batch, n_test=10)
        for fname, content in batches.items():
            with open(folder / fname, "wb") as f:
                pickle.dump(content, f, protocol=2)
        return root


@dataclass
class Case:
    build: Callable[[Ctx], list[str]]
    phrases: tuple
    own_process: bool = False  #: run as a subprocess (with ``preexec``)
    preexec: Optional[Callable[[], None]] = None
    skip: Optional[Callable[[], Optional[str]]] = None  #: a reason to skip on this machine, or None
    as_user: Optional[int] = None  #: effective uid for the call (where the test runs as root)
    absent: tuple = ()  #: phrases the message must not hold


CASES: dict[str, Case] = {}


def case(*phrases: str, **options) -> Callable:
    def register(build: Callable[[Ctx], list[str]]) -> Callable:
        CASES[build.__name__] = Case(build, phrases, **options)
        return build
    return register


def _rows(n: int, width: int = 3072) -> np.ndarray:
    return np.zeros((n, width), dtype=np.uint8)


# ---- config files, flags and --set --------------------------------------------------------------------------------

@case("is not valid YAML")
def malformed_yaml(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("bad.yaml", "train:\n  epochs: [1, 2\n")))


@case("must hold a mapping of sections, got list")
def yaml_list_instead_of_mapping(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("list.yaml", "- data\n- model\n")))


@case("config section 'train' must be a mapping")
def yaml_section_not_a_mapping(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("sec.yaml", "train: 5\n")))


@case("unknown config section 'datta'", "Did you mean 'data'")
def unknown_section(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("sec.yaml", "datta:\n  dataset: cifar10\n")))


@case("unknown key 'optim.lrr'", "Did you mean 'lr'")
def unknown_key(c: Ctx) -> list[str]:
    return c.new_run("--set", "optim.lrr=0.1")


@case("c.yaml, line 3:", "unknown key 'train.batch_szie'", "Did you mean 'batch_size'")
def config_typo_names_file_and_line(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("c.yaml", "train:\n  epochs: 1\n  batch_szie: 8\n")))


@case("train.epochs must be >= 1, got -1", absent=("c.yaml", "line"))
def a_flag_that_replaced_a_file_key_is_not_blamed_on_the_file(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("c.yaml", "train:\n  epochs: 1\n")), "--epochs", "-1")


@case("--set expects section.key=value", absent=("c.yaml", "line"))
def a_bad_set_is_not_blamed_on_the_file(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.file("c.yaml", "attack:\n  eps: 8\n")), "--set", "width=8")


@case("method.lam is a key of GAIR weighting", "method.weights=gair")
def gair_key_without_gair_weights(c: Ctx) -> list[str]:
    return c.new_run("--method", "iaat", "--set", "method.lam=0")


@case("--threads must be >= 1, got 0")
def zero_threads(c: Ctx) -> list[str]:
    return ["demo", "--threads", "0", "--out", str(c.tmp / "demo")]


@case("train.threads must be >= 1, got 0")
def zero_threads_in_the_config(c: Ctx) -> list[str]:
    return c.new_run("--set", "train.threads=0")


@case("holds cifar10, not cifar100", "--dataset cifar10", absent=("download",))
def cifar100_asked_of_a_cifar10_folder(c: Ctx) -> list[str]:
    return c.new_run("--dataset", "cifar100")  # once: a download of CIFAR-100 into the CIFAR-10 folder


@case("model.width must be a whole number >= 1, got 0")
def zero_model_width(c: Ctx) -> list[str]:
    return c.new_run("--set", "model.width=0")  # `width or 32` once trained a width-32 model here


@case("optim.lr must be a finite number > 0, got nan")
def nan_learning_rate(c: Ctx) -> list[str]:
    return c.new_run("--set", "optim.lr=.nan")


@case("optim.momentum must be in [0, 1), got 1.5")
def momentum_above_one(c: Ctx) -> list[str]:
    return c.new_run("--set", "optim.momentum=1.5")  # the message names the one setting that is wrong


@case("train.eval_steps", "must be >= 0, got -1")
def negative_eval_steps(c: Ctx) -> list[str]:
    return c.new_run("--set", "train.eval_steps=-1")  # once failed only after the first epoch


@case("config file not found")
def missing_config_file(c: Ctx) -> list[str]:
    return c.new_run("--config", str(c.tmp / "nope.yaml"))


@case("train.batch_size must be an integer")
def wrong_type_integer(c: Ctx) -> list[str]:
    return c.new_run("--set", "train.batch_size=abc")


@case("data.augment must be true or false")
def wrong_type_bool(c: Ctx) -> list[str]:
    return c.new_run("--set", "data.augment=maybe")


@case("argument --epochs: invalid int value")
def flag_not_a_number(c: Ctx) -> list[str]:
    return c.new_run("--epochs", "abc")


@case("--set expects section.key=value")
def set_without_equals(c: Ctx) -> list[str]:
    return c.new_run("--set", "attack.eps")


@case("attack.eps='0.031' means 0.031/255", "looks like a value already in [0, 1] units", "'0.031/1'")
def eps_in_unit_interval(c: Ctx) -> list[str]:
    return c.new_run("--eps", "0.031")


@case("method.gamma=0.0075", "looks like a value already in [0, 1] units")
def iaat_gamma_in_unit_interval(c: Ctx) -> list[str]:
    return c.new_run("--method", "iaat", "--set", "method.gamma=0.0075")


@case("attack.eps='-8' is negative")
def negative_eps(c: Ctx) -> list[str]:
    return c.new_run("--eps", "-8")


@case("data.train_subset must be positive")
def negative_train_subset(c: Ctx) -> list[str]:
    return c.new_run("--train-subset", "-5")


@case("data.train_subset=450 is larger than the 400 training images left")
def train_subset_larger_than_data(c: Ctx) -> list[str]:
    return c.new_run("--train-subset", "450")


@case("train.batch_size must be >= 2")
def batch_size_one(c: Ctx) -> list[str]:
    return c.new_run("--batch-size", "1")


@case("train.epochs must be >= 1")
def zero_epochs(c: Ctx) -> list[str]:
    return c.new_run("--epochs", "0")


@case("train.device must be auto, cpu, cuda", "'tpu'")
def unknown_device(c: Ctx) -> list[str]:
    return c.new_run("--device", "tpu")


@case("device 'cuda' requested but CUDA is not available",
      skip=lambda: "this machine has CUDA" if torch.cuda.is_available() else None)
def cuda_without_cuda(c: Ctx) -> list[str]:
    return c.new_run("--device", "cuda")


@case("train.amp=fp16 needs a CUDA device")
def fp16_on_cpu(c: Ctx) -> list[str]:
    return c.new_run("--amp", "fp16", "--device", "cpu")


# ---- data ---------------------------------------------------------------------------------------------------------

@case("data_batch_2: 'data' must be uint8 rows of 3072 values", "(10, 1024)")
def data_of_the_wrong_image_shape(c: Ctx) -> list[str]:
    root = c.cifar({"data_batch_2": {"data": _rows(10, 1024), "labels": [0] * 10}})
    return tiny_train_args(root, c.tmp / "new", 1, "--set", "data.val_size=10")


@case("the cifar10 training split has labels in [0, 12], outside 0..9")
def labels_out_of_range(c: Ctx) -> list[str]:
    root = c.cifar({"data_batch_3": {"data": _rows(10), "labels": [12] * 10}})
    return tiny_train_args(root, c.tmp / "new", 1, "--set", "data.val_size=10")


@case("the cifar10 training split holds no images")
def empty_data_set(c: Ctx) -> list[str]:
    empty = {"data": _rows(0), "labels": []}
    root = c.cifar({f"data_batch_{k}": empty for k in range(1, 6)})
    return tiny_train_args(root, c.tmp / "new", 1, "--set", "data.val_size=0")


@case("cifar10 not found", "does not exist", "--data-dir")
def missing_data_folder(c: Ctx) -> list[str]:
    return tiny_train_args(c.tmp / "nowhere", c.tmp / "new", 1)


@case("data.val_size=600 leaves no training images out of 500")
def held_out_set_larger_than_data(c: Ctx) -> list[str]:
    return c.new_run("--set", "data.val_size=600")


# ---- checkpoints and run folders ----------------------------------------------------------------------------------

@case("holds a model for 10 classes", "cifar100", "has 100 classes", "the data set it was trained on")
def class_count_does_not_match_the_model(c: Ctx) -> list[str]:
    """A 10-class run whose config.yaml was edited to say cifar100, evaluated on a CIFAR-100 folder."""
    run = c.run()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["dataset"] = "cifar100"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    folder = c.tmp / "c100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("test", 20)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "fine_labels": [i % 100 for i in range(n)]}, f, protocol=2)
    return ["eval", str(run), "--data-dir", str(c.tmp / "c100"), "--n", "8", "--no-progress"]


@case("holds weights of a different model", "shape mismatches")
def checkpoint_of_another_model(c: Ctx) -> list[str]:
    run = c.run()
    path = run / "checkpoints" / "epoch_0001.pt"
    ckpt = load_checkpoint(path)
    ckpt["model"] = build_model("small_cnn", 10, 3, width=16).state_dict()  # a width-16 run's weights
    save_checkpoint(path, ckpt)
    return ["eval", str(run), "--n", "8", "--no-progress"]


@case("was written by method 'clean', but this run uses 'pgd_at'")
def checkpoint_of_another_method_on_resume(c: Ctx) -> list[str]:
    run = c.run()
    path = run / "checkpoints" / "epoch_0001.pt"
    ckpt = load_checkpoint(path)
    ckpt["method_name"] = "clean"
    save_checkpoint(path, ckpt)
    return ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]


@case("no checkpoint in", "loads, so the run cannot be resumed", "is damaged")
def every_checkpoint_damaged_on_resume(c: Ctx) -> list[str]:
    run = c.run()
    path = run / "checkpoints" / "epoch_0001.pt"
    path.write_bytes(path.read_bytes()[:1000])
    return ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]


@case("was trained on data with train_size 400, but the data now has 450", "--data-dir")
def resume_on_other_data(c: Ctx) -> list[str]:
    root = c.cifar({}, per_batch=110)  # 550 training images instead of 500 (--data-dir may change on resume)
    return ["train", "--out", str(c.run()), "--resume", "--epochs", "2", "--data-dir", str(root), "--no-progress"]


@case("was trained on data with train_labels_sha256", "resume with the data the run started with")
def resume_on_a_copy_of_the_data_in_another_order(c: Ctx) -> list[str]:
    root = c.tmp / "swapped"
    shutil.copytree(c.data / "cifar-10-batches-py", root / "cifar-10-batches-py")
    one, two = root / "cifar-10-batches-py" / "data_batch_1", root / "cifar-10-batches-py" / "data_batch_2"
    one_bytes = one.read_bytes()
    one.write_bytes(two.read_bytes())
    two.write_bytes(one_bytes)  # the same images, in another order: each stored radius would go to another image
    return ["train", "--out", str(c.run()), "--resume", "--epochs", "2", "--data-dir", str(root), "--no-progress"]


@case("cannot change attack.eps when resuming")
def resume_with_changed_config(c: Ctx) -> list[str]:
    return ["train", "--out", str(c.run()), "--resume", "--eps", "4", "--epochs", "2"]


@case("nothing to resume in", "no config.yaml")
def resume_with_nothing_to_resume(c: Ctx) -> list[str]:
    (c.tmp / "empty").mkdir()
    return ["train", "--out", str(c.tmp / "empty"), "--resume"]


@case("--resume takes the config from the run folder; drop --config")
def resume_with_config(c: Ctx) -> list[str]:
    return ["train", "--out", str(c.run()), "--resume", "--config", str(c.file("c.yaml", "train:\n  epochs: 2\n"))]


@case("already exists and is not empty", "--resume")
def existing_run_folder_without_resume(c: Ctx) -> list[str]:
    return tiny_train_args(c.data, c.run(), 1)


@case("already exists and is not empty", "--resume")
def out_folder_holding_a_users_config_yaml(c: Ctx) -> list[str]:
    folder = c.tmp / "exp"  # once: taken for a start killed before its first checkpoint, the file overwritten
    folder.mkdir()
    (folder / "config.yaml").write_text("# my preset, with comments\ntrain:\n  epochs: 1\n")
    return tiny_train_args(c.data, folder, 1)


@case("sweep eval.attacks: pgd has no option 'stepz'")
def sweep_with_a_bad_evaluation_attack(c: Ctx) -> list[str]:
    return ["sweep", str(REPO / "configs/sweeps/cifar10_small_cnn_cpu.yaml"), "--data-dir", str(c.data), "--out",
            str(c.tmp / "sw"), "--only", "clean", "--eval-attack", "pgd:stepz=2"]  # once failed after training


@case("sweep eval.eps=0.031 means 0.031/255 in pixel units", "'0.031/1'")
def sweep_with_an_evaluation_radius_in_unit_units(c: Ctx) -> list[str]:
    sweep = c.file("s.yaml", "base: " + str(REPO / "configs/cifar10_small_cnn_cpu.yaml") + "\n"
                   "runs:\n  clean: {method.name: clean}\neval: {eps: 0.031}\n")
    return ["sweep", str(sweep), "--data-dir", str(c.data), "--out", str(c.tmp / "sw"), "--dry-run"]  # was: trained


@case("was trained on cifar10; --dataset digits names another data set")
def eval_of_a_run_on_another_data_set(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--dataset", "digits", "--n", "8", "--no-progress"]  # was: used, or downloaded


@case("--num-classes goes with --model")
def eval_of_a_run_with_num_classes(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--num-classes", "5", "--n", "8", "--no-progress"]  # was: ignored


@case("--eps must be positive, got 0")
def demo_at_radius_zero(c: Ctx) -> list[str]:
    return ["demo", "--eps", "0", "--out", str(c.tmp / "demo")]


@case("already exists", "choose another --out", absent=("--resume",))
def demo_into_an_existing_run(c: Ctx) -> list[str]:
    return ["demo", "--out", str(c.run().parent)]


@case("already exists and is not a folder")
def demo_into_a_file(c: Ctx) -> list[str]:
    return ["demo", "--out", str(c.file("afile", "x"))]


@case("step_size must be positive, got 0")
def eval_with_a_step_of_zero(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--n", "8", "--step-size", "0", "--no-progress"]


@case("not both")
def eval_of_a_run_and_a_factory_at_once(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--model", "torch.nn:Linear", "--no-progress"]


@case("iaat eval needs a run folder or model file")
def eval_of_nothing(c: Ctx) -> list[str]:
    return ["eval", "--no-progress"]


@case("unknown device 'tpu'", "cuda:N")
def eval_on_an_unknown_device(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--n", "8", "--device", "tpu", "--no-progress"]


@case("--out", "config.yaml", "name a .json file")
def eval_out_onto_the_runs_config(c: Ctx) -> list[str]:
    run = c.run()
    return ["eval", str(run), "--n", "8", "--out", str(run / "config.yaml"), "--no-progress"]


@case("notes.json exists and is not an evaluation result", "left as it is")
def eval_out_onto_another_json_file(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--n", "8", "--out", str(c.file("notes.json", '{"a": 1}')), "--no-progress"]


@case("does not exist (expected a run folder or a checkpoint file)")
def eval_of_a_missing_path(c: Ctx) -> list[str]:
    return ["eval", str(c.tmp / "no_such_run"), "--no-progress"]


@case("c.yaml is not a checkpoint", "a text file", "a config file?", absent=("weights_only", "could run code"))
def eval_of_a_yaml_file(c: Ctx) -> list[str]:
    return ["eval", str(c.file("c.yaml", "train:\n  epochs: 1\n")), "--no-progress"]


@case("is not a checkpoint", "unrecognised binary data", absent=("weights_only", "could run code"))
def eval_of_random_bytes(c: Ctx) -> list[str]:
    path = c.tmp / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return ["eval", str(path), "--no-progress"]


@case("is not a checkpoint", "cut short or damaged", absent=("weights_only", "could run code"))
def eval_of_a_truncated_checkpoint(c: Ctx) -> list[str]:
    path = c.tmp / "copy.pt"  # a copy without its sha256 sidecar, cut short
    path.write_bytes((c.base_run / "checkpoints" / "epoch_0001.pt").read_bytes()[:4000])
    return ["eval", str(path), "--no-progress"]


@case("refusing to load", "objects other than tensors", "Save a state_dict", absent=("weights_only",))
def eval_of_a_pickled_model(c: Ctx) -> list[str]:
    path = c.tmp / "whole_model.pt"
    torch.save(build_model("small_cnn", 10, 3, width=8), path)
    return ["eval", str(path), "--no-progress"]


@case("is a sweep folder", "evaluate one of its runs", "iaat eval", "runs/iaat")
def eval_of_a_sweep_folder(c: Ctx) -> list[str]:
    sweep = c.tmp / "sw"
    (sweep / "runs" / "iaat").mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("runs: [iaat]\n")
    return ["eval", str(sweep), "--no-progress"]


@case("a corruptions folder holds corrupted test images", "use --corruptions generated", "or --split test")
def eval_of_the_held_out_split_against_a_corruptions_folder(c: Ctx) -> list[str]:
    (c.tmp / "CIFAR-10-C").mkdir()
    return ["eval", str(c.run()), "--split", "val", "--corruptions", str(c.tmp / "CIFAR-10-C"), "--no-progress"]


@case("--n must be positive, got 0")
def eval_of_zero_images(c: Ctx) -> list[str]:
    return ["eval", str(c.run()), "--n", "0", "--no-progress"]


@case("a .safetensors name says safetensors, but the format (--format, fmt=) is torchscript", "torchscript writes .pt",
      "pass --format safetensors")
def export_torchscript_under_a_safetensors_name(c: Ctx) -> list[str]:
    return ["export", str(c.run()), "--format", "torchscript", "--out", str(c.tmp / "x.safetensors")]


@case(".onnx is not an extension of any export format", "name the safetensors file *.safetensors")
def export_under_an_unknown_extension(c: Ctx) -> list[str]:
    return ["export", str(c.run()), "--out", str(c.tmp / "x.onnx")]


@case("--data-dir", "data_batch_1 is a file, not a folder", absent=("Errno",))
def data_dir_pointing_at_a_file(c: Ctx) -> list[str]:
    batch = c.file("data_batch_1", "not a folder")  # download on: the mkdir before it once failed with Errno 17
    return c.new_run("--data-dir", str(batch), "--set", "data.download=true")


@case("unknown method 'IAAT'", "Did you mean 'iaat'")
def method_name_in_the_wrong_case(c: Ctx) -> list[str]:
    return c.new_run("--method", "IAAT")


@case("data.train_subset must be >= 2", "got 1", absent=("Expected more than 1 value",))
def a_training_set_of_one_image(c: Ctx) -> list[str]:
    # resnet18 on 8x8 digits: a batch of one reached BatchNorm at 1x1 and crashed after the run folder was made
    return ["train", "--dataset", "digits", "--model", "resnet18", "--train-subset", "1", "--epochs", "1",
            "--out", str(c.tmp / "new"), "--no-progress", "--threads", "1"]


@case("data.val_size=1496 leaves 1 training image", "at least 2")
def a_held_out_set_that_leaves_one_image(c: Ctx) -> list[str]:
    return ["train", "--dataset", "digits", "--model", "resnet18", "--set", "data.val_size=1496", "--epochs", "1",
            "--out", str(c.tmp / "new"), "--no-progress", "--threads", "1"]


# ---- where output cannot be written -------------------------------------------------------------------------------

def _read_only_folder(c: Ctx) -> Path:
    # Outside pytest's tmp folders (mode 0700), so that a non-root user can reach it.
    parent = Path(tempfile.mkdtemp(prefix="iaat-ro-"))
    parent.chmod(0o755)
    folder = parent / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("existing\n")
    folder.chmod(0o555)
    c.extra_roots.append(parent)
    return folder


@case("could not write", "/ro/run", "Permission denied",
      as_user=NOBODY if os.geteuid() == 0 else None)  # root ignores permissions: drop to nobody for the call
def read_only_output_folder(c: Ctx) -> list[str]:
    # digits ship with scikit-learn, so the call needs no access to pytest's (root-only) folders. Loading them once
    # now imports what the call needs: as nobody, Python could not import from a root-only interpreter folder.
    from iaat.data import load_dataset

    load_dataset("digits")
    return ["train", "--dataset", "digits", "--model", "small_cnn", "--set", "model.width=8", "--epochs", "1",
            "--out", str(_read_only_folder(c) / "run"), "--no-progress"]


def _small_file_size_limit() -> None:
    # Files can grow to 20 kB: config, metrics and split fit, a checkpoint (~100 kB) does not. Writes beyond fail
    # with EFBIG, like on a full disk (SIGXFSZ ignored so that the write fails instead of the process dying).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@case("could not write", "epoch_0002.pt", "File too large", "earlier checkpoints, are intact",
      own_process=True, preexec=_small_file_size_limit)
def disk_full_while_writing_a_checkpoint(c: Ctx) -> list[str]:
    return ["train", "--out", str(c.run()), "--resume", "--epochs", "2", "--no-progress"]


# ---- the test -----------------------------------------------------------------------------------------------------

def _run_as(uid: Optional[int], argv: list[str]) -> tuple:
    if uid is None:
        return run_main(*argv)
    os.seteuid(uid)
    try:
        return run_main(*argv)
    finally:
        os.seteuid(0)


def _snapshot_all(roots: list[Path]) -> dict:
    return {str(root): snapshot(root) for root in roots}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_a_clear_error_and_changes_nothing(name, tiny_cifar, base_run, tmp_path):
    spec = CASES[name]
    reason = spec.skip() if spec.skip else None
    if reason:
        pytest.skip(reason)
    ctx = Ctx(tmp_path, tiny_cifar, base_run, [])
    try:
        argv = spec.build(ctx)
        roots = [tmp_path, tiny_cifar, *ctx.extra_roots]
        before = _snapshot_all(roots)
        if spec.own_process:
            res = subprocess.run([sys.executable, "-m", "iaat", *argv], capture_output=True, text=True,
                                 env=child_env(), preexec_fn=spec.preexec, timeout=600)
            code, err = res.returncode, res.stderr
        else:
            code, _, err = _run_as(spec.as_user, argv)
        assert code not in (0, None), err
        assert "Traceback" not in err, err
        assert "iaat: error:" in err, err
        for phrase in spec.phrases:
            assert phrase in err, (phrase, err)
        for phrase in spec.absent:
            assert phrase not in err, (phrase, err)
        assert _snapshot_all(roots) == before
    finally:
        for root in ctx.extra_roots:
            for folder in [root, *root.rglob("*")]:
                if folder.is_dir():
                    folder.chmod(0o755)
            shutil.rmtree(root, ignore_errors=True)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_refuses_an_empty_batch_alike(name):
    """Once: IAAT crashed in aminmax, GAIRAT in max(), PGD-AT, TRADES, MART and Clean returned a NaN loss."""
    from helpers import config_method
    from iaat.errors import ConfigError

    method = config_method(name, 8, {"steps": 2})
    method.start_epoch(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ConfigError, match=r"loss got an empty batch \(0 images\)"):
        method.loss(model, x[:0], y[:0], torch.arange(0))
    assert torch.isfinite(method.loss(model, x, y, torch.arange(4)))  # the method itself still works


def test_a_key_of_a_setting_that_is_off_is_refused_before_a_run_starts(tiny_cifar, tmp_path):
    code, _, err = run_main(*tiny_train_args(tiny_cifar, tmp_path / "new", 1, "--method", "gairat", "--set",
                                             "method.lam_max=3"))
    assert code not in (0, None) and "Traceback" not in err
    assert "method.lam_max applies with method.lam_schedule=linear only" in err
    assert not (tmp_path / "new").exists()
