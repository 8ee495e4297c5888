"""Fused RMSNorm: forward (with the forward-mode JVP folded in), backward, double backward and
second-order forward (jvp of jvp): every second derivative in one sweep over the rows.

Reading order: ``_kernels`` (row helpers, the kernels, the column sum that finishes every
weight-shaped reduction), ``_launch`` (tuning, row layout, the plans). Framework-neutral:
neither torch nor JAX is imported here; the torch-tensor launchers are
``theria_kernels.rmsnorm.torch_launchers`` and JAX runs the same plans through ``theria_jax``.
Equations: docs/theory/rmsnorm_derivatives.md.
"""

from __future__ import annotations

from theria_kernels._contracts import SUPPORTED_DTYPES, dtype_name
from theria_kernels.rmsnorm._launch import (
    DEFAULT_TUNING,
    MAX_N,
    RMSNormCall,
    RMSNormDevice,
    RMSNormTuning,
    SweepTuning,
    backward_backward_plan,
    backward_plan,
    forward_plan,
    forward_second_plan,
)

BACKENDS = ("triton_full_fused", "reference")
# The adapters' words for what the kernels cannot do, shared so torch and JAX say the same.
BEYOND_SECOND_ORDER = (
    "rmsnorm(backend='triton_full_fused') provides every derivative up to second order (any "
    "composition of two of grad, jvp, vjp); third derivatives are not implemented. Use "
    "backend='reference'."
)


def check_arguments(x_shape, x_dtype, weight_shape, weight_dtype, eps, *, backend: str) -> None:
    """The public ``rmsnorm``'s checks on metadata, shared by ``theria_torch`` and ``theria_jax``
    so that both raise the same messages. Dtypes may be torch or numpy/JAX dtypes; the fused
    backend adds the kernels' own limit on N.

    Raises:
        TypeError: unsupported or mixed dtypes, non-numeric eps.
        ValueError: unknown backend, x without a feature dimension, N out of range,
            weight not (N,), eps < 0.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rmsnorm: unknown backend {backend!r}; choose one of {BACKENDS}")
    fused = backend == "triton_full_fused"
    supported = list(SUPPORTED_DTYPES)
    for name, dtype in (("x", x_dtype), ("weight", weight_dtype)):
        if dtype_name(dtype) not in supported:
            raise TypeError(f"rmsnorm: {name} has dtype {dtype_name(dtype)}; supported: {', '.join(supported)}")
    if dtype_name(weight_dtype) != dtype_name(x_dtype):
        raise TypeError(
            f"rmsnorm: weight has dtype {dtype_name(weight_dtype)} but x has dtype {dtype_name(x_dtype)}; "
            "cast one so that both match"
        )
    if len(x_shape) == 0:
        raise ValueError("rmsnorm: x must have shape (..., N), got a scalar")
    n_cols = x_shape[-1]
    if n_cols < 1:
        raise ValueError(f"rmsnorm: x of shape {tuple(x_shape)} has no features to normalise (N = 0)")
    if fused and n_cols > MAX_N:
        raise ValueError(
            f"rmsnorm: N = {n_cols} exceeds the fused kernels' limit of {MAX_N} features; "
            "use backend=\"reference\""
        )
    if tuple(weight_shape) != (n_cols,):
        raise ValueError(
            f"rmsnorm: weight must have shape (N,) = ({n_cols},) to match x of shape {tuple(x_shape)}, "
            f"got {tuple(weight_shape)}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"rmsnorm: eps must be a Python float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"rmsnorm: eps must be >= 0, got {eps}")


__all__ = [
    "BACKENDS", "BEYOND_SECOND_ORDER", "MAX_N", "DEFAULT_TUNING", "RMSNormTuning", "SweepTuning", "RMSNormCall",
    "RMSNormDevice", "check_arguments", "forward_plan", "backward_plan", "backward_backward_plan",
    "forward_second_plan",
]
