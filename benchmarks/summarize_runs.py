"""Summarise finished runs (from their saved files only) into a JSON file and a markdown table.

    python benchmarks/summarize_runs.py runs/cpu --out benchmarks/results/cpu_small_cnn_cifar10 \
        --command "benchmarks/cpu_compare.sh DATA runs/cpu pgd_at iaat ..." --data "CIFAR-10 (JPEG-75 copy)"
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from iaat.engine.rundir import read_metrics, run_config
from iaat.units import format_size

#: the evaluation file of each run that benchmarks/cpu_compare.sh writes
EVAL_FILE = "eval-test1000-pgd20.json"


def summarize(run: Path, eval_file: str = EVAL_FILE) -> dict:
    """One run's numbers from its saved files: its config, metrics.jsonl and evaluation ``eval_file``."""
    rows = read_metrics(run)
    cfg = run_config(run)
    evaluation = json.loads((run / eval_file).read_text())
    label, attack = next(iter(evaluation["attacks"].items()))
    seconds = evaluation["seconds"]
    last = rows[-1]
    out = {
        "method": evaluation["method"],
        "run": run.name,
        "epochs": last["epoch"],
        "planned_epochs": cfg.train.epochs,
        "train_eps": cfg.eps,  # [0, 1] units
        "protocol": _protocol(evaluation, label, attack),
        "test_n": evaluation["n"],
        "test_clean_acc": evaluation["clean"],
        "test_pgd20_acc": attack["accuracy"],
        "val_clean_acc": last.get("val_clean_acc"),
        "val_pgd10_acc": last.get("val_pgd10_acc"),
        "train_seconds_total": sum(r["train_seconds"] for r in rows),
        "eval_seconds": seconds["this_run"] if isinstance(seconds, dict) else seconds,
    }
    if "radius_mean" in last:
        out.update({k: last[k] for k in ("radius_mean", "radius_q10", "radius_q50", "radius_q90")})
    return out


def _protocol(evaluation: dict, label: str, attack: dict) -> str:
    """What the evaluation file says it ran: the attack, radius, norm, step and images."""
    step = f", step {format_size(attack['step'])}" if attack.get("step") is not None else ""
    return (f"clean and {label} ({evaluation['norm']} {format_size(evaluation['eps'])}{step}) on the first "
            f"{evaluation['n']} {evaluation.get('split', 'test')} images")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder holding one run folder per method")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    p.add_argument("--command", required=True, help="the command that produced the runs")
    p.add_argument("--data", required=True, help="the data set as it was, e.g. 'CIFAR-10 (JPEG-75 copy)'")
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    p.add_argument("--eval", default=EVAL_FILE, help=f"each run's evaluation file (default {EVAL_FILE})")
    args = p.parse_args(argv)
    runs = [summarize(r, args.eval) for r in sorted(Path(args.root).iterdir()) if (r / args.eval).is_file()]
    protocols = sorted({r["protocol"] for r in runs})
    result = {"command": args.command, "data": args.data, "machine": args.machine, "torch": torch.__version__,
              "protocol": ("; ".join(protocols) if len(protocols) == 1 else "by run (they differ): "
                           + " | ".join(protocols))
              + "; a sample counts as robust only if it is correct when clean and at every PGD iterate",
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Command: `{args.command}`  ", f"Data: {args.data}; machine: {args.machine}; torch {torch.__version__}  ",
             f"Evaluation: {result['protocol']}", "",
             "| method | epochs | test clean | test robust | train time (s) | mean radius (/255) |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        radius = (f"{r['radius_mean'] * 255:.2f}" if "radius_mean" in r else "0" if r["method"] == "clean"
                  else f"{r['train_eps'] * 255:g} (fixed)")
        epochs = f"{r['epochs']}" + (f" of {r['planned_epochs']} (unfinished)" if r["epochs"] < r["planned_epochs"] else "")
        lines.append(f"| {r['run']} | {epochs} | {r['test_clean_acc']:.3f} | {r['test_pgd20_acc']:.3f} | "
                     f"{r['train_seconds_total']:.0f} | {radius} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
