"""The torch launcher: runs a ``theria_kernels._plan.Plan`` on torch tensors.

On a GPU each launch goes straight to the compiled kernel's launcher, cached on the plan's
``Launch`` per device and pointer alignment: Triton's ``JITFunction.run`` binds, specialises and
hashes every argument on every call (tens of microseconds for kernels of 30–40 parameters), while
a plan's scalars are fixed when it is built, so only the pointers' 16-byte alignment (which
Triton specialises on) can differ between calls. The first call of each key goes through
``JITFunction.run``, which compiles and launches. In Triton's interpreter every launch goes through
the interpreter. ``THERIA_TORCH_LAUNCH=triton`` forces ``JITFunction.run`` on every call (to compare
the two).

Kernels that create tensor descriptors on the device (attention's TMA loads) need
Triton's global scratch, which Triton asks of the allocator set with ``triton.set_allocator``; where
none is set, this launcher lends torch's caching allocator for those launches only.
"""

from __future__ import annotations

import contextlib
import os

import torch
from triton import knobs
from triton.runtime import _allocation
from triton.runtime.driver import driver

from theria_kernels._contracts import is_interpreter
from theria_kernels._plan import Plan

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 "float64": torch.float64, "int32": torch.int32}


def _allocation_steps(plan: Plan) -> tuple:
    """(name, like, torch dtype or None for like's, shape, zeroed) of each of the plan's allocations."""
    steps = plan.launcher_cache.get("torch")
    if steps is None:
        steps = plan.launcher_cache["torch"] = tuple(
            (name, spec.like, None if spec.dtype is None else _TORCH_DTYPES[spec.dtype], spec.shape, spec.zeroed)
            for name, spec in plan.allocations.items())
    return steps


def run_plan(plan: Plan, tensors: dict) -> tuple[torch.Tensor, ...]:
    """Run ``plan`` and return its outputs.

    Arguments:
        plan: the op call.
        tensors: name -> tensor for every input of the plan, laid out as the plan assumes
            (query-shaped in q's strides, key-shaped in k's, row statistics contiguous), plus any
            outputs the caller preallocated (the JAX bridge passes JAX's buffers); every other
            output and temporary is allocated here.
    Returns:
        The plan's outputs, in ``plan.outputs`` order.
    """
    device = tensors[next(iter(plan.inputs))].device
    # Kernels launch in the current CUDA context: switch devices only when the inputs are on
    # another one (entering torch.cuda.device costs several microseconds even when it changes nothing).
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return _run_plan(plan, tensors, device)
    return _run_plan(plan, tensors, device)


def _run_plan(plan: Plan, tensors: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    for name, like, dtype, shape, zeroed in _allocation_steps(plan):
        if name in tensors:
            continue
        if like is not None:
            like = tensors[like]
            # In the input's strides, gaps included: the kernels address it with the input's offsets.
            found = (like.new_empty_strided(like.shape, like.stride()) if dtype is None
                     else like.new_empty_strided(like.shape, like.stride(), dtype=dtype))
        else:
            found = torch.empty(shape, dtype=dtype, device=device)
        tensors[name] = found.zero_() if zeroed else found
    for name in plan.skip_if_empty:
        if not tensors[name].numel():
            for output in plan.outputs:
                tensors[output].zero_()
            break
    else:
        for launch in plan.launches:
            launch_one(launch, tensors)
    return tuple(tensors[name] for name in plan.outputs)


def launch_one(launch, tensors: dict) -> None:
    """Launch one kernel of a plan on ``tensors`` (buffer name -> tensor)."""
    args = list(launch.values)
    pointers = []
    for slot, name in launch.buffer_slots:
        args[slot] = tensor = tensors[name]
        pointers.append(tensor)
    if _INTERPRETER or _FORCE_JIT_RUN:
        launch.kernel[launch.grid](*args, num_warps=launch.num_warps, num_stages=launch.num_stages)
        return
    device = pointers[0].device.index
    key = (device, *(t.data_ptr() % 16 == 0 for t in pointers))
    found = launch.compiled.get(key)
    if found is None:
        # Compiles (or finds Triton's cached binary) and launches; later calls skip the binding.
        with _scratch_allocator():
            compiled = launch.kernel[launch.grid](*args, num_warps=launch.num_warps, num_stages=launch.num_stages)
        compiled._init_handles()
        scratch = getattr(compiled.metadata, "global_scratch_size", 0)
        launch.compiled[key] = compiled, _with_scratch_allocator(compiled.run) if scratch else compiled.run
        return
    compiled, run = found
    stream = _current_stream(device)
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if _hooked(enter) or _hooked(leave):  # a profiler listens: hand it what JITFunction.run would
        metadata = compiled.launch_metadata(launch.grid, stream, *args)
    else:  # Triton's hook chains are always set; empty ones would only cost two Python calls
        enter = leave = metadata = None
    grid = launch.grid
    run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata, enter, leave,
        *args)


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # The caching allocator's blocks start at 512-byte boundaries, above any alignment Triton asks.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _with_scratch_allocator(run):
    """``run`` (a compiled kernel's launcher) inside ``_scratch_allocator``."""

    def scratched(*args):
        with _scratch_allocator():
            return run(*args)

    return scratched


@contextlib.contextmanager
def _scratch_allocator():
    """torch's allocator as Triton's for the launches inside, unless the user set one."""
    if _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:
        yield
        return
    token = _allocation._allocator.set(_torch_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _hooked(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_stream(device: int) -> int:
    global _current_stream
    _current_stream = driver.active.get_current_stream  # resolve Triton's lazy driver proxy once
    return _current_stream(device)


_FORCE_JIT_RUN = os.environ.get("THERIA_TORCH_LAUNCH", "") == "triton"
# Triton reads TRITON_INTERPRET when it decorates the kernels, so it cannot change afterwards.
_INTERPRETER = is_interpreter()
