"""The torch launcher's compiled-kernel path (kernels/_launch_torch.py), which only a GPU takes, on
a stand-in kernel: the first call compiles through the kernel's own launch and keeps the compiled
kernel; later calls run it directly; a kernel that asks for global scratch (attention's TMA
descriptors) runs with torch's allocator lent to Triton, unless the user set one."""

from __future__ import annotations

import types

import pytest
import torch
from triton.runtime import _allocation

import theria_kernels._launch_torch as launch_torch


class StandInKernel:
    """``kernel[grid](*args, ...)`` as Triton's JITFunction: returns the compiled kernel, whose
    ``run`` records the allocator it met and the arguments it got."""

    def __init__(self, scratch: int):
        self.scratch, self.runs, self.jit_calls = scratch, [], 0

    def __getitem__(self, grid):
        def jit_run(*args, num_warps, num_stages):
            self.jit_calls += 1
            self.runs.append(("jit", _allocation._allocator.get(), args))
            return self.compiled

        return jit_run

    @property
    def compiled(self):
        kernel = self

        class Compiled:
            metadata = types.SimpleNamespace(global_scratch_size=kernel.scratch)
            function, packed_metadata = "function", "packed"

            def _init_handles(self):
                self.run = lambda *a: kernel.runs.append(("run", _allocation._allocator.get(), a[9:]))

        if not hasattr(self, "_compiled"):
            self._compiled = Compiled()
        return self._compiled


def _launch(kernel):
    return types.SimpleNamespace(values=(None, 7), buffer_slots=((0, "x"),), kernel=kernel, grid=(3, 1, 1),
                                 num_warps=4, num_stages=2, compiled={})


@pytest.fixture
def compiled_path(monkeypatch):
    monkeypatch.setattr(launch_torch, "_INTERPRETER", False)
    monkeypatch.setattr(launch_torch, "_FORCE_JIT_RUN", False)
    monkeypatch.setattr(launch_torch, "_current_stream", lambda device: 0)


@pytest.mark.parametrize("scratch", [0, 256], ids=["no_scratch", "scratch"])
def test_compiled_kernels_run_directly_with_scratch_where_asked(scratch, compiled_path):
    kernel = StandInKernel(scratch)
    launch, x = _launch(kernel), torch.zeros(4)
    for _ in range(3):
        launch_torch.launch_one(launch, {"x": x})
    assert kernel.jit_calls == 1 and [kind for kind, _, _ in kernel.runs] == ["jit", "run", "run"]
    assert all(args == (x, 7) for _, _, args in kernel.runs)
    # The first call may compile a kernel that needs scratch: it always has the allocator.
    assert kernel.runs[0][1] is launch_torch._torch_scratch
    expected = launch_torch._torch_scratch if scratch else _allocation._NULL_ALLOCATOR
    assert all(allocator is expected for _, allocator, _ in kernel.runs[1:])
    assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR  # lent for the launch only


def test_a_users_allocator_is_kept(compiled_path):
    kernel = StandInKernel(256)
    launch, x = _launch(kernel), torch.zeros(4)
    mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
    token = _allocation._allocator.set(mine)
    try:
        for _ in range(2):
            launch_torch.launch_one(launch, {"x": x})
    finally:
        _allocation._allocator.reset(token)
    assert [allocator for _, allocator, _ in kernel.runs] == [mine, mine]
