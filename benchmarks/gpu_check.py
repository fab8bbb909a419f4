"""Every owed GPU figure from one command on a bare GPU machine, within a time budget.

    bash benchmarks/gpu_check.sh OUT_DIR [--budget 540] [--data FILE.npz]   # on a GPU machine
    bash benchmarks/gpu_check.sh OUT2 --stages late --budget 200            # then, if time is left: compile
    bash benchmarks/gpu_check.sh OUT_DIR --smoke                            # CPU dry run, under a minute

Stages, in priority order; each writes its files to OUT_DIR as soon as it ends (and ``summary.md``
is rewritten), so a stage cut short by the budget loses nothing done before it:

1. ``env``: the GPU, driver, torch and CUDA (``1-env.json``) and the CUDA-only tests that do not
   compile (``pytest -m "cuda and not compile"``: fast path on CUDA, deterministic runs, torchrun on one
   GPU, an NCCL process group, the PGD loop without host syncs, exported model files on the GPU), log in
   ``1-cuda-tests.log``; the data set is built meanwhile;
2. ``speed``: ``benchmarks/speed.py`` for ResNet-18 at batch 512 (pgd_at fp32 / bf16 /
   bf16+channels_last beside the plain PyTorch loop, IAAT batched / conditional / online,
   GAIRAT, TRADES, MART, MMA, CAT, MAIL, AWP, EMA) and WRN-34-10 at batch 128, images/s, peak memory and
   the fraction of the measured bf16 peak (``2-speed-resnet18.json``, ``2-speed-wrn-34-10.json``);
3. ``paper``: ResNet-18 on all 50,000 training images, PGD-AT at 8/255 against IAAT on the same short
   schedule, sized to the time left from the throughput just measured; each evaluated on the first
   1,000 test images with PGD-20 and, when ``pyautoattack`` imports, AutoAttack's APGD-CE + APGD-T
   (``3-paper-scale.json``; an evaluation the budget cuts keeps the attacks it went through). The
   stages before it leave it ``PAPER_MIN`` seconds, and each command before it the floors of those after;
4. ``late``: what ``torch.compile`` costs most to check, with the time the paper stage left (it takes
   nearly all: run ``--stages late`` as a second command, into another OUT_DIR, when the loan has time
   for it): the compiling
   CUDA tests (``pytest -m "cuda and compile"``: compiled steps against the plain one, recompiles over
   IAAT epochs; their results in ``1-env.json``, log appended to ``1-cuda-tests.log``) and ResNet-18's
   bf16 + channels_last + compile speed (``2-speed-resnet18-compile.json``).

At most 8 files: those, ``summary.md`` and ``log.txt``. The data set is built from the JPEG-75
CIFAR-10 archive (``--data``, default ``.gpu/cifar10_jpeg75.npz``; ``benchmarks/gpu_pack.sh``
fills ``.gpu/``) into ``--work`` (not OUT_DIR); without it the tests and the speed stage still run (on
random images) and the paper stage is left out. Nothing is installed or downloaded: the package runs
from ``src/`` (the shell wrapper sets PYTHONPATH). The budget counts from the start of this script (after the
wrapper's offline install of any carried wheels).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pickle
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()  # the budget's clock: importing numpy and torch on a fresh machine takes seconds

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = ("env", "speed", "paper", "late")
LABEL = "CIFAR-10 (JPEG-75 copy)"
TRAIN_IMAGES = 50_000


class Kit:
    """The budget, the output folder and the log shared by the stages."""

    def __init__(self, out: Path, work: Path, budget: float, smoke: bool, started: float | None = None) -> None:
        self.out, self.work, self.smoke = out, work, smoke
        self.deadline = (time.monotonic() if started is None else started) + budget
        self.reserve = 0.0  #: seconds no command may take: the paper stage's minimum and the later commands' floors
        self.proc: subprocess.Popen | None = None  #: the command running now (killed with the kit)
        self.sections: dict[str, str] = {}
        self.speed_parts: dict[str, str] = {}  #: per speed plan, its markdown (the compile plan runs last)
        self.log_file = open(out / "log.txt", "a", buffering=1)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def time_for(self, cap: float) -> float:
        """Seconds a command capped at ``cap`` may take now: what is left above the reserve."""
        return max(0.0, min(cap, self.left() - self.reserve))

    def short_of(self, cap: float, floor: float, what: str) -> str | None:
        """``None`` when a command capped at ``cap`` gets at least ``floor`` seconds; else why ``what`` is not run
        (also logged)."""
        have = self.time_for(cap)
        if have >= floor:
            return None
        self.log(f"{what}: not run, {have:.0f} s left for it (it needs {floor:.0f})")
        return f"not run, {have:.0f} s left (it needs {floor:.0f})"

    def kill_child(self, wait: bool = True) -> None:
        """End the running command with its whole process group (pytest's, torchrun's and compile workers), also
        when its leader has just ended; ``wait=False`` in a signal handler (the main thread may hold the wait)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass
        if wait:
            self.proc.wait()

    def log(self, text: str) -> None:
        print(text, flush=True)
        self.log_file.write(text + "\n")

    def write_json(self, name: str, data: dict) -> None:
        (self.out / name).write_text(json.dumps(data, indent=2) + "\n")
        self.log(f"wrote {self.out / name}")

    def section(self, stage: str, markdown: str) -> None:
        """Set a stage's part of ``summary.md`` and rewrite the file (stages in their order)."""
        self.sections[stage] = markdown
        head = (f"# GPU check{' (smoke run on CPU)' if self.smoke else ''}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                f"Command: `bash benchmarks/gpu_check.sh {' '.join(sys.argv[1:])}`\n")
        body = "\n".join(self.sections[s] for s in (*STAGES, "plan") if s in self.sections)
        (self.out / "summary.md").write_text(head + "\n" + body)

    def run(self, cmd: list[str], cap: float, log_name: str | None = None) -> tuple[int | None, float, str]:
        """Run ``cmd`` (its output to the log) for at most ``cap`` seconds or what is left of the budget;
        ``(exit code or None when cut, seconds, output)``."""
        limit = max(1.0, self.time_for(cap))
        self.log(f"$ {' '.join(cmd)}   [at most {limit:.0f} s]")
        t0 = time.monotonic()
        proc = self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                                            env=child_env(), start_new_session=True)
        lines: list[str] = []
        try:
            _pump(proc, lines, self, t0 + limit)
            code = proc.wait(timeout=max(0.1, t0 + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_child()
            _pump(proc, lines, self, time.monotonic() + 2)  # what it wrote before the kill and was not yet read
            code = None
            self.log(f"... cut after {limit:.0f} s (budget)")
        finally:
            self.kill_child()  # whatever it left in its group (a test's subprocess), and on any error here
            self.proc = None
        text = "".join(lines)
        if log_name:
            with open(self.out / log_name, "a") as f:  # the late stage's compiling tests add to the first ones' log
                f.write(text)
        return code, time.monotonic() - t0, text


def _pump(proc: subprocess.Popen, lines: list[str], kit: Kit, until: float) -> None:
    """Copy ``proc``'s output into ``lines`` and the log until it ends or ``until`` passes. Reads the pipe's bytes
    as they come (no ``readline``, which would wait past ``until`` for the end of a line a hung test began)."""
    fd, pending = proc.stdout.fileno(), b""

    def record(raw: bytes) -> None:
        lines.append(raw.decode("utf-8", "replace"))
        kit.log(lines[-1].rstrip("\n"))

    while time.monotonic() < until:
        if not select.select([fd], [], [], min(1.0, max(0.01, until - time.monotonic())))[0]:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *done, pending = (pending + chunk).split(b"\n")
        for line in done:
            record(line + b"\n")
    if pending:
        record(pending)
    if time.monotonic() >= until and proc.poll() is None:
        raise subprocess.TimeoutExpired(proc.args, 0)


def child_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}


# --- data -------------------------------------------------------------------------------------------------------

def build_cifar10(npz: Path, root: Path) -> Path:
    """Decode the JPEG-75 archive (``train_jpeg``/``train_offsets``/``train_labels``, same for ``test``) into a
    ``cifar-10-batches-py`` folder under ``root`` (the official layout and pickle fields); returns ``root``."""
    from PIL import Image

    folder = root / "cifar-10-batches-py"
    if (folder / "batches.meta").is_file():  # written last (by a rename): an earlier build was whole
        return root
    folder.mkdir(parents=True, exist_ok=True)
    z = np.load(npz)

    def decode(split: str) -> tuple[np.ndarray, list[int]]:
        blob, offsets = z[f"{split}_jpeg"], z[f"{split}_offsets"]
        images = np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
                           for a, b in zip(offsets[:-1], offsets[1:])])
        return images.transpose(0, 3, 1, 2).reshape(len(images), -1), [int(v) for v in z[f"{split}_labels"]]

    x, y = decode("train")
    per = len(y) // 5
    for k in range(5):
        _dump(folder / f"data_batch_{k + 1}", x[k * per:(k + 1) * per], y[k * per:(k + 1) * per])
    _dump(folder / "test_batch", *decode("test"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta.tmp", "wb") as f:
        pickle.dump({"label_names": names}, f, protocol=2)
    os.replace(folder / "batches.meta.tmp", folder / "batches.meta")
    return root


def _dump(path: Path, x: np.ndarray, y: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.ascontiguousarray(x), "labels": y}, f, protocol=2)


def write_tiny_npz(path: Path, n_train: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """An archive in the JPEG-75 format with ``n_train``/``n_test`` random images (smoke runs and tests)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_labels"] = rng.integers(0, 10, n).astype(np.uint8)
    np.savez(path, **arrays)
    return path


# --- stage 1: environment and CUDA-only tests --------------------------------------------------------------------

def environment() -> dict:
    import torch

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpu_count": os.cpu_count(),
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count, gpu_count=torch.cuda.device_count())
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env["nvidia_smi"] = f"not available: {e}"
    return env


def junit_results(path: Path) -> list[dict]:
    """Per test: name, outcome, seconds, recorded properties (from pytest's --junitxml file)."""
    if not path.is_file():
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        row = {"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))}
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props:
            row["properties"] = props
        detail = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if detail is not None:
            row["message"] = (detail.get("message") or "")[:500]
        rows.append(row)
    return rows


def log_results(text: str) -> list[dict]:
    """Per test: name and outcome, from pytest's ``-v`` lines (``tests/f.py::name PASSED  [ 6%]``): what a run cut
    short by the time cap, which writes no --junitxml report, had finished."""
    outcomes = re.findall(r"^\S+?\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M)
    return [{"test": name, "outcome": {"PASSED": "passed", "FAILED": "failure", "ERROR": "error"}.get(o, o.lower())}
            for name, o in outcomes]


#: (pytest marker expression, cap, floor, per-test timeout) in seconds of the CUDA tests without and with
#: torch.compile; with less time than the floor they are not started (the compiling ones could not get past
#: compiling from a cold cache)
TESTS = {"env": ("cuda and not compile", 110, 20, 100), "late": ("cuda and compile", 240, 60, 200)}
TESTS_LOG = "1-cuda-tests.log"


def run_cuda_tests(kit: Kit, stage: str) -> tuple[dict, list[str]]:
    """The CUDA tests of ``stage`` (:data:`TESTS`): ``(record for 1-env.json, summary lines)``."""
    marker, cap, floor, per_test = TESTS[stage]
    cap, floor = (60, 5) if kit.smoke else (cap, floor)
    short = kit.short_of(cap, floor, f"tests {marker!r}")
    if short:
        return ({"not_run": short, "tests": []},
                [f"`pytest -m \"{marker}\"`: {short}. Run `bash benchmarks/gpu_check.sh OUT2 --stages {stage} --budget "
                 f"SECONDS` as a command of its own.\n"])
    junit = kit.work / f"cuda-tests-{stage}.xml"
    junit.unlink(missing_ok=True)
    # a hung test (NCCL, say) fails alone where pytest-timeout is installed, rather than using up the cap
    timeout = [f"--timeout={per_test}"] if importlib.util.find_spec("pytest_timeout") else []
    code, seconds, text = kit.run([sys.executable, "-m", "pytest", "-m", marker, "tests/test_cuda.py", "-v", "-rA",
                                   "-p", "no:cacheprovider", f"--junitxml={junit}", *timeout],
                                  cap=cap, log_name=TESTS_LOG)
    record = {"exit_code": code, "seconds": round(seconds, 1),
              "tests": junit_results(junit) if junit.is_file() else log_results(text)}
    counts: dict[str, int] = {}
    for t in record["tests"]:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    lines = [f"`pytest -m \"{marker}\"`: {', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'no results'} "
             f"in {seconds:.0f} s " + ("(cut short by the time limit: the tests after these did not run).\n"
                                       if code is None else f"(exit {code}).\n")]
    lines += [f"- {t['test']}: {t['outcome']}" + (f" {t['properties']}" if "properties" in t else "")
              + (f" ({t['message'][:200]})" if t["outcome"] != "passed" and "message" in t else "")
              for t in record["tests"]]
    return record, lines


def stage_env(kit: Kit) -> None:
    env = environment()
    kit.write_json("1-env.json", env)
    (kit.out / TESTS_LOG).unlink(missing_ok=True)
    env["cuda_tests"], lines = run_cuda_tests(kit, "env")
    kit.write_json("1-env.json", env)
    kit.section("env", "\n".join(["## 1. Environment and CUDA-only tests\n",
                                    f"{env.get('gpu', 'no GPU')} ({env.get('nvidia_smi', '')}), torch {env['torch']}, "
                                    f"CUDA {env['cuda']}, Python {env['python']}.\n", *lines]) + "\n")


def stage_late(kit: Kit, data_dir: Callable[[], Path | None], speed: dict) -> None:
    """The compiling CUDA tests, then ResNet-18's compile speed, with the time left; ``data_dir`` is asked for only
    when the speed plan starts (the tests need no data)."""
    base, speed_floor = kit.reserve, speed_floors(kit, late=True)
    tests_floor = 5 if kit.smoke else TESTS["late"][2]
    if kit.left() - base >= tests_floor + speed_floor:  # time for both: the tests leave the speed plan its floor
        kit.reserve = base + speed_floor
    path = kit.out / "1-env.json"
    env = json.loads(path.read_text()) if path.is_file() else environment()  # run alone: a second command
    env["compile_tests"], lines = run_cuda_tests(kit, "late")
    kit.write_json("1-env.json", env)
    kit.section("late", "\n".join(["## 4. torch.compile: tests (speed in section 2)\n", *lines]) + "\n")
    kit.reserve = base
    if speed_floor and kit.time_for(max(cap for _, _, cap, _ in speed_plans(kit, late=True))) >= speed_floor:
        stage_speed(kit, data_dir(), speed, late=True)
    else:
        stage_speed(kit, None, speed, late=True)  # says it is not run, without waiting for the data


# --- stage 2: speed ----------------------------------------------------------------------------------------------

def speed_plans(kit: Kit, late: bool = False) -> list[tuple[str, list[str], float, float]]:
    """``(model, speed.py arguments, cap, floor)`` per model, in order, in seconds: a plan with less time than its
    floor is not started (it could not warm up); ``late``: the plans run after the paper stage."""
    if kit.smoke:
        return [] if late else [
            ("small_cnn", ["--model", "small_cnn", "--width", "8", "--batch-size", "32", "--images", "64", "--methods",
                           "pgd_at", "iaat", "gairat", "--fast-paths", "fp32", "--rounds", "1", "--steps", "1",
                           "--device", "cpu"], 60, 5)]
    common = ["--device", "cuda", "--amp", "bf16", "--channels-last", "--rounds", "2", "--steps", "3", "--warmup", "2"]
    if late:  # compiling ResNet-18 for the attack and the training step takes long and the CUDA tests check
        # compile already: its speed comes after the paper stage (pgd_at bf16+channels_last is timed beside it)
        return [("resnet18-compile", ["--model", "resnet18", "--batch-size", "512", "--images", "4096", *common,
                                      "--methods", "pgd_at", "--fast-paths", "bf16+cl+compile"], 150, 90)]
    return [("resnet18", ["--model", "resnet18", "--batch-size", "512", "--images", "4096", *common, "--methods",
                          "pgd_at", "iaat", "iaat:alg2_schedule=conditional", "iaat:selection=online", "gairat",
                          "trades", "mart", "mma", "cat", "mail", "pgd_at:train.awp=auto", "pgd_at:train.ema=0.999",
                          "--fast-paths", "fp32", "bf16"], 100, 50),
            ("wrn-34-10", ["--model", "wrn-34-10", "--batch-size", "128", "--images", "1024", *common, "--methods",
                           "pgd_at", "iaat", "gairat", "trades", "--fast-paths", "fp32"], 80, 40)]


def speed_floors(kit: Kit, late: bool = False) -> float:
    """The seconds the speed plans need at the least."""
    return sum(floor for *_, floor in speed_plans(kit, late))


def stage_speed(kit: Kit, data_dir: Path | None, results: dict, late: bool = False) -> dict:
    """Run the speed plans (``late``: those after the paper stage) into ``results`` (model → speed.py's result);
    without ``data_dir``, on random images."""
    plans, base = speed_plans(kit, late), kit.reserve
    for i, (model, args, cap, floor) in enumerate(plans):
        kit.reserve = base + sum(later for *_, later in plans[i + 1:])  # the plans after this one keep their floors
        out = kit.out / f"2-speed-{model}.json"
        out.unlink(missing_ok=True)  # an earlier kit run's, in a reused OUT_DIR
        short = kit.short_of(cap, floor, f"speed {model}")
        if short:
            kit.speed_parts[model] = f"### {model}: {short}\n"
            _speed_section(kit)
            continue
        lines: list[str] = []
        data = ["--data-dir", str(data_dir), "--data-label", "random JPEG images (smoke)" if kit.smoke else LABEL] \
            if data_dir is not None else []
        code, seconds, text = kit.run([sys.executable, "benchmarks/speed.py", *data, "--out", str(out), *args], cap)
        # a write the cut interrupted (iaat.engine.checkpoint.atomic_write_bytes names it so): not a 9th file
        for partial in kit.out.glob(f".{out.name}.tmp-*"):
            partial.unlink()
        if out.is_file():  # written after every round (atomically): a run cut short keeps the rounds it finished
            results[model] = json.loads(out.read_text())
            lines.append(speed_table(model, results[model]))
            if code != 0:
                lines.append(f"_{'Cut by the budget' if code is None else f'Exit {code}'} after "
                             f"{results[model]['rounds_done']} of {results[model]['rounds']} rounds._\n")
        else:
            lines.append(f"### {model}: {'cut by the budget' if code is None else f'failed (exit {code})'} after "
                         f"{seconds:.0f} s; its printed lines:\n\n```\n{text[-3000:]}\n```\n")
        kit.speed_parts[model] = "\n".join(lines)
        _speed_section(kit)
    kit.reserve = base
    return results


def _speed_section(kit: Kit) -> None:
    kit.section("speed", "\n".join(["## 2. Training speed (benchmarks/speed.py)\n", *kit.speed_parts.values()]))


def speed_table(model: str, result: dict) -> str:
    peak = result.get("bf16_peak_tflops_measured")
    rows = [f"### {model}, batch {result['batch_size']} ({result['device_name']}; bf16 peak measured "
            f"{peak:.0f} TFLOP/s)\n" if peak else f"### {model}, batch {result['batch_size']}\n",
            "| method | images/s | vs pgd_at | TFLOP/s | of bf16 peak | peak memory GiB |", "|---|---|---|---|---|---|"]
    for r in result["results"]:
        rows.append(f"| {r['method']} | {r['images_per_second']:.0f} | {r['time_ratio_to_pgd_at']:.2f}x | "
                    f"{_num(r, 'achieved_tflops', '.1f')} | {_num(r, 'fraction_of_bf16_peak', '.1%')} | "
                    f"{_num(r, 'peak_memory_gib', '.1f')} |")
    rows += [f"| {spec} | failed: {error[:150].replace('|', '/')} | | | | |"
             for spec, error in result.get("failed", {}).items()]
    return "\n".join(rows) + f"\n\n`{result['command']}`\n"


def _num(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "–"


# --- stage 3: paper-scale comparison -------------------------------------------------------------------------------

#: The short schedule's settings beside each method's paper preset (Wong et al.'s fast-AT batch and peak rate).
PAPER_SETTINGS = ["--batch-size", "512", "--set", "optim.lr=0.2", "--set", "optim.schedule=cosine",
                  "--set", "optim.warmup_epochs=1", "--set", "data.val_size=0", "--amp", "bf16",
                  "--set", "train.channels_last=true", "--no-progress"]
IAAT_COST = 2.5  # an Alg. 2 epoch over a PGD-AT epoch at most, before any is measured at this scale
EVAL_RESERVE = 45  # seconds kept for each run's evaluation (PGD-20 and AutoAttack's two APGDs on 1,000 images)
START_UP = 15  # seconds for a training process to start (torch, CUDA, data onto the GPU)
#: seconds the stages before it leave the paper stage: two epochs of each method, their evaluations and start-ups
#: at the 3,000 images/s assumed without a measurement (``paper_epochs``), and a margin
PAPER_MIN = 250


def paper_epochs(seconds: float, pgd_images_per_s: float, fixed: float) -> tuple[int, float]:
    """Epochs E of the shared schedule that fit in ``seconds``: PGD-AT E epochs, IAAT 1 warmup epoch then E-1 at
    up to IAAT_COST times the cost, plus ``fixed`` seconds of start-up and evaluation; ``(E, PGD-AT epoch s)``."""
    epoch = 1.15 * TRAIN_IMAGES / pgd_images_per_s  # the loader's shuffling, per-epoch logging, checkpoints
    epochs = int((seconds - fixed + (IAAT_COST - 1) * epoch) // ((1 + IAAT_COST) * epoch))
    return epochs, epoch


def _paper_plan(kit: Kit, data_dir: Path, speed: dict, lines: list[str]) -> tuple | None:
    """``(epochs, IAAT warmup epochs, shared train arguments, [(name, own arguments, planned training seconds)],
    test images)``, or ``None`` when too little time is left for two epochs each."""
    if kit.smoke:
        base = ["--config", "configs/cifar10_small_cnn_cpu.yaml", "--set", "model.width=8"]
        return (1, 0, ["--data-dir", str(data_dir), "--device", "cpu", "--train-subset", "200", "--no-progress",
                       "--set", "data.val_size=0", "--set", "attack.steps=2"],
                [("pgd_at", [*base, "--method", "pgd_at"], 0),
                 ("iaat", [*base, "--method", "iaat", "--set", "method.warmup_epochs=0"], 0)], 50)
    row = next((r for r in speed.get("resnet18", {}).get("results", []) if r["method"] == "pgd_at"), None)
    ips = row["images_per_second"] if row else 3000.0  # a cautious guess when the speed stage did not finish
    epochs, epoch_s = paper_epochs(kit.left() - 20, ips, fixed=2 * (EVAL_RESERVE + START_UP))
    lines.append(f"PGD-AT measured at {ips:.0f} images/s (batch 512, bf16, channels_last) → about {epoch_s:.0f} s "
                 f"per epoch of 50,000 images; {kit.left():.0f} s left → {epochs} epochs each.\n")
    if epochs < 2:
        return None
    warmup = max(1, epochs // 5)
    iaat_s = (warmup + (epochs - warmup) * IAAT_COST) * epoch_s + START_UP
    return (epochs, warmup, ["--data-dir", str(data_dir), "--device", "cuda", *PAPER_SETTINGS],
            [("pgd_at", ["--config", "configs/cifar10_resnet18_pgd_at.yaml"], epochs * epoch_s + START_UP),
             ("iaat", ["--config", "configs/cifar10_resnet18_iaat.yaml", "--set", f"method.warmup_epochs={warmup}"],
              iaat_s)], 1000)


#: why the paper stage cannot run without a data set, unless the build says otherwise
NO_ARCHIVE = "no CIFAR-10 archive (benchmarks/gpu_pack.sh fills .gpu/, which the GPU machine needs beside the checkout)"


def stage_paper(kit: Kit, data_dir: Path | None, speed: dict, no_data: str = NO_ARCHIVE) -> dict | None:
    lines = ["## 3. Paper-scale comparison: " + ("small CNN on random images (smoke)" if kit.smoke
                                                   else "ResNet-18 on CIFAR-10, PGD-AT against IAAT") + "\n"]
    (kit.out / "3-paper-scale.json").unlink(missing_ok=True)  # an earlier kit run's, in a reused OUT_DIR
    if data_dir is None:
        kit.section("paper", "\n".join(lines + [f"Not run: {no_data}.\n"]))
        return None
    plan = _paper_plan(kit, data_dir, speed, lines)
    if plan is None:
        kit.section("paper", "\n".join(lines + ["Not run: too little time left for two epochs each.\n"]))
        return None
    epochs, warmup, shared, methods, n_eval = plan
    attacks = ["--attack", "pgd:steps=20"] + (["--attack", "autoattack:version=quick"] if _has_autoattack() else [])
    result = {"data": f"{LABEL}, all training images" if not kit.smoke else "random JPEG images (smoke)",
              "epochs": epochs, "iaat_warmup_epochs": warmup, "settings": " ".join(shared),
              "evaluation": f"first {n_eval} test images, {', '.join(attacks[1::2])} at 8/255", "runs": {}}
    reserve = 15 if kit.smoke else EVAL_RESERVE
    for i, (name, args, _) in enumerate(methods):
        # what the methods after this one were planned to take stays theirs; each run keeps time for its evaluation
        later = sum(planned + reserve for _, _, planned in methods[i + 1:])
        run = kit.work / f"paper-{name}"
        shutil.rmtree(run, ignore_errors=True)
        code, seconds, _ = kit.run([sys.executable, "-m", "iaat", "train", *args, *shared, "--epochs", str(epochs),
                                    "--out", str(run)], cap=kit.left() - reserve - later)
        entry = {"exit_code": code, "train_seconds": round(seconds, 1), "epochs": _epoch_rows(run)}
        saved = _last_checkpoint(run)
        if code is None and saved:  # cut: evaluate what it finished (the newest checkpoint; a metrics row may be
            entry["cut_after_epochs"] = saved  # written just before the kill cut its checkpoint)
        if code == 0 or "cut_after_epochs" in entry:
            ev = kit.work / f"paper-{name}-eval.json"
            state = ev.with_name(ev.name + ".state.npz")
            for stale in (ev, ev.with_suffix(".md"), state):  # an earlier kit run's, refused as another evaluation's
                stale.unlink(missing_ok=True)
            code, eval_s, _ = kit.run([sys.executable, "-m", "iaat", "eval", str(run), "--n", str(n_eval), "--eps", "8",
                                       *attacks, "--no-checks", "--no-progress", "--out", str(ev)],
                                      cap=kit.left() - later - 5)
            entry.update(eval_exit_code=code, eval_seconds=round(eval_s, 1))
            try:  # reading one run's results must not cost the next run
                if code == 0:
                    entry["eval"] = _eval_summary(json.loads(ev.read_text()))
                elif state.is_file():  # cut or failed midway: keep the attacks it went through
                    from iaat.evaluation.protocol import finished_part

                    entry["eval"] = finished_part(state)
                    entry["eval_cut"] = True
            except Exception as e:  # noqa: BLE001 -- recorded; the next method still trains
                entry["eval_error"] = f"{type(e).__name__}: {e}"
        result["runs"][name] = entry
        result["iaat_epoch_ratio"] = iaat_epoch_ratio(result)
        kit.write_json("3-paper-scale.json", result)
        lines.append(_paper_line(name, entry))
        kit.section("paper", "\n".join(lines) + "\n")
    return result


def _last_checkpoint(run: Path) -> int:
    """The epoch of the run's newest checkpoint (0: none)."""
    epochs = [int(m.group(1)) for p in (run / "checkpoints").glob("epoch_*.pt")
              if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    return max(epochs, default=0)


def _has_autoattack() -> bool:
    return importlib.util.find_spec("pyautoattack") is not None


def _epoch_rows(run: Path) -> list[dict]:
    from iaat.engine.rundir import read_metrics  # a line cut by the budget's kill is skipped

    rows = read_metrics(run)
    keep = ("epoch", "seconds", "train_loss", "train_acc", "train_clean_acc", "radius_mean", "lr")
    return [{k: r[k] for k in keep if k in r} for r in rows]


def _eval_summary(ev: dict) -> dict:
    return {"clean": ev["clean"], **{label: a["accuracy"] for label, a in ev["attacks"].items()},
            **({"worst_case": ev["worst_case"]["accuracy"]} if "worst_case" in ev else {})}


def _paper_line(name: str, entry: dict) -> str:
    times = [r["seconds"] for r in entry["epochs"] if "seconds" in r]
    text = f"- `{name}`: {len(times)} epochs in {entry['train_seconds']:.0f} s"
    if times:
        text += f" (last epoch {times[-1]:.1f} s)"
    if "cut_after_epochs" in entry:
        text += " (training cut by the budget: evaluated as it stood)"
    if "eval" in entry:
        text += "; " + ", ".join(f"{k} {v:.3f}" for k, v in entry["eval"].items())
        if entry.get("eval_cut"):
            text += " (evaluation cut: the attacks it finished)"
    elif entry["exit_code"] != 0 and "cut_after_epochs" not in entry:
        text += f"; training {'cut by the budget' if entry['exit_code'] is None else 'failed'}"
    return text


# --- the reproduction plan ------------------------------------------------------------------------------------------

#: The IAAT paper's CIFAR-10 schedules (Table 10): model, epochs, and which measured speed stands for it.
PAPER_SCHEDULES = [("ResNet-18", 200, "resnet18"), ("WRN-32-10 (timed as WRN-34-10)", 110, "wrn-34-10")]


def plan_section(speed: dict, paper: dict | None) -> str:
    """Expected wall time of the paper's full runs from the throughput measured here, for 1 and 8 GPUs."""
    measured = (paper or {}).get("iaat_epoch_ratio")
    lines = ["## Reproduction plan (from the throughput above)\n",
             "Per run of the paper's schedule on all 50,000 training images, bf16 + channels_last; IAAT at its "
             "cost ratio to PGD-AT " + ("from stage 3's epoch times after the warmup (ResNet-18 learning on all "
                                        "of CIFAR-10; taken for WRN too)" if measured else
                                        "from stage 2's steps, a lower bound: a randomly initialised model "
                                        "misclassifies most images, which IAAT does not attack") +
             "; several GPUs under torchrun assume linear scaling (gradient all-reduce is small beside 11 passes "
             "per step), an estimate, not a measurement.\n",
             "| model | epochs | method | images/s (1 GPU) | hours, 1 GPU | hours, 8 GPUs |", "|---|---|---|---|---|---|"]
    for label, epochs, key in PAPER_SCHEDULES:
        rows = {r["method"]: r for r in speed.get(key, {}).get("results", [])}
        if "pgd_at" not in rows:
            continue
        ips = rows["pgd_at"]["images_per_second"]
        ratio = measured or rows.get("iaat", {}).get("time_ratio_to_pgd_at")
        for method, cost in (("pgd_at", 1.0), ("iaat", ratio)):
            if cost:
                hours = epochs * TRAIN_IMAGES * cost / ips / 3600
                lines.append(f"| {label} | {epochs} | {method} | {ips / cost:.0f} | {hours:.1f} | {hours / 8:.2f} |")
    return "\n".join(lines) + "\n"


def iaat_epoch_ratio(result: dict) -> float | None:
    """IAAT's mean epoch time after its warmup over PGD-AT's mean epoch time (stage 3's runs)."""
    runs = result.get("runs", {})
    pgd = [r["seconds"] for r in runs.get("pgd_at", {}).get("epochs", [])[1:] if "seconds" in r]
    iaat = [r["seconds"] for r in runs.get("iaat", {}).get("epochs", [])[result.get("iaat_warmup_epochs", 1):]
            if "seconds" in r]
    return (sum(iaat) / len(iaat)) / (sum(pgd) / len(pgd)) if pgd and iaat else None


# --- main ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="folder for the results (created; at most 8 files)")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for everything from the script's start, the data set's build included (default 540)")
    p.add_argument("--smoke", action="store_true", help="a CPU dry run of every stage on tiny data and models")
    p.add_argument("--data", type=Path, default=REPO / ".gpu" / "cifar10_jpeg75.npz",
                   help="the JPEG-75 CIFAR-10 archive (default .gpu/cifar10_jpeg75.npz; --smoke: generated)")
    p.add_argument("--work", type=Path, default=Path("/tmp/iaat-gpu-check"), help="scratch folder (data, runs)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="stages to run, always in the order env, speed, paper, late (default all; 'late' alone: a "
                        "second command)")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch here; on a CPU machine run it with --smoke (a dry run).",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    kit = Kit(args.out, args.work, args.budget, args.smoke, started=STARTED)
    signal.signal(signal.SIGTERM, lambda *_: _terminated(kit))
    stages = [s for s in STAGES if s in args.stages]
    data = DataBuild(kit, args) if {"speed", "paper", "late"} & set(stages) else None
    speed: dict = {}
    paper = None
    for stage in stages:
        t0 = time.monotonic()
        kit.reserve = _reserve(kit, stage, stages)
        try:
            if stage == "env":
                stage_env(kit)
            elif stage == "speed":
                stage_speed(kit, data.folder(), speed)
            elif stage == "paper":
                paper = stage_paper(kit, data.folder(), speed, data.problem)
            else:
                stage_late(kit, data.folder, speed)
        except Exception as e:  # noqa: BLE001 -- a broken stage must not cost the later ones
            kit.log(f"stage {stage} failed: {type(e).__name__}: {e}")
            kit.section(stage, kit.sections.get(stage, f"## {stage}\n") + f"\nstage failed: {type(e).__name__}: {e}\n")
        kit.log(f"stage {stage}: {time.monotonic() - t0:.0f} s; {kit.left():.0f} s of budget left")
    if speed and "speed" in stages:  # not from the compile plan of a late stage alone
        kit.section("plan", plan_section(speed, paper))
    return 0


def _reserve(kit: Kit, stage: str, stages: list[str]) -> float:
    """Seconds the commands of ``stage`` leave to the stages after it: the paper stage's minimum for those before
    it, and the speed plans' floors for the tests before them (the late stage takes what is left)."""
    if "paper" not in stages or stages.index(stage) >= stages.index("paper"):
        return 0.0
    paper_min = 15 if kit.smoke else PAPER_MIN
    return paper_min + (speed_floors(kit) if stage == "env" and "speed" in stages else 0.0)


class DataBuild:
    """The CIFAR-10 folder, decoded in a daemon thread while the first tests run (they need no data; a daemon, so
    that an exit never waits for it). :meth:`folder` waits for it; ``problem`` says why there is none."""

    def __init__(self, kit: Kit, args: argparse.Namespace) -> None:
        self.kit, self._folder, self.problem = kit, None, NO_ARCHIVE
        self._done = threading.Event()
        if args.smoke:
            npz = write_tiny_npz(args.work / "tiny.npz")
        elif args.data.is_file():
            npz = args.data
        else:
            kit.log(f"gpu_check: warning: {args.data} is missing (benchmarks/gpu_pack.sh fills .gpu/, which must "
                    f"travel with the checkout): the speed stage runs on random images, the paper stage not at all")
            self._done.set()
            return
        root = args.work / ("cifar-tiny" if args.smoke else "cifar10")
        threading.Thread(target=self._build, args=(npz, root), name="data", daemon=True).start()

    def _build(self, npz: Path, root: Path) -> None:
        t0 = time.monotonic()
        try:
            self._folder = build_cifar10(npz, root)
            self.kit.log(f"data: {self._folder} ({time.monotonic() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001 -- recorded once; what needs no data still runs
            self.problem = f"the data set's build from {npz} failed ({type(e).__name__}: {e})"
            self.kit.log(f"data: {self.problem}; going on without it")
        finally:
            self._done.set()

    def folder(self) -> Path | None:
        """The built folder, once the build is done (``None``: see ``problem``)."""
        self._done.wait()
        return self._folder


def _terminated(kit: Kit) -> None:
    """SIGTERM (the machine's own time limit): end the running command's process group too, so that nothing
    keeps the GPU busy after the kit; what the stages wrote stays. Unbuffered writes and no wait: the main thread
    may be inside a buffered write or holding the command's wait when the signal comes."""
    kit.kill_child(wait=False)
    message = b"gpu_check: terminated (SIGTERM); the files written so far stand\n"
    for fd in (2, kit.log_file.fileno()):
        try:
            os.write(fd, message)
        except OSError:
            pass
    os._exit(143)


if __name__ == "__main__":
    sys.exit(main())
