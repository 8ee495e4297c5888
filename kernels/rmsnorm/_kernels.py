"""RMSNorm's Triton kernels: forward (with the forward-mode JVP folded in), backward, double
backward, second-order forward (jvp of jvp), and the column sum that finishes every
weight-shaped reduction. Framework-neutral; the equations are derived in
docs/theory/rmsnorm_derivatives.md (§ numbers below).

Per row of N features: r = 1/sqrt(mean(x²) + eps) (``rstd``, saved by the forward), x̂ = r·x,
y = w ∘ x̂. Everything rests on one symmetric matrix, the Jacobian of x ↦ x̂,
J = r·(I − x̂ x̂ᵀ/N), applied to a row vector v as ``_project``: J v = r·(v − x̂·mean(v ∘ x̂)).
Every kernel takes the pointers it reads before the pointers it writes (``theria_kernels._plan``).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
