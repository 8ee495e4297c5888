"""Test set-up: tensors go where the machine runs the kernels (tests/_device.py: the CUDA GPU, or
the CPU under Triton's interpreter), and tests marked ``gpu`` run on a GPU machine and are skipped
elsewhere, so ``python -m pytest -q`` is the whole suite this machine can run."""

import os

from _device import DEVICE, ON_GPU  # first: it decides TRITON_INTERPRET before triton is imported

import torch  # noqa: E402

# Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads: workers
# that each start a thread per core stall one another on tiny reference computations.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

# torch and JAX share the GPU: JAX must not take 75 % of it up front (set before JAX starts).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the suite on every core when pytest-xdist is installed and the command line chose no
    ``-n``: the kernels run in Triton's interpreter, one Python thread each, so CI's 2 cores halve
    the wall time (``-n 0`` runs in one process). On the CPU whole files go to one worker
    (``loadfile``), so a module's expensive fixtures (compiled MAML steps, jitted programs) are
    built once; on a GPU tests go one by one (``load``): there the cost is the kernels' compilation,
    which Triton caches on disk for every worker, and the GPU accuracy matrix is a few large files."""
    if (hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist")
            or config.getoption("numprocesses", None) is not None or config.getoption("collectonly")):
        return
    config.option.numprocesses = "auto"
    if config.option.dist == "no":
        config.option.dist = "load" if ON_GPU else "loadfile"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        # The GPU-only cases are the long ones there (each compiles its kernels for the GPU): started
        # first, they spread over the workers instead of leaving one worker to finish the last of
        # them alone (one H200 run: 718 of 781 cases in 10 minutes, the GPU cases of the files late
        # in the alphabet not reached). The sort is stable: file order holds within each group.
        items.sort(key=lambda item: "gpu" not in item.keywords)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (this machine runs the kernels in Triton's interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """``"cuda"`` on a GPU machine, else ``"cpu"`` (the kernels then run in Triton's interpreter)."""
    return DEVICE


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny torch programs: more threads only
    synchronise, and on shared CI cores they stall each other (seen: 0.6 s → 11 s for one test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
