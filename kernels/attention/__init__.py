"""Fused scaled-dot-product attention: forward, forward-mode JVP, second-order forward, backward and
double backward as Triton kernels, and the launch plans that describe every call of them.

Reading order: ``_tiles`` (loads, stores, masks, ranges shared by every sweep), ``_sweeps``
(the backward's row and column sweeps, one tile function each, specialised by a constexpr STAGE),
``forward`` (forward, JVP and second-order forward: one kernel), ``backward`` (row term, dQ row
sweep, dK/dV column sweep), ``double_backward`` (one or two row sweeps, one column sweep), ``_tuning`` (a tile
table per GPU architecture, docs/design/tuning.md), ``_launch`` (grids, the plans). Framework-neutral:
neither torch nor JAX is imported here. The torch-tensor launchers are
``theria_kernels.attention.torch_launchers``; JAX runs the same plans through ``theria_jax``.
Equations: docs/theory/attention_derivatives.md.
"""

from theria_kernels._contracts import (
    BACKENDS,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    SUPPORTED_DTYPES,
    THIRD_ORDER_ERROR,
    UNBOUNDED,
    VMAP_CU_SEQLENS_ERROR,
    AttentionParams,
    default_scale,
    row_stat_dtype_name,
    validate_attention_args,
    validate_cu_seqlens,
    validate_cu_seqlens_values,
    validate_dropout,
)
from theria_kernels.attention._launch import (
    AttentionCall,
    Device,
    backward_backward_plan,
    backward_plan,
    forward_plan,
)

__all__ = [
    "AttentionParams", "AttentionCall", "Device", "forward_plan", "backward_plan", "backward_backward_plan",
    "validate_attention_args", "validate_cu_seqlens", "validate_cu_seqlens_values", "validate_dropout",
    "default_scale", "row_stat_dtype_name", "BACKENDS", "SUPPORTED_DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM",
    "UNBOUNDED", "VMAP_CU_SEQLENS_ERROR", "THIRD_ORDER_ERROR",
]
