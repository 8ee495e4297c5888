"""Test set-up: tensors go where the machine runs the kernels (tests/_device.py: the CUDA GPU, or
the CPU under Triton's interpreter), and tests marked ``gpu`` run on a GPU machine and are skipped
elsewhere, so ``python -m pytest -q`` is the whole suite this machine can run."""

import os

from _device import DEVICE, ON_GPU  # first: it decides TRITON_INTERPRET before triton is imported

import torch  # noqa: E402

# torch and JAX share the GPU: JAX must not take 75 % of it up front (set before JAX starts).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
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
