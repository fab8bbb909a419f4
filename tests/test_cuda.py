"""What only a GPU can check: the fast path on CUDA, compile over IAAT's varying batches, deterministic runs,
torchrun with NCCL, a PGD loop without host synchronisation, and exported model files loaded onto the GPU.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them on a GPU machine, those that do not
compile first thing, those marked ``compile`` in its late stage. Tolerances are those of the CPU fast-path tests
(tests/test_fast_path.py) unless said.

``IAAT_CUDA_TESTS_DEVICE=cpu`` runs them on the CPU instead, a dry run of the tests' own code so that it does not rot
between GPU loans (``make test-cuda-on-cpu``); what needs CUDA itself (fp16, the sync debug mode, NCCL) is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, child_env, run_cli, tiny_train_args
from iaat.config import config_from_dict
from iaat.data import DeviceLoader
from iaat.engine.setup import prepare_data
from iaat.engine.trainer import build_step
import test_fast_path
from test_fast_path import cosine, fast_step, initial_weights, max_relative_gap, plain_step, step_config

GPU = torch.device(os.environ.get("IAAT_CUDA_TESTS_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(GPU.type == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]
needs_cuda = pytest.mark.skipif(GPU.type != "cuda", reason="needs CUDA itself (this is a dry run on the CPU)")
batch = test_fast_path.batch  # the fast-path tests' batch fixture, reused


# fp32 on CUDA: cuDNN picks its own algorithms (and may use TF32 for convolutions, PyTorch's default there), so the
# bounds allow TF32 rounding (a 10-bit mantissa), not a wrong step.
@pytest.mark.parametrize("train, loss_tol, min_cosine", [
    ({}, 1e-3, 0.999),
    ({"channels_last": True}, 1e-3, 0.999),
    ({"amp": "bf16"}, 1e-2, 0.9),
    ({"amp": "bf16", "channels_last": True}, 1e-2, 0.9),
    pytest.param({"amp": "fp16"}, 1e-2, 0.95, marks=needs_cuda),
    pytest.param({"attack_amp": "fp16"}, 1e-2, 0.95, marks=needs_cuda),
], ids=["fp32", "channels_last", "bf16", "bf16+channels_last", "fp16+scaler", "fp16-attack-only"])
def test_fast_path_on_cuda_matches_the_plain_step(batch, tiny_cifar, train, loss_tol, min_cosine):
    check_fast_step(batch, tiny_cifar, train, loss_tol, min_cosine)


def check_fast_step(batch, tiny_cifar, train: dict, loss_tol: float, min_cosine: float) -> None:
    """The trainer's step with the ``train`` settings against the plain fp32 step from the same weights."""
    data, x, y, idx = batch
    weights = initial_weights(step_config(tiny_cifar), data, GPU)
    plain_loss, plain_grads = plain_step(step_config(tiny_cifar), data, idx, weights, GPU)
    fast_loss, fast_grads = fast_step(step_config(tiny_cifar, **train), data, x, y, idx, weights, GPU)
    assert fast_loss == pytest.approx(plain_loss, rel=loss_tol)
    assert cosine(fast_grads, plain_grads) > min_cosine
    assert all(torch.isfinite(g).all() for g in fast_grads)
    if not train:
        assert max_relative_gap(fast_grads, plain_grads) < 1e-2


