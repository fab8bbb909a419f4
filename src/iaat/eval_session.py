"""``iaat eval``: load a model (a run, a checkpoint, an exported or TorchScript file, a user's own architecture),
choose the images, run the plan, write JSON and markdown."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import __version__
from .errors import ConfigError, DataError
from .evaluation.attacks import long_default_step
from .evaluation.protocol import EvalPlan, markdown_report, run_evaluation
from .evaluation.state import EvalState
from .units import format_size


@dataclass
class EvalRequest:
    """Everything ``iaat eval`` was asked, already parsed (sizes in [0, 1] units)."""

    path: Optional[Path]  #: run folder, checkpoint, exported .safetensors, TorchScript or .pt2 file (or None)
    plan: Optional[EvalPlan]
    n: Optional[int] = None
    split: str = "test"
    data_dir: Optional[str] = None
    batch_size: Optional[int] = None  #: default: 256 on a GPU, 64 on a CPU
    device: str = "auto"
    seed: int = 0
    out: Optional[Path] = None
    progress: bool = True
    model: Optional[str] = None  #: a user's architecture, ``module:factory``
    weights: Optional[Path] = None  #: the weights of ``model``
    dataset: Optional[str] = None  #: where the model file does not say
    num_classes: Optional[int] = None  #: passed to ``model``'s factory (default: the data set's)
    #: a run's weights: auto (the averaged ones of train.ema where it keeps them), raw (the trained ones) or ema
    #: (the averaged ones, an error where it keeps none); a model file's must match what it holds
    run_weights: str = "auto"
    command: Optional[str] = None  #: the command line that asked for it, recorded in the results


@dataclass
class ModelSource:
    """A model to evaluate and what is known about it."""

    model: nn.Module
    what: str  #: for the report, e.g. "iaat / small_cnn, epoch 10" or "TorchScript model.pt"
    digest: str  #: identifies the weights (part of the resumable state's fingerprint)
    base: Path  #: the folder whose eval/ receives the results by default
    stem: str  #: the output file name's prefix
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    eps: Optional[float] = None  #: the training radius, the default evaluation radius
    shape: Optional[tuple] = None  #: (classes, image shape) the model was made for, when known
    classes: Optional[list] = None  #: its outputs' class names, where its data named them (image folders)
    cfg: Any = None  #: a run's config (held-out split, image folders' sizes)
    info: dict = field(default_factory=dict)  #: epoch, model, method for the JSON


def _file_digest(path: Path) -> str:
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_source(path: Optional[Path], device: torch.device, model: Optional[str] = None,
                weights: Optional[Path] = None, dataset: Optional[str] = None,
                num_classes: Optional[int] = None, run_weights: str = "auto",
                in_channels: Optional[int] = None) -> ModelSource:
    """The model behind ``path`` (a run, a checkpoint, an exported, TorchScript or .pt2 file), or ``model``
    (``module:factory``) with ``weights``, on ``device`` in eval mode. A run's averaged weights
    (``train.ema``) are used where it keeps them (``run_weights="auto"``); ``raw`` or ``ema`` choose."""
    from .model_files import factory_model, file_format, read_model_file

    if model is not None:
        if path is not None:
            raise ConfigError("give either a model file or run (PATH) or --model module:factory, not both.")
        if dataset is None:
            raise ConfigError(f"--model {model}: say which data set to evaluate on with --dataset.")
        if run_weights != "auto":
            raise ConfigError("--raw and --ema choose among a run's weights; with --model the weights are --weights.")
        weights = Path(weights) if weights is not None else None
        digest = hashlib.sha256(model.encode() + (weights.read_bytes() if weights and weights.is_file() else b""))
        net = factory_model(model, weights, num_classes, in_channels)
        return ModelSource(net.to(device), model + (f" with {weights.name}" if weights else ""), digest.hexdigest(),
                           weights.parent if weights else Path("."),
                           weights.stem if weights else model.replace(":", "-"), dataset, info={"model": model})
    if path is None:
        raise ConfigError("iaat eval needs a run folder or model file, or --model module:factory --weights FILE.")
    if weights is not None:
        raise ConfigError("--weights goes with --model module:factory (a model file holds its own weights).")
    _refuse_sweep_folder(path)
    kind = file_format(path)
    if kind in ("run", "checkpoint"):
        return _run_source(path, device, run_weights)
    net, meta = read_model_file(path, device, run_weights)  # a file holds one set: --raw/--ema must match it
    training = meta.get("training") or {}
    shape = (meta["num_classes"], list(meta["input_shape"])) if meta.get("input_shape") else None
    label = {"torchscript": "TorchScript", "export": "torch.export"}.get(kind, "exported")
    return ModelSource(net, f"{label} model {path.name}",
                       hashlib.sha256(path.read_bytes()).hexdigest(), path.parent, path.stem, meta.get("dataset"),
                       eps=training.get("eps"), shape=shape, classes=meta.get("classes"),
                       info={"epoch": training.get("epochs"), "model": (meta.get("architecture") or {}).get("name"),
                             "method": training.get("method"), "weights": meta.get("weights")})


def _run_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint in its ``checkpoints/`` (where its evaluations go, beside the run's own, for
    iaat report and iaat export to find), else the checkpoint's folder."""
    from .engine import rundir

    run = checkpoint.parent.parent
    if checkpoint.parent.name == rundir.CHECKPOINTS and (run / rundir.CONFIG).is_file():
        return run
    return checkpoint.parent


