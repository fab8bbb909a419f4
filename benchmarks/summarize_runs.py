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

from iaat.engine.rundir import read_metrics


def summarize(run: Path) -> dict:
    rows = read_metrics(run)
    evaluation = json.loads((run / "eval-test1000-pgd20.json").read_text())
    attack = next(iter(evaluation["attacks"].values()))
    seconds = evaluation["seconds"]
    last = rows[-1]
    out = {
        "method": evaluation["method"],
        "run": run.name,
        "epochs": last["epoch"],
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="folder holding one run folder per method")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    p.add_argument("--command", required=True, help="the command that produced the runs")
    p.add_argument("--data", required=True, help="the data set as it was, e.g. 'CIFAR-10 (JPEG-75 copy)'")
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    args = p.parse_args(argv)
    runs = [summarize(r) for r in sorted(Path(args.root).iterdir()) if (r / "eval-test1000-pgd20.json").is_file()]
    result = {"command": args.command, "data": args.data, "machine": args.machine, "torch": torch.__version__,
              "protocol": "clean and PGD-20 (L-inf 8/255, step 2.5*eps/20, 1 restart) on the first 1000 test "
                          "images; a sample counts as robust only if it is correct when clean and at every PGD iterate",
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Command: `{args.command}`  ", f"Data: {args.data}; machine: {args.machine}; torch {torch.__version__}",
             "", "| method | test clean | test PGD-20 | train time (s) | mean radius (/255) |", "|---|---|---|---|---|"]
    for r in runs:
        radius = f"{r['radius_mean'] * 255:.2f}" if "radius_mean" in r else "8 (fixed)" if r["method"] != "clean" else "0"
        lines.append(f"| {r['run']} | {r['test_clean_acc']:.3f} | {r['test_pgd20_acc']:.3f} | "
                     f"{r['train_seconds_total']:.0f} | {radius} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
