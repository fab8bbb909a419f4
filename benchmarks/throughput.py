"""Training-step throughput (images/s) of iaat's methods, measured side by side.

Times the real training step (the trainer's ``forward_backward`` — the PGD attacks and, for IAAT, the
radius selection, the loss and backward, AWP's extra pass with ``train.awp`` — then an SGD step and the
EMA update with ``train.ema``) on real CIFAR-10 batches (``--data-dir``) or on
random uint8 images (the speed does not depend on pixel values). Methods are timed in
interleaved rounds so that drift of the machine hits them alike, and each is reported in
images/s (from the median step time) and as a ratio to ``pgd_at`` measured in the same run. IAAT is timed after its
warmup, i.e. with its selection attacks active.

    python benchmarks/throughput.py --data-dir DIR --models small_cnn resnet18
    python benchmarks/throughput.py --data-dir DIR --models small_cnn \
        --methods pgd_at iaat iaat:selection_check=final_iterate iaat:selection=online clean
    python benchmarks/throughput.py --data-dir DIR --models small_cnn \
        --methods pgd_at pgd_at:train.awp=auto pgd_at:train.ema=0.999 mart   # parts: train.KEY=VALUE

Results go to benchmarks/results/ as JSON with the command, device, torch version and data.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from iaat.config import config_from_dict
from iaat.data import DeviceLoader, ImageSet, load_dataset, to_unit
from iaat.engine.rundir import read_train_indices
from iaat.engine.setup import autocast_context, model_from_config, resolve_device
from iaat.ema import EMA
from iaat.engine.trainer import build_awp, build_step, forward_backward

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_method(spec: str) -> tuple[str, dict]:
    """``iaat:selection=online,train_attack=reuse`` → ("iaat", {...})."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    return name, params


