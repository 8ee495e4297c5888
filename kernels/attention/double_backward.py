"""Double backward of attention (the VJP of the backward): two row sweeps, then one column sweep."""

from __future__ import annotations

import triton
import triton.language as tl

from theria_kernels.attention._tiles import (
    _column_program,
    _column_store,
    _key_range,
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
# Double backward (§4): the VJP of (Q, K, V, dO, d_lse) ↦ (dQ, dK, dV) for cotangents
# (Ḡq, Ḡk, Ḡv). With dS̄ = scale (Ḡq Kᵀ + Q Ḡkᵀ) it needs two row reductions over all keys,
#   sigma_i = Σ_j P_ij dS̄_ij                        (= the cotangent of d_lse)
#   rho_i   = Σ_j P_ij P̄_ij = Σ_j P_ij dS̄_ij dP_ij − sigma_i (2 delta_i + d_lse_i) + dO_i · (P Ḡv)_i
# before any output tile can be formed; then, per tile,
#   dS = P ∘ (dP − delta),  P̄ = dS̄ ∘ (dP − delta) + dO Ḡvᵀ − sigma dP,
#   S̄ = P ∘ (P̄ − rho),     dP̄ = P ∘ (dS̄ − sigma),
#   cot_q = scale (S̄ K + dS Ḡk),  cot_k = scale (S̄ᵀ Q + dSᵀ Ḡq),  cot_v = dP̄ᵀ dO,
#   cot_dO = P Ḡv + dP̄ V.
# The row kernel sweeps the keys twice (reductions, then cot_q and cot_dO); the column kernel
# then sweeps the queries once for cot_k and cot_v, reading sigma and rho.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _second_order_tile(p, dp, ds_bar, do_gv, delta, sigma, rho):
    """dS, S̄ and dP̄ of one tile (§4); the row statistics arrive broadcast to the tile's
    orientation, so row tiles and column (transposed) tiles share this code."""
    ds = p * (dp - delta)
    p_bar = ds_bar * (dp - delta) + do_gv - sigma * dp
    s_bar = p * (p_bar - rho)
    dp_bar = p * (ds_bar - sigma)
    return ds, s_bar, dp_bar


@triton.jit
def _row_tile(q, d_out, cot_dq, lse2, K, V, Cot_dk, Cot_dv, start_m, start_n, offs_m, offs_k, offs_d, t_k,
              stride_kt, band_lo, band_hi, sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BANDED: tl.constexpr, MASKED: tl.constexpr,
              ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The key-side tiles of one key block and the recomputed P, dP = dO Vᵀ and
    dS̄ = scale (Ḡq Kᵀ + Q Ḡkᵀ) that both sweeps of the row kernel start from."""
    k = _load_tile(K, offs_k, offs_d, t_k, stride_kt, HEAD_DIM, BLOCK_D)
    v = _load_tile(V, offs_k, offs_d, t_k, stride_kt, HEAD_DIM, BLOCK_D)
    cot_dk = _load_tile(Cot_dk, offs_k, offs_d, t_k, stride_kt, HEAD_DIM, BLOCK_D)
    cot_dv = _load_tile(Cot_dv, offs_k, offs_d, t_k, stride_kt, HEAD_DIM, BLOCK_D)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    p = _mask(_probs(scores, lse2[:, None], qk_scale), 0.0, offs_m[:, None], offs_k[None, :], start_m, start_n, t_k,
              band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, MASKED)
    dp = tl.dot(d_out, tl.trans(v), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    ds_bar = tl.dot(cot_dq, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    ds_bar = (ds_bar + tl.dot(q, tl.trans(cot_dk), input_precision=PRECISION, out_dtype=ACC_DTYPE)) * sm_scale
    return k, v, cot_dk, cot_dv, p, dp, ds_bar


@triton.jit
def _attn_bwd_bwd_rows_kernel(
    Q, K, V, D_out, Lse, Delta, D_lse, Cot_dq, Cot_dk, Cot_dv, Cu_q, Cu_k,
    Cot_q, Cot_d_out, Sigma, Rho,
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
    row_mask = offs_m < len_q
    masked: tl.constexpr = BANDED or not EVEN_K

    q = _load_tile(Q + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
    d_out = _load_tile(D_out + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
    cot_dq = _load_tile(Cot_dq + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_mask, other=float("inf")).to(ACC_DTYPE) * log2e
    delta = tl.load(Delta + row_base + offs_m, mask=row_mask, other=0.0)
    d_lse = tl.load(D_lse + row_base + offs_m, mask=row_mask, other=0.0).to(ACC_DTYPE)
    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)

    # Sweep 1: the row reductions sigma, rho and the row vectors P Ḡv.
    sigma = tl.zeros([BLOCK_M], ACC_DTYPE)
    p_ds_bar_dp = tl.zeros([BLOCK_M], ACC_DTYPE)
    p_gv = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k, v, cot_dk, cot_dv, p, dp, ds_bar = _row_tile(
            q, d_out, cot_dq, lse2, K + k_base, V + k_base, Cot_dk + k_base, Cot_dv + k_base, start_m, start_n,
            offs_m, offs_k, offs_d, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BANDED, masked, ACC_DTYPE, PRECISION)
        p_ds_bar = p * ds_bar
        sigma += tl.sum(p_ds_bar, 1)
        p_ds_bar_dp += tl.sum(p_ds_bar * dp, 1)
        p_gv += tl.dot(p.to(cot_dv.dtype), cot_dv, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    rho = p_ds_bar_dp - sigma * (2.0 * delta + d_lse) + tl.sum(d_out.to(ACC_DTYPE) * p_gv, 1)
    tl.store(Sigma + row_base + offs_m, sigma, mask=row_mask)
    tl.store(Rho + row_base + offs_m, rho, mask=row_mask)

    # Sweep 2: cot_q and cot_dO, now that every row statistic is complete.
    cot_q = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    cot_d_out = p_gv
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k, v, cot_dk, cot_dv, p, dp, ds_bar = _row_tile(
            q, d_out, cot_dq, lse2, K + k_base, V + k_base, Cot_dk + k_base, Cot_dv + k_base, start_m, start_n,
            offs_m, offs_k, offs_d, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, BANDED, masked, ACC_DTYPE, PRECISION)
        do_gv = tl.dot(d_out, tl.trans(cot_dv), input_precision=PRECISION, out_dtype=ACC_DTYPE)
        ds, s_bar, dp_bar = _second_order_tile(
            p, dp, ds_bar, do_gv, delta[:, None], sigma[:, None], rho[:, None])
        cot_q += tl.dot(s_bar.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        cot_q += tl.dot(ds.to(cot_dk.dtype), cot_dk, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        cot_d_out += tl.dot(dp_bar.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    _store_tile(Cot_q + q_base, cot_q * sm_scale, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
    _store_tile(Cot_d_out + q_base, cot_d_out, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_bwd_cols_kernel(
    Q, K, V, D_out, Lse, Delta, Sigma, Rho, Cot_dq, Cot_dk, Cot_dv, Cu_q, Cu_k,
    Cot_k, Cot_v, Part_k, Part_v, Arrivals,
    members, stride_split, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BANDED: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SPLIT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """cot_k and cot_v for one key block of one key/value head, summed over the query heads the
    program serves (``_column_program``)."""
    start_n = tl.program_id(0) * BLOCK_N
    first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi, share, tile = _column_program(
        Cu_q, Cu_k, members, t_q, t_k, heads, group, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        if start_n >= len_k:  # the grid is sized for the longest sequence
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)
    k = _load_tile(K + k_base, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + k_base, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    cot_dk = _load_tile(Cot_dk + k_base, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    cot_dv = _load_tile(Cot_dv + k_base, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    cot_k = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    cot_v = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)

    lo, hi = _query_range(start_n, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    for member in range(members):
        # The group's query heads are adjacent: each one stride_qh elements and T_q row statistics on.
        q_base = first_q_base + tl.cast(member, tl.int64) * stride_qh
        row_base = first_row_base + member * t_q
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_mb
            row_mask = offs_m < len_q
            row = row_base + offs_m
            q = _load_tile(Q + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
            d_out = _load_tile(D_out + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
            cot_dq = _load_tile(Cot_dq + q_base, offs_m, offs_d, len_q, stride_qt, HEAD_DIM, BLOCK_D)
            lse2 = tl.load(Lse + row, mask=row_mask, other=float("inf")).to(ACC_DTYPE) * log2e
            delta = tl.load(Delta + row, mask=row_mask, other=0.0)
            sigma = tl.load(Sigma + row, mask=row_mask, other=0.0)
            rho = tl.load(Rho + row, mask=row_mask, other=0.0)
            scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            p_t = _mask(_probs(scores_t, lse2[None, :], qk_scale), 0.0, offs_m[None, :], offs_n[:, None], start_m,
                        start_n, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, BANDED)
            dp_t = tl.dot(v, tl.trans(d_out), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            ds_bar_t = tl.dot(k, tl.trans(cot_dq), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            ds_bar_t = (ds_bar_t + tl.dot(cot_dk, tl.trans(q), input_precision=PRECISION, out_dtype=ACC_DTYPE)) * sm_scale
            do_gv_t = tl.dot(cot_dv, tl.trans(d_out), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            ds_t, s_bar_t, dp_bar_t = _second_order_tile(
                p_t, dp_t, ds_bar_t, do_gv_t, delta[None, :], sigma[None, :], rho[None, :])
            cot_k += tl.dot(s_bar_t.to(q.dtype), q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            cot_k += tl.dot(ds_t.to(cot_dq.dtype), cot_dq, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            cot_v += tl.dot(dp_bar_t.to(d_out.dtype), d_out, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    _column_store(Cot_k, Cot_v, Part_k, Part_v, Arrivals, cot_k * sm_scale, cot_v, k_base, share, tile,
                  group // members, stride_split, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D, SPLIT)