def _refuse_sweep_folder(path: Path) -> None:
    """A sweep folder holds many runs: say which to evaluate instead of failing to find a config."""
    from .sweep import PLAN, RUNS

    if path.is_dir() and (path / PLAN).is_file():
        runs = sorted(p.name for p in (path / RUNS).iterdir() if p.is_dir()) if (path / RUNS).is_dir() else []
        example = f"{path / RUNS / runs[0]}" if runs else f"{path / RUNS}/NAME"
        raise ConfigError(f"{path} is a sweep folder: evaluate one of its runs, e.g. iaat eval {example} (runs: "
                          f"{', '.join(runs) or 'none trained yet'}); iaat sweep evaluates them all, and "
                          f"iaat report {path} collects the results.")


def _run_source(path: Path, device: torch.device, weights: str = "auto") -> ModelSource:
    from .ema import EMA_KEY
    from .engine.runs import load_run

    model, cfg, ckpt_path, ckpt = load_run(path, device, weights=weights)
    averaged = weights != "raw" and EMA_KEY in ckpt
    trained = ckpt.get("data") or {}
    shape = (trained["num_classes"], trained["image_shape"]) if trained.get("image_shape") else None
    return ModelSource(model, f"{cfg.method.name} / {cfg.model.name}, epoch {ckpt.get('epoch')}"
                       + (", averaged weights (EMA)" if averaged else ""),
                       _file_digest(Path(ckpt_path)) + (":ema" if averaged else ""),
                       path if path.is_dir() else _run_of(path), "eval", cfg.data.dataset, cfg.data.data_dir, cfg.eps,
                       shape, trained.get("classes"), cfg,
                       {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "model": cfg.model.name,
                        "method": cfg.method.name, "weights": "ema" if averaged else "raw"})