def _cifar10(data_dir: str, label: str | None) -> tuple:
    """CIFAR-10's splits from ``data_dir`` and how to name them (``label``, else from the files' checksums)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_dataset("cifar10", data_dir, download=False)
    official = not any("differ" in str(w.message) for w in caught)
    return splits, label or ("CIFAR-10" if official else "CIFAR-10 (not the official files: md5 differs)")


def bench_data(data_dir: str | None, n: int, label: str | None) -> tuple:
    """The first ``n`` CIFAR-10 training images of ``data_dir`` (or ``n`` random uint8 images), their
    splits, and how to name them in the results."""
    if data_dir:
        splits, name = _cifar10(data_dir, label)
        return splits.train.subset(torch.arange(n)), splits, f"{name}, first {n} training images"
    from iaat.data.datasets import DatasetSplits

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g))
    splits = DatasetSplits("random", data, data, 10, (0.5,) * 3, (0.25,) * 3, "random uint8")
    return data, splits, label or "random uint8 images, 3x32x32"


#: Environment variables that change what a benchmark measures; those set are part of its recorded command.
RESULT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR", "CUDA_VISIBLE_DEVICES",
              "CUBLAS_WORKSPACE_CONFIG")
_STARTING_ENV: dict[str, str] | None = None  #: None until a main notes it (often empty: none of them set)


def note_starting_env() -> None:
    """Record the :data:`RESULT_ENV` values a benchmark's ``main`` starts with, which :func:`run_header` reports:
    torch sets some itself on the way (its FLOP counter sets TORCHINDUCTOR_CACHE_DIR)."""
    global _STARTING_ENV
    _STARTING_ENV = {k: os.environ[k] for k in RESULT_ENV if os.environ.get(k)}


def run_header(benchmark: str, device: torch.device, argv: list[str] | None, script: str = __file__) -> dict:
    """What every result file starts with: the benchmark, the exact command, the machine and the software.

    ``argv`` are the arguments ``main`` was given (``None``: the command line) and ``script`` the file whose
    ``main`` ran, so the command is right when ``main(argv)`` is called from Python too.
    """
    if argv is None:  # run as a script: its own command line
        script, argv = sys.argv[0], sys.argv[1:]
    else:  # main(argv) called from Python: the script as one would run it from here
        script = os.path.relpath(script)
    env = _STARTING_ENV if _STARTING_ENV is not None else {k: os.environ[k] for k in RESULT_ENV if os.environ.get(k)}
    settings = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    return {
        "benchmark": benchmark,
        "command": " ".join([*settings, "python", *(shlex.quote(a) for a in [script, *argv])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        # CPU speed depends on the vector instructions used (AVX-512 and AVX2 machines differ several times over)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


RUN_DATA_HELP = ("with --init-from: time on the run's own training images (the first ones, in its order) and start "
                 "IAAT's memory from the run's newest radii for them, i.e. mid-training state (default: the first "
                 "training images of --data-dir, every radius at eps_warmup as right after the warmup)")


def bench_inputs(args: argparse.Namespace, n: int, parser: argparse.ArgumentParser) -> tuple:
    """``(data, splits, name, radii)`` for ``args.data_dir``/``--run-data`` (radii ``None``: eps_warmup)."""
    if args.run_data:
        if not args.init_from:
            parser.error("--run-data needs --init-from RUN")
        return run_data(args.init_from, args.data_dir, n, args.data_label, parser)
    return (*bench_data(args.data_dir, n, args.data_label), None)


def run_data(run: str, data_dir: str | None, n: int, label: str | None,
             parser: argparse.ArgumentParser) -> tuple:
    """``--run-data``: the first ``n`` images of ``run``'s own training set (in its order, so that they line up with
    its per-sample state), the splits, a name, and the run's newest IAAT radii for them (``None`` if it has none)."""
    from iaat.engine.runs import load_run_config

    if not data_dir:
        parser.error("--run-data needs --data-dir (the run's data set)")
    run_dir = Path(run)
    cfg = load_run_config(run_dir)  # the config only: init_weights loads the checkpoint
    if cfg.data.dataset != "cifar10":
        parser.error(f"--run-data: {run} was trained on {cfg.data.dataset}; the benchmarks load CIFAR-10")
    splits, name = _cifar10(data_dir, label)
    order = read_train_indices(run_dir)
    if len(order) < n:
        parser.error(f"--run-data: {run} has {len(order)} training images; the benchmark needs {n}")
    data = splits.train.subset(torch.as_tensor(order[:n], dtype=torch.long))
    files = sorted((run_dir / "radii").glob("epoch_*.npy"))
    radii = torch.from_numpy(np.load(files[-1])[:n]) if files else None
    where = f", radii of {files[-1].name}" if files else ""
    return data, splits, f"{name}, the first {n} training images of {run}{where}", radii


def clean_correct(model: torch.nn.Module, data: ImageSet, device: torch.device) -> torch.Tensor:
    """(N,) bool: which images of ``data`` ``model`` classifies correctly (IAAT attacks only those)."""
    model.eval()
    with torch.no_grad():
        right = torch.cat([model(to_unit(data.x[i:i + 256], device)).argmax(1).cpu() == data.y[i:i + 256]
                           for i in range(0, len(data.y), 256)])
    model.train()
    return right


def clean_accuracy(model: torch.nn.Module, data: ImageSet, device: torch.device) -> float:
    """Share of ``data`` that ``model`` classifies correctly."""
    return float(clean_correct(model, data, device).float().mean())


def keep_clean_correct(model: str | dict, data: ImageSet, splits, device, init: dict, radii: torch.Tensor | None,
                       batch_size: int, parser: argparse.ArgumentParser) -> tuple[ImageSet, torch.Tensor | None]:
    """``--clean-correct-only``: the images (and radii) the initial model classifies correctly."""
    probe = model_from_config(config_from_dict({"model": model_section(model)}), splits)
    probe.load_state_dict(init)
    keep = clean_correct(probe.to(device), data, device)
    if int(keep.sum()) < batch_size:
        parser.error(f"--clean-correct-only: the model classifies only {int(keep.sum())} of the {len(keep)} images "
                     f"correctly, fewer than one batch of {batch_size}")
    rows = keep.nonzero().squeeze(1)
    return data.subset(rows), (radii[rows] if radii is not None else None)


