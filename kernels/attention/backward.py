"""Backward of attention: the row term delta, the row sweep for dQ and the column sweep for dK, dV."""

from __future__ import annotations

import triton
import triton.language as tl

from theria_kernels.attention._tiles import (
    _column_program,
    _column_store,
    _key_range,
    _load_rows,
    _load_tile,
    _mask,
    _probs,
    _program,
    _query_range,
    _scales,
    _sequence,
    _store_tile,
)

# ----------------------------------------------------------------------------------------------
# Backward (§2): delta = rowsum(dO ∘ O) − d_lse, dS = P ∘ (dP − delta), dP = dO Vᵀ,
# dQ = scale · dS K (row sweep), dK = scale · dSᵀ Q and dV = Pᵀ dO (column sweep).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_delta_kernel(Out, D_out, D_lse, Delta, stride_qb, stride_qh, stride_qt, t_q, heads,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_D_LSE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """delta_i = Σ_d dO_id O_id − d_lse_i: the row term shared by every backward kernel. Rows are
    independent, so packed variable-length sequences need no VARLEN mode here: the launch covers
    every row of the packed tensors."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    q_base = (bh // heads).to(tl.int64) * stride_qb + (bh % heads).to(tl.int64) * stride_qh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out = _load_tile(Out + q_base, offs_m, offs_d, t_q, stride_qt, HEAD_DIM, BLOCK_D).to(ACC_DTYPE)
    d_out = _load_tile(D_out + q_base, offs_m, offs_d, t_q, stride_qt, HEAD_DIM, BLOCK_D).to(ACC_DTYPE)
    delta = tl.sum(out * d_out, 1)
    if HAS_D_LSE:
        delta -= tl.load(D_lse + bh * t_q + offs_m, mask=offs_m < t_q, other=0.0).to(ACC_DTYPE)
    tl.store(Delta + bh * t_q + offs_m, delta, mask=offs_m < t_q)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, D_out, Lse, Delta, Cu_q, Cu_k,
    DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BANDED: tl.constexpr, EVEN_K: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch, head, entry = _program(heads, VARLEN)
    q_base, k_base, row_base, len_q, len_k, band_lo, band_hi = _sequence(
        Cu_q, Cu_k, batch, entry, head, group, heads, t_q, t_k, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        if start_m >= len_q:  # the grid is sized for the longest sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)

    q = _load_tile(Q + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
    d_out = _load_tile(D_out + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
    row_mask = offs_m < len_q
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_mask, other=float("inf")).to(ACC_DTYPE) * log2e
    delta = tl.load(Delta + row_base + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)

    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k = _load_tile(K + k_base, offs_k, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        v = _load_tile(V + k_base, offs_k, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE)
        p = _mask(_probs(scores, lse2[:, None], qk_scale), 0.0, offs_m[:, None], offs_k[None, :], start_m, start_n,
                  len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, BANDED or not EVEN_K)
        dp = tl.dot(d_out, tl.trans(v), input_precision=PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    _store_tile(DQ + q_base, dq * sm_scale, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)


@triton.jit
def _full_blocks_end(lo, hi, t_q, BLOCK_M: tl.constexpr):
    """Where a column program's query sweep [lo, hi) (lo a multiple of BLOCK_M) stops having whole
    blocks of rows < t_q. The sweep loops over the whole blocks with unmasked loads, then takes
    the one partial block, if any, with masked ones: per-row masks against a length the compiler
    knows nothing about (a VARLEN sequence's) cost more address and predicate work than the tile's
    arithmetic hides (VARLEN dK/dV was 30–40 % slower than at a fixed length, H100; perf-notes 8)."""
    return tl.maximum(lo, tl.minimum(hi, t_q // BLOCK_M * BLOCK_M))


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, D_out, Lse, Delta, start_m, start_n, offs_n, offs_d, t_q, t_k, stride_qt, band_lo,
               band_hi, qk_scale, log2e, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BANDED: tl.constexpr, ROWS_MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr,
               PRECISION: tl.constexpr):
    """dK, dV accumulated over the query block [start_m, start_m + BLOCK_M); Q, D_out, Lse and
    Delta point at the query head's first row."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q, offs_m, offs_d, t_q, stride_qt, HEAD_DIM, BLOCK_D, ROWS_MASKED)
    d_out = _load_tile(D_out, offs_m, offs_d, t_q, stride_qt, HEAD_DIM, BLOCK_D, ROWS_MASKED)
    lse2 = _load_rows(Lse, offs_m, t_q, float("inf"), ROWS_MASKED).to(ACC_DTYPE) * log2e
    delta = _load_rows(Delta, offs_m, t_q, 0.0, ROWS_MASKED)
    scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    p_t = _mask(_probs(scores_t, lse2[None, :], qk_scale), 0.0, offs_m[None, :], offs_n[:, None], start_m,
                start_n, t_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, BANDED)
    dv += tl.dot(p_t.to(d_out.dtype), d_out, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    dp_t = tl.dot(v, tl.trans(d_out), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, D_out, Lse, Delta, Cu_q, Cu_k,
    DK, DV, Part_k, Part_v, Arrivals,
    members, stride_split, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BANDED: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per key block of one key/value head (or of one share of its query heads, see
    ``_column_program``); it sums over the query heads it serves, so grouped-query gradients need
    no atomics. Tiles are key-major (keys × queries): the transposes of the row kernel's tiles."""
    start_n = tl.program_id(0) * BLOCK_N
    first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi, share, tile = _column_program(
        Cu_q, Cu_k, members, t_q, t_k, heads, group, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        if start_n >= len_k:  # the grid is sized for the longest sequence
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)
    k = _load_tile(K + k_base, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + k_base, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)

    lo, hi = _query_range(start_n, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    full_hi = _full_blocks_end(lo, hi, len_q, BLOCK_M)
    for member in range(members):
        # The group's query heads are adjacent: each one stride_qh elements and T_q row statistics on.
        q_base = first_q_base + tl.cast(member, tl.int64) * stride_qh
        row_base = first_row_base + member * t_q
        for start_m in range(lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q + q_base, D_out + q_base, Lse + row_base, Delta + row_base, start_m,
                                start_n, offs_n, offs_d, len_q, len_k, stride_qt, band_lo, band_hi, qk_scale, log2e,
                                HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BANDED, False, ACC_DTYPE, PRECISION)
        if full_hi < hi:  # the one partial block
            dk, dv = _dkdv_tile(dk, dv, k, v, Q + q_base, D_out + q_base, Lse + row_base, Delta + row_base, full_hi,
                                start_n, offs_n, offs_d, len_q, len_k, stride_qt, band_lo, band_hi, qk_scale, log2e,
                                HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BANDED, True, ACC_DTYPE, PRECISION)
    _column_store(DK, DV, Part_k, Part_v, Arrivals, dk * sm_scale, dv, k_base, share, tile, group // members,
                  stride_split, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D, SPLIT)

