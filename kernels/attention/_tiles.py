"""Device helpers every attention sweep is built from: loads and stores of (T, D) tiles and of
their head-dim parts (through TMA or masked loads), masks and key/query ranges of a causal or
windowed band, where a program's sequence and heads live, and the column kernels' split-group
store. The backward sweeps built from them are in ``_sweeps``.

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
          BLOCK_N: tl.constexpr, BANDED: tl.constexpr, MASKED: tl.constexpr, EVERY_TILE: tl.constexpr = False):
    """``x`` with ``fill`` where a (query, key) pair may not attend (``_visible``), on the tile of
    queries [start_m, start_m + BLOCK_M) and keys [start_n, start_n + BLOCK_N). MASKED (a band, or
    key blocks that may run past T_k) compiles the mask in; at run time only the tiles that cross
    the end of the keys or an edge of the band apply it: the tiles inside pay one scalar branch
    instead of a compare and a select per element (most tiles of a causal or varlen sweep).
    EVERY_TILE applies it without that branch, for loops that run edge tiles only: in the forward's
    two halves the branch makes ptxas serialise every wgmma of the kernel (docs/perf-notes.md item
    53)."""
    if MASKED:
        if EVERY_TILE:
            return tl.where(_visible(q_idx, k_idx, t_k, band_lo, band_hi, BANDED), x, fill)
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
def _full_blocks_end(lo, hi, length, BLOCK: tl.constexpr):
    """Where a sweep [lo, hi) of blocks of BLOCK rows (lo a multiple of BLOCK) stops having whole
    blocks of rows < length, so that it can loop over those without masks and take the one partial
    block, if any, apart. In the column sweeps (queries): per-row masks against a length the
    compiler knows nothing about (a VARLEN sequence's) cost more address and predicate work than
    the tile's arithmetic hides (VARLEN dK/dV was 30–40 % slower than at a fixed length, H100;
    perf-notes 8). In the forward's halves (keys): the mask's run-time test in their loop made
    ptxas serialise the kernel's wgmma (perf-notes 53)."""
    return tl.maximum(lo, tl.minimum(hi, length // BLOCK * BLOCK))


@triton.jit
def _program(grid_heads, VARLEN: tl.constexpr, LPT: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """(block, sequence, head, entry, tile) of this program: its block along the sweep (query blocks
    in row kernels, key blocks in column ones), where its rows live, and its index among all
    programs, block-major (``_column_program``'s tiles). ``grid_heads`` counts query heads for row
    kernels, key/value heads (or shares of their groups) for column ones; a grid row is one of
    them in one batch entry. The grid is (blocks, B · heads) for fixed lengths, where sequence b is
    batch entry b, and (blocks, N, B · heads) for VARLEN, so that neither the number of sequences N
    nor B · heads alone meets CUDA's 65535 limit on the last two grid dimensions.

    LPT (``AttentionCall.ordered``: fixed lengths under a band bounded on one side) hands the
    programs out longest first. CUDA starts programs in launch order (the first grid index the
    fastest), and there they differ in length along the diagonal, so in the grid order above the
    longest programs of the last heads start in the last wave and run on after the rest. The grid
    is then (section, blocks, B · heads / section): a section's grid rows the fastest, so that a
    few heads' streamed tiles share L2 as in grid order, then the blocks from the longest (the last
    first with HEAVY_LAST), then the sections."""
    if VARLEN:
        tile = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        return tl.program_id(0), tl.program_id(1), tl.program_id(2) % grid_heads, tl.program_id(2) // grid_heads, tile
    if LPT:
        block = tl.program_id(1)
        if HEAVY_LAST:
            block = tl.num_programs(1) - 1 - block
        row = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        rows = tl.num_programs(0) * tl.num_programs(2)
    else:
        block = tl.program_id(0)
        row = tl.program_id(1)
        rows = tl.num_programs(1)
    return block, row // grid_heads, row % grid_heads, row // grid_heads, block * rows + row


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
                    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, LPT: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """Where a column program's tensors live. It serves ``members`` adjacent query heads of one
    key/value head: the whole group, or one share of it when the launcher splits the group
    (``_Call.group_split``).

    Returns its key block (``_program``), ``_sequence``'s values for the first query head served,
    then ``share`` (which share of the group this program is) and ``tile``, the index of its (key
    block, key/value head, sequence) among all programs' (shares of one tile are adjacent grid
    rows)."""
    block, batch, slot, entry, program = _program(heads // members, VARLEN, LPT, HEAVY_LAST)
    first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi = _sequence(
        Cu_q, Cu_k, batch, entry, slot * members, group, heads, t_q, t_k, band_lo, band_hi,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, VARLEN, BOTTOM_RIGHT)
    shares = group // members
    return (block, first_q_base, k_base, first_row_base, len_q, len_k, band_lo, band_hi, program % shares,
            program // shares)


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
