"""JAX's launchers of ``theria_kernels`` plans: one primitive per kernel launch, lowered either to
jaxlib's own Triton launcher or to the DLPack bridge.

* **XLA-native** (GPU): the kernel is compiled once per launch specialisation at lowering time and
  emitted as the custom call ``triton_kernel_call_ffi`` that jaxlib's CUDA plugin registers
  (``jax._src.lib.gpu_triton``). XLA runs it like any of its own kernels: no Python at run time,
  no host synchronisation, and command buffers (CUDA graphs) may capture it.
* **Bridge** (the CPU interpreter, or a jaxlib without that target): ``theria_jax._bridge`` runs the
  torch launcher on DLPack views of XLA's buffers from a ``buffer_callback``.

``THERIA_JAX_LAUNCH=xla`` or ``=bridge`` forces one (``xla`` raises where it is unavailable);
unset, the XLA-native path is taken wherever it is available. :func:`launcher` reports the choice.

The XLA-native call carries Triton's own machine code (the cubin it compiled, from its on-disk
cache when warm) beside the PTX, as the ``module_image`` of jaxlib's ``TritonKernel`` message:
jaxlibs that read it load the cubin instead of running ptxas on the PTX in every process (0.2-8 s
per kernel on the CPU, the dearest for the float32 second-order kernels); older ones ignore the
field and compile the PTX as before. ``THERIA_JAX_CUBIN=0`` leaves the cubin out.
``THERIA_JAX_PTX=0`` (with the cubin in, on jaxlib 0.11.2 or later, which launches from the image)
sends a one-line stand-in for the PTX and no TTIR: such a jaxlib rebuilds the kernel from its
message at every execution outside a command buffer, copying both strings (0.1-0.35 MB for
theria's kernels) and hashing the PTX as its image cache's key, and the stand-in (the PTX's
digest) keeps that key one per kernel. It passes on the H200; opt-in until a timing tells it
apart from the machine's noise (docs/perf-notes.md item 20).

Buffers between launches (delta, rho, the grouped-query partials) are XLA values like any other;
buffers that must start at zero are zeroed by jaxlib's launcher (or created as zeros when no
launch writes them).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import mlir

from theria_kernels._contracts import is_interpreter
from theria_kernels._plan import Buffer, Plan, compile_for_target

_FFI_TARGET = "triton_kernel_call_ffi"


def _gpu_triton():
    """jaxlib's Triton launcher module when its CUDA plugin provides it, else None."""
    try:
        from jax._src.lib import gpu_triton
    except ImportError:
        return None
    return gpu_triton if getattr(gpu_triton, "_cuda_triton", None) is not None else None


def launcher() -> str:
    """``"xla"`` or ``"bridge"``: how kernels launch in this process (``THERIA_JAX_LAUNCH``
    forces one; otherwise XLA-native wherever jaxlib provides its Triton target and JAX runs on
    a GPU outside the interpreter)."""
    forced = os.environ.get("THERIA_JAX_LAUNCH", "")
    if forced not in ("", "xla", "bridge"):
        raise ValueError(f"THERIA_JAX_LAUNCH must be 'xla' or 'bridge', got {forced!r}")
    available = not is_interpreter() and jax.default_backend() == "gpu" and _gpu_triton() is not None
    if forced == "xla" and not available:
        raise RuntimeError("THERIA_JAX_LAUNCH=xla, but XLA-native Triton launches need JAX on a CUDA GPU with "
                           "jaxlib's Triton target (jax._src.lib.gpu_triton) and TRITON_INTERPRET unset; "
                           "unset THERIA_JAX_LAUNCH to use the DLPack bridge")
    return "xla" if (forced == "xla" or (forced == "" and available)) else "bridge"


def _aval(spec, avals: dict) -> ShapedArray:
    """The JAX type of an allocated buffer: like an input array (its shape, its layout being
    row-major), or the allocation's own contiguous shape."""
    if spec.like is not None:
        like = avals[spec.like]
        return ShapedArray(like.shape, like.dtype if spec.dtype is None else jnp.dtype(spec.dtype))
    return ShapedArray(spec.shape, jnp.dtype(spec.dtype))


