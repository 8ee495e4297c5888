"""Device helpers every attention sweep is built from: loads and stores of (T, D) tiles and of
their head-dim parts, masks and key/query ranges of a causal or windowed band, where a program's
sequence and heads live, the column kernels' split-group store, and the backward sweeps: one row
tile and one column tile (``_row_tile``, ``_column_tile``) that the backward and the double
backward specialise by a constexpr STAGE.

Notation per (sequence, head): S = scale · Q Kᵀ (masked entries −∞), P = softmax(S) row-wise,
O = P V, lse = row log-sum-exp of S. Row statistics live in (B, H, T_q) buffers; nothing of size
T_q × T_k ever reaches global memory. A sequence is a batch entry of the (B, H, T, D) tensors, or
with VARLEN (variable-length batches, flash-attn's ``cu_seqlens``) a run of rows of a packed entry;
``_sequence`` is the one place that tells the two apart. Softmax is evaluated in base 2 (``exp2``)
with log2(e) folded into the scale, as the Triton fused-attention tutorial does. The equations are
derived in docs/theory/attention_derivatives.md (§ numbers in the kernels' headers).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def _load_tile(base, offs_t, offs_d, t_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               ROWS_MASKED: tl.constexpr = True):
    """A (len(offs_t), BLOCK_D) tile of a (T, HEAD_DIM) matrix; rows ≥ t_len and the head-dim
    padding read as zeros, which leaves every dot product over the head dim unchanged. Without
    ROWS_MASKED the caller guarantees every row is < t_len."""
    pointers = base + offs_t[:, None] * stride_t + offs_d[None, :]
    if ROWS_MASKED:
        mask = offs_t[:, None] < t_len
        if HEAD_DIM != BLOCK_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        return tl.load(pointers, mask=mask, other=0.0)
    if HEAD_DIM != BLOCK_D:
        return tl.load(pointers, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.load(pointers)


@triton.jit
def _load_rows(base, offs_t, t_len, other, ROWS_MASKED: tl.constexpr):
    """Row statistics ``base[offs_t]``, ``other`` at rows ≥ t_len (with ROWS_MASKED; without it the
    caller guarantees every row is < t_len)."""
    if ROWS_MASKED:
        return tl.load(base + offs_t, mask=offs_t < t_len, other=other)
    return tl.load(base + offs_t)


@triton.jit
def _store_tile(base, tile, offs_t, offs_d, t_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = offs_t[:, None] < t_len
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + offs_t[:, None] * stride_t + offs_d[None, :], tile.to(base.dtype.element_ty), mask=mask)


# A head dim split into power-of-two parts (``_head_dim_parts``) is a tuple of tiles: part 0 holds
# columns [0, BLOCK_D0), part 1 (only when BLOCK_D1 > 0) columns [BLOCK_D0, HEAD_DIM) padded to
# BLOCK_D1. Unsplit (BLOCK_D1 = 0), part 0 is the whole tile padded to BLOCK_D0 and the helpers
# below emit exactly the single-tile code. Tuples are unrolled at compile time (tl.static_range),
# in the interpreter too; a comprehension over a tuple gives a tuple (a list in the interpreter).


@triton.jit
def _load_part(base, offs_t, t_len, stride_t, PART: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ROWS_MASKED: tl.constexpr = True):
    start: tl.constexpr = PART * BLOCK_D0
    width: tl.constexpr = BLOCK_D1 if PART else BLOCK_D0
    return _load_tile(base + start, offs_t, tl.arange(0, width), t_len, stride_t, min(HEAD_DIM - start, width), width,
                      ROWS_MASKED)


@triton.jit
def _store_part(base, tile, offs_t, t_len, stride_t, PART: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    start: tl.constexpr = PART * BLOCK_D0
    width: tl.constexpr = BLOCK_D1 if PART else BLOCK_D0
    _store_tile(base + start, tile, offs_t, tl.arange(0, width), t_len, stride_t, min(HEAD_DIM - start, width), width)


@triton.jit
def _load_parts(base, offs_t, t_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
                BLOCK_D1: tl.constexpr, ROWS_MASKED: tl.constexpr = True):
    """A (len(offs_t), HEAD_DIM) tile of a (T, HEAD_DIM) matrix as the tuple of its head-dim parts
    (``_load_tile``'s ROWS_MASKED)."""
    tile = (_load_part(base, offs_t, t_len, stride_t, 0, HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED),)
    if BLOCK_D1 > 0:
        tile += (_load_part(base, offs_t, t_len, stride_t, 1, HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED),)
    return tile


@triton.jit
def _rows_source(matrix, offset, t_len, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """What ``_block`` reads the (t_len, HEAD_DIM) matrix at ``matrix + offset`` through: with TMA
    its tensor descriptor (BLOCK rows a box, rows past t_len read as zeros), else ``matrix`` itself."""
    source = matrix
    if TMA:
        source = tl.make_tensor_descriptor(matrix + offset, [t_len, HEAD_DIM], [stride_t, 1], [BLOCK, HEAD_DIM])
    return source


@triton.jit
def _block(source, offset, start, t_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
           BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, TMA: tl.constexpr, ROWS_MASKED: tl.constexpr = True):
    """Rows [start, start + BLOCK) of the matrix ``_rows_source`` gave ``source`` for, as head-dim
    parts: one TMA copy (one part as wide as HEAD_DIM), or ``_load_parts`` at ``source + offset``;
    rows past t_len are zeros either way."""
    if TMA:
        parts = (source.load([start, 0]),)
    else:
        parts = _load_parts(source + offset, start + tl.arange(0, BLOCK), t_len, stride_t, HEAD_DIM, BLOCK_D0, BLOCK_D1,
                            ROWS_MASKED)
    return parts


@triton.jit
def _store_parts(base, tile, offs_t, t_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
                 BLOCK_D1: tl.constexpr):
    for part in tl.static_range(len(tile)):
        _store_part(base, tile[part], offs_t, t_len, stride_t, part, HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _zeros_like_parts(tile, DTYPE: tl.constexpr):
    return [tl.zeros(part.shape, DTYPE) for part in tile]


@triton.jit
def _scale_rows(tile, factor):
    """Each part of a split tile times factor (one value per row)."""
    return [part * factor[:, None] for part in tile]


@triton.jit
def _dot_t(a, b, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """a bᵀ over the whole head dim of two split tiles: the parts cover disjoint columns, so the
    product is the sum of the parts' products."""
    product = tl.dot(a[0], tl.trans(b[0]), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    for part in tl.static_range(1, len(a)):
        product += tl.dot(a[part], tl.trans(b[part]), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return product


@triton.jit
def _add_dot(acc, p, b, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc + p b for a split tile b (and accumulator acc): each part of the product is p times
    that part of b, with p cast to b's dtype once."""
    p = p.to(b[0].dtype)
    total = ()
    for part in tl.static_range(len(b)):
        total += (acc[part] + tl.dot(p, b[part], input_precision=PRECISION, out_dtype=ACC_DTYPE),)
    return total


@triton.jit
def _add_parts(a, b):
    """a + b part by part."""
    total = ()
    for part in tl.static_range(len(a)):
        total += (a[part] + b[part],)
    return total


@triton.jit
def _times(tile, factor):
    """Each part of a split tile times one scalar."""
    return [part * factor for part in tile]


@triton.jit
def _row_dot(a, b, ACC_DTYPE: tl.constexpr):
    """Σ_d a_id b_id for every row i, over the whole head dim of two split tiles, in ACC_DTYPE."""
    total = tl.sum(a[0].to(ACC_DTYPE) * b[0].to(ACC_DTYPE), 1)
    for part in tl.static_range(1, len(a)):
        total += tl.sum(a[part].to(ACC_DTYPE) * b[part].to(ACC_DTYPE), 1)
    return total


@triton.jit
def _normalise(acc, norm, coefficients, terms):
    """acc / norm − Σ_j coefficients[j] · terms[j] part by part, the coefficients and norm one
    value per row: how every output of the forward sweep is formed from its accumulator."""
    total = ()
    for part in tl.static_range(len(acc)):
        value = acc[part] / norm[:, None]
        for j in tl.static_range(len(terms)):
            value = value - coefficients[j][:, None] * terms[j][part]
        total += (value,)
    return total


@triton.jit
def _visible(q_idx, k_idx, t_k, band_lo, band_hi, BANDED: tl.constexpr):
    """Which (query, key) pairs of a tile may attend; q_idx and k_idx broadcast against each
    other, so the same helper serves row tiles (queries × keys) and column tiles (keys × queries).
    Query rows past T_q need no mask: their loads are zero and their stores are masked."""
    visible = k_idx < t_k
    if BANDED:
        visible = visible & (k_idx >= q_idx + band_lo) & (k_idx <= q_idx + band_hi)
    return visible


@triton.jit
def _mask(x, fill, q_idx, k_idx, start_m, start_n, t_k, band_lo, band_hi, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BANDED: tl.constexpr, MASKED: tl.constexpr):
    """``x`` with ``fill`` where a (query, key) pair may not attend (``_visible``), on the tile of
    queries [start_m, start_m + BLOCK_M) and keys [start_n, start_n + BLOCK_N). MASKED (a band, or
    key blocks that may run past T_k) compiles the mask in; at run time only the tiles that cross
    the end of the keys or an edge of the band apply it: the tiles inside pay one scalar branch
    instead of a compare and a select per element (most tiles of a causal or varlen sweep)."""
    if MASKED:
        crosses = start_n + BLOCK_N > t_k
        if BANDED:
            crosses = crosses | (start_n < start_m + BLOCK_M - 1 + band_lo) | (start_n + BLOCK_N - 1 > start_m + band_hi)
        if crosses:
            x = tl.where(_visible(q_idx, k_idx, t_k, band_lo, band_hi, BANDED), x, fill)
    return x


@triton.jit
def _scores(dot, q_idx, k_idx, slope, diagonal, sm_scale, qk_scale, log2e, softcap, SOFTCAP: tl.constexpr,
            ALIBI: tl.constexpr):
    """(s, t) of a tile from ``dot`` = Q Kᵀ: the scores in base-2 units, s = log2 e · S, and the cap's
    t = tanh(R / softcap) (§1; §8). Plain, S = R = scale · dot. SOFTCAP: S = softcap · t; ALIBI then
    adds −slope · |i + diagonal − j|. q_idx, k_idx and slope broadcast like ``dot``, so row tiles and
    column (transposed) tiles share this; without the flags it is the one multiply of §1 and t is
    unused. The derivative sweeps recompute P = exp2(s − lse · log2 e) from it: rows that see no key
    have lse = +∞, so their probabilities come out exactly 0."""
    scores = dot * qk_scale
    cap = dot
    if SOFTCAP or ALIBI:
        modified = dot * sm_scale
        if SOFTCAP:
            # tanh(x) = 1 − 2 / (1 + e^{2x}): one exp2, and exactly ±1 where e^{2x} overflows or vanishes.
            cap = 1.0 - 2.0 / (1.0 + tl.exp2(modified * (2.0 * log2e / softcap)))
            modified = softcap * cap
        if ALIBI:
            modified -= slope * tl.abs(q_idx + diagonal - k_idx).to(modified.dtype)
        scores = modified * log2e
    return scores, cap


@triton.jit
def _key_range(start_m, t_q, t_k, band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BANDED: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) can see; blocks wholly outside the
    causal/window band are skipped, so cost falls with the band."""
    lo = 0
    hi = t_k
    if BANDED:
        last_m = tl.minimum(start_m + BLOCK_M, t_q) - 1
        lo = tl.maximum(start_m + band_lo, 0)
        hi = tl.minimum(last_m + band_hi + 1, t_k)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, t_q, t_k, band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BANDED: tl.constexpr):
    """Query blocks that can see the key block [start_n, start_n + BLOCK_N)."""
    lo = 0
    hi = t_q
    if BANDED:
        last_n = tl.minimum(start_n + BLOCK_N, t_k) - 1
        lo = tl.maximum(start_n - band_hi, 0)
        hi = tl.minimum(last_n - band_lo + 1, t_q)
        lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def _program(grid_heads, VARLEN: tl.constexpr):
    """(sequence, head, entry) of this program. The grid is (blocks, B · heads) for fixed lengths,
    where sequence b is batch entry b, and (blocks, N, B · heads) for VARLEN, so that neither the
    number of sequences N nor B · heads alone meets CUDA's 65535 limit on the last two grid
    dimensions. ``grid_heads`` counts query heads for row kernels, key/value heads for column ones."""
    if VARLEN:
        return tl.program_id(1), tl.program_id(2) % grid_heads, tl.program_id(2) // grid_heads
    return tl.program_id(1) // grid_heads, tl.program_id(1) % grid_heads, tl.program_id(1) // grid_heads


@triton.jit
def _sequence(Cu_q, Cu_k, batch, entry, head, group, heads, t_q, t_k, band_lo, band_hi,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """Where query head ``head`` of sequence ``batch`` (in batch entry ``entry``) and its key/value
    head ``head // group`` (grouped-query attention) live.

    Returns (q_base, k_base, row_base, len_q, len_k, band_lo, band_hi): offsets of the two heads'
    first rows in the query- and key-shaped tensors, the index of the first row statistic in the
    (B, H, T_q) buffers, the sequence's lengths and its band. Fixed length: sequence b is all
    T_q × T_k of batch entry b. VARLEN: T_q and T_k are total lengths, every batch entry (B > 1
    only under vmap) packs the sequences the same way, sequence b being rows Cu[b]:Cu[b + 1]; the
    band arrives for shift 0, and BOTTOM_RIGHT moves it by the sequence's own len_k − len_q
    (``AttentionParams.diagonal_band``'s rule, per sequence).
    """
    if VARLEN:
        q_start = tl.load(Cu_q + batch)
        k_start = tl.load(Cu_k + batch)
        len_q = tl.load(Cu_q + batch + 1) - q_start
        len_k = tl.load(Cu_k + batch + 1) - k_start
        if BOTTOM_RIGHT:
            band_lo += len_k - len_q
            band_hi += len_k - len_q
        q_row = q_start.to(tl.int64) * stride_qt
        k_row = k_start.to(tl.int64) * stride_kt
    else:
        q_start, len_q, len_k, q_row, k_row = 0, t_q, t_k, 0, 0
    q_base = entry.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_row
    k_base = entry.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh + k_row
    row_base = (entry * heads + head) * t_q + q_start
    return q_base, k_base, row_base, len_q, len_k, band_lo, band_hi


@triton.jit
def _column_program(Cu_q, Cu_k, members, t_q, t_k, heads, group, band_lo, band_hi,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """Where a column program's tensors live. It serves ``members`` adjacent query heads of one
    key/value head: the whole group, or one share of it when the launcher splits the group
    (``_Call.group_split``).

    Returns ``_sequence``'s values for the first query head served, then ``share`` (which share
    of the group this program is) and ``tile``, the index of its (key block, key/value head,
    sequence) among all programs' (shares of one tile are adjacent, the fastest grid index)."""
    batch, slot, entry = _program(heads // members, VARLEN)
    first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi = _sequence(
        Cu_q, Cu_k, batch, entry, slot * members, group, heads, t_q, t_k, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    shares = group // members
    return first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi, program % shares, program // shares


@triton.jit
def _column_store(Out_a, Out_b, Part_a, Part_b, Arrivals, tile_a, tile_b, k_base, share, tile, shares, stride_split,
                  offs_n, len_k, stride_kt, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Store a column program's two key-shaped output tiles (split into head-dim parts). SPLIT (the
    group shared among ``shares`` programs): each share stores its float32 partials,
    ``stride_split`` elements apart, and the last share of the tile to arrive sums all of them in
    share order, so the result does not depend on which share arrives last (no float atomics)."""
    if SPLIT:
        _store_parts(Part_a + k_base + share * stride_split, tile_a, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0,
                     BLOCK_D1)
        _store_parts(Part_b + k_base + share * stride_split, tile_b, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0,
                     BLOCK_D1)
        # Every thread's partial stores precede the counter's release; the last share acquires.
        tl.debug_barrier()
        if tl.atomic_add(Arrivals + tile, 1, sem="acq_rel") == shares - 1:
            tile_a = _load_parts(Part_a + k_base, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            tile_b = _load_parts(Part_b + k_base, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            for other in range(1, shares):
                offset = k_base + other * stride_split
                tile_a = _add_parts(tile_a, _load_parts(Part_a + offset, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0,
                                                        BLOCK_D1))
                tile_b = _add_parts(tile_b, _load_parts(Part_b + offset, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0,
                                                        BLOCK_D1))
            _store_parts(Out_a + k_base, tile_a, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            _store_parts(Out_b + k_base, tile_b, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    else:
        _store_parts(Out_a + k_base, tile_a, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        _store_parts(Out_b + k_base, tile_b, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)


_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _modifiers(Slopes, row_base, offs_m, len_q, len_k, softcap, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               ROWS: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """What a program's tiles need of the score modifiers (§8): with ROWS (a row program) the rows'
    ALiBi slopes broadcast along keys (column programs load theirs per query block), the ALiBi
    diagonal (the sequence's T_k − T_q when BOTTOM_RIGHT, as the mask's) and the cap in the
    accumulator dtype; what a flag leaves off is unused (0)."""
    slope = 0
    diagonal = 0
    if ALIBI:
        if ROWS:
            slope = tl.load(Slopes + row_base + offs_m, mask=offs_m < len_q, other=0.0).to(ACC_DTYPE)[:, None]
        if BOTTOM_RIGHT:
            diagonal = len_k - len_q
    if SOFTCAP:  # formed in float64, like _scales' products
        softcap = (softcap * tl.full([], 1.0, tl.float64)).to(ACC_DTYPE)
    return slope, diagonal, softcap


@triton.jit
def _scales(sm_scale, ACC_DTYPE: tl.constexpr):
    """(scale, scale · log2 e, log2 e) in the accumulator dtype. ``sm_scale`` arrives as a float64
    argument and the products are formed in float64, so float64 runs lose no precision."""
    log2e = tl.full([], _LOG2E, tl.float64)
    one = tl.full([], 1.0, tl.float64)
    return (sm_scale * one).to(ACC_DTYPE), (sm_scale * log2e).to(ACC_DTYPE), log2e.to(ACC_DTYPE)



# ----------------------------------------------------------------------------------------------
# The backward sweeps (§2, §4). A row sweep runs over the key blocks a query block sees (dQ-like
# outputs), a column sweep over the query blocks a key block is seen by (dK/dV-like outputs); each
# has one tile function, specialised by STAGE (what the tile accumulates) and by whether its
# block needs masks. Column tiles are key-major (keys × queries): the row tiles' transposes.
# ----------------------------------------------------------------------------------------------

# STAGE of ``_row_tile`` and ``_column_tile``: the backward's gradients (§2: dQ, or dK and dV),
# the double backward's row reductions (§4: sigma, the terms of rho, P Ḡv; row sweeps only), the
# double backward's outputs (cot_q and cot_dO, or cot_k and cot_v), or those outputs plus the
# backward for a second cotangent u̇ = (dȮ, dl̇se): H_u ẋ + Jᵀ u̇, the tangent of the backward
# (forward over reverse, theory §5), whose Jᵀ u̇ adds the backward's dS for u̇ to S̄ and Pᵀ dȮ to
# cot_v.
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
def _broadcast(rows, ROW_TILE: tl.constexpr):
    """Row statistics along a row tile's rows, or along a column (transposed) tile's columns."""
    if ROW_TILE:
        broadcast = rows[:, None]
    else:
        broadcast = rows[None, :]
    return broadcast


@triton.jit
def _second_order_dots(acc_s, acc_p, p, dp, ds_bar, gv_a, gv_b, u_a, u_b, delta, sigma, rho, delta_u, by_s, by_ds,
                       by_dp, cap, softcap, ROW_TILE: tl.constexpr, HAS_U: tl.constexpr, SOFTCAP: tl.constexpr,
                       PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One tile's part of the double backward's outputs (§4.3), for row tiles and column (transposed)
    tiles alike: acc_s + dS by_ds + S̄ by_s and acc_p + dP̄ by_dp, with dS = P ∘ (dP − δ), dP̄ = P ∘
    (dS̄ − σ), P̄ = dS̄ ∘ (dP − δ) − σ dP + gv_a gv_bᵀ (dO Ḡvᵀ in the tile's orientation) and S̄ = P
    ∘ (P̄ − ρ); HAS_U adds Jᵀ u̇'s dS = P ∘ (u_a u_bᵀ − δ_u) to S̄ (§5). Each product is taken as
    soon as its tile exists and P̄ gathers its matrix products in place, so that few T×T tiles are
    live at once (forming dS, S̄ and dP̄ together first spilled more; perf-notes item 25). SOFTCAP
    (§8): ``ds_bar`` is the cotangent of dR, the softmax sees g ∘ ds_bar (g = 1 − t², t = ``cap``),
    and the products take the scores' dR = g ∘ dS and R̄ = g ∘ (S̄ − (2 / softcap) t ∘ ds_bar ∘ dS)."""
    delta, sigma, rho = _broadcast(delta, ROW_TILE), _broadcast(sigma, ROW_TILE), _broadcast(rho, ROW_TILE)
    ds = p * (dp - delta)
    ds_bar_s, ds_s = ds_bar, ds
    if SOFTCAP:
        gate = 1.0 - cap * cap
        ds_bar_s, ds_s = gate * ds_bar, gate * ds
    acc_s = _add_dot(acc_s, ds_s, by_ds, PRECISION, ACC_DTYPE)
    acc_p = _add_dot(acc_p, p * (ds_bar_s - sigma), by_dp, PRECISION, ACC_DTYPE)
    p_bar = _add_dot_t(ds_bar_s * (dp - delta) - sigma * dp, gv_a, gv_b, PRECISION, ACC_DTYPE)
    if HAS_U:
        p_bar = _add_dot_t(p_bar, u_a, u_b, PRECISION, ACC_DTYPE) - _broadcast(delta_u, ROW_TILE)
    s_bar = p * (p_bar - rho)
    if SOFTCAP:
        s_bar = gate * (s_bar - (2.0 / softcap) * cap * ds_bar * ds)
    return _add_dot(acc_s, s_bar, by_s, PRECISION, ACC_DTYPE), acc_p


@triton.jit
def _row_tile(acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, K, V, Cot_dk, Cot_dv, k_base, start_m,
              start_n, offs_m, t_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal, softcap,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
              BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, MASKED: tl.constexpr, STAGE: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr = False):
    """``acc`` plus what the key block [start_n, start_n + BLOCK_N) adds to it, for the query block
    whose tiles (q, d_out, cot_dq, u_dot; split into head-dim parts) and row statistics (lse2 =
    lse · log2 e, delta, sigma, rho, delta_u) the caller holds; key-shaped pointers are offset by
    k_base. ``acc`` is (dQ,) for GRADIENT, (sigma, Σ_j P dS̄ dP, P Ḡv) for ROW_REDUCTIONS, (cot_q,
    cot_dO) for COTANGENTS and BACKWARD_TANGENT; a stage reads no tile or statistic it does not
    use (None). The score modifiers (§8, ``_scores``): ``slope`` is the rows' ALiBi slope
    broadcast along keys. With TMA, K and V are the key/value head's tensor descriptors (one key
    block a box; rows past t_k arrive as zeros, as the masked loads give them)."""
    offs_k = start_n + tl.arange(0, BLOCK_N)
    k = _block(K, k_base, start_n, t_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
    v = _block(V, k_base, start_n, t_k, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D0, BLOCK_D1, TMA)
    if STAGE != GRADIENT:
        cot_dk = _load_parts(Cot_dk + k_base, offs_k, t_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        cot_dv = _load_parts(Cot_dv + k_base, offs_k, t_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    scores, cap = _scores(_dot_t(q, k, PRECISION, ACC_DTYPE), offs_m[:, None], offs_k[None, :], slope, diagonal,
                          sm_scale, qk_scale, log2e, softcap, SOFTCAP, ALIBI)
    p = _mask(tl.exp2(scores - lse2[:, None]), 0.0, offs_m[:, None], offs_k[None, :], start_m, start_n, t_k,
              band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, MASKED)
    dp = _dot_t(d_out, v, PRECISION, ACC_DTYPE)
    if STAGE == GRADIENT:
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # dR = g ∘ dS (§8)
            ds = (1.0 - cap * cap) * ds
        acc = (_add_dot(acc[0], ds, k, PRECISION, ACC_DTYPE),)
    else:
        # dS̄ = scale (Ḡq Kᵀ + Q Ḡkᵀ)
        ds_bar = _add_dot_t(_dot_t(cot_dq, k, PRECISION, ACC_DTYPE), q, cot_dk, PRECISION, ACC_DTYPE) * sm_scale
        if STAGE == ROW_REDUCTIONS:
            if SOFTCAP:  # the softmax's dS̄ = g ∘ dR̄ (§8)
                ds_bar = (1.0 - cap * cap) * ds_bar
            p_ds_bar = p * ds_bar
            acc = (acc[0] + tl.sum(p_ds_bar, 1), acc[1] + tl.sum(p_ds_bar * dp, 1),
                   _add_dot(acc[2], p, cot_dv, PRECISION, ACC_DTYPE))
        else:  # (cot_q, cot_dO) += (S̄ K + dS Ḡk, dP̄ V); BACKWARD_TANGENT: Jᵀ u̇'s dS joins S̄
            acc = _second_order_dots(acc[0], acc[1], p, dp, ds_bar, d_out, cot_dv, u_dot, v, delta, sigma, rho, delta_u,
                                     k, cot_dk, v, cap, softcap, True, STAGE == BACKWARD_TANGENT, SOFTCAP, PRECISION,
                                     ACC_DTYPE)
    return acc


@triton.jit
def _row_sweep(acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, K, V, Cot_dk, Cot_dv, k_base, start_m,
               offs_m, len_q, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope, diagonal, softcap,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
               BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, EVEN_K: tl.constexpr, STAGE: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr = False):
    """``_row_tile`` over every key block the query block [start_m, start_m + BLOCK_M) sees. Key
    blocks are loaded with masks (cheap against a row tile's work); only a band or a last key
    block past T_k (not EVEN_K) compiles the score mask in (``_mask``)."""
    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    for start_n in range(lo, hi, BLOCK_N):
        acc = _row_tile(acc, q, d_out, cot_dq, lse2, delta, sigma, rho, u_dot, delta_u, K, V, Cot_dk, Cot_dv, k_base,
                        start_m, start_n, offs_m, len_k, stride_kt, band_lo, band_hi, sm_scale, qk_scale, log2e, slope,
                        diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, BANDED,
                        BANDED or not EVEN_K, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA)
    return acc


@triton.jit
def _full_blocks_end(lo, hi, t_q, BLOCK_M: tl.constexpr):
    """Where a column program's query sweep [lo, hi) (lo a multiple of BLOCK_M) stops having whole
    blocks of rows < t_q. The sweep loops over the whole blocks with unmasked loads, then takes
    the one partial block, if any, with masked ones: per-row masks against a length the compiler
    knows nothing about (a VARLEN sequence's) cost more address and predicate work than the tile's
    arithmetic hides (VARLEN dK/dV was 30–40 % slower than at a fixed length, H100; perf-notes 8)."""
    return tl.maximum(lo, tl.minimum(hi, t_q // BLOCK_M * BLOCK_M))


@triton.jit
def _column_tile(acc_k, acc_v, k, v, cot_dk, cot_dv, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot,
                 Slopes, q_base, row_base, start_m, start_n, offs_n, t_q, t_k, stride_qt, band_lo, band_hi, sm_scale,
                 qk_scale, log2e, diagonal, softcap, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BANDED: tl.constexpr,
                 ROWS_MASKED: tl.constexpr, STAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """(acc_k, acc_v) plus what the query block [start_m, start_m + BLOCK_M) adds for the key block
    whose tiles (k, v, cot_dk, cot_dv; split into head-dim parts) the caller holds: (dK / scale, dV)
    for GRADIENT, (cot_k / scale, cot_v) for COTANGENTS and BACKWARD_TANGENT. Query-shaped pointers
    are offset by q_base, row statistics by row_base; a stage reads no pointer it does not use
    (None). Without ROWS_MASKED every query row of the block is < t_q. With TMA, Q and D_out are the
    query head's tensor descriptors (``_row_tile``'s K and V)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _block(Q, q_base, start_m, t_q, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1, TMA, ROWS_MASKED)
    d_out = _block(D_out, q_base, start_m, t_q, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D0, BLOCK_D1, TMA, ROWS_MASKED)
    lse2 = _load_rows(Lse + row_base, offs_m, t_q, float("inf"), ROWS_MASKED).to(ACC_DTYPE) * log2e
    delta = _load_rows(Delta + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
    if STAGE != GRADIENT:
        cot_dq = _load_parts(Cot_dq + q_base, offs_m, t_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED)
        sigma = _load_rows(Sigma + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
        rho = _load_rows(Rho + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
    u_dot, delta_u = None, None
    if STAGE == BACKWARD_TANGENT:
        u_dot = _load_parts(D_out_dot + q_base, offs_m, t_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1, ROWS_MASKED)
        delta_u = _load_rows(Delta_dot + row_base, offs_m, t_q, 0.0, ROWS_MASKED)
    slope = None
    if ALIBI:  # the ALiBi slope of each query row (§8), laid out like lse
        slope = _load_rows(Slopes + row_base, offs_m, t_q, 0.0, ROWS_MASKED).to(ACC_DTYPE)[None, :]
    scores_t, cap_t = _scores(_dot_t(k, q, PRECISION, ACC_DTYPE), offs_m[None, :], offs_n[:, None], slope, diagonal,
                              sm_scale, qk_scale, log2e, softcap, SOFTCAP, ALIBI)
    p_t = _mask(tl.exp2(scores_t - lse2[None, :]), 0.0, offs_m[None, :], offs_n[:, None], start_m, start_n,
                t_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED, BANDED)
    dp_t = _dot_t(v, d_out, PRECISION, ACC_DTYPE)
    if STAGE == GRADIENT:
        acc_v = _add_dot(acc_v, p_t, d_out, PRECISION, ACC_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # dR = g ∘ dS (§8)
            ds_t = (1.0 - cap_t * cap_t) * ds_t
        acc_k = _add_dot(acc_k, ds_t, q, PRECISION, ACC_DTYPE)
    else:
        ds_bar_t = _add_dot_t(_dot_t(k, cot_dq, PRECISION, ACC_DTYPE), cot_dk, q, PRECISION, ACC_DTYPE) * sm_scale
        if STAGE == BACKWARD_TANGENT:  # + Jᵀ u̇: the backward's dSᵀ for u̇ joins S̄ᵀ, and dV gains Pᵀ u̇
            acc_v = _add_dot(acc_v, p_t, u_dot, PRECISION, ACC_DTYPE)
        acc_k, acc_v = _second_order_dots(acc_k, acc_v, p_t, dp_t, ds_bar_t, cot_dv, d_out, v, u_dot, delta, sigma, rho,
                                          delta_u, q, cot_dq, d_out, cap_t, softcap, False, STAGE == BACKWARD_TANGENT,
                                          SOFTCAP, PRECISION, ACC_DTYPE)
    return acc_k, acc_v


@triton.jit
def _column_sweep(acc_k, acc_v, k, v, cot_dk, cot_dv, Q, D_out, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot, Delta_dot,
                  Slopes, first_q_base, first_row_base, members, start_n, offs_n, t_q, len_q, len_k, stride_qh,
                  stride_qt, band_lo, band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                  BANDED: tl.constexpr, STAGE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """``_column_tile`` over every query block that sees the key block [start_n, start_n + BLOCK_N),
    of each of the ``members`` query heads a column program serves (``_column_program``): the
    whole blocks with unmasked loads, then the one partial block, if any (``_full_blocks_end``)."""
    lo, hi = _query_range(start_n, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    full_hi = _full_blocks_end(lo, hi, len_q, BLOCK_M)
    for member in range(members):
        # The group's query heads are adjacent: each one stride_qh elements and T_q row statistics on.
        q_base = first_q_base + tl.cast(member, tl.int64) * stride_qh
        row_base = first_row_base + member * t_q
        # This query head's Q and dO (``_rows_source``): descriptors with TMA.
        q_rows = _rows_source(Q, q_base, len_q, stride_qt, BLOCK_M, HEAD_DIM, TMA)
        do_rows = _rows_source(D_out, q_base, len_q, stride_qt, BLOCK_M, HEAD_DIM, TMA)
        for start_m in range(lo, full_hi, BLOCK_M):
            acc_k, acc_v = _column_tile(
                acc_k, acc_v, k, v, cot_dk, cot_dv, q_rows, do_rows, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot,
                Delta_dot, Slopes, q_base, row_base, start_m, start_n, offs_n, len_q, len_k, stride_qt, band_lo,
                band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
                BANDED, False, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA)
        if full_hi < hi:  # the one partial block
            acc_k, acc_v = _column_tile(
                acc_k, acc_v, k, v, cot_dk, cot_dv, q_rows, do_rows, Cot_dq, Lse, Delta, Sigma, Rho, D_out_dot,
                Delta_dot, Slopes, q_base, row_base, full_hi, start_n, offs_n, len_q, len_k, stride_qt, band_lo,
                band_hi, sm_scale, qk_scale, log2e, diagonal, softcap, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
                BANDED, True, STAGE, SOFTCAP, ALIBI, ACC_DTYPE, PRECISION, TMA)
    return acc_k, acc_v