def test_deterministic_training_is_bitwise_repeatable(tiny_cifar, tmp_path):
    """Each run in a process of its own, as users run it: ``CUBLAS_WORKSPACE_CONFIG`` counts only when set before
    the process's first cuBLAS call, which in this process the tests before have made."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_cli(*tiny_train_args(tiny_cifar, out, 2, "--device", GPU.type, "--method", "iaat",
                                        "--set", "method.warmup_epochs=1", "--set", "train.deterministic=true"),
                       cwd=REPO, timeout=45)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs.append(torch.load(out / "checkpoints" / "epoch_0002.pt", map_location="cpu", weights_only=False))
    for key, value in runs[0]["model"].items():
        assert torch.equal(value, runs[1]["model"][key]), key
    assert torch.equal(torch.as_tensor(runs[0]["method"]["memory"]), torch.as_tensor(runs[1]["method"]["memory"]))


def test_pgd_step_loop_never_waits_for_the_host(batch):
    """The attack loop queues its steps without a host synchronisation (``stop_on_miss`` aside, which counts)."""
    from iaat.attacks.pgd import _as_radius, _one_run, _run_settings

    data, x, y, _ = batch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).to(GPU)
    model.eval()
    x, y = x.to(GPU), y.to(GPU)
    eps = _as_radius(8 / 255, len(y), x)
    run = _run_settings(GPU.type, steps=10)  # what pgd() runs (tests/test_pgd.py checks it on the CPU)
    _one_run(model, x, y, eps, eps / 4, None, None, run)  # warm up: allocations and kernel selection
    on_gpu = GPU.type == "cuda"  # the dry run on the CPU runs the loop without the check
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        x_adv, kappa, first_miss = _one_run(model, x, y, eps, eps / 4, None, None, run)
    finally:
        if on_gpu:
            torch.cuda.set_sync_debug_mode("default")
    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
    assert kappa.shape == first_miss.shape == y.shape


@pytest.mark.parametrize("method", ["pgd_at", "gairat", "trades", "mart", "cat"])
def test_training_step_never_waits_for_the_host(batch, tiny_cifar, method):
    """After the first batch's checks, a method's step (attack, loss, backward, optimiser step) is queued without a
    host synchronisation, as the README says: the host runs ahead of the GPU."""
    from iaat.engine.setup import autocast_context

    data, x, y, idx = batch
    cfg = step_config_for(tiny_cifar, method, amp="bf16")
    model, net, method_obj = build_step(cfg, data, GPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y, idx = x.to(GPU), y.to(GPU), idx.to(GPU)
    method_obj.start_epoch(0)

    def step():
        with autocast_context(GPU, "bf16")():
            loss = method_obj.compute(net, x, y, idx).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # the first batch: its checks sync, as documented
    on_gpu = GPU.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        if on_gpu:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def step_config_for(data_dir, method: str, **train):
    """The fast-path tests' config with another method (its defaults) and random starts on."""
    from test_fast_path import step_config

    cfg = step_config(data_dir, **train)
    return config_from_dict({**cfg.to_dict(), "method": {"name": method},
                             "attack": {**cfg.to_dict()["attack"], "random_start": True}})


def test_the_loader_gives_the_cpus_batches_on_the_gpu():
    """Order, crops and flips come from a CPU generator on any device: an epoch stopped on one device and resumed
    on another continues the same batches."""
    from iaat.data.imageset import ImageSet

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (203, 3, 8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (203,), generator=g))
    loaders = [DeviceLoader(data, 50, device, augment=True, seed=3) for device in (torch.device("cpu"), GPU)]
    for epoch in range(2):
        for a, b in zip(*(loader.epoch(epoch, start=epoch) for loader in loaders)):
            for p, q in zip(a, b):
                assert q.device.type == GPU.type and torch.equal(p, q.cpu())


@pytest.mark.parametrize("name", ["IAAT", "MMA", "CAT", "MAIL"])
def test_per_sample_state_built_on_the_cpu_follows_a_gpu_batch(name):
    """A user's loop builds the method, then moves model and data to the GPU: the per-sample state follows."""
    import iaat

    method = getattr(iaat, name)(num_train=50, eps=8 / 255, steps=2)
    method.start_epoch(200)  # past every method's warm-up or burn-in
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).to(GPU)
    x, y = torch.rand(6, 3, 8, 8, device=GPU), torch.arange(6, device=GPU)
    for index in (torch.arange(6), torch.arange(6, 12, device=GPU)):  # a DataLoader's CPU indices, or the GPU's
        method.loss(model, x, y, index).backward()
    state = method.state_dict()
    assert all(getattr(method, key).device.type == GPU.type for key in state)


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("torchscript", "model.pt"),
                                       ("export", "model.pt2")])