def trained_for(req: EvalRequest, read_files: bool = True) -> dict:
    """The radius and norm the model was trained for (``{"eps", "norm"}``), where its run's config or its model
    file's description says them; ``{}`` where nothing does (``--model module:factory``). Without ``read_files``
    only what is quick to read: a run's (or its checkpoint's run's) config.yaml, a model file's JSON beside it.
    """
    if req.path is None or req.model is not None:
        return {}
    from .engine import rundir
    from .model_files import file_format, json_path, read_model_file

    _refuse_sweep_folder(req.path)
    kind = file_format(req.path)
    if kind in ("run", "checkpoint"):
        from .engine.runs import load_run_config

        # a checkpoint in its run's checkpoints/: the run's config.yaml (radius and norm stay as they were on a
        # resume), not a second load of the checkpoint the evaluation loads
        run = req.path if kind == "run" else _run_of(req.path)
        source = run if (run / rundir.CONFIG).is_file() else req.path if read_files else None
        if source is None:
            return {}
        cfg = load_run_config(source)
        return {"eps": cfg.eps, "norm": cfg.attack.norm}
    if not (read_files or json_path(req.path).is_file()):
        return {}
    try:
        card = read_model_file(req.path)[1] if read_files else json.loads(json_path(req.path).read_text())
    except (OSError, ValueError):  # a damaged description beside the file: the default norm
        return {}
    training = (card.get("training") or {}) if isinstance(card, dict) else {}
    return {key: training[key] for key in ("eps", "norm") if training.get(key) is not None}


def default_eps(trained: dict, norm: str) -> float:
    """The evaluation radius when ``--eps`` is not given: the model's training radius, where it is known and of
    the evaluation's norm."""
    if "eps" not in trained:
        raise ConfigError("the model does not say which radius it was trained for: give the evaluation's --eps.")
    if trained.get("norm", norm) != norm:
        raise ConfigError(f"the model was trained under {trained['norm']} (eps {format_size(trained['eps'])}), the "
                          f"evaluation is under --norm {norm}: give its --eps in that norm.")
    return float(trained["eps"])


def check_output(out: Path) -> None:
    """``--out`` may replace an earlier evaluation's result (and its markdown), never any other file: a typo such
    as ``--out RUN/config.yaml`` would otherwise destroy the run."""
    from .engine.rundir import read_evaluation

    if out.suffix != ".json":
        raise ConfigError(f"--out {out}: the evaluation writes JSON; name a .json file (the markdown goes beside it).")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a .json file in it.")
    if out.exists() and read_evaluation(out) is None:
        raise ConfigError(f"--out {out} exists and is not an evaluation result; it is left as it is. Choose another "
                          f"name, or delete it first.")
    md = out.with_suffix(".md")
    if md.exists() and not out.exists():
        raise ConfigError(f"{md} exists, and the evaluation would replace it with its markdown; choose another --out.")


def check_same_data(shape: Optional[tuple], splits, what: str, classes: Optional[list] = None) -> None:
    """Refuse to evaluate a model on a data set with other classes or image shapes than it was made for (and, where
    both name their classes, other class names or another order: each output would score another class)."""
    found = (splits.num_classes, list(splits.image_shape))
    if shape is not None and (shape[0], list(shape[1])) != found:
        raise DataError(f"{what} holds a model for {shape[0]} classes of {list(shape[1])} images, but "
                        f"{splits.name} ({splits.source}) has {found[0]} classes of {found[1]} images; "
                        f"evaluate it on the data set it was trained on.")
    if classes and splits.classes and list(classes) != list(splits.classes):
        raise DataError(f"{what} holds a model whose outputs are the classes {list(classes)}, but {splits.source} "
                        f"has the classes {list(splits.classes)}: its outputs would score other classes; evaluate it "
                        f"on the data set it was trained on.")


