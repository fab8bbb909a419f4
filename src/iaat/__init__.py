"""iaat: instance-adaptive adversarial training (IAAT, GAIRAT and their baselines).

The public API; every size is a float in [0, 1] image units (8/255, not 8)::

    import iaat
    model = iaat.NormalizedModel(my_net, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))  # any nn.Module
    method = iaat.IAAT(num_train=len(train_set), epochs=100, eps=8 / 255, gamma=1.9 / 255, warmup_epochs=5)
    loader = DataLoader(iaat.IndexedDataset(train_set), batch_size=128, shuffle=True)  # yields (x, y, index)
    for epoch in range(100):
        method.start_epoch(epoch)
        for x, y, index in loader:
            loss = method.loss(model, x, y, index)
            ...
    x_adv = iaat.PGD(model, eps=8 / 255, steps=10)(x, y)
    print(iaat.evaluate(model, x_test, y_test, attacks=["pgd:steps=20,restarts=5", "cw"], eps=8 / 255))

    # or the whole trainer of `iaat train` (checkpoints, resume, metrics.jsonl), its config as in config files:
    iaat.train("runs/iaat", "configs/cifar10_resnet18_iaat.yaml", overrides={"train.epochs": 10})

Submodules are imported when first used, so ``import iaat`` stays light (the command line reads
its help without loading torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models
    "build_model": "models", "NormalizedModel": "models", "MODELS": "models",
    # the attack
    "pgd": "attacks", "PGD": "attacks", "AttackResult": "attacks",
    # training methods
    "Method": "methods", "Clean": "methods", "PGDAT": "methods", "IAAT": "methods", "GAIRAT": "methods",
    "FAT": "methods", "GAIRFAT": "methods", "TRADES": "methods", "MixupAT": "methods", "MART": "methods",
    "MMA": "methods", "CAT": "methods", "MAIL": "methods", "METHODS": "methods",
    "gair_weights": "methods.gair", "EMA": "ema", "AWP": "awp", "size": "methods.base",
    # data
    "IndexedDataset": "data.indexed",
    # evaluation
    "evaluate": "evaluation.api", "AttackSpec": "evaluation.attacks",
    # runs (the trainer behind `iaat train`) and model files
    "train": "training", "load_model": "model_files", "export_model": "model_files",
    # units
    "check_size": "units", "format_size": "units",
}

__all__ = sorted(_EXPORTS)


#: Subpackages reachable as attributes (``iaat.data.load_dataset``) without importing them first.
_SUBPACKAGES = ("attacks", "config", "data", "engine", "errors", "evaluation", "methods", "models", "reporting",
                "units")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
