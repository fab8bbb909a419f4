"""``iaat`` CLI entry point for the distributed tests, with one extra model: a CNN with GroupNorm instead of BatchNorm.

With BatchNorm each rank normalises by the statistics of its own share of the batch (SyncBatchNorm,
which fixes that, needs CUDA), so only a BatchNorm-free model can end a 2-process CPU run with the
same weights as a 1-process run. Run as ``python tests/ddp_worker.py train ...`` or under
``torchrun ... tests/ddp_worker.py train ...``.

With ``IAAT_TEST_HANG_DUMP_S`` set, a worker still running after that many seconds prints every thread's
stack to stderr (the test kills a hung job a little later and shows it).

It also checks the process group's teardown: once the CLI returns, no gloo thread may be left
(Linux), since threads that live into interpreter shutdown can abort a finished run (SIGABRT).
"""

import faulthandler
import os
import sys

import torch
from torch import nn

from iaat.cli import main
from iaat.models.registry import MODELS


class _ToDefaultDtype(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.get_default_dtype())


def _plain_cnn(num_classes, in_channels, depth, width) -> nn.Module:
    """Conv-GroupNorm-ReLU blocks: GroupNorm normalises each image alone, so the batch split does not matter."""
    w = width or 32

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU()]

    return nn.Sequential(_ToDefaultDtype(), *block(in_channels, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))


MODELS["plain_cnn"] = _plain_cnn


def _thread_names() -> list[str]:
    """The names of this process's native threads (Linux; empty elsewhere)."""
    names = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _signal_rank_0_only() -> None:
    """SIGTERM to rank 0 alone (one node of a job preempted), after its N-th training step
    (``IAAT_TEST_SIGTERM_RANK0_AT_STEP=N``) or after the first batch of its N-th held-out evaluation
    (``IAAT_TEST_SIGTERM_RANK0_IN_EVAL=N``)."""
    import signal

    from iaat.engine import trainer

    at_step, in_eval = (int(os.environ.get(key, 0)) for key in ("IAAT_TEST_SIGTERM_RANK0_AT_STEP",
                                                                  "IAAT_TEST_SIGTERM_RANK0_IN_EVAL"))
    if os.environ.get("RANK", "0") != "0" or not (at_step or in_eval):
        return
    calls = {"steps": 0, "evals": 0}
    step, accuracy = trainer.forward_backward, trainer.accuracy

    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        calls["steps"] += 1
        if calls["steps"] == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    def counted_accuracy(*args, stop, **kwargs):
        calls["evals"] += 1
        batches = {"n": 0}

        def stop_after_the_first_batch():
            batches["n"] += 1
            if calls["evals"] == in_eval and batches["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return stop()
        return accuracy(*args, stop=stop_after_the_first_batch, **kwargs)

    trainer.forward_backward, trainer.accuracy = counted_step, counted_accuracy


if __name__ == "__main__":
    _signal_rank_0_only()
    if os.environ.get("IAAT_TEST_HANG_DUMP_S"):
        faulthandler.dump_traceback_later(float(os.environ["IAAT_TEST_HANG_DUMP_S"]), exit=False)
    # Adversarial training amplifies rounding: a 1e-7 difference in an all-reduced gradient flips a sign() in
    # PGD or a kept/dropped radius a few hundred steps later. In float64 the rounding of the gradient sum over
    # ranks (the one thing that differs from one process) is 1e-16, far below anything that can flip.
    # Hence the float64 option of the 1-process/2-process comparisons (the plain CNN casts its input).
    if os.environ.get("IAAT_TEST_FLOAT64") == "1":
        torch.set_default_dtype(torch.float64)
    code = main()
    left = [name for name in _thread_names() if "gloo" in name]
    if left:
        print(f"ddp_worker: gloo threads still alive after the CLI returned: {left}", file=sys.stderr)
        code = code or 3
    sys.exit(code)