def evaluate_checkpoint(req: EvalRequest) -> tuple[dict, Path, Path]:
    """Run the requested evaluation; returns ``(result, json_path, markdown_path)``."""
    from .engine.rundir import write_json
    from .engine.setup import resolve_device

    if req.out is not None:
        check_output(Path(req.out))
    device = resolve_device(req.device)
    # On CPU small batches stay in cache: PGD-10 on the small CNN ran 1.65x faster at 64 than at 256 (2-core EPYC).
    batch_size = req.batch_size or (256 if device.type == "cuda" else 64)
    source, splits, data = _model_and_images(req, device)
    surrogates = {}
    for spec in req.plan.attacks:
        if spec.kind == "transfer" and spec.source not in surrogates:
            surrogates[spec.source] = _surrogate(Path(spec.source), source, splits, device)

    stages = [spec.label for spec in req.plan.stages()]
    fingerprint = {"checkpoint": source.digest, "split": req.split, "n": len(data), "data_source": splits.source,
                   "seed": req.seed, "batch_size": batch_size, "stages": stages, "corruptions": req.plan.corruptions,
                   "eps_sweep": req.plan.eps_sweep, "steps_sweep": req.plan.steps_sweep,
                   **({"surrogates": sorted(surrogates)} if surrogates else {})}  # the labels do not name them
    if any(long_default_step(s.kind, s.steps, s.step_size) for s in req.plan.stages()):  # no state of tiny steps
        fingerprint["long_attack_step"] = "eps/4"
    out = req.out or _default_output(req, source, fingerprint, len(data))
    state_path = out.with_name(out.name + ".state.npz")
    _drop_state_of_tiny_steps(state_path, fingerprint)
    corruption_sets = None
    if req.plan.corruptions:
        corruption_sets = _corruption_source(req.plan.corruptions, data, req.n, req.seed,
                                             image_size=splits.image_shape[-1], split=req.split)

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    res = run_evaluation(source.model, data, req.plan, num_classes=splits.num_classes, fingerprint=fingerprint,
                         state_path=state_path, batch_size=batch_size, device=device, seed=req.seed,
                         progress=req.progress, surrogates=surrogates, corruption_sets=corruption_sets)
    result = {**({"command": req.command} if req.command else {}),
              "iaat_version": __version__, "torch_version": torch.__version__, "device": str(device),
              "model_source": source.what, "checkpoint": source.info.get("checkpoint", str(req.path or req.weights)),
              "epoch": source.info.get("epoch"), "model": source.info.get("model"),
              "method": source.info.get("method"), "weights": source.info.get("weights"),
              "dataset": req.dataset or source.dataset,
              "data_source": splits.source, "split": req.split, "seed": req.seed, "started": started, **res}
    write_json(out, result)
    md = out.with_suffix(".md")
    md.write_text(markdown_report(result, f"{source.what}, {req.split} split"))
    state_path.unlink(missing_ok=True)
    return result, out, md


def _model_and_images(req: EvalRequest, device: torch.device) -> tuple[ModelSource, Any, Any]:
    """The model, its data set's splits and the images to evaluate on (checked against each other)."""
    from .data import load_dataset, make_train_val

    if req.model is not None:  # the factory is told the data set's number of classes
        from .models.registry import resolve_factory

        if req.dataset is None:
            raise ConfigError(f"--model {req.model}: say which data set to evaluate on with --dataset.")
        resolve_factory(req.model)  # a typo fails before the data loads
        splits = load_dataset(req.dataset, req.data_dir, False)
        source = open_source(None, device, req.model, req.weights, req.dataset, req.num_classes or splits.num_classes,
                             run_weights=req.run_weights, in_channels=splits.image_shape[0])
    else:
        source = open_source(req.path, device, weights=req.weights, run_weights=req.run_weights)
        if req.dataset is not None and source.dataset is not None and req.dataset != source.dataset:
            raise ConfigError(f"{req.path} was trained on {source.dataset}; --dataset {req.dataset} names another "
                              f"data set (--dataset is for --model and model files that do not say theirs).")
        splits = _load_splits(req.dataset or source.dataset, req.data_dir or source.data_dir, source)
    check_same_data(source.shape, splits, source.what, source.classes)
    cfg = source.cfg
    if req.split == "test":
        data = splits.test
    elif cfg is None:
        raise ConfigError("--split val is the held-out part of a run's training split: it needs a run folder or "
                          "checkpoint; use the test split for model files.")
    else:
        _, val_idx = make_train_val(splits.train.y, cfg.data.val_size, cfg.data.train_subset, cfg.data.split_seed)
        data = splits.train.subset(val_idx)
    if req.n is not None:
        data = data.subset(torch.arange(min(req.n, len(data))))
    return source, splits, data


