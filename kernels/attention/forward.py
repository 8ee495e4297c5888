"""Forward, forward-mode JVP and second-order forward of attention: one kernel, one sweep over key
blocks per query block, specialised by constexpr flags (HAS_TANGENT, SECOND_ORDER, GIVEN_PRIMAL;
HALVES sweeps the forward alone as two halves of each query block)."""

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
    _mask,
    _modifiers,
    _normalise,
    _program,
    _rows_source,
    _scale_rows,
    _scales,
    _scores,
    _sequence,
    _store_parts,
    _zeros_like_parts,
)

# ----------------------------------------------------------------------------------------------
# Forward, forward-mode JVP (§1, §3) and second-order forward (§7): one sweep over key blocks per
# query block. The tangent's row term mu = Σ_j P_ij Ṡ_ij accumulates online with the same
# rescaling as the softmax normaliser, so Ȯ = (Σ_j P_ij (Ṡ_ij V_j + V̇_j)) / l − mu O needs no
# second sweep. The second derivative along (ẋ, y) does the same with a second direction y:
#   O'' = Σ_j P_ij ((S^y_ij Ṡ_ij + S''_ij) V_j + Ṡ_ij V^y_j + S^y_ij V̇_j) − mu^y Ȯ − mu O^y − m O,
#   lse'' = m − mu mu^y,   with S'' = scale (Q̇ K^yᵀ + Q^y K̇ᵀ), m = Σ_j P_ij (S^y_ij Ṡ_ij + S''_ij).
# Score modifiers (§8): with a cap the tangents are Ṡ = g Ṙ, S^y = g R^y and S'' = g (R'' − (2/c) t Ṙ R^y)
# (g = 1 − t², t = tanh(R / c)); ALiBi's bias is a constant.
# Given the primal (GIVEN_PRIMAL: O and lse from a forward that already ran, as forward-mode AD
# runs it before the JVP rule), P = exp(S − lse) is exact from the first key block on: no running
# maximum, no rescaling, no P V, and Ȯ = Σ_j P_ij (Ṡ_ij V_j + V̇_j) − mu O with the stored O: five
# GEMMs a tile instead of the JVP's six. The second-order forward recomputes the primal: on the
# primal given, its largest bf16 errors doubled on the H200 and broke the accuracy bound (likely
# the 16-bit P of its GEMMs, normalised, where the running maximum keeps each row's largest weight
# exactly 1, amplified by the second order's row terms; docs/perf-notes.md item 27).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_scores(dot, offs_m, offs_k, start_m, start_n, len_k, band_lo, band_hi, slope, diagonal, sm_scale, qk_scale,
                 log2e, softcap, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BANDED: tl.constexpr,
                 MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, EVERY_TILE: tl.constexpr = False):
    """(scores, unit, cap) of the query rows ``offs_m`` (a block of BLOCK_M from start_m) against the
    key block at start_n, from ``dot`` = Q Kᵀ: unit · scores is in base-2 units, with −∞ where a
    pair may not attend (``_mask``, with its EVERY_TILE); cap is the softcap's t (``_scores``).
    Without modifiers the scale stays out of the tile (unit = scale · log2 e), so that it joins the
    exponent's shift: one fused multiply-add a score instead of a multiply and a subtract."""
    if SOFTCAP or ALIBI:
        scores, cap = _scores(dot, offs_m[:, None], offs_k[None, :], slope, diagonal, sm_scale, qk_scale, log2e,
                              softcap, SOFTCAP, ALIBI)
        unit = 1.0
    else:
        scores, cap, unit = dot, 0.0, qk_scale
    scores = _mask(scores, float("-inf"), offs_m[:, None], offs_k[None, :], start_m, start_n, len_k, band_lo,
                   band_hi, BLOCK_M, BLOCK_N, BANDED, MASKED, EVERY_TILE)
    return scores, unit, cap


