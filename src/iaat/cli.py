"""Command line: ``iaat train | eval | export | metrics | sweep | report | demo``.

Sizes (eps, step sizes) are in pixel units over 255: ``8`` means 8/255; ``"8/255"`` and
``"0.031/1"`` (an explicit fraction of the [0, 1] range) are accepted too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from . import __version__
from .errors import ConfigError, IaatError, TrainingInterrupted

SIZE_HELP = "pixel units over 255 (8 means 8/255), or a fraction such as '8/255' or '0.031/1'"



def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML preset (see configs/); flags and --set override it")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="run folder to create (must not exist or be empty unless --resume)")
    p.add_argument("--print-config", action="store_true",
                   help="print every config key with its value (the default unless set by --config, flags or "
                        "--set), its meaning and unit, as YAML that --config reads back; then exit")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint (exactly, on CPU)")
    p.add_argument("--method", help="training method: clean | pgd_at | iaat | gairat | fat | gair_fat | trades | "
                                    "mixup_at | mart | mma | cat | mail, or your own as module:Class (an iaat.Method "
                                    "subclass; see examples/own_method.py)  [method.name]; set its keys with --set "
                                    "method.KEY=VALUE")
    p.add_argument("--model", help="architecture: small_cnn | resnet18 | preact_resnet18 | wideresnet | "
                                   "wrn-32-10 | wrn-34-10 (CIFAR-sized); resnet50 | resnet101 | resnet152 "
                                   "(ImageNet-sized); or your own as module:factory (imported from the current "
                                   "folder or the path, called with num_classes, in_channels, depth and width "
                                   "where it takes them; the data set's normalisation goes around it)  [model.name]")
    p.add_argument("--dataset", help="cifar10 | cifar100 | digits | imagefolder (--data-dir ROOT with "
                                     "ROOT/train/<class>, ROOT/val/<class>, e.g. ImageNet)  [data.dataset]")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding cifar-10-batches-py / cifar-100-python, or that folder itself "
                        "[data.data_dir; default ~/.cache/iaat or $IAAT_DATA]")
    p.add_argument("--epochs", type=int, help="number of epochs  [train.epochs]")
    p.add_argument("--train-subset", type=int, metavar="N",
                   help="train on a fixed class-balanced subset of N images  [data.train_subset]")
    p.add_argument("--batch-size", type=int, help="images per step, all processes together  [train.batch_size]")
    p.add_argument("--seed", type=int, help="training seed: init, order, augmentation, attacks  [train.seed]")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N  [train.device]")
    p.add_argument("--eps", help=f"training attack radius, {SIZE_HELP}  [attack.eps]")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], help="autocast for attacks and training  [train.amp]")
    _add_threads(p, "; written to the run's config so that a resumed run computes exactly as before)  "
                    "[train.threads]")
    p.add_argument("--init-from", metavar="FILE",
                   help="start from these weights: a run folder, a checkpoint, or an exported .safetensors, "
                        "TorchScript or .pt2 model of the same architecture (adversarial fine-tuning)  "
                        "[train.init_from]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in batch jobs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set attack.eps=8 --set optim.lr=0.05 "
                        "--set method.warmup_epochs=5 (repeatable; value parsed as YAML)")


def _add_threads(p: argparse.ArgumentParser, more: str = ")") -> None:
    """``--threads N`` (see :func:`iaat.engine.setup.choose_threads`); ``more`` ends its help text."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: all cores, or 1 when the machine is busy at the start" + more)


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
    merge(raw, "train", "init_from", args.init_from)
    merge(raw, "train", "threads", args.threads)
    if args.no_progress:
        merge(raw, "train", "progress", False)
    for assignment in args.set:
        apply_override(raw, assignment)
    return raw


def cmd_train(args: argparse.Namespace) -> int:
    from .config import describe
    from .engine import train

    if args.resume and not args.out:
        raise ConfigError("--resume continues the run in --out RUN_DIR; give that folder.")
    cfg = _resumed_config(args, Path(args.out)) if args.resume else _new_config(args)
    if args.print_config:  # with --resume: the run's config, as resuming would use it
        from .engine.rundir import check_resume_config

        # the trainer's resume check: what a resume may not change is refused, a stretched schedule noted
        note = check_resume_config(Path(args.out), cfg) if args.resume else None
        if note:
            warnings.warn(note, stacklevel=1)
        print(describe(cfg), end="")
        return 0
    if not args.out:
        raise ConfigError("iaat train needs --out RUN_DIR, the run folder to create (or to continue with --resume).")
    train(cfg, Path(args.out), resume=args.resume)
    if not _rank_prefix():
        print(f"run saved in {args.out}")
    return 0