def run_plan(plan: Plan, arrays: dict) -> list[jax.Array]:
    """Run ``plan`` on JAX arrays (name -> array for each of ``plan.inputs``; q- and k-like
    arrays (B, T, H, D), row statistics (B, H, T_q)) and return its outputs in order."""
    avals = {name: ShapedArray(a.shape, a.dtype) for name, a in arrays.items()}
    wrong = [f"{name} is {avals[name].dtype}, the plan reads {dtype}" for name, dtype in plan.inputs.items()
             if avals[name].dtype != jnp.dtype(dtype)]
    if wrong:  # an adapter bug, caught at trace time rather than as a kernel reading the wrong width
        raise TypeError(f"theria launch plan: {'; '.join(wrong)}")
    if any(arrays[name].size == 0 for name in plan.skip_if_empty):
        return [jnp.zeros(_aval(plan.allocations[name], avals).shape, _aval(plan.allocations[name], avals).dtype)
                for name in plan.outputs]
    buffers = dict(arrays)
    written = {name for launch in plan.launches for name in launch.writes_buffers}
    for name, spec in plan.allocations.items():
        if name not in written:  # only zeroed buffers go unwritten: absent cotangents
            aval = _aval(spec, avals)
            buffers[name] = jnp.zeros(aval.shape, aval.dtype)
    for launch in plan.launches:
        out_avals = tuple(_aval(plan.allocations[name], avals) for name in launch.writes_buffers)
        zeroed = tuple(plan.allocations[name].zeroed for name in launch.writes_buffers)
        results = launch_p.bind(*(buffers[name] for name in launch.reads_buffers), launch=launch,
                                out_avals=out_avals, zeroed=zeroed)
        buffers.update(zip(launch.writes_buffers, results))
    return [buffers[name] for name in plan.outputs]


# ----------------------------------------------------------------------------------------------
# One primitive per launch
# ----------------------------------------------------------------------------------------------

launch_p = Primitive("theria_triton_launch")
launch_p.multiple_results = True
launch_p.def_abstract_eval(lambda *operands, launch, out_avals, zeroed: list(out_avals))


def _bridge_impl(*operands, launch, out_avals, zeroed):
    from theria_jax._bridge import run_launch  # torch is needed on this path only

    return run_launch(launch, operands, out_avals, zeroed)


# Eager calls compile the launch like any primitive, so they take the same lowering as jitted ones.
launch_p.def_impl(functools.partial(dispatch.apply_primitive, launch_p))


def _lowering(ctx, *operands, launch, out_avals, zeroed):
    if launcher() == "bridge":
        return mlir.lower_fun(_bridge_impl, multiple_results=True)(
            ctx, *operands, launch=launch, out_avals=out_avals, zeroed=zeroed)
    call, scratch_bytes = _kernel_call(launch, tuple(a.dtype for a in ctx.avals_in), out_avals, zeroed,
                                       compute_capability())
    if not scratch_bytes:
        return jax.ffi.ffi_lowering(_FFI_TARGET, api_version=4)(ctx, *operands, opaque=call)
    # The kernel's global scratch (its TMA descriptors) is one more result of the call, a buffer XLA
    # allocates like any other, so that the call can sit in XLA's command buffers, which cannot
    # hold jaxlib's own per-launch allocation (``_kernel_call`` passes it last).
    with_scratch = ctx.replace(avals_out=[*ctx.avals_out, ShapedArray((scratch_bytes,), jnp.uint8)])
    return jax.ffi.ffi_lowering(_FFI_TARGET, api_version=4)(with_scratch, *operands, opaque=call)[:-1]


mlir.register_lowering(launch_p, _lowering)


# ----------------------------------------------------------------------------------------------
# The XLA-native launch: compile at lowering time, emit jaxlib's Triton custom call
# ----------------------------------------------------------------------------------------------


@functools.cache
def compute_capability() -> int:
    """The first GPU's compute capability as an int (9.0 -> 90)."""
    device = jax.devices("gpu")[0]
    major, minor = str(device.compute_capability).split(".")
    return int(major) * 10 + int(minor)


