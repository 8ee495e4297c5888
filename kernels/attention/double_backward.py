"""Double backward of attention (the VJP of the backward): one or two row sweeps, then one column sweep."""

from __future__ import annotations

import triton
import triton.language as tl

from theria_kernels.attention._sweeps import BACKWARD_TANGENT, COTANGENTS, ROW_REDUCTIONS, _column_sweep, _row_sweep
from theria_kernels.attention._tiles import (
    _column_program,
    _column_store,
    _load_parts,
    _modifiers,
    _program,
    _scales,
    _sequence,
    _store_parts,
    _row_dot,
    _rows_source,
    _times,
    _zeros_like_parts,
)
from theria_kernels.attention.backward import _row_delta

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
# then sweeps the queries once for cot_k and cot_v, reading sigma and rho. With ONE_SWEEP the row
# kernel sweeps the keys once, from the same quantities written another way (§4.7):
#   S̄ = X − sigma dS − (sigma delta + rho) P,   X = P ∘ (dS̄ ∘ (dP − delta) + dO Ḡvᵀ),
#   rho = Σ_j X − sigma rowsum(dO ∘ O),   dP̄ V = (P ∘ dS̄) V − sigma O:
# it sums X K + dS Ḡk, dS K and P K apart, with sigma and rho alongside, and weighs them at the
# end, which leaves the row terms out of every tile (11 GEMMs a tile pair instead of 13; 9 instead
# of 12 without cot_dO) for two more (BLOCK_M, D) accumulators (``_tuning.ROW_ONE_SWEEP`` says
# where that pays). dS K is the backward's own dQ / scale, so where the caller passes that dQ
# (Dq) the sweep reads it instead: one GEMM and one accumulator fewer (10 GEMMs; 8 without cot_dO).
# With a cap (§8) dS̄ above is g ∘ dR̄ (dR̄ = scale (Ḡq Kᵀ + Q Ḡkᵀ)), and cot_q,
# cot_k read dR = g ∘ dS and R̄ = g ∘ (S̄ − (2/c) t ∘ dR̄ ∘ dS) in place of dS and S̄.
# The tangent of the backward along (ẋ, u̇) (forward over reverse) is H_u ẋ + Jᵀ u̇: the double
# backward with cotangents Ḡ = ẋ (the Hessian is symmetric) plus the backward for u̇, which is
# linear in u. TANGENT fuses the two: with u̇ = (dȮ, dl̇se), delta_u = rowsum(dȮ ∘ O) − dl̇se and
# dS_u = P ∘ (dȮ Vᵀ − delta_u) (§2 for u̇), S̄ + dS_u takes S̄'s place in cot_q and cot_k, and
# cot_v gains Pᵀ dȮ: three GEMMs per tile pair instead of the backward's own launches and sweeps.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_bwd_rows_kernel(
    Q, K, V, Out, D_out, Lse, D_lse, Cot_dq, Cot_dk, Cot_dv, D_out_dot, D_lse_dot, Dq, Cu_q, Cu_k, Slopes,
    Delta, Delta_dot, Cot_q, Cot_d_out, Sigma, Rho,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, softcap: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, EVEN_K: tl.constexpr, VARLEN: tl.constexpr,
    LPT: tl.constexpr, HEAVY_LAST: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, TANGENT: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
    ONE_SWEEP: tl.constexpr,
):
    """cot_q, cot_dO, sigma (= cot_d_lse), rho and the row term delta for one query block of one
    query head, in two sweeps over the keys or, with ONE_SWEEP, in one; without Cot_d_out (None:
    d_out needs no cotangent) the sweep that forms the outputs skips cot_dO's products.
    TANGENT adds Jᵀ u̇ for the second cotangent u̇ = (D_out_dot, D_lse_dot) to cot_q
    (``BACKWARD_TANGENT``) and stores its row term in Delta_dot for the column kernel. TMA loads K
    and V through tensor descriptors in every sweep, as the backward's dQ kernel does. Dq, read by
    the one sweep only, is the backward's dQ = scale · dS K for these inputs (None: not at hand):
    the sweep then takes dS K from it instead of summing it, one GEMM a tile and one (BLOCK_M, D)
    accumulator fewer (§4.7)."""
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
    row_mask = offs_m < len_q

    q = _load_parts(Q + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    d_out = _load_parts(D_out + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    cot_dq = _load_parts(Cot_dq + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_mask, other=float("inf")).to(ACC_DTYPE) * log2e
    delta, row_dot = _row_delta(Out, D_lse, Delta, row_base, q_base, offs_m, d_out, len_q, stride_qt, HEAD_DIM,
                                BLOCK_D0, BLOCK_D1, ACC_DTYPE)
    slope, diagonal, softcap = _modifiers(Slopes, row_base, offs_m, len_q, len_k, softcap, SOFTCAP, ALIBI, True,
                                          BOTTOM_RIGHT, ACC_DTYPE)
    u_dot = None
    delta_u = None
    if TANGENT:
        u_dot = _load_parts(D_out_dot + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        delta_u, _ = _row_delta(Out, D_lse_dot, Delta_dot, row_base, q_base, offs_m, u_dot, len_q, stride_qt, HEAD_DIM,
                                BLOCK_D0, BLOCK_D1, ACC_DTYPE)
    STAGE: tl.constexpr = BACKWARD_TANGENT if TANGENT else COTANGENTS
    k_rows = _rows_source(K, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    v_rows = _rows_source(V, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)

    if ONE_SWEEP:  # sigma, Σ_j X and the three parts of S̄ K, summed alongside (``_row_second_order``)
        zeros, rows = _zeros_like_parts(q, ACC_DTYPE), tl.zeros([BLOCK_M], ACC_DTYPE)
        ds_k = zeros
        if Dq is not None:  # dS K is the backward's dQ / scale: no sum of it (an empty part)
            ds_k = ()
        acc = (rows, rows, zeros, ds_k, zeros)
        if Cot_d_out is not None:
            acc += (zeros,)
        sigma, rho = None, None
    else:
        # Sweep 1: the row reductions sigma, rho and the row vectors P Ḡv.
        sums = (tl.zeros([BLOCK_M], ACC_DTYPE), tl.zeros([BLOCK_M], ACC_DTYPE), _zeros_like_parts(q, ACC_DTYPE))
        sigma, p_ds_bar_dp, p_gv = _row_sweep(
            sums, q, d_out, cot_dq, lse2, None, None, None, None, None, k_rows, v_rows, Cot_dk, Cot_dv, k_base,
            start_m, offs_m, len_q, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal,
            softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, EVEN_K, ROW_REDUCTIONS, SOFTCAP, ALIBI,
            ACC_DTYPE, PRECISION, TMA)
        # 2 delta + d_lse = delta + rowsum(dO ∘ O)
        rho = p_ds_bar_dp - sigma * (delta + row_dot) + _row_dot(d_out, p_gv, ACC_DTYPE)
        # Sweep 2 forms cot_q and cot_dO (which starts at P Ḡv) from the complete row statistics.
        acc = (_zeros_like_parts(q, ACC_DTYPE),)
        if Cot_d_out is not None:
            acc += (p_gv,)

    acc = _row_sweep(
        acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, k_rows, v_rows, Cot_dk, Cot_dv, k_base,
        start_m, offs_m, len_q, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal,
        softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, EVEN_K, STAGE, SOFTCAP, ALIBI, ACC_DTYPE,
        PRECISION, TMA, ONE_SWEEP)

    if ONE_SWEEP:  # the row terms, applied once: S̄ K = X K − sigma (dS K) − (sigma delta + rho) (P K)
        sigma = acc[0]
        rho = acc[1] - sigma * row_dot
        by_p = sigma * delta + rho
        cot_q = ()
        if Dq is not None:
            dq = _load_parts(Dq + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        for part in tl.static_range(len(q)):
            if Dq is not None:  # scale (dS K) = dQ
                cot_q += ((acc[2][part] - by_p[:, None] * acc[4][part]) * sm_scale
                          - sigma[:, None] * dq[part].to(ACC_DTYPE),)
            else:
                cot_q += ((acc[2][part] - sigma[:, None] * acc[3][part] - by_p[:, None] * acc[4][part]) * sm_scale,)
        if Cot_d_out is not None:  # dP̄ V = (P ∘ dS̄) V − sigma O
            out = _load_parts(Out + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            cot_d_out = ()
            for part in tl.static_range(len(q)):
                cot_d_out += (acc[5][part] - sigma[:, None] * out[part].to(ACC_DTYPE),)
    else:
        cot_q = _times(acc[0], sm_scale)
        if Cot_d_out is not None:
            cot_d_out = acc[1]
    tl.store(Sigma + row_base + offs_m, sigma, mask=row_mask)
    tl.store(Rho + row_base + offs_m, rho, mask=row_mask)
    _store_parts(Cot_q + q_base, cot_q, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    if Cot_d_out is not None:
        _store_parts(Cot_d_out + q_base, cot_d_out, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _attn_bwd_bwd_cols_kernel(
    Q, K, V, D_out, Lse, Delta, Sigma, Rho, Cot_dq, Cot_dk, Cot_dv, D_out_dot, Delta_dot, Cu_q, Cu_k, Slopes,
    Cot_k, Cot_v, Part_k, Part_v, Arrivals,
    members, stride_split, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, softcap: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, VARLEN: tl.constexpr, LPT: tl.constexpr, HEAVY_LAST: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, TANGENT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, LATE_BAR: tl.constexpr = False,
):
    """cot_k and cot_v for one key block of one key/value head, summed over the query heads the
    program serves (``_column_program``): the column sweep of the backward's dK/dV kernel at
    STAGE = COTANGENTS, or BACKWARD_TANGENT with TANGENT (reading u̇ = D_out_dot and its row term
    Delta_dot), whole query blocks unmasked, the one partial block masked; TMA loads Q and dO
    through tensor descriptors (``_column_sweep``). LATE_BAR forms each tile's dS̄ after dS's
    product (``_sweeps._second_order_dots``; where: ``_tuning.COLUMNS_LATE_BAR``)."""
    STAGE: tl.constexpr = BACKWARD_TANGENT if TANGENT else COTANGENTS
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
    cot_dk = _load_parts(Cot_dk + k_base, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    cot_dv = _load_parts(Cot_dv + k_base, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    zeros = _zeros_like_parts(k, ACC_DTYPE)
    _, diagonal, softcap = _modifiers(Slopes, first_row_base, offs_n, len_q, len_k, softcap, SOFTCAP, ALIBI, False,
                                      BOTTOM_RIGHT, ACC_DTYPE)
    cot_k, cot_v = _column_sweep(
        zeros, zeros, k, v, cot_dk, cot_dv, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot, Slopes,
        first_q_base, first_row_base, members, start_n, offs_n, t_q, len_q, len_k, stride_qh, stride_qt, band_lo,
        band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED,
        STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA, LATE_BAR=LATE_BAR)
    _column_store(Cot_k, Cot_v, Part_k, Part_v, Arrivals, _times(cot_k, sm_scale), cot_v, k_base, share, tile,
                  group // members, stride_split, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT)

