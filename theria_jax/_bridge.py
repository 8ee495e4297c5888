"""The DLPack crossing from JAX into Triton: run a torch-tensor launcher on JAX's own buffers.

The fallback launcher of ``theria_jax._launch`` (the CPU interpreter, jaxlibs without an
XLA-native Triton launch) runs one plan launch through :func:`run_launch`; :func:`triton_call`
runs any torch-tensor launcher the same way. Both stage an XLA custom call
(``jax.experimental.buffer_callback``) whose Python callback receives the device buffers XLA
allocated for the inputs and the outputs, wraps each one as a torch tensor with DLPack (no copy),
and calls the launcher, which writes the outputs in place. On a GPU the launcher runs on the CUDA
stream XLA runs the program on, so nothing synchronises with the host and nothing is copied.
Outside ``jax.jit`` the same custom call is compiled once per shape and run eagerly.
docs/design/jax_bridge.md states the contract.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import jax
import torch
from jax.experimental.buffer_callback import buffer_callback


def triton_call(
    launch: Callable[..., object],
    *arrays: jax.Array,
    out_shapes: Sequence[jax.ShapeDtypeStruct],
    **static,
) -> tuple[jax.Array, ...]:
    """Run ``launch(*torch_inputs, *torch_outputs, **static)`` on zero-copy views of JAX buffers.

    Arguments:
        launch: writes every output in place; its return value is ignored. It receives the
            inputs' and the preallocated outputs' buffers as torch tensors with the JAX arrays'
            shapes, dtypes and (row-major) layouts, on the arrays' device.
        arrays: the inputs; the launcher must not write to them.
        out_shapes: shape and dtype of each output. Outputs start uninitialised: the launcher
            must write every element.
        static: hashable keyword arguments passed through to ``launch`` (e.g. an
            ``AttentionParams``); ``launch`` and ``static`` together key JAX's compilation cache.
    Returns:
        The outputs, one ``jax.Array`` per entry of ``out_shapes``.

    Works under ``jax.jit`` and eagerly, on CPU (Triton interpreter, CPU tensors) and on GPU.
    It has no differentiation rules; under ``jax.vmap`` it runs the launcher once per batch
    element, so ops define their own batching rule instead (see ``theria_jax._primitives``).
    """
    callback = _callback(launch, tuple(sorted(static.items())))
    call = buffer_callback(callback, tuple(out_shapes), vmap_method="sequential")
    return tuple(call(*arrays))


@functools.cache
def _callback(launch: Callable[..., object], static_items: tuple) -> Callable[..., None]:
    # One callback object per (launch, static): JAX keys compiled programs on the callback, so a
    # fresh closure per call would recompile on every eager call.
    return functools.partial(_run, launch, dict(static_items))


# XLA's CPU runtime may run independent callbacks on two threads at once, and Triton's interpreter
# patches triton.language globally while a kernel runs: one launch at a time on the CPU.
_CPU_LAUNCH = threading.Lock()


def _run(launch, static, context, outputs, *inputs) -> None:
    tensors = [torch.from_dlpack(buffer) for buffer in (*inputs, *outputs)]
    device = tensors[0].device
    if device.type != "cuda":
        with _CPU_LAUNCH:
            launch(*tensors, **static)
        return
    # XLA enqueues the rest of the program on its own stream: launch there, without a sync.
    stream = torch.cuda.ExternalStream(context.stream, device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        launch(*tensors, **static)


def run_launch(launch, operands, out_avals, zeroed) -> list[jax.Array]:
    """Run one ``theria_kernels._plan.Launch`` on JAX arrays: ``operands`` are the buffers it reads
    (``launch.reads_buffers``), the results the buffers it writes, typed by ``out_avals``; those
    flagged in ``zeroed`` start at zero."""
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals)
    call = buffer_callback(_launch_callback(launch, tuple(zeroed)), shapes, vmap_method="sequential")
    return list(call(*operands))


@functools.cache
def _launch_callback(launch, zeroed: tuple) -> Callable[..., None]:
    return functools.partial(_run, functools.partial(_launch_buffers, launch, zeroed), {})


def _launch_buffers(launch, zeroed, *tensors) -> None:
    # The kernels address memory through the plan's strides alone, so the views' shapes do not matter.
    from theria_kernels._launch_torch import launch_one

    names = (*launch.reads_buffers, *launch.writes_buffers)
    buffers = dict(zip(names, tensors))
    for name, zero in zip(launch.writes_buffers, zeroed):
        if zero:
            buffers[name].zero_()
    launch_one(launch, buffers)
