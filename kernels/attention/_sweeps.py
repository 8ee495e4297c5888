"""The backward sweeps (§2, §4), built from ``_tiles``. A row sweep runs over the key blocks a
query block sees (dQ-like outputs), a column sweep over the query blocks a key block is seen by
(dK/dV-like outputs); each has one tile function (``_row_tile``, ``_column_tile``), specialised by
a constexpr STAGE (what the tile accumulates) and by whether its block needs masks, which the
backward and the double backward share. Column tiles are key-major (keys × queries): the row
tiles' transposes. Notation as in ``_tiles``; equations in docs/theory/attention_derivatives.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from theria_kernels.attention._tiles import (
    _add_dot,
    _block,
    _dot_t,
    _full_blocks_end,
    _key_range,
    _load_parts,
    _load_rows,
    _mask,
    _query_range,
    _rows_source,
    _scores,
)

# STAGE of ``_row_tile`` and ``_column_tile``: the backward's gradients (§2: dQ, or dK and dV),
# the double backward's row reductions (§4: sigma, the terms of rho, P Ḡv; row sweeps only), the
# double backward's outputs (cot_q and cot_dO, or cot_k and cot_v), or those outputs plus the
# backward for a second cotangent u̇ = (dȮ, dl̇se): H_u ẋ + Jᵀ u̇, the tangent of the backward
# (forward over reverse, theory §5), whose Jᵀ u̇ adds the backward's dS for u̇ to S̄ and Pᵀ dȮ to
# cot_v.
#
# A row sweep of the double backward runs either as two sweeps (ROW_REDUCTIONS for sigma and rho,
# then COTANGENTS or BACKWARD_TANGENT, which read them) or, with ONE_SWEEP, as one sweep at
# COTANGENTS or BACKWARD_TANGENT that sums sigma, rho and the outputs' parts together
# (``_row_second_order``; where each runs: ``_tuning.ROW_ONE_SWEEP``).
GRADIENT = tl.constexpr(0)
ROW_REDUCTIONS = tl.constexpr(1)
COTANGENTS = tl.constexpr(2)
BACKWARD_TANGENT = tl.constexpr(3)


@triton.jit
def _add_dot_t(acc, a, b, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc + a bᵀ over the whole head dim of two split tiles (``_dot_t`` into an accumulator)."""
    for part in tl.static_range(len(a)):
        acc = tl.dot(a[part], tl.trans(b[part]), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _bar_scores(bar_a, bar_b, bar_c, bar_d, sm_scale, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dS̄ = scale (bar_a bar_bᵀ + bar_c bar_dᵀ) (§4.3) over two pairs of split tiles: scale (Ḡq Kᵀ +
    Q Ḡkᵀ) in a row tile, scale (K Ḡqᵀ + Ḡk Qᵀ) in a column (transposed) tile."""
    return _add_dot_t(_dot_t(bar_a, bar_b, PRECISION, ACC_DTYPE), bar_c, bar_d, PRECISION, ACC_DTYPE) * sm_scale


@triton.jit
def _broadcast(rows, ROW_TILE: tl.constexpr):
    """Row statistics along a row tile's rows, or along a column (transposed) tile's columns."""
    if ROW_TILE:
        broadcast = rows[:, None]
    else:
        broadcast = rows[None, :]
    return broadcast


@triton.jit
def _probabilities(dot, q_idx, k_idx, lse2, slope, diagonal, sm_scale, qk_scale, log2e, softcap, start_m, start_n, t_k,
                   band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BANDED: tl.constexpr,
                   MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """(P, t) of a tile from its Q Kᵀ product ``dot`` (``_scores``, then P = exp2(s − lse2) masked
    by ``_mask``), for row tiles and column (transposed) tiles alike: q_idx, k_idx, lse2 and slope
    come broadcast like ``dot``."""
    scores, cap = _scores(dot, q_idx, k_idx, slope, diagonal, sm_scale, qk_scale, log2e, softcap, SOFTCAP, ALIBI)
    p = _mask(tl.exp2(scores - lse2), 0.0, q_idx, k_idx, start_m, start_n, t_k, band_lo, band_hi, BLOCK_M, BLOCK_N,
              BANDED, MASKED)
    return p, cap


@triton.jit
def _second_order_dots(acc, p, dp, bar_a, bar_b, bar_c, bar_d, gv_a, gv_b, u_a, u_b, delta, sigma, rho, delta_u,
                       by_s, by_ds, by_dp, cap, sm_scale, softcap, ROW_TILE: tl.constexpr, HAS_U: tl.constexpr,
                       SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       LATE_BAR: tl.constexpr = False):
    """One tile's part of the double backward's outputs (§4.3), for row tiles and column (transposed)
    tiles alike: (acc_s, acc_p) = ``acc`` becomes (acc_s + dS by_ds + S̄ by_s, acc_p + dP̄ by_dp), or
    (acc_s,) alone (dP̄'s product not wanted) its first part, with dS = P ∘ (dP − δ), dS̄ = scale
    (bar_a bar_bᵀ + bar_c bar_dᵀ) (``_bar_scores``), dP̄ = P ∘ (dS̄ − σ) and S̄ = P ∘ (P̄ − ρ), P̄ =
    dS̄ ∘ (dP − δ) − σ dP + gv_a gv_bᵀ (dO Ḡvᵀ in the tile's orientation); HAS_U adds Jᵀ u̇'s dS =
    P ∘ (u_a u_bᵀ − δ_u) to S̄ (§5).

    The tile takes S̄ as dP̄ ∘ (dP − δ) + P ∘ (gv_a gv_bᵀ − σ δ − ρ), the same sum regrouped (theory
    §4.3), so that each T×T tile forms when its predecessor dies: dP − δ (dP dies), dS and its
    product, dP̄ and its product, dP̄ ∘ (dP − δ), and the last product into a tile that starts at
    −(σ δ + ρ), where P̄ whole would be a fourth. dS̄'s two products come first, or with LATE_BAR
    after dS's product, when dP has died into dP − δ: fewer tiles live (three), but dS̄'s wait then
    waits for dS's product too (where it pays: ``_tuning.COLUMNS_LATE_BAR``; perf-notes item 45).
    SOFTCAP (§8): dS̄ is the cotangent of dR, the softmax sees g ∘ dS̄ (g = 1 − t², t = ``cap``),
    and the products take the scores' dR = g ∘ dS and R̄ = g ∘ (S̄ − (2 / softcap) t ∘ dS̄ ∘ dS)."""
    delta, sigma, rho = _broadcast(delta, ROW_TILE), _broadcast(sigma, ROW_TILE), _broadcast(rho, ROW_TILE)
    if not LATE_BAR:
        ds_bar = _bar_scores(bar_a, bar_b, bar_c, bar_d, sm_scale, PRECISION, ACC_DTYPE)
    dp_delta = dp - delta
    ds = p * dp_delta
    if SOFTCAP:
        gate = 1.0 - cap * cap
        acc_s = _add_dot(acc[0], gate * ds, by_ds, PRECISION, ACC_DTYPE)
    else:
        acc_s = _add_dot(acc[0], ds, by_ds, PRECISION, ACC_DTYPE)
    if LATE_BAR:
        ds_bar = _bar_scores(bar_a, bar_b, bar_c, bar_d, sm_scale, PRECISION, ACC_DTYPE)
    if SOFTCAP:
        capped = (2.0 / softcap) * cap * ds_bar * ds
        ds_bar = gate * ds_bar
    dp_bar = p * (ds_bar - sigma)
    others = ()
    if len(acc) > 1:
        others = (_add_dot(acc[1], dp_bar, by_dp, PRECISION, ACC_DTYPE),)
    s_bar = dp_bar * dp_delta
    g = _add_dot_t(tl.zeros_like(p) - (sigma * delta + rho), gv_a, gv_b, PRECISION, ACC_DTYPE)
    if HAS_U:
        g = _add_dot_t(g, u_a, u_b, PRECISION, ACC_DTYPE) - _broadcast(delta_u, ROW_TILE)
    s_bar += p * g
    if SOFTCAP:
        s_bar = gate * (s_bar - capped)
    return (_add_dot(acc_s, s_bar, by_s, PRECISION, ACC_DTYPE),) + others


@triton.jit
def _row_second_order(acc, p, dp, ds_bar, d_out, cot_dv, u_dot, v, k, cot_dk, delta, delta_u, cap, softcap,
                      HAS_U: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One row tile's part of the double backward's row outputs in one sweep (§4.7): ``acc`` =
    (sigma, Σ_j X, X K + dS Ḡk, dS K, P K[, P Ḡv + (P ∘ dS̄) V]) with X = P ∘ (dS̄ ∘ (dP − δ) + dO
    Ḡvᵀ); dS K is an empty tuple, left so, where the kernel has the backward's dQ. S̄ = X − sigma
    dS − (sigma δ + rho) P needs the row sums sigma and rho of every key block, so the sweep sums
    S̄ K's three parts apart and the kernel weighs them once at the end (cot_q), as it subtracts
    sigma O from the last part (cot_dO's dP̄ V = (P ∘ dS̄) V − sigma O); rho = Σ_j X − sigma
    rowsum(dO ∘ O). HAS_U adds Jᵀ u̇'s dS = P ∘ (dȮ Vᵀ − δ_u) to X's product with K (§5).
    SOFTCAP (§8): ``ds_bar`` is the cotangent of dR, the softmax sees g ∘ ds_bar, and the products
    take dR = g ∘ dS, g ∘ P and R̄'s g ∘ X − (2 / softcap) t ∘ ds_bar ∘ dR in place of dS, P and X."""
    ds = p * (dp - delta[:, None])
    ds_bar_s, ds_s, p_s = ds_bar, ds, p
    if SOFTCAP:
        gate = 1.0 - cap * cap
        ds_bar_s, ds_s, p_s = gate * ds_bar, gate * ds, gate * p
    p_ds_bar = p * ds_bar_s
    sigma = acc[0] + tl.sum(p_ds_bar, 1)
    # Each product is taken as soon as its tile exists, so that few T×T tiles are live at once.
    acc_x = _add_dot(acc[2], ds_s, cot_dk, PRECISION, ACC_DTYPE)
    acc_ds = acc[3]
    if len(acc[3]) > 0:  # empty where the kernel reads dS K from the backward's dQ
        acc_ds = _add_dot(acc[3], ds_s, k, PRECISION, ACC_DTYPE)
    acc_p = _add_dot(acc[4], p_s, k, PRECISION, ACC_DTYPE)
    others = ()
    if len(acc) > 5:
        others = (_add_dot(_add_dot(acc[5], p, cot_dv, PRECISION, ACC_DTYPE), p_ds_bar, v, PRECISION, ACC_DTYPE),)
    x = p * _add_dot_t(ds_bar_s * (dp - delta[:, None]), d_out, cot_dv, PRECISION, ACC_DTYPE)
    x_sum = acc[1] + tl.sum(x, 1)
    if HAS_U:
        x += p * (_dot_t(u_dot, v, PRECISION, ACC_DTYPE) - delta_u[:, None])
    if SOFTCAP:
        x = gate * x - (2.0 / softcap) * cap * ds_bar * ds_s
    return (sigma, x_sum, _add_dot(acc_x, x, k, PRECISION, ACC_DTYPE), acc_ds, acc_p) + others


@triton.jit
def _row_gradient(acc, dot, k, v, d_out, lse2, delta, offs_m, offs_k, start_m, start_n, t_k, band_lo, band_hi, sm_scale,
                  qk_scale, log2e, slope, diagonal, softcap, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BANDED: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(dQ / scale,) = ``acc`` plus one key block's dS K (§2), from the block's Q Kᵀ product ``dot``."""
    p, cap = _probabilities(dot, offs_m[:, None], offs_k[None, :], lse2[:, None], slope, diagonal, sm_scale, qk_scale,
                            log2e, softcap, start_m, start_n, t_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, MASKED,
                            SOFTCAP, ALIBI)
    ds = p * (_dot_t(d_out, v, PRECISION, ACC_DTYPE) - delta[:, None])
    if SOFTCAP:  # dR = g ∘ dS (§8)
        ds = (1.0 - cap * cap) * ds
    return (_add_dot(acc[0], ds, k, PRECISION, ACC_DTYPE),)


@triton.jit
def _row_tile(acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, K, V, Cot_dk, Cot_dv, k_base, start_m,
              start_n, offs_m, t_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal, softcap,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
              BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, MASKED: tl.constexpr, STAGE: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr = False, ONE_SWEEP: tl.constexpr = False):
    """``acc`` plus what the key block [start_n, start_n + BLOCK_N) adds to it, for the query block
    whose tiles (q, d_out, cot_dq, u_dot; split into head-dim parts) and row statistics (lse2 =
    lse · log2 e, delta, sigma, rho, delta_u) the caller holds; key-shaped pointers are offset by
    k_base. ``acc`` is (dQ,) for GRADIENT, (sigma, Σ_j P dS̄ dP, P Ḡv) for ROW_REDUCTIONS, (cot_q,
    cot_dO) for COTANGENTS and BACKWARD_TANGENT, or (cot_q,) where cot_dO is not wanted, and with
    ONE_SWEEP the sums of ``_row_second_order`` (which reads no sigma or rho); a stage reads no
    tile or statistic it does not use (None). The score modifiers (§8, ``_scores``):
    ``slope`` is the rows' ALiBi slope broadcast along keys. With TMA, K and V are the key/value
    head's tensor descriptors (one key block a box; rows past t_k arrive as zeros, as the masked
    loads give them)."""
    offs_k = start_n + tl.arange(0, BLOCK_N)
    k = _block(K, k_base, start_n, t_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
    v = _block(V, k_base, start_n, t_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
    if STAGE != GRADIENT:
        cot_dk = _load_parts(Cot_dk + k_base, offs_k, t_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        cot_dv = _load_parts(Cot_dv + k_base, offs_k, t_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    if STAGE == GRADIENT:
        acc = _row_gradient(acc, _dot_t(q, k, PRECISION, ACC_DTYPE), k, v, d_out, lse2, delta, offs_m, offs_k, start_m,
                            start_n, t_k, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal, softcap,
                            BLOCK_M, BLOCK_N, BANDED, MASKED, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION)
    else:
        p, cap = _probabilities(_dot_t(q, k, PRECISION, ACC_DTYPE), offs_m[:, None], offs_k[None, :], lse2[:, None],
                                slope, diagonal, sm_scale, qk_scale, log2e, softcap, start_m, start_n, t_k, band_lo,
                                band_hi, BLOCK_M, BLOCK_N, BANDED, MASKED, SOFTCAP, ALIBI)
        dp = _dot_t(d_out, v, PRECISION, ACC_DTYPE)
        if STAGE == ROW_REDUCTIONS or ONE_SWEEP:  # dS̄ = scale (Ḡq Kᵀ + Q Ḡkᵀ)
            ds_bar = _bar_scores(cot_dq, k, q, cot_dk, sm_scale, PRECISION, ACC_DTYPE)
        if STAGE == ROW_REDUCTIONS:
            if SOFTCAP:  # the softmax's dS̄ = g ∘ dR̄ (§8)
                ds_bar = (1.0 - cap * cap) * ds_bar
            p_ds_bar = p * ds_bar
            acc = (acc[0] + tl.sum(p_ds_bar, 1), acc[1] + tl.sum(p_ds_bar * dp, 1),
                   _add_dot(acc[2], p, cot_dv, PRECISION, ACC_DTYPE))
        elif ONE_SWEEP:
            acc = _row_second_order(acc, p, dp, ds_bar, d_out, cot_dv, u_dot, v, k, cot_dk, delta, delta_u, cap,
                                    softcap, STAGE == BACKWARD_TANGENT, SOFTCAP, PRECISION, ACC_DTYPE)
        else:  # (cot_q, cot_dO) += (S̄ K + dS Ḡk, dP̄ V); BACKWARD_TANGENT: Jᵀ u̇'s dS joins S̄
            acc = _second_order_dots(acc, p, dp, cot_dq, k, q, cot_dk, d_out, cot_dv, u_dot, v, delta, sigma, rho,
                                     delta_u, k, cot_dk, v, cap, sm_scale, softcap, True, STAGE == BACKWARD_TANGENT,
                                     SOFTCAP, PRECISION, ACC_DTYPE)
    return acc


@triton.jit
def _row_sweep(acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, K, V, Cot_dk, Cot_dv, k_base, start_m,
               offs_m, len_q, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal, softcap,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
               BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, EVEN_K: tl.constexpr, STAGE: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr = False, ONE_SWEEP: tl.constexpr = False):
    """``_row_tile`` over every key block the query block [start_m, start_m + BLOCK_M) sees. Key
    blocks are loaded with masks (cheap against a row tile's work); only a band or a last key
    block past T_k (not EVEN_K) compiles the score mask in (``_mask``)."""
    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    for start_n in range(lo, hi, BLOCK_N):
        acc = _row_tile(acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, K, V, Cot_dk, Cot_dv, k_base,
                        start_m, start_n, offs_m, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope,
                        diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, BANDED or not EVEN_K,
                        STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA, ONE_SWEEP)
    return acc


@triton.jit
def _column_rows(Q, D_out, Lse, Delta, Slopes, q_base, row_base, start_m, t_q, stride_qt, log2e,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                 ROWS_MASKED: tl.constexpr, ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, TMA: tl.constexpr,
                 FROM_FIRST: tl.constexpr = False):
    """What every column tile reads of the query block [start_m, start_m + BLOCK_M): (offs_m, q, dO,
    lse2 = lse · log2 e, delta, the rows' ALiBi slopes along the tile's columns; 0, unused, without
    ALIBI).

    FROM_FIRST reads the row statistics as the block's first row's pointer plus arange. From
    ``Lse + row_base`` at start_m + arange, an int32 sum the compiler cannot prove free of overflow
    once start_m starts at a band's run-time bound, the loop carries each row's index in a register
    and widens it to a 64-bit address every tile (16 a thread); from the first row the rows'
    offsets stay loop-invariant and a tile adds each to one base. The backward's sweep takes it
    (perf-notes 51); the double backward's, whose causal loop it lengthens, does not."""
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    q = _block(Q, q_base, start_m, t_q, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1, TMA, ROWS_MASKED)
    d_out = _block(D_out, q_base, start_m, t_q, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1, TMA, ROWS_MASKED)
    first, index, t_rows = row_base, offs_m, t_q
    if FROM_FIRST:
        first, index, t_rows = row_base + start_m, rows, t_q - start_m
    lse2 = _load_rows(Lse + first, index, t_rows, float("inf"), ROWS_MASKED).to(ACC_DTYPE) * log2e
    delta = _load_rows(Delta + first, index, t_rows, 0.0, ROWS_MASKED)
    slope = 0
    if ALIBI:  # the ALiBi slope of each query row (§8), laid out like lse
        slope = _load_rows(Slopes + first, index, t_rows, 0.0, ROWS_MASKED).to(ACC_DTYPE)[None, :]
    return offs_m, q, d_out, lse2, delta, slope


@triton.jit
def _column_gradient(acc_k, acc_v, v, dot_t, q, d_out, lse2, delta, slope, offs_m, offs_n, start_m, start_n, t_k,
                     band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """(acc_k, acc_v) plus one query block's (dK / scale, dV) (§2), from the block's K Qᵀ product
    ``dot_t`` and what ``_column_rows`` read: P, then dV += Pᵀ dO and dK += dSᵀ Q."""
    p_t, cap_t = _probabilities(dot_t, offs_m[None, :], offs_n[:, None], lse2[None, :], slope, diagonal, sm_scale,
                                qk_scale, log2e, softcap, start_m, start_n, t_k, band_lo, band_hi, BLOCK_M, BLOCK_N,
                                BANDED, BANDED, SOFTCAP, ALIBI)
    dp_t = _dot_t(v, d_out, PRECISION, ACC_DTYPE)
    acc_v = _add_dot(acc_v, p_t, d_out, PRECISION, ACC_DTYPE)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:  # dR = g ∘ dS (§8)
        ds_t = (1.0 - cap_t * cap_t) * ds_t
    return _add_dot(acc_k, ds_t, q, PRECISION, ACC_DTYPE), acc_v


@triton.jit
def _column_second_rows(Cot_dq, Sigma, Rho, D_out_dot, Delta_dot, q_base, row_base, offs_m, t_q, stride_qt,
                        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                        ROWS_MASKED: tl.constexpr, STAGE: tl.constexpr):
    """What the double backward's column tiles read of a query block besides ``_column_rows``:
    (Ḡq, sigma, rho, u̇, delta_u), u̇ and delta_u 0 (unused) but at BACKWARD_TANGENT."""
    cot_dq = _load_parts(Cot_dq + q_base, offs_m, t_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED)
    sigma = _load_rows(Sigma + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
    rho = _load_rows(Rho + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
    u_dot, delta_u = 0, 0
    if STAGE == BACKWARD_TANGENT:
        u_dot = _load_parts(D_out_dot + q_base, offs_m, t_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED)
        delta_u = _load_rows(Delta_dot + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
    return cot_dq, sigma, rho, u_dot, delta_u


@triton.jit
def _column_second_order(acc_k, acc_v, k, v, cot_dk, cot_dv, dot_t, q, d_out, lse2, delta, slope, cot_dq, sigma, rho,
                         u_dot, delta_u, offs_m, offs_n, start_m, start_n, t_k, band_lo, band_hi, sm_scale, qk_scale,
                         log2e, diagonal, softcap, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BANDED: tl.constexpr,
                         STAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         PRECISION: tl.constexpr, LATE_BAR: tl.constexpr = False):
    """(acc_k, acc_v) plus one query block's (cot_k / scale, cot_v) (§4.3; at BACKWARD_TANGENT with
    Jᵀ u̇'s terms, §5), from the block's K Qᵀ product ``dot_t`` and what ``_column_rows`` and
    ``_column_second_rows`` read."""
    p_t, cap_t = _probabilities(dot_t, offs_m[None, :], offs_n[:, None], lse2[None, :], slope, diagonal, sm_scale,
                                qk_scale, log2e, softcap, start_m, start_n, t_k, band_lo, band_hi, BLOCK_M, BLOCK_N,
                                BANDED, BANDED, SOFTCAP, ALIBI)
    dp_t = _dot_t(v, d_out, PRECISION, ACC_DTYPE)
    if STAGE == BACKWARD_TANGENT:  # + Jᵀ u̇: the backward's dSᵀ for u̇ joins S̄ᵀ, and dV gains Pᵀ u̇
        acc_v = _add_dot(acc_v, p_t, u_dot, PRECISION, ACC_DTYPE)
    # dS̄ᵀ = scale (K Ḡqᵀ + Ḡk Qᵀ), formed inside
    return _second_order_dots((acc_k, acc_v), p_t, dp_t, k, cot_dq, cot_dk, q, cot_dv, d_out, v, u_dot, delta, sigma,
                              rho, delta_u, q, cot_dq, d_out, cap_t, sm_scale, softcap, False,
                              STAGE == BACKWARD_TANGENT, SOFTCAP, PRECISION, ACC_DTYPE, LATE_BAR)


@triton.jit
def _column_half(k, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot, Slopes, q_base, row_base, start_m,
                 t_q, stride_qt, log2e, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D0: tl.constexpr,
                 BLOCK_D1: tl.constexpr, ROWS_MASKED: tl.constexpr, STAGE: tl.constexpr, ALIBI: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """The first part of a column tile (``_column_tile``, or one of its HALVES): what it
    reads of the query block [start_m, start_m + BLOCK_M) and its K Qᵀ product, as (the block's
    tiles and statistics from ``_column_rows``, with the product last) and the double backward's
    from ``_column_second_rows`` (zeros at GRADIENT)."""
    offs_m, q, d_out, lse2, delta, slope = _column_rows(Q, D_out, Lse, Delta, Slopes, q_base, row_base, start_m, t_q,
                                                        stride_qt, log2e, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1,
                                                        ROWS_MASKED, ALIBI, ACC_DTYPE, TMA, STAGE == GRADIENT)
    second = (0, 0, 0, 0, 0)
    if STAGE != GRADIENT:
        second = _column_second_rows(Cot_dq, Sigma, Rho, D_out_dot, Delta_dot, q_base, row_base, offs_m, t_q, stride_qt,
                                     HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED, STAGE)
    return (offs_m, q, d_out, lse2, delta, slope, _dot_t(k, q, PRECISION, ACC_DTYPE)), second


@triton.jit
def _column_finish(acc_k, acc_v, k, v, cot_dk, cot_dv, half, second, start_m, start_n, offs_n, t_k, band_lo, band_hi,
                   sm_scale, qk_scale, log2e, diagonal, softcap, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BANDED: tl.constexpr, STAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LATE_BAR: tl.constexpr = False):
    """The rest of a column tile: (acc_k, acc_v) plus the tile that ``_column_half`` read and
    multiplied."""
    offs_m, q, d_out, lse2, delta, slope, dot_t = half
    if STAGE == GRADIENT:
        acc_k, acc_v = _column_gradient(acc_k, acc_v, v, dot_t, q, d_out, lse2, delta, slope, offs_m, offs_n, start_m,
                                        start_n, t_k, band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap,
                                        BLOCK_M, BLOCK_N, BANDED, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION)
    else:
        cot_dq, sigma, rho, u_dot, delta_u = second
        acc_k, acc_v = _column_second_order(acc_k, acc_v, k, v, cot_dk, cot_dv, dot_t, q, d_out, lse2, delta, slope,
                                            cot_dq, sigma, rho, u_dot, delta_u, offs_m, offs_n, start_m, start_n, t_k,
                                            band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, BLOCK_M,
                                            BLOCK_N, BANDED, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, LATE_BAR)
    return acc_k, acc_v


@triton.jit
def _column_tile(acc_k, acc_v, k, v, cot_dk, cot_dv, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot,
                 Slopes, q_base, row_base, start_m, start_n, offs_n, t_q, t_k, stride_qt, band_lo, band_hi, sm_scale,
                 qk_scale, log2e, diagonal, softcap, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BANDED: tl.constexpr,
                 ROWS_MASKED: tl.constexpr, STAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False,
                 HALVES: tl.constexpr = False, LATE_BAR: tl.constexpr = False):
    """(acc_k, acc_v) plus what the query block [start_m, start_m + BLOCK_M) adds for the key block
    whose tiles (k, v, cot_dk, cot_dv; split into head-dim parts) the caller holds: (dK / scale, dV)
    for GRADIENT, (cot_k / scale, cot_v) for COTANGENTS and BACKWARD_TANGENT. Query-shaped pointers
    are offset by q_base, row statistics by row_base; a stage reads no pointer it does not use
    (None). Without ROWS_MASKED every query row of the block is < t_q. With TMA, Q and D_out are the
    query head's tensor descriptors (``_row_tile``'s K and V), of BLOCK_M-row boxes, or of
    BLOCK_M / 2 with HALVES.

    HALVES (a whole block, not ROWS_MASKED) takes the block as two halves of BLOCK_M / 2 queries:
    both halves' reads and K Qᵀ products first (``_column_half``), then each half's tile
    (``_column_finish``). Triton waits for a product that does not accumulate as soon as it is
    issued but leaves the accumulating ones (dV and dK, or cot_v and cot_k) in flight, so the second
    half's exp2 and masks run beside the first half's accumulating products, the overlap the
    forward's halves buy (``forward._forward_halves``; where: ``_tuning.BACKWARD_COLUMNS_HALVES``)."""
    if HALVES:
        tl.static_assert(not ROWS_MASKED, "HALVES takes whole query blocks")
        HALF: tl.constexpr = BLOCK_M // 2
        half_a, second_a = _column_half(k, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot, Slopes,
                                        q_base, row_base, start_m, t_q, stride_qt, log2e, HEAD_DIM, HALF, BLOCK_D0,
                                        BLOCK_D1, False, STAGE, ALIBI, ACC_DTYPE, PRECISION, TMA)
        half_b, second_b = _column_half(k, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot, Slopes,
                                        q_base, row_base, start_m + HALF, t_q, stride_qt, log2e, HEAD_DIM, HALF,
                                        BLOCK_D0, BLOCK_D1, False, STAGE, ALIBI, ACC_DTYPE, PRECISION, TMA)
        acc_k, acc_v = _column_finish(acc_k, acc_v, k, v, cot_dk, cot_dv, half_a, second_a, start_m, start_n, offs_n,
                                      t_k, band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HALF,
                                      BLOCK_N, BANDED, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, LATE_BAR)
        acc_k, acc_v = _column_finish(acc_k, acc_v, k, v, cot_dk, cot_dv, half_b, second_b, start_m + HALF, start_n,
                                      offs_n, t_k, band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap,
                                      HALF, BLOCK_N, BANDED, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, LATE_BAR)
    else:
        half, second = _column_half(k, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot, Slopes, q_base,
                                    row_base, start_m, t_q, stride_qt, log2e, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1,
                                    ROWS_MASKED, STAGE, ALIBI, ACC_DTYPE, PRECISION, TMA)
        acc_k, acc_v = _column_finish(acc_k, acc_v, k, v, cot_dk, cot_dv, half, second, start_m, start_n, offs_n, t_k,
                                      band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, BLOCK_M, BLOCK_N,
                                      BANDED, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, LATE_BAR)
    return acc_k, acc_v


@triton.jit
def _column_sweep(acc_k, acc_v, k, v, cot_dk, cot_dv, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot,
                  Slopes, first_q_base, first_row_base, members, start_n, offs_n, t_q, len_q, len_k, stride_qh,
                  stride_qt, band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                  BANDED: tl.constexpr, STAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False,
                  HALVES: tl.constexpr = False, LATE_BAR: tl.constexpr = False):
    """``_column_tile`` over every query block that sees the key block [start_n, start_n + BLOCK_N),
    of each of the ``members`` query heads a column program serves (``_column_program``): the
    whole blocks with unmasked loads (as two halves with HALVES), then the one partial block, if
    any (``_full_blocks_end``), as one tile."""
    lo, hi = _query_range(start_n, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    full_hi = _full_blocks_end(lo, hi, len_q, BLOCK_M)
    ROWS: tl.constexpr = BLOCK_M // 2 if HALVES else BLOCK_M  # rows a Q or dO load of a whole block takes
    for member in range(members):
        # The group's query heads are adjacent: each one stride_qh elements and T_q row statistics on.
        q_base = first_q_base + tl.cast(member, tl.int64) * stride_qh
        row_base = first_row_base + member * t_q
        # This query head's Q and dO (``_rows_source``): descriptors with TMA, of a whole block's
        # loads (q_rows) and of the partial block's (q_block: BLOCK_M rows).
        q_rows = _rows_source(Q, q_base, len_q, stride_qt, ROWS, HEAD_DIM, TMA)
        do_rows = _rows_source(D_out, q_base, len_q, stride_qt, ROWS, HEAD_DIM, TMA)
        q_block, do_block = q_rows, do_rows
        if HALVES:
            q_block = _rows_source(Q, q_base, len_q, stride_qt, BLOCK_M, HEAD_DIM, TMA)
            do_block = _rows_source(D_out, q_base, len_q, stride_qt, BLOCK_M, HEAD_DIM, TMA)
        for start_m in range(lo, full_hi, BLOCK_M):
            acc_k, acc_v = _column_tile(
                acc_k, acc_v, k, v, cot_dk, cot_dv, q_rows, do_rows, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot,
                Delta_dot, Slopes, q_base, row_base, start_m, start_n, offs_n, len_q, len_k, stride_qt, band_lo,
                band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
                BANDED, False, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA, HALVES, LATE_BAR)
        if full_hi < hi:  # the one partial block
            acc_k, acc_v = _column_tile(
                acc_k, acc_v, k, v, cot_dk, cot_dv, q_block, do_block, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot,
                Delta_dot, Slopes, q_base, row_base, full_hi, start_n, offs_n, len_q, len_k, stride_qt, band_lo,
                band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
                BANDED, True, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA, LATE_BAR=LATE_BAR)
    return acc_k, acc_v