@triton.jit
def _online_softmax(acc, row_sum, row_max, scores, unit, v, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One key block of the online softmax: (acc, row_sum, row_max, p, rescale) with acc and
    row_sum rescaled to the new running maximum and P V and P's row sums added."""
    new_max = tl.maximum(row_max, tl.max(scores, 1) * unit)  # max(c · s) = c · max(s) for c > 0, exactly
    # A row that has seen no key yet keeps max −∞; shifting by 0 keeps exp2 finite (0).
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp2(row_max - shift)
    p = tl.exp2(scores * unit - shift[:, None])
    row_sum = row_sum * rescale + tl.sum(p, 1)
    acc = _add_dot(_scale_rows(acc, rescale), p, v, PRECISION, ACC_DTYPE)
    return acc, row_sum, new_max, p, rescale


@triton.jit
def _store_primal(acc, row_sum, row_max, Out, Lse, q_base, row_base, offs_m, len_q, stride_qt, log2e,
                  HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """Store out = acc / row_sum and lse of a query block (+∞ and zeros on rows that saw no key);
    returns (out, norm) for the tangents' outputs."""
    empty = row_sum == 0.0
    norm = tl.where(empty, 1.0, row_sum)
    out = _normalise(acc, norm, (), ())
    lse = tl.where(empty, float("inf"), (row_max + tl.log2(norm)) / log2e)
    _store_parts(Out + q_base, out, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    tl.store(Lse + row_base + offs_m, lse, mask=offs_m < len_q)
    return out, norm


@triton.jit
def _halves_keys(state, q_a, q_b, offs_a, offs_b, slope_a, slope_b, diagonal, k_rows, v_rows, k_base, start_m, lo, hi,
                 len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, softcap, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                 BANDED: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """``state`` = (acc_a, sum_a, max_a, acc_b, sum_b, max_b) after the key blocks [lo, hi) of the
    two halves' sweep (``_forward_halves``); MASKED compiles the mask in and applies it to every
    block (``_mask``'s EVERY_TILE: the loops that take it run edge blocks only)."""
    HALF: tl.constexpr = BLOCK_M // 2
    acc_a, sum_a, max_a, acc_b, sum_b, max_b = state
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k = _block(k_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
        v = _block(v_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
        dot_a = _dot_t(q_a, k, PRECISION, ACC_DTYPE)
        dot_b = _dot_t(q_b, k, PRECISION, ACC_DTYPE)
        scores, unit = _tile_scores(dot_a, offs_a, offs_k, start_m, start_n, len_k, band_lo, band_hi, slope_a,
                                    diagonal, sm_scale, qk_scale, log2e, softcap, HALF, BLOCK_N, BANDED, MASKED,
                                    SOFTCAP, ALIBI, True)[:2]
        acc_a, sum_a, max_a = _online_softmax(acc_a, sum_a, max_a, scores, unit, v, PRECISION, ACC_DTYPE)[:3]
        scores, unit = _tile_scores(dot_b, offs_b, offs_k, start_m + HALF, start_n, len_k, band_lo, band_hi,
                                    slope_b, diagonal, sm_scale, qk_scale, log2e, softcap, HALF, BLOCK_N, BANDED,
                                    MASKED, SOFTCAP, ALIBI, True)[:2]
        acc_b, sum_b, max_b = _online_softmax(acc_b, sum_b, max_b, scores, unit, v, PRECISION, ACC_DTYPE)[:3]
    return acc_a, sum_a, max_a, acc_b, sum_b, max_b


@triton.jit
def _inner_keys(start_m, lo, hi, len_k, band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[inner_lo, inner_hi): the key blocks of a banded sweep [lo, hi) (lo a multiple of BLOCK_N, as
    ``_key_range`` gives it) that every row of the query block [start_m, start_m + BLOCK_M) sees
    whole, inside the band and the sequence's keys; lo ≤ inner_lo ≤ inner_hi ≤ hi, with the blocks
    before and after it the ones that cross an edge of the band or the end of the keys."""
    below = tl.maximum(start_m + BLOCK_M - 1 + band_lo - lo, 0)  # keys the last row's band starts past lo
    inner_lo = tl.minimum(lo + tl.cdiv(below, BLOCK_N) * BLOCK_N, hi)
    end = tl.minimum(start_m + band_hi + 1, len_k)  # the first row's keys end here
    inner_hi = tl.maximum(inner_lo, inner_lo + (end - inner_lo) // BLOCK_N * BLOCK_N)
    return inner_lo, tl.minimum(inner_hi, hi)


@triton.jit
def _forward_halves(Q, Out, Lse, Slopes, k_rows, v_rows, q_base, k_base, row_base, start_m, len_q, len_k, stride_qt,
                    stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, softcap, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                    BANDED: tl.constexpr, EVEN_K: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                    ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """The forward of one query block as two halves of BLOCK_M / 2 rows that share each key block's
    loads: both halves' Q Kᵀ first, then each half's softmax and P V. Triton waits for a score
    product as soon as it is issued, but not for P V, which accumulates: so the first half's P V
    runs on the tensor cores while the second half's softmax runs beside it, the overlap that one
    tile's alternation of GEMMs and softmax lacks (``_tuning.FORWARD_HALVES``; docs/perf-notes.md
    item 37). The halves mask and store their own rows; the key range is the whole block's. Under a
    band the key blocks that every row sees whole (``_inner_keys``) run in a loop without the mask
    code, and the blocks at the band's edges in loops with it: compiled for sm_90 with the mask in
    the one loop, ptxas holds the halves' mask predicates across the key loop (perf-notes item 44).
    At lengths the key block does not divide, likewise the whole key blocks and then the partial
    one. The edge loops apply the mask to every block without a run-time test: with that test in
    the loop, ptxas serialises every wgmma of the kernel (its C7513; perf-notes item 53)."""
    HALF: tl.constexpr = BLOCK_M // 2
    offs_a = start_m + tl.arange(0, HALF)
    offs_b = offs_a + HALF
    slope_a, diagonal, softcap = _modifiers(Slopes, row_base, offs_a, len_q, len_k, softcap, SOFTCAP, ALIBI, True,
                                            BOTTOM_RIGHT, ACC_DTYPE)
    slope_b = _modifiers(Slopes, row_base, offs_b, len_q, len_k, softcap, False, ALIBI, True, BOTTOM_RIGHT,
                         ACC_DTYPE)[0]
    q_a = _load_parts(Q + q_base, offs_a, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    q_b = _load_parts(Q + q_base, offs_b, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    state = (_zeros_like_parts(q_a, ACC_DTYPE), tl.zeros([HALF], ACC_DTYPE), tl.full([HALF], float("-inf"), ACC_DTYPE),
             _zeros_like_parts(q_b, ACC_DTYPE), tl.zeros([HALF], ACC_DTYPE), tl.full([HALF], float("-inf"), ACC_DTYPE))
    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    if BANDED:
        inner_lo, inner_hi = _inner_keys(start_m, lo, hi, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N)
        state = _halves_keys(state, q_a, q_b, offs_a, offs_b, slope_a, slope_b, diagonal, k_rows, v_rows, k_base,
                             start_m, lo, inner_lo, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e,
                             softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, True, SOFTCAP, ALIBI,
                             ACC_DTYPE, PRECISION, TMA)
        state = _halves_keys(state, q_a, q_b, offs_a, offs_b, slope_a, slope_b, diagonal, k_rows, v_rows, k_base,
                             start_m, inner_lo, inner_hi, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale,
                             log2e, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, False, SOFTCAP,
                             ALIBI, ACC_DTYPE, PRECISION, TMA)
        lo = inner_hi
    elif not EVEN_K:  # the whole key blocks without the mask, then the partial one with it
        whole_hi = _full_blocks_end(lo, hi, len_k, BLOCK_N)
        state = _halves_keys(state, q_a, q_b, offs_a, offs_b, slope_a, slope_b, diagonal, k_rows, v_rows, k_base,
                             start_m, lo, whole_hi, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e,
                             softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, False, SOFTCAP, ALIBI,
                             ACC_DTYPE, PRECISION, TMA)
        lo = whole_hi
    state = _halves_keys(state, q_a, q_b, offs_a, offs_b, slope_a, slope_b, diagonal, k_rows, v_rows, k_base, start_m,
                         lo, hi, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, softcap, HEAD_DIM,
                         BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED, BANDED or not EVEN_K, SOFTCAP, ALIBI, ACC_DTYPE,
                         PRECISION, TMA)
    acc_a, sum_a, max_a, acc_b, sum_b, max_b = state
    _store_primal(acc_a, sum_a, max_a, Out, Lse, q_base, row_base, offs_a, len_q, stride_qt, log2e, HEAD_DIM,
                  BLOCK_D0, BLOCK_D1)
    _store_primal(acc_b, sum_b, max_b, Out, Lse, q_base, row_base, offs_b, len_q, stride_qt, log2e, HEAD_DIM,
                  BLOCK_D0, BLOCK_D1)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Q_dot, K_dot, V_dot, Q_y, K_y, V_y, Cu_q, Cu_k, Slopes,
    Out, Lse, Out_dot, Lse_dot, Out_second, Lse_second,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, softcap: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, EVEN_K: tl.constexpr, VARLEN: tl.constexpr,
    LPT: tl.constexpr, HEAVY_LAST: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, HAS_TANGENT: tl.constexpr, SECOND_ORDER: tl.constexpr, GIVEN_PRIMAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, HALVES: tl.constexpr = False,
):
    """HAS_TANGENT adds Ȯ, l̇se along (Q̇, K̇, V̇); SECOND_ORDER (with HAS_TANGENT) adds the second
    derivative along (Q̇, K̇, V̇) and (Q^y, K^y, V^y), bilinear in the two directions. GIVEN_PRIMAL
    (with HAS_TANGENT alone) reads Out and Lse, a forward's results, instead of writing them, and
    writes the tangents only. Every tile with a head-dim axis is a tuple of head-dim parts
    (BLOCK_D0, BLOCK_D1: ``_head_dim_parts``). TMA loads K and V, and their directions (K̇, V̇;
    K^y, V^y), through tensor descriptors (Hopper's tensor memory accelerator; one head-dim part as
    wide as HEAD_DIM, 16-byte aligned rows: ``AttentionCall.tma``): rows past the sequence's keys
    arrive as zeros, as the masked loads give them, so the results are the same. HALVES (the
    forward alone) sweeps the query block as two halves (``_forward_halves``)."""
    block, batch, head, entry = _program(heads, VARLEN, LPT, HEAVY_LAST)[:4]
    start_m = block * BLOCK_M
    q_base, k_base, row_base, len_q, len_k, band_lo, band_hi = _sequence(
        Cu_q, Cu_k, batch, entry, head, group, heads, t_q, t_k, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        if start_m >= len_q:  # the grid is sized for the longest sequence
            return
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)
    # This sequence's key/value head and its directions (``_rows_source``): descriptors with TMA.
    k_rows = _rows_source(K, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    v_rows = _rows_source(V, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    if HALVES:
        tl.static_assert(not HAS_TANGENT, "HALVES is the forward alone")
        _forward_halves(Q, Out, Lse, Slopes, k_rows, v_rows, q_base, k_base, row_base, start_m, len_q, len_k, stride_qt,
                        stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, softcap, HEAD_DIM, BLOCK_M, BLOCK_N,
                        BLOCK_D0, BLOCK_D1, BANDED, EVEN_K, BOTTOM_RIGHT, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA)
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    slope, diagonal, softcap = _modifiers(Slopes, row_base, offs_m, len_q, len_k, softcap, SOFTCAP, ALIBI, True,
                                          BOTTOM_RIGHT, ACC_DTYPE)

    q = _load_parts(Q + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    if GIVEN_PRIMAL:  # base-2 lse; +inf on rows that see no key, where every P is then 0
        lse2 = tl.load(Lse + row_base + offs_m, mask=offs_m < len_q, other=float("inf")).to(ACC_DTYPE) * log2e
    row_max = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = _zeros_like_parts(q, ACC_DTYPE)
    if HAS_TANGENT:
        q_dot = _load_parts(Q_dot + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        mu = tl.zeros([BLOCK_M], ACC_DTYPE)
        acc_dot = _zeros_like_parts(q, ACC_DTYPE)
    if SECOND_ORDER:
        q_y = _load_parts(Q_y + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        mu_y = tl.zeros([BLOCK_M], ACC_DTYPE)
        m_second = tl.zeros([BLOCK_M], ACC_DTYPE)
        acc_y = _zeros_like_parts(q, ACC_DTYPE)
        acc_second = _zeros_like_parts(q, ACC_DTYPE)

    if HAS_TANGENT:
        k_dot_rows = _rows_source(K_dot, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
        v_dot_rows = _rows_source(V_dot, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    if SECOND_ORDER:
        k_y_rows = _rows_source(K_y, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
        v_y_rows = _rows_source(V_y, k_base, len_k, stride_kt, BLOCK_N, HEAD_DIM, TMA)
    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k = _block(k_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
        v = _block(v_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
        scores, unit, cap = _tile_scores(_dot_t(q, k, PRECISION, ACC_DTYPE), offs_m, offs_k, start_m, start_n, len_k,
                                         band_lo, band_hi, slope, diagonal, sm_scale, qk_scale, log2e, softcap,
                                         BLOCK_M, BLOCK_N, BANDED, BANDED or not EVEN_K, SOFTCAP, ALIBI)
        if GIVEN_PRIMAL:
            p = tl.exp2(scores * unit - lse2[:, None])
        else:
            acc, row_sum, new_max, p, rescale = _online_softmax(acc, row_sum, row_max, scores, unit, v, PRECISION,
                                                                ACC_DTYPE)
        if HAS_TANGENT:
            k_dot = _block(k_dot_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
            v_dot = _block(v_dot_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
            # P V̇ before Ṡ's tile exists: fewer tiles live at once (perf-notes item 31).
            if not GIVEN_PRIMAL:
                acc_dot = _scale_rows(acc_dot, rescale)
            acc_dot = _add_dot(acc_dot, p, v_dot, PRECISION, ACC_DTYPE)
            scores_dot = _dot_t(q_dot, k, PRECISION, ACC_DTYPE)
            scores_dot += _dot_t(q, k_dot, PRECISION, ACC_DTYPE)
            scores_dot *= sm_scale
            if SOFTCAP:  # Ṡ = g Ṙ; the second order needs Ṙ itself
                gate = 1.0 - cap * cap
                r_dot = scores_dot
                scores_dot = gate * scores_dot
            p_scores_dot = p * scores_dot
            if GIVEN_PRIMAL:
                mu += tl.sum(p_scores_dot, 1)
            else:
                mu = mu * rescale + tl.sum(p_scores_dot, 1)
            acc_dot = _add_dot(acc_dot, p_scores_dot, v, PRECISION, ACC_DTYPE)
        if SECOND_ORDER:
            k_y = _block(k_y_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
            v_y = _block(v_y_rows, k_base, start_n, len_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
            scores_y = _dot_t(q_y, k, PRECISION, ACC_DTYPE)
            scores_y = (scores_y + _dot_t(q, k_y, PRECISION, ACC_DTYPE)) * sm_scale
            scores_xy = _dot_t(q_dot, k_y, PRECISION, ACC_DTYPE)
            scores_xy += _dot_t(q_y, k_dot, PRECISION, ACC_DTYPE)
            scores_xy *= sm_scale
            if SOFTCAP:  # S'' = g (R'' − (2/c) t Ṙ R^y), S^y = g R^y
                scores_xy = gate * (scores_xy - (2.0 / softcap) * cap * r_dot * scores_y)
                scores_y = gate * scores_y
            p_scores_y = p * scores_y
            p_second = p * (scores_y * scores_dot + scores_xy)
            mu_y = mu_y * rescale + tl.sum(p_scores_y, 1)
            m_second = m_second * rescale + tl.sum(p_second, 1)
            acc_y = _scale_rows(acc_y, rescale)
            acc_y = _add_dot(acc_y, p_scores_y, v, PRECISION, ACC_DTYPE)
            acc_y = _add_dot(acc_y, p, v_y, PRECISION, ACC_DTYPE)
            acc_second = _scale_rows(acc_second, rescale)
            acc_second = _add_dot(acc_second, p_second, v, PRECISION, ACC_DTYPE)
            acc_second = _add_dot(acc_second, p_scores_dot, v_y, PRECISION, ACC_DTYPE)
            acc_second = _add_dot(acc_second, p_scores_y, v_dot, PRECISION, ACC_DTYPE)
        if not GIVEN_PRIMAL:
            row_max = new_max

    if GIVEN_PRIMAL:  # P summed to one already; the row term multiplies the stored O
        out = [part.to(ACC_DTYPE) for part in _load_parts(Out + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0,
                                                           BLOCK_D1)]
        out_dot = _normalise(acc_dot, tl.full([BLOCK_M], 1.0, ACC_DTYPE), (mu,), (out,))
        _store_parts(Out_dot + q_base, out_dot, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        tl.store(Lse_dot + row_base + offs_m, mu, mask=offs_m < len_q)
        return
    # Each output is its accumulator over the normaliser less row multiples of the lower orders'.
    out, norm = _store_primal(acc, row_sum, row_max, Out, Lse, q_base, row_base, offs_m, len_q, stride_qt, log2e,
                              HEAD_DIM, BLOCK_D0, BLOCK_D1)
    if HAS_TANGENT:
        mu = mu / norm
        out_dot = _normalise(acc_dot, norm, (mu,), (out,))
        _store_parts(Out_dot + q_base, out_dot, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        tl.store(Lse_dot + row_base + offs_m, mu, mask=offs_m < len_q)
    if SECOND_ORDER:
        mu_y = mu_y / norm
        m_second = m_second / norm
        out_y = _normalise(acc_y, norm, (mu_y,), (out,))
        out_second = _normalise(acc_second, norm, (mu_y, mu, m_second), (out_dot, out_y, out))
        _store_parts(Out_second + q_base, out_second, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        tl.store(Lse_second + row_base + offs_m, m_second - mu * mu_y, mask=offs_m < len_q)

