"""Launch helpers shared by the op files: dtypes, device facts, preallocated outputs.

Kept small and op-neutral; anything specific to one op lives in that op's file.
"""

from __future__ import annotations

import torch
import triton.language as tl

from theria_kernels._contracts import INTERPRETER_MULTIPROCESSORS, dtype_name, is_interpreter  # noqa: F401 (re-exported)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}



def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions and saved statistics run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype of a torch floating dtype (passed as a ``tl.constexpr``)."""
    return _TL_DTYPES[dtype]


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: sizes persistent grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_MULTIPROCESSORS


def output_buffer(out: torch.Tensor | None, name: str, shape, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A preallocated output checked against what the kernel will write, or a fresh one.

    Kernels write through the data pointer assuming a contiguous layout, so a wrong shape,
    dtype, device or stride is an error here rather than silently wrong memory.
    """
    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"preallocated {name} must be {dtype_name(dtype)} of shape {shape} on {device}, got "
            f"{dtype_name(out.dtype)} of shape {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"preallocated {name} must be contiguous")
    return out


# Launch arithmetic as plain ints: ``triton.next_power_of_2`` and ``triton.cdiv`` are
# constexpr_functions, whose host calls go through Triton's wrapper at ~7 µs each, and every
# launch's geometry takes several (a full-MAML meta-step makes dozens of launches).
def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(x: int, y: int) -> int:
    """⌈x / y⌉ for positive y, as ``triton.cdiv``."""
    return (x + y - 1) // y
