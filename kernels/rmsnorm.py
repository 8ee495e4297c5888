"""Fused RMSNorm: forward (with the forward-mode JVP folded in), backward, double backward and
second-order forward (jvp of jvp): every second derivative in one sweep over the rows.

Reading order: tuning and layout, the row helpers, the kernels (forward/JVP, backward, double
backward, second-order forward, the column sum that finishes every weight-shaped reduction),
the launch functions.
No autograd here: ``theria_torch`` and ``theria_jax`` wrap the launchers. The equations are
derived in docs/theory/rmsnorm_derivatives.md (§ numbers below).

Per row of N features: r = 1/sqrt(mean(x²) + eps) (``rstd``, saved by the forward), x̂ = r·x,
y = w ∘ x̂. Everything rests on one symmetric matrix, the Jacobian of x ↦ x̂,
J = r·(I − x̂ x̂ᵀ/N), applied to a row vector v as ``_project``: J v = r·(v − x̂·mean(v ∘ x̂)).

Grouped weights: ``weight`` has shape (*G, N) and ``x`` has shape (*G, *R, N); the rows of group
g use weight[g], and weight-shaped outputs (dweight, cot_weight) are summed over each group's
rows. The public API uses G = () (one weight for every row); vmap over a weight folds the mapped
dimension into G, so a batch of weights is still one launch.

Precision: loads are cast to ``ACC`` (float32, float64 for float64 inputs); rstd and the
per-program partial sums stay in ``ACC``; outputs are cast to their buffer's dtype on store.
Weight-shaped reductions never use atomics: every program writes its own partial row and
``_column_sum_kernel`` adds them in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from theria_kernels._common import (
    SUPPORTED_DTYPES,
    accumulator_dtype,
    cdiv,
    dtype_name,
    multiprocessor_count,
    next_power_of_2,
    output_buffer,
    tl_dtype,
)

# A whole row lives in registers (one sweep reads each input once), so N is bounded by what a
# 32-warp program can hold; beyond it the reference backend applies.
MAX_N = 65536

BACKENDS = ("triton_full_fused", "reference")
# The adapters' words for what the kernels cannot do, shared so torch and JAX say the same.
BEYOND_SECOND_ORDER = (
    "rmsnorm(backend='triton_full_fused') provides every derivative up to second order (any "
    "composition of two of grad, jvp, vjp); third derivatives are not implemented. Use "
    "backend='reference'."
)


@dataclass(frozen=True)
class SweepTuning:
    """Launch shape of one kind of row sweep.

    ``tile_elements``: a program handles ``max(1, tile_elements // BLOCK_N)`` rows at once, so
    short rows are packed into tiles as large as one long row.
    ``elements_per_thread``: num_warps = tile / (32 · elements_per_thread), clamped to [1, 32].
    ``programs_per_sm``: 0 for one tile per program; otherwise a persistent grid of about this
    many programs per multiprocessor, each looping over tiles. Kernels with a weight-shaped
    reduction need it: every program writes one N-long partial row, so fewer programs mean less
    partial-sum traffic.
    ``loop_stages``: software-pipelining depth of the persistent loop (``tl.range``'s num_stages):
    above 1 the next tiles' loads are issued while the current tile is reduced, so a program keeps
    more bytes in flight than one load-reduce-store round; lowered where the staged tiles would not
    fit in half the device's shared memory.
    """

    tile_elements: int
    elements_per_thread: int
    programs_per_sm: int = 0
    loop_stages: int = 1


@dataclass(frozen=True)
class RMSNormTuning:
    """Launch shapes, exposed so ``scripts/bench_rmsnorm.py`` can sweep them: ``row_local`` for
    the forward (with JVP) and second-order forward, ``reducing`` for the backward and double
    backward. The defaults are the best of that sweep on an H100 at (2, 1024, 4096) bfloat16
    (docs/benchmarks.md): a small tile per program for the row-local kernels; for the reducing
    ones one program per multiprocessor over two-row tiles, three tiles in flight."""

    row_local: SweepTuning = SweepTuning(tile_elements=4096, elements_per_thread=32)
    reducing: SweepTuning = SweepTuning(tile_elements=8192, elements_per_thread=32, programs_per_sm=1,
                                        loop_stages=3)


DEFAULT_TUNING = RMSNormTuning()


@dataclass(frozen=True)
class _Layout:
    """How a (*G, *R, N) input maps onto programs for one ``SweepTuning``: per group, tiles of
    ``tile_rows`` rows, ``programs`` programs (one per tile unless the grid is persistent)."""

    n_groups: int
    rows_per_group: int
    n_cols: int
    block_n: int
    tile_rows: int
    num_warps: int
    programs: int
    loop_stages: int

    @property
    def grid(self) -> tuple[int]:
        return (self.n_groups * self.programs,)

    def launch(self) -> dict:
        """The launch keywords every rmsnorm kernel takes."""
        return dict(TILE_ROWS=self.tile_rows, BLOCK_N=self.block_n, num_warps=self.num_warps)


def _layout(x: torch.Tensor, weight: torch.Tensor, sweep: SweepTuning, staged_tensors: int = 0) -> _Layout:
    """``staged_tensors``: how many x-shaped inputs the persistent loop pipelines (they bound
    ``loop_stages`` by shared memory)."""
    group_shape = tuple(weight.shape[:-1])
    if (x.ndim < weight.ndim or tuple(x.shape[: len(group_shape)]) != group_shape
            or x.shape[-1] != weight.shape[-1]):
        raise ValueError(
            f"rmsnorm kernels: weight of shape {tuple(weight.shape)} = (*G, N) needs x of shape "
            f"(*G, ..., N), got {tuple(x.shape)}"
        )
    n_cols = x.shape[-1]
    if not 1 <= n_cols <= MAX_N:
        raise ValueError(f"rmsnorm kernels: need 1 <= N <= {MAX_N}, got N = {n_cols}")
    n_groups = math.prod(group_shape)
    rows_per_group = x.numel() // n_cols // n_groups if n_groups else 0
    block_n = next_power_of_2(n_cols)
    tile_rows = min(max(1, sweep.tile_elements // block_n), next_power_of_2(max(rows_per_group, 1)))
    num_warps = min(32, max(1, tile_rows * block_n // (32 * sweep.elements_per_thread)))
    tiles = cdiv(rows_per_group, tile_rows)
    programs = tiles
    if sweep.programs_per_sm:  # persistent: the budget is shared among the groups
        budget = sweep.programs_per_sm * multiprocessor_count(x.device)
        programs = max(1, min(tiles, cdiv(budget, max(n_groups, 1))))
    stage_bytes = tile_rows * block_n * x.element_size() * staged_tensors
    stages = max(1, min(sweep.loop_stages, _shared_memory(x.device) // 2 // max(stage_bytes, 1)))
    return _Layout(n_groups, rows_per_group, n_cols, block_n, tile_rows, next_power_of_2(num_warps),
                   programs, stages)


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use (no limit in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return 2**62


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
    supported = [dtype_name(d) for d in SUPPORTED_DTYPES]
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


def _check_like(name: str, tensor: torch.Tensor, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Tangents and cotangents must match their primal exactly; returned contiguous."""
    if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(
            f"rmsnorm kernels: {name} must match {like_name} ({like.dtype}, {tuple(like.shape)}, "
            f"{like.device}), got ({tensor.dtype}, {tuple(tensor.shape)}, {tensor.device})"
        )
    return tensor.contiguous()


def _check_rstd(rstd: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    acc = accumulator_dtype(x.dtype)
    if rstd.shape != x.shape[:-1] or rstd.dtype != acc or rstd.device != x.device:
        raise ValueError(
            f"rmsnorm kernels: rstd must be the forward's ({acc}, {tuple(x.shape[:-1])}, {x.device}), "
            f"got ({rstd.dtype}, {tuple(rstd.shape)}, {rstd.device})"
        )
    return rstd.contiguous()


# ----------------------------------------------------------------------------------------------
# Row helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(group, tile, rows_per_group, n_cols, TILE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flat offsets of one (TILE_ROWS, BLOCK_N) tile, the global row indices and the masks.
    int64 because rows · N passes 2³¹ on large activations."""
    rows = tile * TILE_ROWS + tl.arange(0, TILE_ROWS)
    row_mask = rows < rows_per_group
    global_rows = group.to(tl.int64) * rows_per_group + rows
    cols = tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    offs = global_rows[:, None] * n_cols + cols[None, :]
    return offs, global_rows, row_mask, mask


@triton.jit
def _load(ptr, offs, mask, ACC: tl.constexpr):
    """Out-of-range entries read as 0, which leaves every row sum and every product unchanged."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _row_mean(u, n_cols):
    """mean over the N real features of each row, kept as a (rows, 1) column."""
    return (tl.sum(u, axis=1) / n_cols)[:, None]


@triton.jit
def _project(v, x_hat, rstd, n_cols):
    """J v = r·(v − x̂·mean(v ∘ x̂)), J the (symmetric) Jacobian of x ↦ x̂ (§1)."""
    return rstd[:, None] * (v - x_hat * _row_mean(v * x_hat, n_cols))


@triton.jit
def _curvature(u, d, x_hat, rstd, n_cols):
    """D(J u)[d], the derivative of J u along d; symmetric in (u, d) (§1):
    r²·[(3·mean(u∘x̂)·mean(d∘x̂) − mean(u∘d))·x̂ − mean(d∘x̂)·u − mean(u∘x̂)·d]."""
    u_mean = _row_mean(u * x_hat, n_cols)
    d_mean = _row_mean(d * x_hat, n_cols)
    r2 = (rstd * rstd)[:, None]
    return r2 * ((3.0 * u_mean * d_mean - _row_mean(u * d, n_cols)) * x_hat - d_mean * u - u_mean * d)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, x_dot_ptr, w_dot_ptr, y_ptr, rstd_ptr, y_dot_ptr,
    rows_per_group, n_cols, programs_per_group, eps: tl.float64,
    ACC: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_X_DOT: tl.constexpr, HAS_W_DOT: tl.constexpr,
):
    """y = w ∘ x̂ and rstd (§0); with a tangent also ẏ = w ∘ J ẋ + ẇ ∘ x̂ (§2), same sweep.
    ``eps`` is passed as float64 so float64 runs see it unrounded; it only touches the per-row
    mean, so the float64 add costs nothing in the float32 kernels."""
    pid = tl.program_id(0)
    group = pid // programs_per_group
    cols = tl.arange(0, BLOCK_N)
    w_offs = group.to(tl.int64) * n_cols + cols
    w = tl.load(w_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    if HAS_W_DOT:
        w_dot = tl.load(w_dot_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    for tile in range(pid % programs_per_group, tl.cdiv(rows_per_group, TILE_ROWS), programs_per_group):
        offs, global_rows, row_mask, mask = _tile_offsets(group, tile, rows_per_group, n_cols,
                                                          TILE_ROWS, BLOCK_N)
        x = _load(x_ptr, offs, mask, ACC)
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)).to(ACC)
        x_hat = x * rstd[:, None]
        tl.store(y_ptr + offs, (w * x_hat).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + global_rows, rstd, mask=row_mask)
        if HAS_X_DOT or HAS_W_DOT:
            y_dot = tl.zeros_like(x_hat)
            if HAS_X_DOT:
                y_dot += w * _project(_load(x_dot_ptr, offs, mask, ACC), x_hat, rstd, n_cols)
            if HAS_W_DOT:
                y_dot += w_dot * x_hat
            tl.store(y_dot_ptr + offs, y_dot.to(y_dot_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_partial_ptr,
    rows_per_group, n_cols, programs_per_group,
    ACC: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    """dx = J (w ∘ dy) and this program's share of dweight = Σ_rows dy ∘ x̂ (§3)."""
    pid = tl.program_id(0)
    group = pid // programs_per_group
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + group.to(tl.int64) * n_cols + cols, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in tl.range(pid % programs_per_group, tl.cdiv(rows_per_group, TILE_ROWS), programs_per_group,
                         num_stages=LOOP_STAGES):
        offs, global_rows, row_mask, mask = _tile_offsets(group, tile, rows_per_group, n_cols,
                                                          TILE_ROWS, BLOCK_N)
        rstd = tl.load(rstd_ptr + global_rows, mask=row_mask, other=0.0)
        x_hat = _load(x_ptr, offs, mask, ACC) * rstd[:, None]
        dy = _load(dy_ptr, offs, mask, ACC)
        dx = _project(w * dy, x_hat, rstd, n_cols)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=cols < n_cols)


@triton.jit
def _double_backward_kernel(
    x_ptr, w_ptr, rstd_ptr, dy_ptr, cot_dx_ptr, cot_dw_ptr, cot_x_ptr, cot_w_partial_ptr, cot_dy_ptr,
    rows_per_group, n_cols, programs_per_group,
    ACC: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
    HAS_COT_DX: tl.constexpr, HAS_COT_DW: tl.constexpr,
):
    """VJP of (x, w, dy) ↦ (dx, dweight) for cotangents a = cot_dx, b = cot_dweight (§4):
        cot_dy = w ∘ J a + b ∘ x̂
        cot_w  = Σ_rows dy ∘ J a
        cot_x  = D(J g)[a] + J (b ∘ dy),   g = w ∘ dy.
    Every term needs only row means, so one sweep suffices."""
    pid = tl.program_id(0)
    group = pid // programs_per_group
    cols = tl.arange(0, BLOCK_N)
    w_offs = group.to(tl.int64) * n_cols + cols
    w = tl.load(w_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    if HAS_COT_DW:
        b = tl.load(cot_dw_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    cot_w = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in tl.range(pid % programs_per_group, tl.cdiv(rows_per_group, TILE_ROWS), programs_per_group,
                         num_stages=LOOP_STAGES):
        offs, global_rows, row_mask, mask = _tile_offsets(group, tile, rows_per_group, n_cols,
                                                          TILE_ROWS, BLOCK_N)
        rstd = tl.load(rstd_ptr + global_rows, mask=row_mask, other=0.0)
        x_hat = _load(x_ptr, offs, mask, ACC) * rstd[:, None]
        dy = _load(dy_ptr, offs, mask, ACC)
        cot_x = tl.zeros_like(x_hat)
        cot_dy = tl.zeros_like(x_hat)
        if HAS_COT_DX:
            a = _load(cot_dx_ptr, offs, mask, ACC)
            j_a = _project(a, x_hat, rstd, n_cols)
            cot_dy += w * j_a
            cot_w += tl.sum(dy * j_a, axis=0)
            cot_x += _curvature(w * dy, a, x_hat, rstd, n_cols)
        if HAS_COT_DW:
            cot_dy += b * x_hat
            cot_x += _project(b * dy, x_hat, rstd, n_cols)
        tl.store(cot_x_ptr + offs, cot_x.to(cot_x_ptr.dtype.element_ty), mask=mask)
        tl.store(cot_dy_ptr + offs, cot_dy.to(cot_dy_ptr.dtype.element_ty), mask=mask)
    tl.store(cot_w_partial_ptr + pid.to(tl.int64) * n_cols + cols, cot_w, mask=cols < n_cols)


@triton.jit
def _forward_second_kernel(
    x_ptr, w_ptr, rstd_ptr, x_dot_ptr, w_dot_ptr, x_dot2_ptr, w_dot2_ptr, out_ptr,
    rows_per_group, n_cols, programs_per_group,
    ACC: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_X_DOT: tl.constexpr, HAS_W_DOT: tl.constexpr, HAS_X_DOT2: tl.constexpr, HAS_W_DOT2: tl.constexpr,
):
    """Second-order forward derivative along ṗ = (ẋ, ẇ) and δ = (δx, δw) (§5):
        f''[ṗ, δ] = w ∘ D(J ẋ)[δx] + δw ∘ J ẋ + ẇ ∘ J δx."""
    pid = tl.program_id(0)
    group = pid // programs_per_group
    cols = tl.arange(0, BLOCK_N)
    w_offs = group.to(tl.int64) * n_cols + cols
    w = tl.load(w_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    if HAS_W_DOT:
        w_dot = tl.load(w_dot_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    if HAS_W_DOT2:
        w_dot2 = tl.load(w_dot2_ptr + w_offs, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    for tile in range(pid % programs_per_group, tl.cdiv(rows_per_group, TILE_ROWS), programs_per_group):
        offs, global_rows, row_mask, mask = _tile_offsets(group, tile, rows_per_group, n_cols,
                                                          TILE_ROWS, BLOCK_N)
        rstd = tl.load(rstd_ptr + global_rows, mask=row_mask, other=0.0)
        x_hat = _load(x_ptr, offs, mask, ACC) * rstd[:, None]
        out = tl.zeros_like(x_hat)
        if HAS_X_DOT:
            x_dot = _load(x_dot_ptr, offs, mask, ACC)
            if HAS_W_DOT2:
                out += w_dot2 * _project(x_dot, x_hat, rstd, n_cols)
        if HAS_X_DOT2:
            x_dot2 = _load(x_dot2_ptr, offs, mask, ACC)
            if HAS_W_DOT:
                out += w_dot * _project(x_dot2, x_hat, rstd, n_cols)
            if HAS_X_DOT:
                out += w * _curvature(x_dot, x_dot2, x_hat, rstd, n_cols)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_sum_kernel(partial_ptr, out_ptr, n_partials, n_cols,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[g, :] = Σ_p partial[g, p, :] in a fixed order: the second stage of every
    weight-shaped reduction. Grid: (groups, column blocks)."""
    group = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    base = partial_ptr + group * n_partials * n_cols
    total = tl.zeros([BLOCK_C], dtype=partial_ptr.dtype.element_ty)
    for start in range(0, n_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        total += tl.sum(tl.load(base + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + group * n_cols + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------


def _sum_partials(partial: torch.Tensor, out: torch.Tensor) -> None:
    """Reduce (G, P, N) per-program partial rows into out (*G, N), contiguous.

    The partials were just written and sit in L2, so latency, not bandwidth, bounds this kernel:
    a program loads a tile of up to 512 partial rows (a persistent grid of a few programs per
    multiprocessor fits in one round of loads) by 8192 / rows columns, which for N = 4096 and
    132 partials gives 128 programs of 32 columns."""
    n_groups, n_partials, n_cols = partial.shape
    block_p = min(next_power_of_2(n_partials), 512)
    block_c = min(next_power_of_2(n_cols), max(1, 8192 // block_p))
    grid = (n_groups, cdiv(n_cols, block_c))
    _column_sum_kernel[grid](partial, out, n_partials, n_cols, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                    y: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
                    tuning: RMSNormTuning = DEFAULT_TUNING):
    """y = x · rsqrt(mean(x², -1) + eps) · weight, and the per-row rstd.

    Arguments:
        x: (*G, ..., N), float16/bfloat16/float32/float64.
        weight: (*G, N), x's dtype (G = () for one weight shared by all rows).
        eps: added to mean(x²) inside the square root.
        y, rstd: optional preallocated outputs (contiguous), written in place.
    Returns:
        (y, rstd): y like x; rstd of shape x.shape[:-1] in float32 (float64 for float64 x).
    """
    return rmsnorm_jvp(x, weight, None, None, eps, y=y, rstd=rstd, tuning=tuning)[:2]


def rmsnorm_jvp(x: torch.Tensor, weight: torch.Tensor, x_dot: torch.Tensor | None,
                weight_dot: torch.Tensor | None, eps: float, *,
                y: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
                y_dot: torch.Tensor | None = None, tuning: RMSNormTuning = DEFAULT_TUNING):
    """Forward and forward-mode derivative in one sweep.

    Arguments:
        x, weight, eps: as in ``rmsnorm_forward``.
        x_dot: tangent of x (x's shape), or None for zero.
        weight_dot: tangent of weight (weight's shape), or None for zero.
        y, rstd, y_dot: optional preallocated outputs. y_dot is only written (and only
        returned non-None) when a tangent is given.
    Returns:
        (y, rstd, y_dot) with y_dot = ∂y/∂x · x_dot + ∂y/∂weight · weight_dot, like x.
    """
    layout = _layout(x, weight, tuning.row_local)
    acc = accumulator_dtype(x.dtype)
    has_tangent = x_dot is not None or weight_dot is not None
    y = output_buffer(y, "y", x.shape, x.dtype, x.device)
    rstd = output_buffer(rstd, "rstd", x.shape[:-1], acc, x.device)
    y_dot = output_buffer(y_dot, "y_dot", x.shape, x.dtype, x.device) if has_tangent else None
    x_dot = _check_like("x_dot", x_dot, x, "x") if x_dot is not None else None
    weight_dot = _check_like("weight_dot", weight_dot, weight, "weight") if weight_dot is not None else None
    if layout.grid[0]:
        x, weight = x.contiguous(), weight.contiguous()
        _forward_kernel[layout.grid](
            x, weight, x_dot if x_dot is not None else x, weight_dot if weight_dot is not None else weight,
            y, rstd, y_dot if has_tangent else y,
            layout.rows_per_group, layout.n_cols, layout.programs, float(eps),
            ACC=tl_dtype(acc), HAS_X_DOT=x_dot is not None, HAS_W_DOT=weight_dot is not None, **layout.launch(),
        )
    return y, rstd, y_dot


def rmsnorm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, *,
                     dx: torch.Tensor | None = None, dweight: torch.Tensor | None = None,
                     tuning: RMSNormTuning = DEFAULT_TUNING):
    """Reverse-mode derivative (VJP) of rmsnorm with cotangent dy.

    Arguments:
        x, weight: the forward's inputs. rstd: the forward's saved rstd (x.shape[:-1]).
        dy: cotangent of y (x's shape and dtype).
        dx, dweight: optional preallocated outputs.
    Returns:
        (dx, dweight): dx like x; dweight like weight (summed over each group's rows).
    """
    layout = _layout(x, weight, tuning.reducing, staged_tensors=2)
    acc = accumulator_dtype(x.dtype)
    dy = _check_like("dy", dy, x, "x")
    rstd = _check_rstd(rstd, x)
    dx = output_buffer(dx, "dx", x.shape, x.dtype, x.device)
    dweight = output_buffer(dweight, "dweight", weight.shape, weight.dtype, weight.device)
    if layout.n_groups == 0:
        return dx, dweight
    partial = torch.empty((layout.n_groups, layout.programs, layout.n_cols), dtype=acc, device=x.device)
    _backward_kernel[layout.grid](
        x.contiguous(), weight.contiguous(), rstd, dy, dx, partial,
        layout.rows_per_group, layout.n_cols, layout.programs,
        ACC=tl_dtype(acc), LOOP_STAGES=layout.loop_stages, **layout.launch(),
    )
    _sum_partials(partial, dweight)
    return dx, dweight


def rmsnorm_backward_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                              cot_dx: torch.Tensor | None, cot_dweight: torch.Tensor | None, *,
                              cot_x: torch.Tensor | None = None, cot_weight: torch.Tensor | None = None,
                              cot_dy: torch.Tensor | None = None, tuning: RMSNormTuning = DEFAULT_TUNING):
    """VJP of the backward, (x, weight, dy) ↦ (dx, dweight), with cotangents (cot_dx, cot_dweight).

    rstd is treated as the function of x it is (total derivative), so no cotangent flows to it.

    Arguments:
        x, weight, rstd, dy: as in ``rmsnorm_backward``.
        cot_dx: cotangent of dx (x's shape), or None for zero.
        cot_dweight: cotangent of dweight (weight's shape), or None for zero.
        cot_x, cot_weight, cot_dy: optional preallocated outputs.
    Returns:
        (cot_x, cot_weight, cot_dy), shaped like x, weight and dy.
    """
    layout = _layout(x, weight, tuning.reducing, staged_tensors=2 + (cot_dx is not None))
    acc = accumulator_dtype(x.dtype)
    dy = _check_like("dy", dy, x, "x")
    rstd = _check_rstd(rstd, x)
    cot_dx = _check_like("cot_dx", cot_dx, x, "x") if cot_dx is not None else None
    cot_dweight = _check_like("cot_dweight", cot_dweight, weight, "weight") if cot_dweight is not None else None
    cot_x = output_buffer(cot_x, "cot_x", x.shape, x.dtype, x.device)
    cot_weight = output_buffer(cot_weight, "cot_weight", weight.shape, weight.dtype, weight.device)
    cot_dy = output_buffer(cot_dy, "cot_dy", x.shape, x.dtype, x.device)
    if layout.n_groups == 0:
        return cot_x, cot_weight, cot_dy
    partial = torch.empty((layout.n_groups, layout.programs, layout.n_cols), dtype=acc, device=x.device)
    _double_backward_kernel[layout.grid](
        x.contiguous(), weight.contiguous(), rstd, dy,
        cot_dx if cot_dx is not None else dy, cot_dweight if cot_dweight is not None else weight,
        cot_x, partial, cot_dy,
        layout.rows_per_group, layout.n_cols, layout.programs,
        ACC=tl_dtype(acc), LOOP_STAGES=layout.loop_stages, HAS_COT_DX=cot_dx is not None,
        HAS_COT_DW=cot_dweight is not None, **layout.launch(),
    )
    _sum_partials(partial, cot_weight)
    return cot_x, cot_weight, cot_dy


def rmsnorm_forward_second(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                           x_dot: torch.Tensor | None, weight_dot: torch.Tensor | None,
                           x_dot2: torch.Tensor | None, weight_dot2: torch.Tensor | None, *,
                           y_ddot: torch.Tensor | None = None, tuning: RMSNormTuning = DEFAULT_TUNING):
    """Second directional derivative f''(x, weight)[(x_dot, weight_dot), (x_dot2, weight_dot2)].

    Forward over forward (jvp of jvp) needs it; symmetric in the two directions.

    Arguments:
        x, weight, rstd: as in ``rmsnorm_backward``.
        x_dot, x_dot2: tangents of x (x's shape), or None for zero.
        weight_dot, weight_dot2: tangents of weight (weight's shape), or None for zero.
        y_ddot: optional preallocated output.
    Returns:
        y_ddot, like x.
    """
    layout = _layout(x, weight, tuning.row_local)
    rstd = _check_rstd(rstd, x)
    x_dot, x_dot2 = (_check_like(name, t, x, "x") if t is not None else None
                     for name, t in (("x_dot", x_dot), ("x_dot2", x_dot2)))
    weight_dot, weight_dot2 = (_check_like(name, t, weight, "weight") if t is not None else None
                               for name, t in (("weight_dot", weight_dot), ("weight_dot2", weight_dot2)))
    y_ddot = output_buffer(y_ddot, "y_ddot", x.shape, x.dtype, x.device)
    if layout.grid[0]:
        _forward_second_kernel[layout.grid](
            x.contiguous(), weight.contiguous(), rstd,
            *(t if t is not None else x for t in (x_dot, weight_dot, x_dot2, weight_dot2)), y_ddot,
            layout.rows_per_group, layout.n_cols, layout.programs,
            ACC=tl_dtype(accumulator_dtype(x.dtype)), HAS_X_DOT=x_dot is not None, HAS_W_DOT=weight_dot is not None,
            HAS_X_DOT2=x_dot2 is not None, HAS_W_DOT2=weight_dot2 is not None, **layout.launch(),
        )
    return y_ddot
