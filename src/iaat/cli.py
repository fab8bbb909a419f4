"""Command line: ``iaat train | eval | demo``.

Sizes (eps, step sizes) are in pixel units over 255: ``8`` means 8/255; ``"8/255"`` and
``"0.031/1"`` (an explicit fraction of the [0, 1] range) are accepted too.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from . import __version__
from .errors import ConfigError, DataError, IaatError, TrainingInterrupted

SIZE_HELP = "pixel units over 255 (8 means 8/255), or a fraction such as '8/255' or '0.031/1'"

# Keys a resumed run may change; anything else must match the saved config.yaml.
_RESUMABLE_CHANGES = {("train", "epochs"), ("train", "device"), ("train", "progress"), ("train", "log_interval"),
                      ("train", "deterministic"), ("data", "data_dir"), ("data", "download")}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML preset (see configs/); flags and --set override it")
    p.add_argument("--out", metavar="RUN_DIR", required=True,
                   help="run folder to create (must not exist or be empty unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint (exactly, on CPU)")
    p.add_argument("--method", help="training method: clean | pgd_at | iaat | gairat | fat | gair_fat | trades | mixup_at  "
                                     "[method.name]; set its keys with --set method.KEY=VALUE")
    p.add_argument("--model", help="architecture: small_cnn | resnet18 | preact_resnet18 | wideresnet | "
                                   "wrn-32-10 | wrn-34-10  [model.name]")
    p.add_argument("--dataset", help="cifar10 | cifar100 | digits  [data.dataset]")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding cifar-10-batches-py / cifar-100-python, or that folder itself "
                        "[data.data_dir; default ~/.cache/iaat or $IAAT_DATA]")
    p.add_argument("--epochs", type=int, help="number of epochs  [train.epochs]")
    p.add_argument("--train-subset", type=int, metavar="N",
                   help="train on a fixed class-balanced subset of N images  [data.train_subset]")
    p.add_argument("--batch-size", type=int, help="images per step  [train.batch_size]")
    p.add_argument("--seed", type=int, help="training seed: init, order, augmentation, attacks  [train.seed]")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N  [train.device]")
    p.add_argument("--eps", help=f"training attack radius, {SIZE_HELP}  [attack.eps]")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], help="autocast for attacks and training  [train.amp]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in batch jobs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set attack.eps=8 --set optim.lr=0.05 "
                        "--set method.warmup_epochs=5 (repeatable; value parsed as YAML)")


def _raw_config(args: argparse.Namespace) -> dict:
    """The nested config dict from --config (if any), the flags and the --set overrides."""
    from .config import apply_override, load_yaml, merge

    raw = load_yaml(args.config) if args.config else {}
    merge(raw, "method", "name", args.method)
    merge(raw, "model", "name", args.model)
    merge(raw, "data", "dataset", args.dataset)
    merge(raw, "data", "data_dir", args.data_dir)
    merge(raw, "data", "train_subset", args.train_subset)
    merge(raw, "train", "epochs", args.epochs)
    merge(raw, "train", "batch_size", args.batch_size)
    merge(raw, "train", "seed", args.seed)
    merge(raw, "train", "device", args.device)
    merge(raw, "train", "amp", args.amp)
    merge(raw, "attack", "eps", args.eps)
    if args.no_progress:
        merge(raw, "train", "progress", False)
    for assignment in args.set:
        apply_override(raw, assignment)
    return raw


def cmd_train(args: argparse.Namespace) -> int:
    from .config import config_from_dict, load_yaml
    from .engine import train
    from .engine.rundir import CONFIG, check_resumable

    out = Path(args.out)
    if args.resume:
        check_resumable(out)
        if args.config:
            raise ConfigError("--resume takes the config from the run folder; drop --config "
                              "(use --epochs or --set train.epochs=N to extend a run).")
        saved = load_yaml(out / CONFIG)
        raw = _raw_config(argparse.Namespace(**{**vars(args), "config": None}))
        merged = {s: dict(saved.get(s) or {}) for s in saved}
        for section, values in raw.items():
            merged.setdefault(section, {}).update(values)
        cfg = config_from_dict(merged)
        before = config_from_dict(saved).to_dict()
        after = cfg.to_dict()
        for section in after:
            for key in set(after[section]) | set(before.get(section, {})):
                old, new = before.get(section, {}).get(key), after[section].get(key)
                if (section, key) not in _RESUMABLE_CHANGES and old != new:
                    raise ConfigError(f"cannot change {section}.{key} when resuming ({old!r} in {out / CONFIG}, "
                                      f"asked {new!r}); start a new run with another --out instead.")
    else:
        cfg = config_from_dict(_raw_config(args))
    train(cfg, out, resume=args.resume)
    print(f"run saved in {out}")
    return 0


def _parse_sizes(values: Optional[Sequence[str]], name: str, norm: str) -> list:
    from .units import parse_size

    return [parse_size(v, name, max_unit=1.0 if norm == "linf" else 64.0) for v in values or []]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset, make_train_val
    from .engine.checkpoint import write_failure
    from .engine.rundir import write_json
    from .engine.setup import resolve_device
    from .engine.trainer import load_run
    from .evaluation import AttackSpec, evaluate
    from .units import format_size

    # Options first: a typo should not wait for the model and the data to load.
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}.")
    if args.steps < 0 or args.restarts < 1:
        raise ConfigError("--steps must be >= 0 and --restarts >= 1.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}.")
    norm = args.norm
    eps_arg = _parse_sizes(args.eps, "--eps", norm) if args.eps else None
    step = _parse_sizes([args.step_size], "--step-size", norm)[0] if args.step_size else None
    device = resolve_device(args.device)
    model, cfg, ckpt_path, ckpt = load_run(Path(args.path), device)
    data_dir = args.data_dir or cfg.data.data_dir
    splits = load_dataset(cfg.data.dataset, data_dir, cfg.data.download)
    trained = ckpt.get("data") or {}
    expected = (trained.get("num_classes"), trained.get("image_shape"))
    found = (splits.num_classes, list(splits.image_shape))
    if None not in expected and tuple(expected) != found:
        raise DataError(f"{ckpt_path} holds a model for {expected[0]} classes of {expected[1]} images, but "
                        f"{cfg.data.dataset} ({splits.source}) has {found[0]} classes of {found[1]} images; "
                        f"evaluate it on the data set it was trained on.")
    if args.split == "test":
        data = splits.test
    else:
        _, val_idx = make_train_val(splits.train.y, cfg.data.val_size, cfg.data.train_subset, cfg.data.split_seed)
        data = splits.train.subset(val_idx)
    if args.n is not None:
        data = data.subset(torch.arange(min(args.n, len(data))))
    eps_list = eps_arg or [cfg.eps]
    specs = [AttackSpec(e, args.steps, args.restarts, step, norm, args.loss) for e in eps_list if e > 0]
    torch.manual_seed(args.seed)
    res = evaluate(model, data, specs, batch_size=args.batch_size, device=device, progress=not args.no_progress)
    result = {
        "iaat_version": __version__,
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "model": cfg.model.name,
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "data_source": splits.source,
        "split": args.split,
        "seed": args.seed,
        **res,
    }
    out = Path(args.out) if args.out else None
    if out is None:
        base = Path(args.path) if Path(args.path).is_dir() else Path(args.path).parent
        out = base / "eval" / f"eval-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(out.parent, e) from None
    write_json(out, result)
    print(f"{cfg.method.name} / {cfg.model.name}, epoch {result['epoch']}, {res['n']} {args.split} images "
          f"({splits.source})")
    print(f"  clean accuracy            {res['clean']:.4f}")
    for spec in specs:
        acc = res["attacks"][spec.label]["accuracy"]
        print(f"  PGD-{spec.steps} x{spec.restarts} {spec.loss} @ {format_size(spec.eps):<9} {acc:.4f}")
    print(f"results written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=Path(args.out) if args.out else None, epochs=args.epochs, eps=args.eps, seed=args.seed)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error format (``iaat: error: ...``) for malformed flags too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"iaat: error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="iaat",
        description="Instance-adaptive adversarial training: train robust classifiers (IAAT, GAIRAT, PGD-AT and "
                    "their baselines) and evaluate them. Sizes are in " + SIZE_HELP + ".",
    )
    parser.add_argument("--version", action="version", version=f"iaat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model into a run folder (resumable)",
                       description="Train a model. The config is built from defaults, then --config, then the "
                                   "flags below, then --set overrides. Every epoch writes a checkpoint and a "
                                   "line of metrics.jsonl into the run folder.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="clean and PGD accuracy of a run or checkpoint, written as JSON",
                       description="Evaluate a trained model: clean accuracy and PGD-k accuracy with restarts. "
                                   "A sample counts as robust only if it is also classified correctly when clean.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run folder (uses its newest valid checkpoint) or .pt")
    p.add_argument("--eps", nargs="+", help=f"attack radii, {SIZE_HELP} (default: the run's attack.eps)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts; a sample must survive all (default 1)")
    p.add_argument("--step-size", help=f"PGD step, {SIZE_HELP} (default 2.5 * eps / steps)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf", help="threat model (default linf)")
    p.add_argument("--loss", choices=["ce", "margin"], default="ce", help="attack loss: cross-entropy or CW margin")
    p.add_argument("--n", type=int, help="evaluate the first N images of the split (default all)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="official test split, or the run's held-out part of the training split")
    p.add_argument("--data-dir", metavar="DIR", help="data folder (default: the run's data.data_dir)")
    p.add_argument("--batch-size", type=int, default=256, help="images per attack batch (default 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default 0)")
    p.add_argument("--out", metavar="FILE", help="JSON file to write (default RUN/eval/eval-<split>-<time>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="a few-minute CPU demo on scikit-learn's bundled digits (no download)",
                       description="Train a small CNN on scikit-learn's 8x8 digits twice, with clean training and "
                                   "with PGD adversarial training, and print clean and robust test accuracy of both.")
    p.add_argument("--out", metavar="DIR", help="folder for the two runs (default runs/demo-<time>)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--eps", default="64", help=f"attack radius for training and testing, {SIZE_HELP} (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Scoped, so that calling main() in-process (tests, notebooks) leaves the caller's warning setup as it was.
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except TrainingInterrupted as e:
            print(f"iaat: {e}", file=sys.stderr)
            return e.exit_code
        except IaatError as e:
            print(f"iaat: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("iaat: interrupted", file=sys.stderr)
            return 130
        except OSError as e:  # a file problem no code path above anticipated: still one line, with the path
            print(f"iaat: error: {e}", file=sys.stderr)
            return 1


def _show_warning(message: Warning | str, category: type, filename: str, lineno: int, file: object = None,
                  line: Optional[str] = None) -> None:
    """Warnings as one ``iaat: warning: ...`` line on stderr, without source locations."""
    print(f"iaat: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
