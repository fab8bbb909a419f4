"""The method-agnostic training loop.

Per step: loader → (x, y, idx) on the device → ``method.loss`` (which calls the PGD
kernel) → optimiser step. Per epoch: held-out evaluation (clean + PGD-k), one JSON line
in ``metrics.jsonl``, an atomic checkpoint with the full state (model, optimiser,
schedule, AMP scaler, method state, every RNG state, epoch). On the CPU a resumed run
ends bitwise equal to an uninterrupted one with the same seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import Config
from ..data import DeviceLoader
from ..errors import CheckpointError, ConfigError, IaatError
from ..evaluation import AttackSpec, evaluate
from ..methods import AttackSettings, build_method
from . import rundir
from .checkpoint import checkpoint_path, latest_valid, prune, save_checkpoint
from .rng import rng_state, seed_everything, set_rng_state
from .schedule import lr_at
from .setup import autocast_context, autocast_dtype, load_model_state, model_from_config, prepare_data, resolve_device


def _to_host(stats: dict, n: int) -> dict:
    return {k: (v.item() if torch.is_tensor(v) else v) / max(n, 1) for k, v in stats.items()}


def train(cfg: Config, run_dir: Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue it with ``resume``); returns the last metrics row.

    Everything that can fail on user input (data, model, method, existing folder) is
    checked before the run folder is created or touched.
    """
    run_dir = Path(run_dir)
    if resume:
        rundir.check_resumable(run_dir)
    else:
        rundir.check_new_run_dir(run_dir)

    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    data = prepare_data(cfg)
    model = model_from_config(cfg, data.splits).to(device)
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (it relies on gradient scaling); use bf16 or off.")
    amp_dtype = autocast_dtype(cfg.train.amp)
    attack = AttackSettings.from_config(cfg, amp_dtype)
    method = build_method(cfg.method.name, cfg.method.params, attack, len(data.train), data.splits.num_classes, device)
    method.total_epochs = cfg.train.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    loader = DeviceLoader(data.train, cfg.train.batch_size, device, shuffle=True, augment=cfg.data.augment,
                          seed=cfg.train.seed)

    start_epoch, global_step = 0, 0
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    if resume:
        path, ckpt = latest_valid(ckpt_dir)
        if ckpt is not None:
            if ckpt.get("method_name") != cfg.method.name:
                raise CheckpointError(f"{path} was written by method '{ckpt.get('method_name')}', "
                                      f"but this run uses '{cfg.method.name}'.")
            load_model_state(model, ckpt["model"], str(path), cfg.model.name, ckpt.get("model_name", "?"))
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            method.load_state_dict(ckpt["method"])
            set_rng_state(ckpt["rng"])
            start_epoch, global_step = ckpt["epoch"], ckpt["global_step"]
            log(f"resuming {run_dir} from {path.name} (epoch {start_epoch} done)")
        else:
            log(f"no checkpoint in {ckpt_dir} yet; starting {run_dir} from epoch 1")
        rundir.truncate_metrics(run_dir, start_epoch)
    else:
        rundir.create_run_dir(run_dir, cfg)
        # Which official training images are in the training set (the order of per-sample state) and held out.
        np.savez(run_dir / rundir.SPLIT, train_indices=data.train_indices.numpy(), val_indices=data.val_indices.numpy())

    epochs = cfg.train.epochs
    steps_per_epoch = len(loader)
    amp_ctx = autocast_context(device, cfg.train.amp)
    eval_spec = AttackSpec(cfg.eps, cfg.train.eval_steps, 1, cfg.step_size, cfg.attack.norm)
    last_row: dict = {}
    if start_epoch >= epochs:
        log(f"{run_dir} already finished {start_epoch} epochs (asked for {epochs}); nothing to do.")
        rows = rundir.read_metrics(run_dir)
        return rows[-1] if rows else {}

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        method.start_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        stat_sums: dict = {}
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        n_seen = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not cfg.train.progress,
                   leave=False, unit="batch", dynamic_ncols=True)
        lr = lr_at(cfg.optim, epoch, epochs)
        for step, (x, y, idx) in enumerate(loader.epoch(epoch)):
            lr = lr_at(cfg.optim, epoch + step / steps_per_epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with amp_ctx():
                out = method.loss(model, x, y, idx)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1

            b = len(y)
            n_seen += b
            loss = out.loss.detach().float()
            # Device-side bookkeeping only; the host reads it once per log interval.
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), torch.full_like(first_bad, step + 1),
                                    first_bad)
            loss_sum += loss * b
            correct += (out.logits.detach().argmax(1) == y).sum()
            for k, v in out.stats.items():
                stat_sums[k] = stat_sums.get(k, 0) + v.detach()
            if (step + 1) % cfg.train.log_interval == 0 or step + 1 == steps_per_epoch:
                bad = int(first_bad)
                if bad > 0:
                    bar.close()
                    raise IaatError(f"the training loss became NaN/inf at epoch {epoch + 1}, step {bad}; stopping "
                                    f"without saving. The last good checkpoint in {ckpt_dir} is intact. Try a "
                                    f"lower learning rate or train.amp=off.")
                bar.set_postfix(loss=f"{loss_sum.item() / n_seen:.3f}", acc=f"{correct.item() / n_seen:.3f}",
                                lr=f"{lr:.4g}")
            bar.update(1)
        bar.close()
        train_seconds = time.perf_counter() - t0

        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / max(n_seen, 1),
               "train_acc": correct.item() / max(n_seen, 1), **{f"train_{k}": v for k, v in
                                                                _to_host(stat_sums, n_seen).items()}}
        row.update(method.end_epoch(epoch, run_dir))
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            if len(data.val) > 0:
                res = evaluate(model, data.val, [eval_spec], batch_size=max(256, cfg.train.batch_size), device=device,
                               progress=cfg.train.progress, desc="val", autocast_dtype=amp_dtype)
                row["val_clean_acc"] = res["clean"]
                row[f"val_pgd{cfg.train.eval_steps}_acc"] = res["attacks"][eval_spec.label]["accuracy"]
        row["train_seconds"] = train_seconds
        row["images_per_second"] = n_seen / train_seconds if train_seconds > 0 else None
        row["seconds"] = time.perf_counter() - t0

        rundir.append_metrics(run_dir, row)
        payload = {
            "iaat_version": __version__,
            "epoch": epoch + 1,
            "global_step": global_step,
            "model_name": cfg.model.name,
            "method_name": cfg.method.name,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"schedule": cfg.optim.schedule, "lr": lr},  # the LR is a pure function of progress
            "scaler": scaler.state_dict(),
            "method": method.state_dict(),
            "rng": rng_state(),
            "config": cfg.to_dict(),
            "data": {"dataset": cfg.data.dataset, "num_classes": data.splits.num_classes,
                     "image_shape": list(data.splits.image_shape),
                     "train_size": len(data.train), "source": data.splits.source},
        }
        save_checkpoint(checkpoint_path(ckpt_dir, epoch + 1), payload)
        prune(ckpt_dir, cfg.train.keep_checkpoints)
        log(_format_row(row))
        last_row = row

    rundir.write_json(run_dir / rundir.SUMMARY, {"epochs": epochs, "last": last_row})
    return last_row


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key in ("train_loss", "train_acc"):
        parts.append(f"{key} {row[key]:.4f}")
    for key, value in row.items():
        if key.startswith("val_") and isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
    if row.get("images_per_second"):
        parts.append(f"{row['images_per_second']:.0f} img/s")
    return " | ".join(parts)