def _drop_state_of_tiny_steps(state_path: Path, fingerprint: dict) -> None:
    """Start afresh, with a note, where a cut evaluation's state was this very evaluation but for the old default
    step of its long attacks: resuming it would mix steps, refusing it would stop a sweep that could just redo it."""
    if "long_attack_step" not in fingerprint or not state_path.is_file():
        return
    try:
        saved = EvalState.read(state_path).meta.get("fingerprint")
    except ConfigError:
        return  # a damaged state: the evaluation's own load says so
    older = {k: v for k, v in fingerprint.items() if k != "long_attack_step"}
    if saved == json.loads(json.dumps(older)):
        state_path.unlink()
        warnings.warn(f"{state_path} was written before the default step of attacks over 10 steps became eps/4; "
                      f"this evaluation starts afresh instead of mixing the two steps.", stacklevel=2)


def _default_output(req: EvalRequest, source: ModelSource, fingerprint: dict, n: int) -> Path:
    """``eval/`` of the run (or beside the model file), named after what was evaluated and a hash of it."""
    tag = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
    prefix = "eval" if source.stem == "eval" else f"{source.stem}-eval"
    return source.base / "eval" / f"{prefix}-{req.split}-n{n}-{req.plan.protocol or 'custom'}-{tag}.json"


def _load_splits(dataset: Optional[str], data_dir: Optional[str], source: ModelSource):
    from .data import load_dataset

    if dataset is None:
        raise ConfigError(f"{source.what} does not say which data set it was trained on: give --dataset.")
    cfg = source.cfg
    if cfg is None and dataset == "imagefolder" and source.shape is not None:  # a model file: its input's side
        return load_dataset(dataset, data_dir, False, image_size=source.shape[1][-1])
    return load_dataset(dataset, data_dir, cfg.data.download if cfg else False,
                        image_size=cfg.data.image_size if cfg else None, resize=cfg.data.resize if cfg else None)


def _surrogate(path: Path, source: ModelSource, splits, device: torch.device) -> nn.Module:
    """The model a transfer attack is crafted on: a run or a model file, for the same data, not the model itself."""
    sur = open_source(path, device)
    check_same_data(sur.shape, splits, f"the surrogate {path}")
    if sur.digest == source.digest:
        raise ConfigError("the surrogate is the evaluated model itself; a transfer attack needs an "
                          "independently trained copy (another run).")
    return sur.model


def _corruption_source(spec: str, data, n: Optional[int], seed: int, image_size: int, split: str = "test"):
    """A callable giving the corruption sets: a CIFAR-10-C or ImageNet-C folder, or generated ones."""
    import warnings

    from .evaluation import corruptions as C

    if spec == "generated":
        return lambda: C.generated_corruption_sets(data, n=n, seed=seed)
    if split != "test":
        raise ConfigError(f"--corruptions {spec}: a corruptions folder holds corrupted test images, so its numbers "
                          f"would not be of the --split {split} images; use --corruptions generated (these images, "
                          f"corrupted here) or --split test.")
    folder = Path(spec)
    if not folder.is_dir():
        raise DataError(f"--corruptions {spec}: no such folder (give a CIFAR-10-C style folder or 'generated').")
    if C.is_imagenet_c(folder):  # classes are the sorted wnid folders, as in torchvision's ImageFolder
        return lambda: C.load_imagenet_c(folder, n=n, image_size=image_size)
    missing = C.missing_corruptions(folder)
    if missing and len(missing) < len(C.CIFAR_C_CORRUPTIONS):
        warnings.warn(f"{folder} lacks {len(missing)} of the {len(C.CIFAR_C_CORRUPTIONS)} corruptions "
                      f"({', '.join(missing)}); the mean is over the others.", stacklevel=2)
    return lambda: C.load_cifar_c(folder, n=n)
