"""``iaat demo``: clean training vs PGD adversarial training on scikit-learn's digits.

Real data that ships inside an installed package (1,797 handwritten 8x8 digits), a small
CNN, about a minute on two CPU cores. It shows the trade-off the library is about:
clean training is accurate but falls apart under attack; PGD-AT is robust.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from .config import config_from_dict
from .errors import ConfigError
from .data import load_dataset
from .engine import rundir, train
from .engine.runs import load_run
from .evaluation.attacks import AttackSpec
from .evaluation.robustness import accuracy
from .units import format_size, parse_size


#: the demo's two runs, each in a folder of that name
METHODS = ("clean", "pgd_at")


def demo_config(method: str, epochs: int, eps: str, seed: int, threads: Optional[int] = None) -> dict:
    return {
        "data": {"dataset": "digits", "val_size": 197, "augment": False},
        "model": {"name": "small_cnn", "width": 32},
        "method": {"name": method},
        "attack": {"eps": eps, "step_size": f"{parse_size(eps) * 255 / 4:g}", "steps": 10},
        "optim": {"lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine"},
        "train": {"epochs": epochs, "batch_size": 64, "seed": seed, "device": "cpu", "eval_steps": 10,
                  "progress": False, "log_interval": 5, "threads": threads},
    }


def _check_same_demo(run: Path, cfg) -> None:
    """``run`` is this demo's run as asked (its epochs too), apart from the threads: else carrying it on would train
    or report another demo than the one asked for."""
    saved = config_from_dict(rundir.read_config(run)).to_dict()
    asked = cfg.to_dict()
    for d in (saved, asked):
        d["train"].pop("threads", None)
    if saved != asked:
        raise ConfigError(f"--out {run.parent} holds another demo's run ({run.name}: other settings or epochs than "
                          f"asked); choose another --out, or ask for the same demo.")


def run_demo(out: Optional[Path] = None, epochs: int = 20, eps: str = "64", seed: int = 0,
             threads: Optional[int] = None) -> dict:
    """Train ``clean`` and ``pgd_at`` and print clean and PGD-20 test accuracy of both (with ``threads`` CPU threads;
    None: iaat's choice)."""
    out = out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    eps_unit = parse_size(eps, "--eps")
    if eps_unit <= 0:
        raise ConfigError(f"--eps must be positive, got {eps}: the demo compares training at that radius with clean "
                          f"training.")
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= set(METHODS)):
        raise ConfigError(f"--out {out} already exists{'' if out.is_dir() else ' and is not a folder'}; the demo "
                          f"writes two new runs there: choose another --out (or leave it out for a fresh one). A "
                          f"folder of an earlier demo's runs is carried on.")
    test = load_dataset("digits").test
    print(f"iaat demo: small CNN on scikit-learn digits (8x8, {len(test)} test images), "
          f"eps {format_size(eps_unit)} L-inf, {epochs} epochs per method, runs in {out}")
    results = {}
    start = time.perf_counter()
    for method in METHODS:
        print(f"\n== training {method} ==")
        cfg = config_from_dict(demo_config(method, epochs, eps, seed, threads))
        earlier = (out / method / rundir.CONFIG).is_file()  # an interrupted demo: carry on where it stopped
        if earlier:
            _check_same_demo(out / method, cfg)
            print(f"carrying on with the earlier demo's run {out / method}")
        train(cfg, out / method, resume=earlier)
        model, *_ = load_run(out / method)
        torch.manual_seed(seed)
        spec = AttackSpec(eps_unit, steps=20, restarts=1, step_size=eps_unit / 8)
        res = accuracy(model, test, [spec], device=torch.device("cpu"))
        results[method] = {"clean": res["clean"], "pgd20": res["attacks"][spec.label]["accuracy"]}
    print(f"\ntest accuracy on {len(test)} digits (PGD-20, eps {format_size(eps_unit)}), "
          f"{time.perf_counter() - start:.0f} s in all:")
    print(f"  {'method':<8} {'clean':>7} {'PGD-20':>7}")
    for method, r in results.items():
        print(f"  {method:<8} {r['clean']:>7.3f} {r['pgd20']:>7.3f}")
    return results