def _new_config(args: argparse.Namespace):
    """The config of a new run: the file (or defaults), then the flags and --set."""
    from .config import config_from_dict, locate

    raw = _raw_config(args)  # a flag's or --set's own mistake is not the file's
    try:
        return config_from_dict(raw)
    except ConfigError as e:  # a mistake in the file: say where
        raise (locate(e, args.config, raw) if args.config else e) from None


def _resumed_config(args: argparse.Namespace, out: Path):
    """The run's saved config with the flags' changes (the trainer refuses those outside ``config.RESUMABLE_KEYS``)."""
    from .engine.rundir import check_resumable
    from .training import resumed_config

    check_resumable(out)
    if args.config:
        raise ConfigError("--resume takes the config from the run folder; drop --config "
                          "(use --epochs or --set train.epochs=N to extend a run).")
    if args.init_from:
        raise ConfigError("--init-from starts a new run from other weights; --resume continues this run from "
                          "its own checkpoint. Drop one of them.")
    return resumed_config(out, _raw_config(argparse.Namespace(**{**vars(args), "config": None})))


def _parse_sizes(values: Optional[Sequence[str]], name: str, norm: str) -> list:
    from .units import parse_size

    return [parse_size(v, name, max_unit=1.0 if norm == "linf" else 64.0) for v in values or []]


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.protocol import build_plan, corruption_headline, curve_x
    from .eval_session import EvalRequest, default_eps, evaluate_checkpoint, trained_for
    from .units import format_size

    # Options first: a typo should not wait for the model and the data to load.
    if args.path and args.model:
        raise ConfigError("give either a model file or run (PATH) or --model module:factory, not both.")
    if not args.path and not args.model:
        raise ConfigError("iaat eval needs a run folder or model file, or --model module:factory --weights FILE.")
    if args.n is not None and args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}.")
    legacy = {"--steps": args.steps, "--restarts": args.restarts, "--step-size": args.step_size,
              "--loss": args.loss}
    attacks = list(args.attack)
    given = [k for k, v in legacy.items() if v is not None]
    # the default attack runs alone; --surrogate or --corruptions without --attack run only what they name
    instead = [k for k, v in (("--protocol", args.protocol), ("--attack", attacks), ("--surrogate", args.surrogate),
                              ("--corruptions", args.corruptions)) if v]
    if given and instead:
        transfer = " (--attack transfer:steps=... for the transfer attack)" if args.surrogate else ""
        raise ConfigError(f"{', '.join(given)} describe the single default PGD attack, which {' and '.join(instead)} "
                          f"leave{'s' * (len(instead) == 1)} out; write it as an attack, e.g. --attack "
                          f"pgd:steps=100,restarts=5,loss=margin{transfer}.")
    if not instead:
        steps = 10 if args.steps is None else args.steps
        restarts = 1 if args.restarts is None else args.restarts
        if steps < 0 or restarts < 1:
            raise ConfigError("--steps must be >= 0 and --restarts >= 1.")
        opts = [f"steps={steps}", f"restarts={restarts}", f"loss={args.loss or 'ce'}"]
        if args.step_size:
            opts.append(f"step_size={args.step_size}")
        attacks = ["pgd:" + ",".join(opts)]
    if args.sweep_steps is not None and any(k < 1 for k in args.sweep_steps):
        raise ConfigError("--sweep-steps values must be >= 1.")

    from .engine.setup import choose_threads, resolve_device

    choose_threads(args.threads, resolve_device(args.device).type == "cpu")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be positive, got {args.num_classes}.")
    if args.weights and not args.model:
        raise ConfigError("--weights goes with --model module:factory (a model file holds its own weights).")
    if args.num_classes is not None and not args.model:
        raise ConfigError("--num-classes goes with --model module:factory (a run or model file knows its classes).")
    if args.model and not args.weights:  # else a random network's accuracy could pass for a trained one's
        warnings.warn(f"no --weights given: --model {args.model} keeps the weights its factory gives it, random "
                      f"initial ones unless the factory loads trained weights itself; pass --weights FILE to "
                      f"evaluate trained weights.", stacklevel=1)
    req = EvalRequest(path=Path(args.path) if args.path else None, plan=None, n=args.n, split=args.split,
                      data_dir=args.data_dir, batch_size=args.batch_size, device=args.device, seed=args.seed,
                      out=Path(args.out) if args.out else None, progress=not args.no_progress, model=args.model,
                      weights=Path(args.weights) if args.weights else None, dataset=args.dataset,
                      num_classes=args.num_classes, run_weights=_run_weights(args), command=args.command_line)
    # the model's own training norm and radius, where not given and known
    trained = trained_for(req, read_files=not args.eps) if args.norm is None or not args.eps else {}
    norm = args.norm or trained.get("norm", "linf")
    eps = _parse_sizes(args.eps, "--eps", norm) if args.eps else [default_eps(trained, norm)]
    sweep_eps = _parse_sizes(args.sweep_eps, "--sweep-eps", norm) if args.sweep_eps else None
    req.plan = build_plan(eps=eps, protocol=args.protocol, attacks=attacks, norm=norm, surrogate=args.surrogate,
                          corruptions=args.corruptions, eps_sweep=sweep_eps, steps_sweep=args.sweep_steps,
                          checks=not args.no_checks)
    try:
        result, out, md = evaluate_checkpoint(req)
    except KeyboardInterrupt:
        print("iaat: interrupted; run the same command again to resume the evaluation where it stopped",
              file=sys.stderr)
        return 130
    print(f"{result['model_source']}, {result['n']} {args.split} images ({result['data_source']})")
    print(f"  {'clean accuracy':<34}{result['clean']:.4f}")
    for label, entry in result["attacks"].items():
        print(f"  {label:<34}{entry['accuracy']:.4f}")
    if "worst_case" in result and len(result["worst_case"]["over"]) > 1:  # over the attacks at the main eps
        label = f"worst case of those at {format_size(result['eps'])}"
        print(f"  {label:<34}{result['worst_case']['accuracy']:.4f}")
    if "corruptions" in result:
        what, value = corruption_headline(result["corruptions"])
        label = f"corruptions (mean over {what})"
        print(f"  {label:<33} {value:.4f}")
        if result["corruptions"].get("mCE") is not None:
            print(f"  {'ImageNet-C mCE':<34}{result['corruptions']['mCE']:.4f}")
    for name, curve in result.get("curves", {}).items():
        print(f"  accuracy over {name}: " + ", ".join(f"{curve_x(name, p)}: {p['accuracy']:.3f}" for p in curve["points"]))
    for check in result.get("checks", []):
        if not check["passed"]:
            warnings.warn(f"suspicious evaluation: the check '{check['name']}' failed: {check['detail']}", stacklevel=1)
    print(f"  eps {format_size(result['eps'])}; sanity checks: "
          + ("SUSPICIOUS (see warnings)" if result.get("suspicious") else "passed" if "checks" in result else "off"))
    sec = result["seconds"]
    print(f"  time: clean {sec['clean']:.1f} s, attacks {sum(sec['attacks'].values()):.1f} s, sanity checks "
          f"{sec['checks']['total']:.1f} s ({100 * sec['checks_share']:.0f}% of the evaluation)")
    print(f"results written to {out} and {md}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .config import apply_override
    from .sweep import DEFAULT_RUNS, build_plan, load_sweep_file, run_sweep

    if args.sweep_file:
        spec = load_sweep_file(Path(args.sweep_file))
        base_dir = Path(args.sweep_file).parent
        if args.config:
            spec["base"] = str(Path(args.config).resolve())
    else:
        if not args.config:
            raise ConfigError("iaat sweep needs a sweep file (see configs/sweeps/) or --config BASE.yaml.")
        spec, base_dir = {"base": str(Path(args.config).resolve())}, Path(".")
    overrides: dict = {}
    per_run: dict = {}  # --set RUN:section.key=value: one named run only
    for assignment in args.set:
        run, sep, rest = assignment.partition(":")
        if not sep or "=" in run or "." in run:
            run, rest = None, assignment
        holder: dict = {}
        apply_override(holder, rest)
        for section, values in holder.items():
            (per_run.setdefault(run, {}) if run else overrides).update(
                {f"{section}.{k}": v for k, v in values.items()})
    for key, value in (("data.data_dir", args.data_dir), ("train.epochs", args.epochs),
                       ("data.train_subset", args.train_subset), ("train.device", args.device)):
        if value is not None:
            overrides[key] = value
    spec["set"] = {**(spec.get("set") or {}), **overrides}
    if args.frontier_eps is not None:
        spec["frontier_eps"] = [] if [e.lower() for e in args.frontier_eps] == ["none"] else args.frontier_eps
    if args.with_runs or per_run:
        runs = dict(spec.get("runs") or {name: {} for name in DEFAULT_RUNS})
        from .sweep import RUN_GROUPS

        wanted = [run for name in args.with_runs or () for run in RUN_GROUPS.get(name, (name,))]
        runs.update({name: runs.get(name, {}) for name in wanted})
        for name, values in per_run.items():
            if name not in runs:
                raise ConfigError(f"--set {name}:...: '{name}' is not a named run of this sweep (named runs: "
                                  f"{', '.join(runs)}); --set without a run name sets every run.")
            runs[name] = {**(runs[name] or {}), **values}
        spec["runs"] = runs
    if args.grid:
        params = {}
        for item in args.grid:
            key, sep, values = item.partition("=")
            if not sep or not values:
                raise ConfigError(f"--grid expects section.key=V1,V2,..., got {item!r}.")
            import yaml

            params[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
        spec["grid"] = {"of": args.grid_of, "params": params}
    ev = dict(spec.get("eval") or {})
    if args.eval_n is not None:
        ev["n"] = args.eval_n
    if args.eval_attack:
        ev["attacks"] = args.eval_attack
    spec["eval"] = ev
    plan = build_plan(spec, base_dir)
    if args.dry_run:
        from .sweep import check_selection

        for name in check_selection(plan, args.jobs, args.only):
            raw = plan.runs[name]
            method = raw["method"]
            params = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
            parts = "".join(f" train.{k}={raw['train'][k]}" for k in ("ema", "awp") if raw["train"].get(k) is not None)
            print(f"{name:<28}{plan.groups[name]:<10}{method['name']} eps={raw['attack']['eps']} {params}{parts}")
        print(f"evaluation: iaat eval RUN {' '.join(plan.eval.args())}")
        return 0
    return run_sweep(plan, Path(args.out), jobs=args.jobs, only=args.only)


def cmd_report(args: argparse.Namespace) -> int:
    from .engine.setup import choose_threads, resolve_device
    from .reporting import make_report

    paths = [Path(p) for p in args.runs]
    if args.out is None and len(paths) > 1:
        raise ConfigError("--out is needed for a report of several folders (one folder's report goes into "
                          "FOLDER/report by default).")
    choose_threads(args.threads, resolve_device(args.device).type == "cpu")  # the attack behind the image grids
    out = make_report(paths, Path(args.out) if args.out else paths[0] / "report", data_dir=args.data_dir,
                      image_eps=args.image_eps, device=args.device)
    print(f"report written to {out}")
    return 0


def _run_weights(args: argparse.Namespace) -> str:
    """A run's weights as --raw / --ema choose them: ``raw``, ``ema``, else ``auto``."""
    return "raw" if args.raw else "ema" if args.ema else "auto"


def cmd_export(args: argparse.Namespace) -> int:
    from .model_files import export_model

    out, meta = export_model(Path(args.run), Path(args.out), args.format, _run_weights(args),
                             overwrite=args.overwrite)
    card = json.loads(meta.read_text())
    fmt = card["file"]["format"]
    acc = card.get("accuracy") or {}
    print(f"{card['training']['method']} / {card['architecture']['name']} ({card['weights']} weights, epoch "
          f"{card['training']['epochs']}) written to {out} ({fmt}), its description to {meta}")
    if acc:
        print(f"  latest accuracy: clean {acc['clean']:.4f}, robust {acc['robust']:.4f} ({', '.join(acc['attacks'])}; "
              f"{acc['split']}, {acc['from']})")
    print(f"  load it with iaat.load_model({str(out)!r}) or evaluate it with iaat eval {out}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    import csv

    from .engine.rundir import METRICS, read_metrics

    run = Path(args.run)
    rows = read_metrics(run)
    if not rows:
        raise ConfigError(f"{run} has no {METRICS} yet (not a run folder, or no epoch finished).")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if args.csv:
        handle = sys.stdout if args.csv == "-" else open(args.csv, "w", newline="")
        try:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        finally:
            if handle is not sys.stdout:
                handle.close()
        if args.csv != "-":
            print(f"{len(rows)} epochs, {len(columns)} columns written to {args.csv}")
        return 0
    shown = [c for c in ("epoch", "lr", "train_loss", "train_acc", "radius_mean") if c in columns]
    shown += [c for c in columns if c.startswith(("val_", "ema_val_"))] + ["train_seconds"]
    print("  ".join(f"{c:>14}" for c in shown))
    for row in rows:
        print("  ".join(f"{_metric_cell(c, row.get(c)):>14}" for c in shown))
    return 0


def _metric_cell(column: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)  # an edited or damaged cell: shown as it is
    return f"{value * 255:.3g}/255" if column == "radius_mean" else f"{value:.4g}"


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .engine.setup import choose_threads

    threads = choose_threads(args.threads, True)  # once for both runs: a busy machine's note is printed once
    run_demo(out=Path(args.out) if args.out else None, epochs=args.epochs, eps=args.eps, seed=args.seed,
             threads=threads)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error format (``iaat: error: ...``) for malformed flags too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"iaat: error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.presets import PROTOCOL_HELP

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
                                   "line of metrics.jsonl into the run folder.",
                       epilog="several processes/GPUs: the same command under torchrun, e.g.\n"
                              "  torchrun --standalone --nproc_per_node 8 -m iaat train --config CONFIG --out RUN\n"
                              "--batch-size is then the global batch (all processes together); see "
                              "docs/distributed.md (several nodes, SLURM, --set train.sync_bn=true, "
                              "--set optim.lr_scaling=linear).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="robustness evaluation of a run, checkpoint or any model file: attacks, sweeps, "
                                    "corruptions, sanity checks (resumable)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate a trained model: a run, a checkpoint, an exported .safetensors,\n"
                                   "TorchScript or .pt2 (torch.export) file, or your own architecture\n"
                                   "(--model module:factory --weights FILE);\n"
                                   "the model takes images in [0, 1]. Without --protocol, --attack, --surrogate or\n"
                                   "--corruptions: clean accuracy and one PGD attack (--steps, --restarts,\n"
                                   "--step-size, --loss); with them, what they name. Only images\n"
                                   "classified correctly when clean are attacked; a sample counts as robust only if\n"
                                   "no attack iterate (of any restart) misclassifies it. Writes JSON and a markdown\n"
                                   "table; re-running an interrupted evaluation resumes it.",
                       epilog="protocols:\n" + "\n".join(f"  {k:<8}{v}" for k, v in PROTOCOL_HELP.items())
                       + "\n\nattack specs (--attack KIND[:key=value,...]; sizes in pixel units over 255):\n"
                       "  pgd         steps, restarts, step_size, loss=ce|margin, targeted=true, random_start, eps, norm\n"
                       "              (default step: 2.5*eps/steps up to 10 steps, eps/4 beyond)\n"
                       "  cw          PGD on the CW margin loss, 40 steps by default\n"
                       "  mifgsm      MI-FGSM: steps (10), step_size (eps/steps), momentum (1.0)\n"
                       "  deepfool    steps (50), candidates (10), overshoot (0.02); accuracy at eps after clipping\n"
                       "  autoattack  version=standard|quick (APGD-CE x5 + APGD-T); needs pip install pyautoattack\n"
                       "  transfer    PGD crafted on source=RUN (or --surrogate RUN), tested on this model\n"
                       "e.g. iaat eval runs/x --protocol paper --surrogate runs/x2 --corruptions generated --n 1000")
    p.add_argument("path", metavar="MODEL", nargs="?",
                   help="run folder (its newest valid checkpoint), checkpoint, exported .safetensors, "
                        "TorchScript or .pt2 file; or leave it out and give --model")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="your own architecture: an importable factory returning an nn.Module that takes [0, 1] "
                        "images (called with num_classes= when it takes it), e.g. mypkg.nets:resnet18")
    p.add_argument("--weights", metavar="FILE", help="with --model: its weights (.safetensors or a .pt state dict)")
    p.add_argument("--dataset", help="the data set, where the model file does not say (cifar10, cifar100, digits, "
                                     "imagefolder)")
    p.add_argument("--num-classes", type=int, metavar="K",
                   help="with --model: passed to the factory (default: the data set's number of classes)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--raw", action="store_true",
                       help="a run that keeps averaged weights (train.ema) is evaluated with them by default; --raw "
                            "evaluates its trained weights instead")
    which.add_argument("--ema", action="store_true", help="the run's averaged weights (error if the run has none)")
    p.add_argument("--protocol", choices=sorted(PROTOCOL_HELP), help="a named set of attacks (see below)")
    p.add_argument("--attack", action="append", default=[], metavar="SPEC",
                   help="an attack to run (repeatable), added to the protocol's, e.g. pgd:steps=100,restarts=5")
    p.add_argument("--eps", nargs="+", help=f"attack radii, {SIZE_HELP}; attacks without their own eps run at each "
                                            "(default: the run's attack.eps); the first is the main one")
    p.add_argument("--surrogate", metavar="RUN", help="add a transfer attack crafted on this independently trained run")
    p.add_argument("--corruptions", metavar="DIR|generated",
                   help="common corruptions: a CIFAR-10-C / CIFAR-100-C folder (<name>.npy, labels.npy), an "
                        "ImageNet-C folder (<name>/<severity>/<wnid>/*.JPEG; adds mCE), or 'generated' for an "
                        "offline copy at CIFAR severities (not comparable with CIFAR-10-C)")
    p.add_argument("--sweep-eps", nargs="+", metavar="EPS",
                   help="accuracy curve over these radii with PGD-10 (paper/full default: 0 2 4 ... 16; under "
                        "--norm l2 0 to twice --eps in quarters of it)")
    p.add_argument("--sweep-steps", nargs="+", type=int, metavar="K",
                   help="accuracy curve over PGD steps, from one run of max(K) steps at step eps/4 "
                        "(paper/full default: 1 2 5 10 20 50 100 200 500 1000)")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the sanity checks (determinism, gradients, monotonicity, large-eps attack)")
    p.add_argument("--steps", type=int, help="single-attack mode: PGD steps (default 10)")
    p.add_argument("--restarts", type=int, help="single-attack mode: random restarts; a sample must survive all "
                                                "(default 1)")
    p.add_argument("--step-size", help=f"single-attack mode: PGD step, {SIZE_HELP} (default 2.5 * eps / steps up to "
                                       f"10 steps, eps / 4 beyond)")
    p.add_argument("--loss", choices=["ce", "margin"], help="single-attack mode: cross-entropy (default) or CW margin")
    p.add_argument("--norm", choices=["linf", "l2"],
                   help="threat model (default: the one the model was trained under where its run or file says, "
                        "else linf)")
    p.add_argument("--n", type=int, help="evaluate the first N images of the split (default all)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="official test split, or the run's held-out part of the training split")
    p.add_argument("--data-dir", metavar="DIR", help="data folder (default: the run's data.data_dir)")
    p.add_argument("--batch-size", type=int,
                   help="images per attack batch (default 256 on a GPU, 64 on a CPU; part of the resume identity: "
                        "it decides which images share a batch and its seed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_threads(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default 0)")
    p.add_argument("--out", metavar="FILE",
                   help="JSON file to write, markdown beside it; replaces only an earlier evaluation (default "
                        "RUN/eval/eval-<split>-n<N>-<protocol>-<id>.json; for a model file FILE, "
                        "eval/<FILE's stem>-eval-<split>-... beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="train and evaluate the papers' comparison (fixed-eps frontier, IAAT, GAIRAT, ...) "
                                     "or a parameter grid, resumably",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a set of runs on the same data, model and schedule, then evaluate them all "
                                   "with the same attacks. Default runs: PGD-AT at each --frontier-eps, iaat, "
                                   "iaat_no_warmup, gairat (add the others with --with: baselines such as clean, trades, "
                                   "mart; the state-of-practice parts ema, awp; the family mma, cat, mail). Each "
                                   "run trains in its own process into OUT/runs/NAME (log in "
                                   "OUT/logs/NAME.log). Re-running the same command skips finished runs and "
                                   "resumes interrupted ones from their checkpoints; nothing is trained twice.",
                       epilog="examples:\n"
                              "  iaat sweep configs/sweeps/cifar10_small_cnn_cpu.yaml --data-dir ~/data --out runs/sweep\n"
                              "  iaat sweep --config configs/cifar10_resnet18_pgd_at.yaml --with clean trades \\\n"
                              "      --grid method.gamma=1,1.9,4 --grid method.beta=0.1,0.5 --out runs/sweep --jobs 2\n"
                              "  iaat sweep configs/sweeps/cifar10_small_cnn_cpu.yaml --with mma cat mail --out runs/sweep\n"
                              "  iaat report runs/sweep --out runs/sweep/report\n"
                              "sweep file keys: base (a train config), set (section.key: value for every run), "
                              "frontier_eps,\nruns (name: overrides), grid (of: RUN, params: {section.key: [values]}), "
                              "eval (eps, n, attacks, sweep_eps, checks).")
    p.add_argument("sweep_file", nargs="?", metavar="SWEEP_FILE", help="a sweep plan (YAML; see configs/sweeps/)")
    p.add_argument("--out", metavar="SWEEP_DIR", required=True, help="sweep folder (created, or continued)")
    p.add_argument("--config", metavar="FILE", help="base train config of every run (replaces the sweep file's base)")
    p.add_argument("--data-dir", metavar="DIR", help="data folder of every run  [data.data_dir]")
    p.add_argument("--epochs", type=int, help="epochs of every run  [train.epochs]")
    p.add_argument("--train-subset", type=int, metavar="N", help="class-balanced training subset  [data.train_subset]")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N  [train.device]")
    p.add_argument("--set", action="append", default=[], metavar="[RUN:]SECTION.KEY=VALUE",
                   help="override a config field of every run, or of one named run with RUN: (e.g. "
                        "--set iaat:method.warmup_epochs=1; repeatable)")
    p.add_argument("--frontier-eps", nargs="*", metavar="EPS",
                   help=f"PGD-AT radii of the fixed-eps frontier, {SIZE_HELP} (default 2 4 6 8; none: no frontier)")
    from .sweep import OPTIONAL_RUNS, RUN_GROUPS

    p.add_argument("--with", dest="with_runs", nargs="+", choices=(*OPTIONAL_RUNS, *RUN_GROUPS),
                   help="add these baselines/ablations to the runs; "
                        + "; ".join(f"{g}: {' '.join(runs)}" for g, runs in RUN_GROUPS.items())
                        + " (a run with train.ema is evaluated twice: its average, and NAME:raw its raw weights)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="grid over a parameter of the --grid-of run (repeatable: every combination is a run)")
    p.add_argument("--grid-of", default="iaat", metavar="RUN", help="the run the grid varies (default iaat)")
    p.add_argument("--eval-n", type=int, metavar="N", help="evaluate on the first N test images (default all)")
    p.add_argument("--eval-attack", action="append", metavar="SPEC",
                   help="evaluation attacks (repeatable; default pgd:steps=10 and pgd:steps=100), as in iaat eval")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (the CPU cores are split between them unless "
                   "OMP_NUM_THREADS or MKL_NUM_THREADS sets each run's count; default 1)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs of the plan")
    p.add_argument("--dry-run", action="store_true", help="print the runs and the evaluation, run nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="figures and tables (the IAAT paper's) from saved runs or sweeps",
                       description="Make the report of saved runs: the accuracy/robustness tradeoff, accuracy over "
                                   "test eps, radius trajectories and histograms, the images with the smallest and "
                                   "largest radii, and markdown tables, into --out (PNG and SVG figures, report.md). "
                                   "Reads only files of the runs (config, metrics, radii, evaluations, checkpoints); "
                                   "needs matplotlib (pip install 'iaat[report]').")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run folders and/or sweep folders")
    p.add_argument("--out", metavar="DIR", help="report folder (created; the report's files in it are replaced, and "
                                                 "figures and tables of an earlier report that this one does not "
                                                 "write are removed); default: FOLDER/report for one run or sweep "
                                                 "folder")
    p.add_argument("--data-dir", metavar="DIR", help="data folder for the image grids (default: the run's)")
    p.add_argument("--image-eps", help=f"radius of the perturbed images shown beside the smallest/largest-radius "
                                       f"images, in each run's norm, {SIZE_HELP} (default 16 under L-inf, twice the "
                                       f"training radius under L2)")
    p.add_argument("--device", default="auto", help="device of the attack behind the image grids")
    _add_threads(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a run's model as one file other tools load (safetensors, TorchScript "
                                      "or torch.export)",
                       description="Write a run's model, with its input normalisation inside (it takes images in "
                                   "[0, 1]), to --out FILE, and a JSON beside it (FILE.json) that says what it is: "
                                   "architecture and arguments, classes, input size, training method and radius, "
                                   "accuracy at that radius, iaat version. Load it with iaat.load_model(FILE) (safetensors: "
                                   "no pickle involved), torch.jit.load (TorchScript) or torch.export.load "
                                   "(.pt2), evaluate it with iaat eval FILE.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (its newest valid checkpoint) or checkpoint")
    p.add_argument("--out", metavar="FILE", required=True, help="the model file to write, e.g. model.safetensors")
    p.add_argument("--format", choices=["safetensors", "torchscript", "export"],
                   help="safetensors (weights only), torchscript (a traced module; deprecated by PyTorch 2.13) or "
                        "export (a torch.export program); default: the one --out's extension names (.safetensors, "
                        ".pt, .pt2), else safetensors")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_true", help="the averaged weights (error if the run has none)")
    which.add_argument("--raw", action="store_true",
                       help="the raw weights (default: the averaged ones when the run keeps them, else the raw)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its JSON if they exist")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("metrics", help="a run's per-epoch metrics as a table, or as CSV for spreadsheets",
                       description="Print the per-epoch metrics of a run (metrics.jsonl) as a table, or write every "
                                   "column as CSV with --csv (sizes in [0, 1] units, as in metrics.jsonl).")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--csv", metavar="FILE", help="write all columns as CSV to FILE ('-': standard output)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("demo", help="a CPU demo on scikit-learn's bundled digits, under a minute (no download)",
                       description="Train a small CNN on scikit-learn's 8x8 digits twice, with clean training and "
                                   "with PGD adversarial training, and print clean and robust test accuracy of both "
                                   "(under a minute on a CPU with the default 20 epochs).")
    p.add_argument("--out", metavar="DIR", help="folder for the two runs (default runs/demo-<time>)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--eps", default="64", help=f"attack radius for training and testing, {SIZE_HELP} (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    _add_threads(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .sweep import stop_with_parent

    stop_with_parent()  # a child of `iaat sweep` stops (saving its state) when the sweep dies
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["iaat", *(sys.argv[1:] if argv is None else argv)])  # recorded with results
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Scoped, so that calling main() in-process (tests, notebooks) leaves the caller's warning setup as it was.
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except TrainingInterrupted as e:
            if not _rank_prefix():  # every rank stopped at the same step; rank 0 speaks for the job
                print(f"iaat: {e}", file=sys.stderr)
            return e.exit_code
        except IaatError as e:
            sys.stderr.write(f"iaat: error: {_rank_prefix()}{e}\n")  # one write: ranks share the stream
            return 2
        except KeyboardInterrupt:
            print("iaat: interrupted", file=sys.stderr)
            return 130
        except OSError as e:  # a file problem no code path above anticipated: still one line, with the path
            print(f"iaat: error: {e}", file=sys.stderr)
            return 1


def _rank_prefix() -> str:
    """``[rank N] `` for the non-zero ranks of a torchrun job, so that their copies of a message are told apart."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" and rank != "0" else ""


def _show_warning(message: Warning | str, category: type, filename: str, lineno: int, file: object = None,
                  line: Optional[str] = None) -> None:
    """Warnings as one ``iaat: warning: ...`` line on stderr, without source locations."""
    print(f"iaat: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
