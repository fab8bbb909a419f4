"""Training speed of iaat's methods beside a plain PyTorch PGD-AT loop, side by side.

For every method (default: clean, pgd_at, iaat Alg. 2, iaat online, gairat, trades) and for a
*reference*: a straightforward PGD adversarial training loop as found in tutorials (a
``torch.utils.data.DataLoader`` over the images with per-sample random crop and flip in
``__getitem__``, fp32, the attack written inline: random start, 10 signed-gradient steps,
projection, then cross-entropy, backward and an SGD step), on the same model, batch size and
data. Each is timed over whole steps including fetching the batch, methods interleaved in rounds
so that drift of the machine hits them alike; reported as images/s (from the median step time)
and as a time ratio to ``pgd_at`` from the same run, with peak GPU memory on CUDA.

iaat's methods run as the trainer sets them up (``build_step``), with the fast-path switches
given here (``--amp``, ``--attack-amp``, ``--channels-last``, ``--compile``: the ``train.*`` keys of
the same names); the reference always runs in fp32 in the default layout. ``--fast-paths`` adds
``pgd_at`` once per listed setting (``fp32``, ``bf16``, ``fp16``, each optionally ``+cl`` for
channels_last and ``+compile``), so that the fast path's parts are compared in one process.

The floating-point work of one step of each method is counted, not guessed
(``torch.utils.flop_counter.FlopCounterMode`` over one eager step: convolutions and matrix
products of attack and training step), and on CUDA set against the bf16 matrix-product rate
measured at the start (an 8192^3 bf16 product) as ``fraction_of_bf16_peak``.

    python benchmarks/speed.py --data-dir DIR --amp bf16 --channels-last        # CPU: small CNN
    python benchmarks/speed.py --data-dir DIR --model resnet18 --device cuda --batch-size 512 \
        --amp bf16 --channels-last --fast-paths fp32 bf16 bf16+cl+compile

Results go to benchmarks/results/speed-<device>-<model>.json with the command, device, torch
version and data set, rewritten after every round (a run cut short keeps the rounds it finished). A
method that fails (a CUDA-only bug, memory) is recorded under ``failed`` and the others are still timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (RESULTS, RUN_DATA_HELP, Runner, bench_inputs, clean_accuracy, init_weights,  # noqa: E402
                        model_section, note_starting_env, run_header, write_result)

from iaat.data import ImageSet  # noqa: E402
from iaat.engine.setup import model_from_config, resolve_device  # noqa: E402
from iaat.errors import first_line  # noqa: E402

DEFAULT_METHODS = ["clean", "pgd_at", "iaat", "iaat:selection=online", "gairat", "trades"]


class _Augmented(torch.utils.data.Dataset):
    """CIFAR-style augmentation per sample, the usual way: zero-pad 4, random 32x32 crop, random flip."""

    def __init__(self, data: ImageSet) -> None:
        self.x, self.y = data.x, data.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = self.x[i].float().div(255)
        img = F.pad(img, (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        img = img[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(2)
        return img, self.y[i]


def plain_pgd(model, x, y, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """The textbook L-inf PGD with a random start (Madry et al.), model in eval mode while attacking."""
    model.eval()
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    model.train()
    return (x + delta).detach()


class ReferenceRunner:
    """The plain PGD-AT loop, stepped like :class:`throughput.Runner`."""

    spec = "reference (plain PyTorch PGD-AT loop)"
    compiled = False

    def __init__(self, model: str | dict, data: ImageSet, splits, device, batch_size: int,
                 init: dict | None = None) -> None:
        from iaat.config import config_from_dict

        cfg = config_from_dict({"model": model_section(model)})
        torch.manual_seed(0)
        self.device = device
        self.model = model_from_config(cfg, splits)
        if init is not None:
            self.model.load_state_dict(init)
        self.model.to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.loader = torch.utils.data.DataLoader(_Augmented(data), batch_size=batch_size, shuffle=True,
                                                  drop_last=True)
        self.batches = self._cycle()
        self.times: list[float] = []

    def _cycle(self):
        while True:
            yield from self.loader

    def step(self) -> None:
        x, y = next(self.batches)
        x, y = x.to(self.device), y.to(self.device)
        x_adv = plain_pgd(self.model, x, y, 8 / 255, 2 / 255, 10)
        loss = F.cross_entropy(self.model(x_adv), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def fast_path(name: str) -> dict:
    """``bf16+cl+compile`` → the ``train.*`` keys ``{"amp": "bf16", "channels_last": True, "compile": True}``."""
    precision, *parts = name.split("+")
    if precision not in ("fp32", "bf16", "fp16") or not set(parts) <= {"cl", "compile"}:
        raise ValueError(f"fast path {name!r}: write fp32, bf16 or fp16, optionally followed by +cl and/or +compile")
    return {"amp": "off" if precision == "fp32" else precision, "channels_last": "cl" in parts,
            "compile": "compile" in parts}


def step_flops(runner, device) -> int:
    """Floating-point operations of one whole step of ``runner`` (attack and training step), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        timed(runner, device)
    return int(counter.get_total_flops())