def load_run(path: Path, device: Optional[torch.device] = None):
    """Load the model of a run folder (its newest valid checkpoint) or of one checkpoint file.

    Returns ``(model, cfg, checkpoint_path, checkpoint)``, the model in eval mode on ``device``.
    """
    from ..config import config_from_dict, load_yaml
    from ..models import build_model
    from .checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir():
        cfg_path = path / rundir.CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} is not a run folder: no {rundir.CONFIG} in it.")
        ckpt_path, ckpt = latest_valid(path / rundir.CHECKPOINTS)
        if ckpt is None:
            raise CheckpointError(f"no valid checkpoint in {path / rundir.CHECKPOINTS}.")
        cfg = config_from_dict(load_yaml(cfg_path))
    elif path.exists():
        ckpt_path, ckpt = path, load_checkpoint(path)
        cfg = config_from_dict(ckpt["config"])
    else:
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file).")
    info = ckpt.get("data", {})
    channels = (info.get("image_shape") or [3])[0]
    # Normalisation constants are buffers in the state dict, so placeholders are overwritten on load.
    model = build_model(cfg.model.name, info.get("num_classes", 10), channels, depth=cfg.model.depth,
                        width=cfg.model.width)
    load_model_state(model, ckpt["model"], str(ckpt_path), cfg.model.name, ckpt.get("model_name", "?"))
    model.to(device or torch.device("cpu")).eval()
    return model, cfg, ckpt_path, ckpt
