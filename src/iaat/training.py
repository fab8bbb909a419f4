"""Runs trained from Python: :func:`train` takes what ``iaat train`` takes and writes the same run folder
(config.yaml, checkpoints, metrics.jsonl, per-sample radii), so ``iaat eval``, ``iaat report`` and a later
``--resume`` work on it as on any run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .config import SECTIONS, Config, config_from_dict, load_yaml, locate, set_key
from .errors import ConfigError

ConfigLike = Union[str, Path, Mapping, Config, None]


def train(out: Union[str, Path], config: ConfigLike = None, *, overrides: Optional[Mapping[str, Any]] = None,
          resume: bool = False, log: Optional[Callable[[str], None]] = print) -> dict:
    """Train a run into the folder ``out`` (or continue it with ``resume``), as ``iaat train --out OUT`` does;
    returns the last epoch's metrics row (as in ``metrics.jsonl``).

    Args:
        out: the run folder; a new run refuses one that already holds a run.
        config: a config file (YAML), a dict in its form (``{"method": {"name": "iaat", "gamma": 1.9}}``) or a
            :class:`~iaat.config.Config`; ``None``: the defaults. Sizes are written as in config files, in
            pixels over 255 (``8``) or as ``"8/255"``. With ``resume`` the run's own config is used: leave it out.
        overrides: ``{"section.key": value}`` set over ``config``, as ``--set section.key=value``; with
            ``resume``, only what a resume may change (``train.epochs``, ``train.device``, ``data.data_dir``...).
        resume: continue the run in ``out`` from its newest checkpoint.
        log: where the run's progress lines go (None: nowhere; the progress bar follows ``train.progress``).

    Raises:
        IaatError: on bad input (before ``out`` is created or touched), a non-finite loss or a failed write.
        TrainingInterrupted: on SIGINT/SIGTERM, after saving what resuming needs; a ``KeyboardInterrupt``, so
            ``except Exception:`` does not swallow it.

    Example (one epoch on scikit-learn's digits, then a second by resuming)::

        >>> spec = {"data": {"dataset": "digits"}, "model": {"name": "small_cnn", "width": 8},
        ...         "method": {"name": "iaat"}, "attack": {"eps": 32}, "train": {"progress": False}}
        >>> row = iaat.train(folder / "run", spec, overrides={"train.epochs": 1}, log=lambda line: None)
        >>> row["epoch"], sorted(p.name for p in (folder / "run").iterdir())[:3]
        (1, ['checkpoints', 'config.yaml', 'data_split.npz'])
        >>> iaat.train(folder / "run", resume=True, overrides={"train.epochs": 2}, log=lambda line: None)["epoch"]
        2
    """
    from .engine import train as train_run

    if resume and config is not None:
        raise ConfigError("resume=True continues the run with the config in its folder; leave config out (change "
                          "what a resume may change with overrides, e.g. {'train.epochs': 20}).")
    out = Path(out)
    cfg = resumed_config(out, overrides) if resume else new_config(config, overrides)
    return train_run(cfg, out, resume=resume, log=log or (lambda line: None))


def new_config(config: ConfigLike = None, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """The config of a new run: ``config`` (a file, a dict in its form, a Config or None for the defaults) with
    ``overrides`` (``{"section.key": value}``) set over it, checked."""
    if isinstance(config, Config):
        raw = config.to_dict()
    elif isinstance(config, (str, Path)):
        raw = load_yaml(config)
    elif config is None or isinstance(config, Mapping):
        raw = {section: dict(values) if isinstance(values, Mapping) else values  # the caller's dict stays as it was
               for section, values in (config or {}).items()}
    else:
        raise ConfigError(f"config must be a YAML file, a dict or an iaat.config.Config, got {type(config).__name__}.")
    raw = with_overrides(raw, overrides)  # an override's own mistake is not the file's
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # a mistake in the file: say where
        raise (locate(e, config, raw) if isinstance(config, (str, Path)) else e) from None


def resumed_config(out: Path, changes: Optional[Mapping[str, Any]] = None) -> Config:
    """The saved config of the run in ``out`` with ``changes`` set over it (``{"section.key": value}`` or a nested
    dict); a change a resume may not make (``config.RESUMABLE_KEYS``) is refused by the trainer when it resumes
    (:func:`iaat.engine.rundir.check_resume_config`)."""
    from .engine.rundir import check_resumable, read_config

    check_resumable(out)
    saved = read_config(out)
    raw = with_overrides({s: dict(saved.get(s) or {}) for s in saved}, changes)
    old, new = (saved.get("method") or {}).get("name"), (raw.get("method") or {}).get("name")
    if old != new:  # before the method's keys are read: the old method's would be refused as the new one's
        raise ConfigError(f"cannot change method.name when resuming ({old!r} in {out / 'config.yaml'}, asked "
                          f"{new!r}); start a new run in another folder instead.")
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # a bad value the run's file still holds (not one a change replaced): say where
        raise locate(e, out / "config.yaml", raw) from None


def with_overrides(raw: dict, overrides: Optional[Mapping[str, Any]]) -> dict:
    """``raw`` (a nested config dict, changed in place) with ``{"section.key": value}`` or nested
    ``{"section": {"key": value}}`` overrides set over it.

    >>> with_overrides({"train": {"epochs": 3}}, {"train.epochs": 5, "method.name": "iaat"})
    {'train': {'epochs': 5}, 'method': {'name': 'iaat'}}
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a dict of {{'section.key': value}}, got {type(overrides).__name__}.")
    for name, value in (overrides or {}).items():
        if isinstance(value, Mapping) and name in SECTIONS:  # a whole section: {"train": {"epochs": 5}}
            for key, item in value.items():
                set_key(raw, name, key, item, f"overrides[{name!r}]")
            continue
        section, dot, key = str(name).partition(".")
        if not dot or not section or not key or "." in key:
            raise ConfigError(f"overrides take 'section.key' names (e.g. 'train.epochs'), got {name!r}.")
        set_key(raw, section, key, value, f"override {name!r}")
    return raw