def test_an_exported_model_runs_on_the_gpu(tiny_run, tmp_path, fmt, name):
    """A file exported on the CPU, loaded onto the GPU (``load_model(path, "cuda")``), gives the run's logits there:
    its normalisation constants and weights move with it (a ``.pt2`` graph could hold CPU constants)."""
    import iaat

    path, _ = iaat.export_model(tiny_run, tmp_path / name, fmt)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(GPU)
    with torch.no_grad():
        got, want = iaat.load_model(path, GPU.type)(x), iaat.load_model(tiny_run, GPU.type)(x)
    assert got.device.type == GPU.type
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # TF32 convolutions may differ in rounding


@needs_cuda
def test_torchrun_trains_on_one_gpu(tiny_cifar, tmp_path):
    """torchrun's launch and environment on a GPU (one process: no process group is needed, so none is made)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "iaat",
           *tiny_train_args(tiny_cifar, out, 1, "--device", "cuda")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=child_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "epoch_0001.pt").is_file()


_NCCL_PROGRAM = """
import torch, torch.distributed as dist
device = torch.device("cuda", 0)
dist.init_process_group("nccl", device_id=device)
total, peak = torch.full((3,), 2.0, device=device), torch.tensor([1.5], device=device)
dist.all_reduce(total)
dist.all_reduce(peak, op=dist.ReduceOp.MAX)
gathered = [None]
dist.all_gather_object(gathered, {"rank": dist.get_rank()})
dist.barrier()
dist.destroy_process_group()
print("ok", total.tolist(), peak.item(), gathered)
"""


@needs_cuda
def test_nccl_process_group_on_one_gpu():
    """NCCL itself, which a one-process torchrun never starts (iaat makes no process group for one rank): a
    one-rank group on the GPU and the collectives the trainer uses (sum, max, gathering objects, barrier)."""
    env = {**child_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", _NCCL_PROGRAM], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok [2.0, 2.0, 2.0] 1.5 [{'rank': 0}]", proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The compiling tests come last and are marked ``compile``: compiling from a cold cache takes longest, so the GPU
# kit runs them in a stage of their own after its paper-scale runs (benchmarks/gpu_check.py).
@pytest.mark.compile
@pytest.mark.parametrize("train, loss_tol, min_cosine", [
    ({"compile": True}, 1e-3, 0.999),
    ({"amp": "bf16", "channels_last": True, "compile": True}, 1e-2, 0.9),
], ids=["compile", "bf16+channels_last+compile"])
def test_compiled_fast_path_on_cuda_matches_the_plain_step(batch, tiny_cifar, train, loss_tol, min_cosine):
    check_fast_step(batch, tiny_cifar, train, loss_tol, min_cosine)


@pytest.mark.compile
def test_compile_recompiles_a_bounded_number_of_times_over_an_iaat_epoch(tiny_cifar, record_property):
    """IAAT's selection attacks see batches of every size (only the samples still standing are attacked): with
    dynamic shapes the compiled model must not recompile per size."""
    from torch._dynamo.utils import counters

    cfg = config_from_dict({
        "data": {"dataset": "cifar10", "data_dir": str(tiny_cifar), "val_size": 0, "download": False},
        "model": {"name": "small_cnn", "width": 8},
        "method": {"name": "iaat", "warmup_epochs": 1},
        "attack": {"eps": 8, "step_size": 2, "steps": 5},
        "train": {"batch_size": 64, "compile": True, "amp": "bf16"}})
    data = prepare_data(cfg)
    torch.manual_seed(0)
    model, net, method = build_step(cfg, data, GPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch._dynamo.reset()
    counters.clear()
    sizes = set()
    for epoch in range(3):  # warmup, then two epochs of Alg. 2
        method.start_epoch(epoch)
        for x, y, idx in DeviceLoader(data.train, 64, GPU, seed=epoch).epoch(epoch):
            with torch.autocast(GPU.type, dtype=torch.bfloat16):
                out = method.compute(net, x, y, idx)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sizes.add(len(y))
        method.end_epoch()
    graphs = int(counters["stats"]["unique_graphs"])
    record_property("compiled_graphs_over_3_iaat_epochs", graphs)
    assert 0 < graphs <= 24, f"{graphs} graphs compiled over 3 epochs"