def write_result(result: dict, out: Path) -> None:
    """Write ``result`` as JSON to ``out`` atomically (a process killed meanwhile leaves the previous file whole)."""
    from iaat.engine.rundir import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"written to {out}")


def init_weights(run: str, models: list[str], parser: argparse.ArgumentParser, flag: str) -> tuple[dict, Path, dict]:
    """The weights of a run's newest checkpoint, its path and the run's ``model`` config section (width,
    depth, ...), for benchmarking from a realistically trained model; ``models`` (the benchmarked
    models) must be exactly the run's."""
    from iaat.engine.runs import load_run

    model, cfg, path, _ = load_run(Path(run))
    if models != [cfg.model.name]:
        parser.error(f"--init-from {run} holds a {cfg.model.name}; pass {flag} {cfg.model.name}")
    return model.state_dict(), Path(path), cfg.to_dict()["model"]


def model_section(model: str | dict) -> dict:
    """The ``model`` config section of a benchmarked model: a name (default settings) or a run's section."""
    return {"name": model} if isinstance(model, str) else dict(model)


class Runner:
    """One (model, method) training step, ready to be timed; ``train`` holds ``train.*`` config keys (precision,
    layout, compile), and the model and method are set up by the trainer's own :func:`build_step`."""

    def __init__(self, model: str | dict, spec: str, data: ImageSet, splits, device, batch_size: int,
                 init: dict | None = None, train: dict | None = None, radii: torch.Tensor | None = None) -> None:
        name, params = parse_method(spec)
        parts = {k.removeprefix("train."): params.pop(k) for k in list(params) if k.startswith("train.")}
        cfg = config_from_dict({"model": model_section(model), "method": {"name": name, **params},
                                "attack": {"eps": 8, "step_size": 2, "steps": 10},
                                "train": {**(train or {}), **parts}})
        torch.manual_seed(0)
        self.spec, self.device = spec, device
        self.compiled = cfg.train.compile  # the first steps compile
        self.model, self.net, self.method = build_step(cfg, SimpleNamespace(splits=splits, train=data), device)
        if init is not None:
            self.model.load_state_dict(init)
        self.model.train()
        self.autocast = autocast_context(device, cfg.train.amp)
        # Time IAAT with its selection active: every radius at eps_warmup (right after the warmup), or ``radii``.
        self.method.start_epoch(getattr(self.method, "warmup_epochs", 0))
        if hasattr(self.method, "memory"):
            if radii is not None:
                self.method.memory.copy_(radii.to(self.method.memory))
            else:
                self.method.memory.fill_(self.method.eps_warmup)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        # the parts around the method (spec keys train.awp=..., train.ema=...), as the trainer sets them up
        self.awp = build_awp(cfg, self.model)
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema else None
        self.loader = DeviceLoader(data, batch_size, device, augment=True, seed=0)
        self.batch_size = batch_size
        self.batches = self._cycle()
        self.times: list[float] = []
        self.peak_memory = 0  #: bytes, the most any of its steps allocated (CUDA)

    def _cycle(self):
        """Full batches only: an epoch's last, smaller batch would be a faster step, and images/s is read from the
        median step at ``batch_size`` images."""
        epoch = 0
        while True:
            yield from (b for b in self.loader.epoch(epoch) if len(b[1]) == self.batch_size)
            epoch += 1

    def step(self, timed: bool) -> None:
        x, y, idx = next(self.batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)  # this runner's own peak, not the largest so far
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        forward_backward(self.method, self.net, x, y, idx, self.autocast, self.awp, lambda loss: loss.backward())
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_memory = max(self.peak_memory, torch.cuda.max_memory_allocated(self.device))
        if timed:
            self.times.append(time.perf_counter() - t0)


