"""``iaat eval``: load a run, choose the images, run the plan, write JSON and markdown."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .errors import ConfigError, DataError
from .evaluation.protocol import EvalPlan, markdown_report, run_evaluation


@dataclass
class EvalRequest:
    """Everything ``iaat eval`` was asked, already parsed (sizes in [0, 1] units)."""

    path: Path
    plan: EvalPlan
    n: Optional[int] = None
    split: str = "test"
    data_dir: Optional[str] = None
    batch_size: Optional[int] = None  #: default: 256 on a GPU, 64 on a CPU
    device: str = "auto"
    seed: int = 0
    out: Optional[Path] = None
    progress: bool = True


def _checkpoint_digest(path: Path) -> str:
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same_data(ckpt: dict, splits, what: str) -> None:
    """Refuse to evaluate a model on a data set with other classes or image shapes than it was trained on."""
    trained = ckpt.get("data") or {}
    expected = (trained.get("num_classes"), trained.get("image_shape"))
    found = (splits.num_classes, list(splits.image_shape))
    if None not in expected and tuple(expected) != found:
        raise DataError(f"{what} holds a model for {expected[0]} classes of {expected[1]} images, but "
                        f"{splits.name} ({splits.source}) has {found[0]} classes of {found[1]} images; "
                        f"evaluate it on the data set it was trained on.")


def evaluate_checkpoint(req: EvalRequest) -> tuple[dict, Path, Path]:
    """Run the requested evaluation; returns ``(result, json_path, markdown_path)``."""
    from .data import load_dataset, make_train_val
    from .engine.rundir import write_json
    from .engine.runs import load_run
    from .engine.setup import resolve_device

    device = resolve_device(req.device)
    # On CPU small batches stay in cache: PGD-10 on the small CNN ran 1.65x faster at 64 than at 256 (2-core EPYC).
    batch_size = req.batch_size or (256 if device.type == "cuda" else 64)
    model, cfg, ckpt_path, ckpt = load_run(req.path, device)
    splits = load_dataset(cfg.data.dataset, req.data_dir or cfg.data.data_dir, cfg.data.download,
                          image_size=cfg.data.image_size, resize=cfg.data.resize)
    check_same_data(ckpt, splits, str(ckpt_path))
    if req.split == "test":
        data = splits.test
    else:
        _, val_idx = make_train_val(splits.train.y, cfg.data.val_size, cfg.data.train_subset, cfg.data.split_seed)
        data = splits.train.subset(val_idx)
    if req.n is not None:
        data = data.subset(torch.arange(min(req.n, len(data))))

    surrogates = {}
    for spec in req.plan.attacks:
        if spec.kind == "transfer" and spec.source not in surrogates:
            sur, _, sur_path, sur_ckpt = load_run(Path(spec.source), device)
            check_same_data(sur_ckpt, splits, f"the surrogate {sur_path}")
            if Path(sur_path).resolve() == Path(ckpt_path).resolve():
                raise ConfigError("the surrogate is the evaluated checkpoint itself; a transfer attack needs an "
                                  "independently trained copy (another run).")
            surrogates[spec.source] = sur

    stages = [spec.label for spec in req.plan.stages()]
    fingerprint = {"checkpoint": _checkpoint_digest(Path(ckpt_path)), "split": req.split, "n": len(data),
                   "data_source": splits.source, "seed": req.seed, "batch_size": batch_size, "stages": stages,
                   "corruptions": req.plan.corruptions, "eps_sweep": req.plan.eps_sweep,
                   "steps_sweep": req.plan.steps_sweep}
    out = req.out
    if out is None:
        tag = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
        base = req.path if req.path.is_dir() else req.path.parent
        out = base / "eval" / f"eval-{req.split}-n{len(data)}-{req.plan.protocol or 'custom'}-{tag}.json"
    state_path = out.with_name(out.name + ".state.npz")

    corruption_sets = None
    if req.plan.corruptions:
        corruption_sets = _corruption_source(req.plan.corruptions, data, req.n, req.seed,
                                             image_size=splits.image_shape[-1])

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    res = run_evaluation(model, data, req.plan, num_classes=splits.num_classes, fingerprint=fingerprint,
                         state_path=state_path, batch_size=batch_size, device=device, seed=req.seed,
                         progress=req.progress, surrogates=surrogates, corruption_sets=corruption_sets)
    result = {"iaat_version": __version__, "torch_version": torch.__version__, "device": str(device),
              "checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "model": cfg.model.name,
              "method": cfg.method.name, "dataset": cfg.data.dataset, "data_source": splits.source,
              "split": req.split, "seed": req.seed, "started": started, **res}
    write_json(out, result)
    md = out.with_suffix(".md")
    title = f"{cfg.method.name} / {cfg.model.name}, epoch {result['epoch']}, {req.split} split"
    md.write_text(markdown_report(result, title))
    state_path.unlink(missing_ok=True)
    return result, out, md


def _corruption_source(spec: str, data, n: Optional[int], seed: int, image_size: int):
    """A callable giving the corruption sets: a CIFAR-10-C or ImageNet-C folder, or generated ones."""
    import warnings

    from .evaluation import corruptions as C

    if spec == "generated":
        return lambda: C.generated_corruption_sets(data, n=n, seed=seed)
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