def bf16_peak_flops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of an ``n``^3 bf16 matrix product on random data (3 warm-ups, mean of ``reps``): the ceiling used."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def timed(runner, device) -> float:
    """Seconds of one whole step (fetching the batch included), synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if isinstance(runner, ReferenceRunner):
        runner.step()
    else:
        runner.step(timed=False)  # Runner.step times without the batch fetch; here the whole step is timed
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    note_starting_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (or parent); random uint8 images when omitted")
    p.add_argument("--data-label", help="how to name the data in the results (default: from the files)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=int, help="the model's width setting (default: its own; small_cnn, wrn-*)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help="method specs, e.g. pgd_at iaat iaat:selection=online (ratios are to pgd_at)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=2048, help="training images cycled through (default 2048)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the methods")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    p.add_argument("--init-from", metavar="RUN", help="start every method from this run's weights: IAAT's and "
                   "GAIRAT's costs depend on how many samples the attacks break, which an untrained model overstates")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="autocast of iaat's training steps and attacks  [train.amp] (default off)")
    p.add_argument("--attack-amp", choices=["same", "off", "bf16", "fp16"], default="same",
                   help="autocast of iaat's attacks alone  [train.attack_amp] (default: as --amp)")
    p.add_argument("--channels-last", action="store_true", help="iaat's models in channels_last  [train.channels_last]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile iaat's models and PGD update  [train.compile]; compile time is not timed")
    p.add_argument("--fast-paths", nargs="+", default=[], metavar="PATH",
                   help="also time pgd_at under each of these settings, e.g. fp32 bf16 bf16+cl bf16+cl+compile "
                   "(cl: channels_last)")
    p.add_argument("--no-flops", action="store_true", help="skip counting each step's FLOPs (one more step each)")
    p.add_argument("--run-data", action="store_true", help=RUN_DATA_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file (default benchmarks/results/speed-<device>-<model>.json)")
    args = p.parse_args(argv)
    if "pgd_at" not in args.methods:
        p.error("--methods must include pgd_at (the ratios are to it)")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be at least 1, --warmup at least 0")
    train = {"amp": args.amp, "attack_amp": args.attack_amp, "channels_last": args.channels_last,
             "compile": args.compile}
    try:
        paths = {name: fast_path(name) for name in args.fast_paths}
    except ValueError as e:
        p.error(str(e))

    device = resolve_device(args.device)
    data, splits, data_name, radii = bench_inputs(args, args.images, p)
    init, model = None, ({"name": args.model, "width": args.width} if args.width else args.model)
    if args.init_from:  # the run's weights and model settings (width, depth)
        init, _, model = init_weights(args.init_from, [args.model], p, "--model")
    failed: dict[str, str] = {}  # spec → error: one method's failure (a CUDA-only bug, memory) costs only its row
    runners = build_runners(args, model, data, splits, device, init, train, radii, paths, failed)
    pgd_at = next((r for r in runners if r.spec == "pgd_at"), None)
    # the given weights' accuracy, before the warm-up steps move them
    clean_acc = clean_accuracy(pgd_at.model, data, device) if init is not None and pgd_at is not None else None
    peak_flops = bf16_peak_flops(device) if device.type == "cuda" else None
    flops: dict[str, int] = {}
    for r in runners:
        if attempt(r.spec, failed, device, warm_up, r, args.warmup, device, flops, not args.no_flops):
            print(f"ready: {r.spec}", flush=True)
    if "pgd_at" in failed:
        print(f"speed: pgd_at failed ({failed['pgd_at']}); the ratios are to it, so nothing is timed", file=sys.stderr)
        return 1
    runners = [r for r in runners if r.spec not in failed]
    out = Path(args.out) if args.out else RESULTS / f"speed-{device.type}-{args.model}.json"
    peaks = {id(r): 0 for r in runners}
    times = {id(r): [] for r in runners}
    for done in range(1, args.rounds + 1):
        for r in runners:
            if device.type == "cuda":  # its own memory: what it keeps, plus what its steps add above all runners'
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times[id(r)] += [timed(r, device) for _ in range(args.steps)]
            if device.type == "cuda":
                peaks[id(r)] = max(peaks[id(r)], r.resident + torch.cuda.max_memory_allocated(device) - base)
        rows = result_rows(runners, times, peaks, flops, peak_flops, args.batch_size, device)
        header = {**run_header("training_speed", device, argv, __file__), "model": args.model,
                  "batch_size": args.batch_size, "data": data_name, "rounds_done": done, "rounds": args.rounds}
        result = {**header, **settings_record(args, train, paths, radii, clean_acc, flops, peak_flops, device),
                  **({"failed": failed} if failed else {}), **speedup(rows), "results": rows}
        write_result(result, out)  # after every round: a run cut short keeps the rounds it finished
    for row in rows:
        peak = f"  {row['fraction_of_bf16_peak']:.1%} of bf16 peak" if "fraction_of_bf16_peak" in row else ""
        print(f"{row['method']:<40} {row['images_per_second']:8.1f} images/s  {row['time_ratio_to_pgd_at']:.2f}x "
              f"pgd_at{peak}", flush=True)
    if "pgd_at_speedup_over_reference" in result:
        print(f"pgd_at is {result['pgd_at_speedup_over_reference']:.2f}x faster than the plain reference loop")
    return 0


def speedup(rows: list[dict]) -> dict:
    """``pgd_at``'s speed-up over the plain reference loop, when both were timed."""
    step = {r["method"]: r["median_seconds_per_step"] for r in rows}
    ref = step.get(ReferenceRunner.spec)
    return {"pgd_at_speedup_over_reference": ref / step["pgd_at"]} if ref else {}