def main(argv=None) -> int:
    note_starting_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 folder (or parent); random uint8 images when omitted")
    p.add_argument("--data-label", help="the data set's name in the results (default: from the files); which of "
                   "its images were timed is added to it")
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"])
    p.add_argument("--methods", nargs="+", default=["pgd_at"],
                   help="method specs, e.g. pgd_at iaat iaat:selection=online (ratios are to pgd_at)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the methods")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    p.add_argument("--init-from", metavar="RUN", help="start from this run's weights (one model only): selection "
                   "costs depend on how many samples an attack breaks, which an untrained model overstates")
    p.add_argument("--run-data", action="store_true", help=RUN_DATA_HELP)
    p.add_argument("--clean-correct-only", action="store_true",
                   help="with --init-from: time only on the images the model classifies correctly, the worst case for "
                   "IAAT (it attacks every sample of such a batch, as for a model that fits its training set)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file (default benchmarks/results/throughput-<device>.json)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    data, splits, data_name, radii = bench_inputs(args, args.batch_size * 8, p)
    init = init_path = init_model = None
    if args.init_from:  # the run's weights and model settings (width, depth)
        init, init_path, init_model = init_weights(args.init_from, args.models, p, "--models")
    if args.clean_correct_only:
        if init is None:
            p.error("--clean-correct-only needs --init-from RUN")
        n = len(data.y)
        data, radii = keep_clean_correct(init_model, data, splits, device, init, radii, args.batch_size, p)
        data_name += f"; only the {len(data.y)} of them the model classifies correctly"
        print(f"timing on the {len(data.y)} of {n} images the model classifies correctly", flush=True)
    rows, clean_acc = [], None
    for model_name in args.models:
        runners = [Runner(init_model or model_name, spec, data, splits, device, args.batch_size, init, radii=radii)
                   for spec in args.methods]
        if init is not None:  # before any timed SGD step moves the weights
            clean_acc = clean_accuracy(runners[0].model, data, device)
            print(f"clean accuracy of {args.init_from} on the timed images: {clean_acc:.3f}", flush=True)
        for r in runners:
            for _ in range(args.warmup):
                r.step(timed=False)
        for _ in range(args.rounds):
            for r in runners:
                for _ in range(args.steps):
                    r.step(timed=True)
        base = next((r for r in runners if r.spec == "pgd_at"), None)
        for r in runners:
            # The median step time resists bursts of other load on the machine better than the mean.
            median = statistics.median(r.times)
            ips = args.batch_size / median
            row = {"model": model_name, "method": r.spec, "batch_size": args.batch_size,
                   "timed_steps": len(r.times), "median_seconds_per_step": median,
                   "mean_seconds_per_step": statistics.fmean(r.times), "images_per_second": ips}
            if base is not None:
                row["time_ratio_to_pgd_at"] = median / statistics.median(base.times)
            if device.type == "cuda":
                row["peak_memory_gib"] = r.peak_memory / 2**30  # the other runners' models resident too
            rows.append(row)
            ratio = f"  {row['time_ratio_to_pgd_at']:.2f}x pgd_at" if "time_ratio_to_pgd_at" in row else ""
            print(f"{model_name:<12} {r.spec:<32} {ips:8.1f} images/s{ratio}", flush=True)
        del runners
    result = {
        **run_header("training_step_throughput", device, argv),
        "data": data_name,
        "attack": "L-inf PGD-10, eps 8/255, step 2/255",
        "init_from": str(init_path) if init_path else "random initialisation",
        **({"clean_accuracy_on_timed_images": clean_acc} if clean_acc is not None else {}),
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    write_result(result, Path(args.out) if args.out else RESULTS / f"throughput-{device.type}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
