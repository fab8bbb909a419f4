import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA, run_in_process, tiny_train_args, write_cifar10_folder

# The CLI picks 1 thread on a busy machine unless OMP_NUM_THREADS says otherwise: this process (which runs the
# CLI in-process) and every child (which inherits the variable) keep one thread count, so bitwise comparisons
# between them hold. A count the caller set is kept; else 2 threads at most.
_threads = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else min(2, os.cpu_count() or 1))
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test: the workers share the cores, one thread each (children too)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

#: Fixtures that train (or evaluate at length) end to end: a test that uses one is marked ``slow``, so that
#: ``make test-fast`` (``pytest -m "not slow"``) leaves it out; ``make test`` runs everything.
TRAINING_FIXTURES = {"tiny_run", "real_cifar", "reference", "digits_eval", "robust_grid"}


#: The longest tests (about 30 s or more under `make test`), longest first.
LONGEST = ("test_sweep_then_report_end_to_end", "test_resume_under_torchrun_is_exact",
           "test_small_cnn_preset_trains_and_evaluates_on_real_cifar10",
           "test_family_sweep_report_has_the_family_table_and_radius_figures", "test_killed_sweep_trains_nothing_twice",
           "test_smoke_mode_runs_every_stage_within_budget",
           "test_an_ema_run_is_two_points_and_awp_runs_join_the_parts_table",
           "test_repeated_sigkill_at_random_moments_then_resume_is_bitwise_equal",
           "test_gairat_weights_are_normalised_over_the_global_batch", "test_two_processes_match_one_process")


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The longest tests first, then the other end-to-end ones (a stable sort). With `--dist worksteal` the second
    # worker takes tests from the end of the first's queue, so the two meet on short tests and finish together
    # instead of one running a long test alone at the end.
    def order(item) -> tuple:
        name = getattr(item, "originalname", item.name)
        return (item.get_closest_marker("slow") is None, LONGEST.index(name) if name in LONGEST else len(LONGEST))

    items.sort(key=order)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A generated CIFAR-10-layout folder (500 train, 200 test images); returns its parent."""
    root = tmp_path_factory.mktemp("tiny_cifar")
    write_cifar10_folder(root)
    return root


@pytest.fixture(scope="session")
def real_cifar() -> Path:
    """The shared CIFAR-10 (JPEG-75 copy) as a cifar-10-batches-py folder; skips when unavailable."""
    if not (SHARED_DATA / "build_cifar10.py").is_file():
        pytest.skip(f"real CIFAR-10 needs {SHARED_DATA} (the shared JPEG-75 copy), which is absent here")
    cache = Path(os.environ.get("IAAT_TEST_CACHE", Path.home() / ".cache" / "iaat-tests")) / "cifar10-jpeg75"
    folder = cache / "cifar-10-batches-py"
    if not (folder / "test_batch").is_file():
        # Built aside and moved in with one rename: parallel test workers never see half a folder.
        cache.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            subprocess.run([sys.executable, str(SHARED_DATA / "build_cifar10.py"), str(build)], check=True,
                           capture_output=True)
            try:
                os.rename(build / folder.name, folder)
            except OSError:  # another worker moved its copy in first
                if not (folder / "test_batch").is_file():
                    raise
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_cifar, tmp_path_factory) -> Path:
    """A one-epoch PGD-AT run of a width-8 small CNN on the generated folder (read-only for tests)."""
    out = tmp_path_factory.mktemp("runs") / "pgd"
    res = run_in_process(*tiny_train_args(tiny_cifar, out, 1))
    assert res.returncode == 0, res.stderr
    return out