def build_runners(args, model, data, splits, device, init, train: dict, radii, paths: dict, failed: dict) -> list:
    """The reference loop, one runner per method spec and one ``pgd_at [PATH]`` per fast path, in that order;
    a runner that cannot be built is recorded in ``failed``."""
    makers = [(ReferenceRunner.spec, lambda: ReferenceRunner(model, data, splits, device, args.batch_size, init))]
    makers += [(spec, lambda spec=spec: Runner(model, spec, data, splits, device, args.batch_size, init, train, radii))
               for spec in args.methods]
    makers += [(f"pgd_at [{name}]", lambda s=settings: Runner(model, "pgd_at", data, splits, device, args.batch_size,
                                                               init, s, radii)) for name, settings in paths.items()]
    runners = []
    for spec, make in makers:
        before = _allocated(device)
        runner = attempt(spec, failed, device, make)
        if runner is not None:
            runner.spec = spec
            runner.resident = _allocated(device) - before  # its model, data copy, ...; warm_up adds the rest
            runners.append(runner)
    return runners


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def attempt(spec: str, failed: dict, device: torch.device, work: Callable, *args: Any) -> Any:
    """``work(*args)``, or ``None`` after recording its exception under ``spec`` in ``failed`` (and freeing cached
    GPU memory)."""
    try:
        return work(*args)
    except Exception as e:  # noqa: BLE001 -- recorded in the result; the other methods are still timed
        failed[spec] = f"{type(e).__name__}: {first_line(e)}"
        print(f"failed: {spec}: {failed[spec]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def warm_up(runner, steps: int, device: torch.device, flops: dict, count_flops: bool) -> Any:
    """Untimed steps (a compiled runner at least 3: shapes, modes; their wall time, compiling included, is kept
    as ``runner.warmup``), then one eager step's FLOPs counted; the runner."""
    count = steps if not runner.compiled else max(steps, 3)
    before = _allocated(device)
    runner.warmup = {"warmup_steps": count, "warmup_seconds": sum(timed(runner, device) for _ in range(count))}
    runner.resident += _allocated(device) - before  # gradients, optimiser state, averaged weights: kept between steps
    if count_flops and not runner.compiled:  # counting inside a compiled graph is not supported
        flops[runner.spec] = step_flops(runner, device)
    return runner


def result_rows(runners: list, times: dict, peaks: dict, flops: dict, peak_flops: float | None, batch_size: int,
                device: torch.device) -> list[dict]:
    """Per runner (the reference first, then pgd_at): images/s from the median step, the ratio to pgd_at, peak
    memory on CUDA and the achieved FLOP rate."""
    base = statistics.median(times[id(next(r for r in runners if r.spec == "pgd_at"))])
    rows = []
    for r in runners:
        median = statistics.median(times[id(r)])
        row = {"method": r.spec, "images_per_second": batch_size / median, "median_seconds_per_step": median,
               "timed_steps": len(times[id(r)]), "time_ratio_to_pgd_at": median / base, **getattr(r, "warmup", {})}
        if device.type == "cuda":
            row["peak_memory_gib"] = peaks[id(r)] / 2**30
        count = flops.get(r.spec, flops.get(r.spec.split(" [")[0]))  # a compiled pgd_at: the eager count
        if count:
            row["flops_per_step"] = count
            row["achieved_tflops"] = count / median / 1e12
            if peak_flops:
                row["fraction_of_bf16_peak"] = count / median / peak_flops
        rows.append(row)
    return rows


def settings_record(args, train: dict, paths: dict, radii, clean_acc, flops: dict, peak_flops, device) -> dict:
    """What the timings were taken under, for the result file."""
    return {
        "init_from": args.init_from or "random initialisation",
        "attack": "L-inf PGD-10, eps 8/255, step 2/255 (IAAT: " + ("the run's radii)" if radii is not None
                                                                   else "timed right after its warmup, radii at 8/255)"),
        **({"clean_accuracy_on_timed_images": clean_acc} if clean_acc is not None else {}),
        "iaat_train_settings": train,
        "fast_paths": {f"pgd_at [{name}]": settings for name, settings in paths.items()},
        "flops": "torch.utils.flop_counter.FlopCounterMode over one eager step per method (a compiled path: the "
                 "eager count of the same method)" if flops else "not counted",
        **({"bf16_peak_tflops_measured": peak_flops / 1e12} if peak_flops else {}),
        "reference_settings": "fp32, default memory layout, eager, DataLoader with per-sample augmentation",
        "peak_memory": ("per method: the memory it keeps between steps (model, data copy, gradients, optimiser "
                        "state, averaged weights; measured as it was built and warmed up) plus the most its steps "
                        "allocated above what all runners held (torch.cuda.max_memory_allocated); the CUDA "
                        "context and the allocator's cache are not counted") if device.type == "cuda"
                       else "not measured on CPU (no per-method allocator statistics)",
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    sys.exit(main())