def _kernel_call(launch, in_dtypes, out_avals, zeroed, capability: int) -> tuple[bytes, int]:
    """The serialized ``TritonKernelCall`` of one launch: its compiled kernel (cached on the launch
    per capability and buffer dtypes), its grid, and one parameter per non-constexpr argument;
    and the bytes of global scratch the kernel needs (0: none).

    A kernel that builds tensor descriptors needs Triton's global scratch, which Triton's launchers
    pass after the kernel's own arguments. It gets one more array parameter, last, for a buffer
    the lowering adds to the call's results: jaxlib's launcher then appends its own (null) scratch
    and profiling pointers after it, which land in the kernel's profile-scratch slot (unused
    without profiling) and past its parameters."""
    gpu_triton = _gpu_triton()
    dtypes = dict(zip(launch.reads_buffers, in_dtypes))
    dtypes.update((name, aval.dtype) for name, aval in zip(launch.writes_buffers, out_avals))
    key = ("xla", capability, tuple(sorted((n, str(d)) for n, d in dtypes.items())))
    found = launch.compiled.get(key)
    if found is None:
        found = launch.compiled[key] = _compile(launch, dtypes, capability, gpu_triton)
    kernel, specialization, module_image, ptx_key, scratch = found
    zero_bytes = {name: aval.size * aval.dtype.itemsize
                  for name, aval, zero in zip(launch.writes_buffers, out_avals, zeroed) if zero}
    parameters = []
    for value, (kind, _) in zip(launch.values, specialization):
        if kind == "constexpr":
            continue
        if isinstance(value, Buffer):
            parameters.append(gpu_triton.create_array_parameter(zero_bytes.get(value.name, 0), 16))
        else:
            parameters.append(gpu_triton.create_scalar_parameter(value, kind))
    grid = launch.grid
    scratch_bytes = 0
    if scratch:  # per program: (bytes, alignment, CTAs); jaxlib checks the buffer's alignment at launch
        scratch_bytes = scratch[0] * scratch[2] * math.prod(grid)
        parameters.append(gpu_triton.create_array_parameter(0, scratch[1]))
    call = gpu_triton.TritonKernelCall(kernel, grid[0], grid[1], grid[2], parameters)
    serialized = call.to_proto(getattr(launch.kernel, "__name__", "theria_kernel"), b"")
    if os.environ.get("THERIA_JAX_CUBIN", "1") != "0":
        stand_in = os.environ.get("THERIA_JAX_PTX", "1") == "0" and _launches_from_image()
        serialized = with_module_image(serialized, module_image, ptx_key if stand_in else None)
    return zlib.compress(serialized), scratch_bytes


def _compile(launch, dtypes: dict, capability: int, gpu_triton):
    """Compile ``launch``'s kernel for this GPU with Triton's own compiler, specialised as
    ``JITFunction.run`` would specialise it (XLA's buffers are 16-byte aligned)."""
    names = {name: np.dtype(dtype).name for name, dtype in dtypes.items()}
    compiled, specialization = compile_for_target(launch, names, capability)
    metadata = compiled.metadata
    if getattr(metadata, "profile_scratch_size", 0):
        raise NotImplementedError(
            f"{launch.kernel.__name__} needs a profile scratch buffer, which theria's XLA-native launch does not "
            "provide; set THERIA_JAX_LAUNCH=bridge")
    arguments = [metadata.name, launch.num_warps, getattr(metadata, "num_ctas", 1), metadata.shared,
                 compiled.asm["ptx"], compiled.asm["ttir"], capability]
    # Global scratch (the TMA descriptors): a buffer of the call's own (``_kernel_call``).
    size = getattr(metadata, "global_scratch_size", 0)
    scratch = (size, max(metadata.global_scratch_align, 16), getattr(metadata, "num_ctas", 1)) if size else None
    try:
        triton_kernel = gpu_triton.TritonKernel(*arguments)
    except TypeError:  # jaxlibs whose TritonKernel takes no num_ctas
        triton_kernel = gpu_triton.TritonKernel(*arguments[:2], *arguments[3:])
    ptx_key = (f"// theria: {metadata.name} for sm_{capability} runs from its module image; "
               f"PTX sha256 {hashlib.sha256(compiled.asm['ptx'].encode()).hexdigest()}\n").encode()
    image = module_image_proto(compiled.asm["cubin"], metadata.name, metadata.shared)
    return triton_kernel, specialization, image, ptx_key, scratch


