"""PGD-10 adversarial-training throughput (images/s) of the iaat training step.

Times the real training step (``pgd_at`` method: PGD-10 at 8/255, step 2/255, in eval
mode, then a train-mode forward/backward and an SGD step) on real CIFAR-10 batches
(the shared JPEG-75 copy when ``--data-dir`` is given, else random uint8 images: the
speed does not depend on pixel values) and writes JSON under benchmarks/results/.

    python benchmarks/throughput.py --data-dir ~/.cache/iaat-tests/cifar10-jpeg75 \
        --models small_cnn resnet18 --batch-size 128 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from iaat.config import config_from_dict
from iaat.data import DeviceLoader, ImageSet, load_dataset
from iaat.engine.setup import model_from_config, resolve_device
from iaat.methods import AttackSettings, build_method

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_model(name: str, data: ImageSet, splits, device, batch_size: int, steps: int, warmup: int,
                method: str = "pgd_at") -> dict:
    cfg = config_from_dict({"model": {"name": name}, "method": {"name": method},
                            "attack": {"eps": 8, "step_size": 2, "steps": 10}})
    torch.manual_seed(0)
    model = model_from_config(cfg, splits).to(device)
    m = build_method(method, {}, AttackSettings.from_config(cfg), len(data), splits.num_classes, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = DeviceLoader(data, batch_size, device, augment=True, seed=0)
    model.train()
    batches = loader.epoch(0)
    times = []
    for i in range(warmup + steps):
        x, y, idx = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = m.loss(model, x, y, idx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    total = sum(times)
    return {"model": name, "method": method, "batch_size": batch_size, "timed_steps": steps, "warmup_steps": warmup,
            "seconds": total, "images_per_second": batch_size * steps / total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (or parent); random uint8 images when omitted")
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file (default benchmarks/results/throughput-<device>.json)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    n = args.batch_size * (args.steps + args.warmup)
    if args.data_dir:
        splits = load_dataset("cifar10", args.data_dir, download=False)
        data = splits.train.subset(torch.arange(n))
        data_name = f"CIFAR-10 from {splits.source}"
    else:
        from iaat.data.datasets import DatasetSplits

        g = torch.Generator().manual_seed(0)
        data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g))
        splits = DatasetSplits("random", data, data, 10, (0.5,) * 3, (0.25,) * 3, "random uint8")
        data_name = "random uint8 images, 3x32x32"
    rows = []
    for name in args.models:
        row = bench_model(name, data, splits, device, args.batch_size, args.steps, args.warmup)
        print(f"{name:<16} batch {args.batch_size:>4}  {row['images_per_second']:8.1f} images/s "
              f"(PGD-10 AT step, {args.steps} timed steps)", flush=True)
        rows.append(row)
    result = {
        "benchmark": "pgd10_at_training_throughput",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "data": data_name,
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    out = Path(args.out) if args.out else RESULTS / f"throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
