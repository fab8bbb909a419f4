"""A saved run read back: its config and its model, from a run folder or one checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import Config, config_from_dict
from ..ema import EMA_KEY
from ..errors import CheckpointError, ConfigError
from ..models import build_model
from ..models.state import load_model_state
from . import rundir
from .checkpoint import latest_valid, load_checkpoint


def load_run_config(path: Path) -> Config:
    """The config of a run folder (its config.yaml) or of a checkpoint file, without building the model."""
    path = Path(path)
    if path.is_dir():
        if not (path / rundir.CONFIG).is_file():
            raise CheckpointError(f"{path} is not a run folder: no {rundir.CONFIG} in it.")
        return rundir.run_config(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint file).")
    return config_from_dict(load_checkpoint(path)["config"])


def load_run(path: Path, device: Optional[torch.device] = None, weights: str = "raw"):
    """Load the model of a run folder (its newest valid checkpoint) or of one checkpoint file.

    ``weights``: ``raw`` (the trained weights), ``ema`` (the averaged ones of ``train.ema``; an error
    when the run has none) or ``auto`` (the averaged ones when the run keeps them). Returns
    ``(model, cfg, checkpoint_path, checkpoint)``, the model in eval mode on ``device``; the weights
    loaded are the averaged ones when ``weights != "raw" and EMA_KEY in checkpoint``.
    """
    if weights not in ("auto", "raw", "ema"):
        raise ConfigError(f"weights must be auto, raw or ema, got {weights!r}.")
    path = Path(path)
    if path.is_dir():
        cfg_path = path / rundir.CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} is not a run folder: no {rundir.CONFIG} in it.")
        ckpt_path, ckpt = latest_valid(path / rundir.CHECKPOINTS)
        if ckpt is None:
            raise CheckpointError(f"no valid checkpoint in {path / rundir.CHECKPOINTS}.")
        cfg = rundir.run_config(path)
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
    if weights == "ema" and EMA_KEY not in ckpt:
        raise CheckpointError(f"{ckpt_path} holds no averaged weights (the run trained without train.ema); use "
                              f"its raw weights (--raw, weights='raw').")
    state = ckpt[EMA_KEY] if weights != "raw" and EMA_KEY in ckpt else ckpt["model"]
    load_model_state(model, state, str(ckpt_path), cfg.model.name, ckpt.get("model_name", "?"))
    model.to(device or torch.device("cpu")).eval()
    return model, cfg, ckpt_path, ckpt