def _launches_from_image() -> bool:
    """Whether the installed jaxlib launches a kernel from its module image without reading its
    PTX (the field arrived with jaxlib 0.11.2; jaxlib-side ahead-of-time compilation, August 2026)."""
    from jax._src.lib import version

    return tuple(version[:3]) >= (0, 11, 2)


# jaxlib/gpu/triton.proto's field numbers, for the one edit made to the serialized call: the
# bindings build a TritonKernel from PTX only, and this adds the cubin Triton already produced.
_ANY_CALL_KERNEL_CALL = 1  # TritonAnyKernelCall.kernel_call
_KERNEL_CALL_KERNEL = 1  # TritonKernelCall.kernel
_KERNEL_PTX, _KERNEL_TTIR = 4, 5  # TritonKernel.ptx, .ttir
_KERNEL_MODULE_IMAGE = 11  # TritonKernel.module_image: ModuleImageProto
_IMAGE_OBJECT_FILE, _IMAGE_KERNEL_NAME, _IMAGE_SHARED_MEM_BYTES = 1, 2, 3  # ModuleImageProto's fields


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def module_image_proto(cubin: bytes, kernel_name: str, shared_mem_bytes: int) -> bytes:
    """A serialized ``TritonKernel.module_image`` field: the kernel's machine code, its name and its
    dynamic shared memory (the keys under which jaxlib caches a loaded image)."""
    image = (_bytes_field(_IMAGE_OBJECT_FILE, cubin) + _bytes_field(_IMAGE_KERNEL_NAME, kernel_name.encode())
             + _varint(_IMAGE_SHARED_MEM_BYTES << 3) + _varint(shared_mem_bytes))
    return _bytes_field(_KERNEL_MODULE_IMAGE, image)


def _edit_field(message: bytes, number: int, edit) -> bytes:
    """``message`` with each length-delimited field ``number`` replaced by ``edit`` of its payload
    (left out where ``edit`` returns None); every other field copied as it is."""
    out, at = bytearray(), 0
    while at < len(message):
        start = at
        tag, at = _read_varint(message, at)
        wire_type = tag & 7
        if wire_type == 0:
            _, at = _read_varint(message, at)
        elif wire_type == 1:
            at += 8
        elif wire_type == 5:
            at += 4
        elif wire_type == 2:
            length, payload = _read_varint(message, at)
            at = payload + length
            if tag >> 3 == number:
                edited = edit(message[payload:at])
                if edited is not None:
                    out += _bytes_field(number, edited)
                continue
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type} in jaxlib's TritonAnyKernelCall")
        out += message[start:at]
    return bytes(out)


def with_module_image(any_kernel_call: bytes, module_image: bytes, ptx_key: bytes | None = None) -> bytes:
    """A serialized ``TritonAnyKernelCall`` (``TritonKernelCall.to_proto``) whose kernel also carries
    ``module_image`` (:func:`module_image_proto`); with ``ptx_key``, whose PTX is that stand-in and
    whose TTIR is left out (the module docstring says when). Protobuf parsers take a message's
    fields in any order, so fields are appended to the kernel's and the enclosing lengths
    re-encoded."""

    def kernel(message: bytes) -> bytes:
        if ptx_key is not None:
            for number in (_KERNEL_PTX, _KERNEL_TTIR):
                message = _edit_field(message, number, lambda _: None)
            message += _bytes_field(_KERNEL_PTX, ptx_key)
        return message + module_image

    return _edit_field(any_kernel_call, _ANY_CALL_KERNEL_CALL,
                       lambda call: _edit_field(call, _KERNEL_CALL_KERNEL, kernel))
