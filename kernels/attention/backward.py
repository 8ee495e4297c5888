"""Backward of attention: the row sweep for dQ (which also stores the row term delta) and the column
sweep for dK, dV."""

from __future__ import annotations

import triton
import triton.language as tl

from theria_kernels.attention._sweeps import GRADIENT, _column_sweep, _row_sweep
from theria_kernels.attention._tiles import (
    _column_program,
    _column_store,
    _load_parts,
    _modifiers,
    _program,
    _row_dot,
    _rows_source,
    _scales,
    _sequence,
    _store_parts,
    _times,
    _zeros_like_parts,
)

# ----------------------------------------------------------------------------------------------
# Backward (§2): delta = rowsum(dO ∘ O) − d_lse, dS = P ∘ (dP − delta), dP = dO Vᵀ,
# dQ = scale · dS K and delta (row sweep), dK = scale · dSᵀ Q and dV = Pᵀ dO (column sweep, after it).
# With a cap (§8) dS becomes the scores' dR = g ∘ dS in dQ and dK. Tiles with a head-dim axis are
# tuples of head-dim parts (BLOCK_D0, BLOCK_D1: ``_launch.head_dim_parts``).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_delta(Out, D_lse, Delta, row_base, q_base, offs_m, d_out, len_q, stride_qt, HEAD_DIM: tl.constexpr,
               BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(delta, r) with r_i = Σ_d dO_id O_id and delta_i = r_i − d_lse_i, for a row block whose dO
    tile the caller holds; delta is stored for the column sweep that follows. The row kernels
    compute it on the way: one (BLOCK_M, D) load of O, no launch of its own. ``D_lse`` None means
    d_lse = 0."""
    out = _load_parts(Out + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    row_dot = _row_dot(out, d_out, ACC_DTYPE)
    row_mask = offs_m < len_q
    delta = row_dot
    if D_lse is not None:
        delta -= tl.load(D_lse + row_base + offs_m, mask=row_mask, other=0.0).to(ACC_DTYPE)
    tl.store(Delta + row_base + offs_m, delta, mask=row_mask)
    return delta, row_dot


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Out, D_out, Lse, D_lse, Cu_q, Cu_k, Slopes,
    Delta, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, softcap: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, EVEN_K: tl.constexpr, VARLEN: tl.constexpr,
    LPT: tl.constexpr, HEAVY_LAST: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """dQ for one query block of one query head, and the block's row term delta (``_row_delta``).
    Tiles with a head-dim axis are tuples of head-dim parts (``_load_parts``). TMA loads K and V
    through tensor descriptors, as the forward kernel does (``AttentionCall.tma``)."""
    block, batch, head, entry = _program(heads, VARLEN, LPT, HEAVY_LAST)[:4]
    start_m = block * BLOCK_M
    q_base, k_base, row_base, len_q, len_k, band_lo, band_hi = _sequence(
        Cu_q, Cu_k, batch, entry, head, group, heads, t_q, t_k, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        if start_m >= len_q:  # the grid is sized for the longest sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)

    q = _load_parts(Q + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    d_out = _load_parts(D_out + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    row_mask = offs_m < len_q
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_mask, other=float("inf")).to(ACC_DTYPE) * log2e
    delta, _ = _row_delta(Out, D_lse, Delta, row_base, q_base, offs_m, d_out, len_q, stride_qt, HEAD_DIM, BLOCK_D0,
                          BLOCK_D1, ACC_DTYPE)
    slope, diagonal, softcap = _modifiers(Slopes, row_base, offs_m, len_q, len_k, softcap, SOFTCAP, ALIBI, True,
                                          BOTTOM_RIGHT, ACC_DTYPE)
    k_rows = _rows_source(K, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    v_rows = _rows_source(V, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    dq = _row_sweep((_zeros_like_parts(q, ACC_DTYPE),), q, d_out, None, lse2, delta, None, None, None, None, k_rows,
                    v_rows, None, None, k_base, start_m, offs_m, len_q, len_k, stride_kt, band_lo, band_hi, sm_scale,
                    qk_scale, log2e, slope, diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED,
                    EVEN_K, GRADIENT, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA)[0]
    _store_parts(DQ + q_base, _times(dq, sm_scale), offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, D_out, Lse, Delta, Cu_q, Cu_k, Slopes,
    DK, DV, Part_k, Part_v, Arrivals,
    members, stride_split, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, softcap: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, VARLEN: tl.constexpr, LPT: tl.constexpr, HEAVY_LAST: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, HALVES: tl.constexpr = False,
):
    """One program per key block of one key/value head (or of one share of its query heads, see
    ``_column_program``); it sums over the query heads it serves, so grouped-query gradients need
    no atomics. Tiles are key-major (keys × queries): the transposes of the row kernel's tiles.
    TMA loads Q and dO through tensor descriptors (``_column_sweep``); HALVES takes each whole
    query block as two halves (``_sweeps._column_tile``)."""
    block, first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi, share, tile = _column_program(
        Cu_q, Cu_k, members, t_q, t_k, heads, group, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT, LPT, HEAVY_LAST)
    start_n = block * BLOCK_N
    if VARLEN:
        if start_n >= len_k:  # the grid is sized for the longest sequence
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)
    k = _load_parts(K + k_base, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    v = _load_parts(V + k_base, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    zeros = _zeros_like_parts(k, ACC_DTYPE)
    _, diagonal, softcap = _modifiers(Slopes, first_row_base, offs_n, len_q, len_k, softcap, SOFTCAP, ALIBI, False,
                                      BOTTOM_RIGHT, ACC_DTYPE)
    dk, dv = _column_sweep(zeros, zeros, k, v, None, None, Q, D_out, None, Lse, Delta, None, None, None, None, Slopes,
                           first_q_base, first_row_base, members, start_n, offs_n, t_q, len_q, len_k, stride_qh,
                           stride_qt, band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM,
                           BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, GRADIENT, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION,
                           TMA, HALVES)
    _column_store(DK, DV, Part_k, Part_v, Arrivals, _times(dk, sm_scale), dv, k_base, share, tile, group // members,
                  stride_split, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT)

