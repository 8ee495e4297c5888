"""Fused scaled-dot-product attention: forward, forward-mode JVP, backward and double backward.

Reading order: parameters, tile helpers, the forward sweep (with the JVP folded in), the
backward (row sweep for dQ, column sweep for dK/dV), the double backward (row sweeps, then the
column sweep), launch functions. No autograd here: ``theria_torch`` and ``theria_jax`` wrap the
launchers. The equations are derived in docs/theory/attention_derivatives.md (§ numbers below).

Notation per (sequence, head): S = scale · Q Kᵀ (masked entries −∞), P = softmax(S) row-wise,
O = P V, lse = row log-sum-exp of S. Row statistics live in (B, H, T_q) buffers; nothing of size
T_q × T_k ever reaches global memory. A sequence is a batch entry of the (B, H, T, D) tensors, or
with VARLEN (variable-length batches, flash-attn's ``cu_seqlens``) a run of rows of a packed entry;
``_sequence`` is the one place that tells the two apart. Softmax is evaluated in base 2 (``exp2``) with
log2(e) folded into the scale, as the Triton fused-attention tutorial does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from theria_kernels._common import (
    accumulator_dtype,
    cdiv,
    dtype_name,
    is_interpreter,
    multiprocessor_count,
    next_power_of_2,
)

LOG2E = math.log2(math.e)
# Stands for an unbounded window side: far beyond any sequence length, far from int32 overflow.
UNBOUNDED = 1 << 30
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


@dataclass(frozen=True)
class AttentionParams:
    """Static description of one attention call (hashable, so JAX can treat it as static).

    ``window_size`` has flash-attn's meaning: key ``j`` is visible to query ``i`` when
    ``-left <= j - i - shift <= right`` (``-1`` = unbounded); ``causal`` sets ``right = 0``.
    ``shift = T_k - T_q`` when ``bottom_right`` (flash-attn ≥ 2.1) else 0 (torch SDPA, JAX).
    """

    scale: float
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    bottom_right: bool = False

    def diagonal_band(self, t_q: int, t_k: int) -> tuple[int, int]:
        """(lo, hi) such that key j is visible to query i iff i + lo <= j <= i + hi."""
        left, right = self.window_size
        if self.causal:
            right = 0
        shift = t_k - t_q if self.bottom_right else 0
        lo = shift - left if left >= 0 else -UNBOUNDED
        hi = shift + right if right >= 0 else UNBOUNDED
        return lo, hi

    @property
    def banded(self) -> bool:
        return self.causal or self.window_size != (-1, -1)


SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
BACKENDS = ("triton_full_fused", "reference")


def validate_attention_args(q_shape, k_shape, v_shape, dtypes, *, layout: str, backend: str,
                            window_size=(-1, -1)) -> None:
    """Framework-neutral checks shared by the torch and JAX adapters, so both raise the same
    messages. Shapes are tuples in the caller's ``layout`` ("(B, H, T, D)", "(B, T, H, D)", or
    "(total, H, D)" for packed variable-length batches), dtypes are the names of q's, k's and v's
    dtypes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    axes = layout.strip("()").split(", ")
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != len(axes):
            raise ValueError(f"{name} must have {len(axes)} dimensions {layout}, got shape {tuple(shape)}")
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k_shape)} and v {tuple(v_shape)}")
    head_axis = axes.index("H")
    if "B" in axes and q_shape[0] != k_shape[0]:
        raise ValueError(f"q has batch size {q_shape[0]} but k and v have {k_shape[0]}; they must match")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"q has head dim {q_shape[-1]} but k and v have {k_shape[-1]}; they must match")
    heads, heads_kv = q_shape[head_axis], k_shape[head_axis]
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(
            f"q has {heads} heads and k, v have {heads_kv}: the query heads must be a multiple of the "
            f"key/value heads (grouped-query attention); check the {layout} layout")
    if len(set(dtypes)) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}; cast them to one")
    if (len(window_size) != 2 or any(not isinstance(w, int) or w < -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    if backend == "reference":
        return
    if dtypes[0] not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {dtypes[0]}; {backend} supports {', '.join(SUPPORTED_DTYPES)}; "
                        "cast the inputs or use backend='reference'")
    head_dim = q_shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; {backend} supports {MIN_HEAD_DIM}–{MAX_HEAD_DIM}; "
                         "use backend='reference'")


def validate_dropout(dropout_p: float) -> None:
    """flash-attn's signatures carry ``dropout_p``; theria has no dropout, so only 0.0 passes."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p}: theria's attention has no dropout; pass dropout_p=0.0")


# Raised by both frameworks' batching rules when vmap maps over the cu_seqlens themselves.
VMAP_CU_SEQLENS_ERROR = (
    "vmap over cu_seqlens is not supported: every vmapped instance must share cu_seqlens_q and "
    "cu_seqlens_k; pack the instances' sequences into one batch (concatenate them and their cu_seqlens) instead"
)


def validate_cu_seqlens(cu_q_shape, cu_k_shape, cu_dtypes, max_seqlen_q, max_seqlen_k) -> None:
    """Framework-neutral checks of the varlen arguments that need no host read (shapes, dtypes,
    the max lengths' types), shared by the launchers and both adapters."""
    for name, shape, dtype in (("cu_seqlens_q", cu_q_shape, cu_dtypes[0]), ("cu_seqlens_k", cu_k_shape, cu_dtypes[1])):
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(shape)}")
        if dtype != "int32":
            raise TypeError(f"{name} must be int32 (flash-attn's cu_seqlens), got {dtype}")
    if cu_q_shape[0] != cu_k_shape[0]:
        raise ValueError(f"cu_seqlens_q has {cu_q_shape[0]} entries and cu_seqlens_k has {cu_k_shape[0]}; "
                         "both must have batch + 1")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a Python int >= 0 (it sizes the launch grid), got {value!r}")


def validate_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k) -> None:
    """Checks of the cu_seqlens values, read to the host by the caller (sequences of ints): each
    starts at 0, never decreases and ends at its tensor's token count, and no sequence is longer
    than its max_seqlen (the kernels would silently skip its tail)."""
    for name, values, total, owner, max_seqlen in (
            ("cu_seqlens_q", cu_seqlens_q, total_q, "q has", max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, total_k, "k and v have", max_seqlen_k)):
        values = [int(x) for x in values]
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        for index, length in enumerate(lengths):
            if length < 0:
                raise ValueError(f"{name} must be non-decreasing, but entry {index + 1} ({values[index + 1]}) is "
                                 f"less than entry {index} ({values[index]})")
        if values[-1] != total:
            raise ValueError(f"{name} ends at {values[-1]} but {owner} {total} tokens (dimension 0); "
                             "its last entry must be the total")
        longest = max(lengths, default=0)
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen_{name[-1]}={max_seqlen} but sequence {lengths.index(longest)} of {name} "
                             f"has {longest} tokens; pass at least the longest length")


# ----------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------


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
               BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    start: tl.constexpr = PART * BLOCK_D0
    width: tl.constexpr = BLOCK_D1 if PART else BLOCK_D0
    return _load_tile(base + start, offs_t, tl.arange(0, width), t_len, stride_t, min(HEAD_DIM - start, width), width)


@triton.jit
def _store_part(base, tile, offs_t, t_len, stride_t, PART: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    start: tl.constexpr = PART * BLOCK_D0
    width: tl.constexpr = BLOCK_D1 if PART else BLOCK_D0
    _store_tile(base + start, tile, offs_t, tl.arange(0, width), t_len, stride_t, min(HEAD_DIM - start, width), width)


@triton.jit
def _load_parts(base, offs_t, t_len, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
                BLOCK_D1: tl.constexpr):
    """A (len(offs_t), HEAD_DIM) tile of a (T, HEAD_DIM) matrix as the tuple of its head-dim parts."""
    tile = (_load_part(base, offs_t, t_len, stride_t, 0, HEAD_DIM, BLOCK_D0, BLOCK_D1),)
    if BLOCK_D1 > 0:
        tile += (_load_part(base, offs_t, t_len, stride_t, 1, HEAD_DIM, BLOCK_D0, BLOCK_D1),)
    return tile


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
def _probs(scores, lse2, qk_scale):
    """P recomputed from the saved row log-sum-exp (lse2 = lse · log2 e, broadcast like scores).
    Rows that see no key have lse = +∞, so their probabilities come out exactly 0."""
    return tl.exp2(scores * qk_scale - lse2)


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
                  offs_n, offs_d, len_k, stride_kt, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Store a column program's two key-shaped output tiles. SPLIT (the group shared among
    ``shares`` programs): each share stores its float32 partials, ``stride_split`` elements
    apart, and the last share of the tile to arrive sums all of them in share order, so the
    result does not depend on which share arrives last (no float atomics)."""
    if SPLIT:
        _store_tile(Part_a + k_base + share * stride_split, tile_a, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        _store_tile(Part_b + k_base + share * stride_split, tile_b, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        # Every thread's partial stores precede the counter's release; the last share acquires.
        tl.debug_barrier()
        if tl.atomic_add(Arrivals + tile, 1, sem="acq_rel") == shares - 1:
            tile_a = tl.zeros_like(tile_a)
            tile_b = tl.zeros_like(tile_b)
            for other in range(shares):
                offset = k_base + other * stride_split
                tile_a += _load_tile(Part_a + offset, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
                tile_b += _load_tile(Part_b + offset, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
            _store_tile(Out_a + k_base, tile_a, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
            _store_tile(Out_b + k_base, tile_b, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
    else:
        _store_tile(Out_a + k_base, tile_a, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        _store_tile(Out_b + k_base, tile_b, offs_n, offs_d, len_k, stride_kt, HEAD_DIM, BLOCK_D)


_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _scales(sm_scale, ACC_DTYPE: tl.constexpr):
    """(scale, scale · log2 e, log2 e) in the accumulator dtype. ``sm_scale`` arrives as a float64
    argument and the products are formed in float64, so float64 runs lose no precision."""
    log2e = tl.full([], _LOG2E, tl.float64)
    one = tl.full([], 1.0, tl.float64)
    return (sm_scale * one).to(ACC_DTYPE), (sm_scale * log2e).to(ACC_DTYPE), log2e.to(ACC_DTYPE)


# ----------------------------------------------------------------------------------------------
# Forward, forward-mode JVP (§1, §3) and second-order forward (§7): one sweep over key blocks per
# query block. The tangent's row term mu = Σ_j P_ij Ṡ_ij accumulates online with the same
# rescaling as the softmax normaliser, so Ȯ = (Σ_j P_ij (Ṡ_ij V_j + V̇_j)) / l − mu O needs no
# second sweep. The second derivative along (ẋ, y) does the same with a second direction y:
#   O'' = Σ_j P_ij ((S^y_ij Ṡ_ij + S''_ij) V_j + Ṡ_ij V^y_j + S^y_ij V̇_j) − mu^y Ȯ − mu O^y − m O,
#   lse'' = m − mu mu^y,   with S'' = scale (Q̇ K^yᵀ + Q^y K̇ᵀ), m = Σ_j P_ij (S^y_ij Ṡ_ij + S''_ij).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Q_dot, K_dot, V_dot, Out_dot, Lse_dot, Q_y, K_y, V_y, Out_second, Lse_second,
    Cu_q, Cu_k, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    t_q, t_k, heads, group, sm_scale: tl.float64, band_lo, band_hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr, BANDED: tl.constexpr, EVEN_K: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_TANGENT: tl.constexpr, SECOND_ORDER: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """HAS_TANGENT adds Ȯ, l̇se along (Q̇, K̇, V̇); SECOND_ORDER (with HAS_TANGENT) adds the second
    derivative along (Q̇, K̇, V̇) and (Q^y, K^y, V^y), bilinear in the two directions. Every tile
    with a head-dim axis is a tuple of head-dim parts (BLOCK_D0, BLOCK_D1: ``_head_dim_parts``)."""
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
    sm_scale, qk_scale, log2e = _scales(sm_scale, ACC_DTYPE)

    q = _load_parts(Q + q_base, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
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

    lo, hi = _key_range(start_m, len_q, len_k, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k = _load_parts(K + k_base, offs_k, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        v = _load_parts(V + k_base, offs_k, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
        scores = _dot_t(q, k, PRECISION, ACC_DTYPE) * qk_scale
        scores = _mask(scores, float("-inf"), offs_m[:, None], offs_k[None, :], start_m, start_n, len_k, band_lo,
                       band_hi, BLOCK_M, BLOCK_N, BANDED, BANDED or not EVEN_K)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no key yet keeps max −∞; shifting by 0 keeps exp2 finite (0).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        p = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = _scale_rows(acc, rescale)
        acc = _add_dot(acc, p, v, PRECISION, ACC_DTYPE)
        if HAS_TANGENT:
            k_dot = _load_parts(K_dot + k_base, offs_k, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            v_dot = _load_parts(V_dot + k_base, offs_k, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            scores_dot = _dot_t(q_dot, k, PRECISION, ACC_DTYPE)
            scores_dot += _dot_t(q, k_dot, PRECISION, ACC_DTYPE)
            scores_dot *= sm_scale
            p_scores_dot = p * scores_dot
            mu = mu * rescale + tl.sum(p_scores_dot, 1)
            acc_dot = _scale_rows(acc_dot, rescale)
            acc_dot = _add_dot(acc_dot, p_scores_dot, v, PRECISION, ACC_DTYPE)
            acc_dot = _add_dot(acc_dot, p, v_dot, PRECISION, ACC_DTYPE)
        if SECOND_ORDER:
            k_y = _load_parts(K_y + k_base, offs_k, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            v_y = _load_parts(V_y + k_base, offs_k, len_k, stride_kt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
            scores_y = _dot_t(q_y, k, PRECISION, ACC_DTYPE)
            scores_y = (scores_y + _dot_t(q, k_y, PRECISION, ACC_DTYPE)) * sm_scale
            scores_xy = _dot_t(q_dot, k_y, PRECISION, ACC_DTYPE)
            scores_xy += _dot_t(q_y, k_dot, PRECISION, ACC_DTYPE)
            p_scores_y = p * scores_y
            p_second = p * (scores_y * scores_dot + scores_xy * sm_scale)
            mu_y = mu_y * rescale + tl.sum(p_scores_y, 1)
            m_second = m_second * rescale + tl.sum(p_second, 1)
            acc_y = _scale_rows(acc_y, rescale)
            acc_y = _add_dot(acc_y, p_scores_y, v, PRECISION, ACC_DTYPE)
            acc_y = _add_dot(acc_y, p, v_y, PRECISION, ACC_DTYPE)
            acc_second = _scale_rows(acc_second, rescale)
            acc_second = _add_dot(acc_second, p_second, v, PRECISION, ACC_DTYPE)
            acc_second = _add_dot(acc_second, p_scores_dot, v_y, PRECISION, ACC_DTYPE)
            acc_second = _add_dot(acc_second, p_scores_y, v_dot, PRECISION, ACC_DTYPE)
        row_max = new_max

    empty = row_sum == 0.0
    norm = tl.where(empty, 1.0, row_sum)
    # Each output is its accumulator over the normaliser less row multiples of the lower orders'.
    out = _normalise(acc, norm, (), ())
    lse = tl.where(empty, float("inf"), (row_max + tl.log2(norm)) / log2e)
    _store_parts(Out + q_base, out, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    tl.store(Lse + row_base + offs_m, lse, mask=offs_m < len_q)
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
    Q, K, V, D_out, Lse, Delta, DQ,
    Cu_q, Cu_k, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
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
    Q, K, V, D_out, Lse, Delta, DK, DV, Part_k, Part_v, Arrivals, members, stride_split,
    Cu_q, Cu_k, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
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
    Q, K, V, D_out, Lse, Delta, D_lse, Cot_dq, Cot_dk, Cot_dv,
    Cot_q, Cot_d_out, Sigma, Rho,
    Cu_q, Cu_k, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
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
    Q, K, V, D_out, Lse, Delta, Sigma, Rho, Cot_dq, Cot_dk, Cot_dv,
    Cot_k, Cot_v, Part_k, Part_v, Arrivals, members, stride_split,
    Cu_q, Cu_k, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
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


# ----------------------------------------------------------------------------------------------
# Launch functions. Every tensor is (B, H, T, D) with unit stride on D (any other strides, e.g.
# a transposed view of a (B, T, H, D) buffer); query-shaped tensors are indexed with q's strides
# and key-shaped ones with k's, so an input laid out differently is copied once into that layout.
# Outputs may be preallocated (the JAX bridge passes JAX's own buffers) and must then share the
# layout; row statistics (lse and its cotangents) are contiguous (B, H, T_q).
#
# Variable-length batches (flash-attn's varlen interface): every launcher also takes the keywords
# ``cu_seqlens_q``, ``cu_seqlens_k`` (int32, shape (N + 1,), on the tensors' device: sequence b is
# rows cu[b]:cu[b + 1] along T) and ``max_seqlen_q``, ``max_seqlen_k`` (ints, at least the longest
# sequence: they size the grid). The tensors are then (B, H, total, D) views of packed buffers,
# B = 1 except under vmap (every entry packed alike), and the kernels run in VARLEN mode. The
# launchers check shapes and types only; the values of cu_seqlens (start 0, non-decreasing, end
# at total) need a host read, which the adapters do once per call (``validate_cu_seqlens_values``).
# ----------------------------------------------------------------------------------------------


# dtype of lse and the other per-row statistics: float32, or float64 for float64 inputs.
row_stat_dtype = accumulator_dtype


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per sweep kind and padded head dim, for 2-byte
# dtypes on a Hopper-class GPU (chosen with scripts/tune_sdpa_blocks.py and profiler sweeps,
# docs/perf-notes.md);
# 4-byte dtypes halve the tiles and 8-byte ones quarter them, so they fit in registers and
# shared memory. Row sweeps tile queries by BLOCK_M, column sweeps keys by BLOCK_N. The forward
# kinds key by the padded head dim also where they split it (``_head_dim_parts``): the split
# tiles are narrower, so they fit wherever the padded one does.
_GPU_BLOCKS = {
    "forward": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 4, 2)},
    "jvp": {64: (64, 64, 4, 2), 128: (128, 64, 8, 2), 256: (32, 32, 4, 1)},
    "forward_second": {64: (64, 32, 4, 1), 128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
    "backward": {64: (64, 64, 4, 3), 128: (64, 64, 4, 2), 256: (64, 32, 4, 2)},
    "backward_backward": {64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (16, 32, 4, 1)},
}
# Grouped-query attention: a column program sums over a whole group of query heads, which leaves
# the column kernels H / H_kv times fewer and longer programs than multi-head attention, and the
# last wave of them runs on a partly idle GPU (under a causal or window mask their lengths also
# differ along the diagonal, so the longest end alone). The group is split until about this many
# programs per multiprocessor run, at the price of a float32 partial per share summed by the last
# share of each tile (``_column_store``). H100, bf16, B8 H16 T4096 D64, 8:1, forward + backward:
# 32 per SM and no split without a mask (8 shares causal, whole groups otherwise) 3.16 ms causal /
# 5.45 ms not; 12 per SM (2 shares) 3.08 / 5.40; multi-head attention 3.12 / 5.47. (Causal
# backward alone by shares 1 / 2 / 4 / 8: 2.32 / 2.27 / 2.27 / 2.38 ms.)
_COLUMN_PROGRAMS_PER_SM = 12
# The interpreter runs one program at a time on the CPU: the smallest tiles tl.dot accepts keep
# test shapes tiny while still crossing several blocks and block boundaries.
_INTERPRETER_BLOCKS = (16, 16, 1, 1)


def _blocks(kind: str, block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if is_interpreter():
        return _INTERPRETER_BLOCKS
    block_m, block_n, warps, stages = _GPU_BLOCKS[kind][max(block_d, 64)]
    shrink = {torch.float32: 2, torch.float64: 4}.get(dtype, 1)
    return max(block_m // shrink, 16), max(block_n // shrink, 16), warps, max(stages - shrink // 2, 1)


# The sweep kinds of ``_attn_fwd_kernel``, which takes its head-dim tiles as BLOCK_D0, BLOCK_D1, and
# whether each splits the head dim (``_head_dim_parts``); the other kinds take one padded BLOCK_D.
# The kernel supports the split in every specialisation, but the second-order forward keeps the
# padded tile: at its 32 × 32 GPU tiles the split (80, 96) makes ptxas fall back to 32 registers
# and ~8 KB of stack (the padded kernel: 255 registers, 1.1 KB), so it needs its own tiles first.
_SPLIT_HEAD_DIM = {"forward": True, "jvp": True, "forward_second": False}


def _head_dim_parts(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the widths of the power-of-two tiles that cover the head dim, BLOCK_D1 = 0
    meaning one tile.

    tl.dot takes power-of-two tiles of at least 16, so a head dim that is not a power of two is
    either padded to the next one (one tile, 80 → 128) or split into the largest power of two below
    it and the rest padded (80 = 64 + 16). The MMA work of QKᵀ and P·V is proportional to the total
    width, so the split is taken when it is narrower than the padded tile: 40 = 32 + 16, 80 = 64 + 16,
    96 = 64 + 32, 160 = 128 + 32, 192 = 128 + 64. Where the rest pads up to the first part's width
    (59 → 32 + 32, 111 → 64 + 64) the two parts are as wide as the padded tile and would only add
    instructions, so those keep one tile.
    """
    padded = max(next_power_of_2(head_dim), 16)
    first = max(1 << (head_dim.bit_length() - 1), 16)
    if head_dim <= first:
        return padded, 0
    second = max(next_power_of_2(head_dim - first), 16)
    return (first, second) if first + second < padded else (padded, 0)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dimension longer than 1 (strides of unit dims are never used)."""
    return a.shape == b.shape and all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1
    )


def _in_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s dtype and layout, copied only if it is not already."""
    if t.dtype == ref.dtype and _same_layout(t, ref):
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=ref.dtype, device=ref.device).copy_(t)


def _output(given: torch.Tensor | None, ref: torch.Tensor, name: str) -> torch.Tensor:
    if given is None:
        return torch.empty_strided(ref.shape, ref.stride(), dtype=ref.dtype, device=ref.device)
    if not _same_layout(given, ref) or given.dtype != ref.dtype:
        raise ValueError(f"preallocated {name} must have the dtype and layout of the tensor it mirrors")
    return given


def _row_output(given: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    batch, heads, t_q, _ = q.shape
    if given is None:
        return torch.empty(batch, heads, t_q, dtype=row_stat_dtype(q.dtype), device=q.device)
    if not given.is_contiguous():
        raise ValueError("preallocated row statistics (lse and its tangents/cotangents) must be contiguous")
    return given


@dataclass(frozen=True)
class _Call:
    """Geometry and scalar arguments shared by every kernel of one attention call."""

    q: torch.Tensor
    k: torch.Tensor
    params: AttentionParams
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def block_d(self) -> int:
        return max(next_power_of_2(self.q.shape[-1]), 16)

    def scalars(self) -> tuple:
        _, heads, t_q, _ = self.q.shape
        t_k = self.k.shape[2]
        # VARLEN kernels get the band of shift 0 and add each sequence's own bottom-right shift.
        band_lo, band_hi = self.params.diagonal_band(0, 0) if self.varlen else self.params.diagonal_band(t_q, t_k)
        return (self.cu_seqlens_q, self.cu_seqlens_k, *self.q.stride()[:3], *self.k.stride()[:3], t_q, t_k,
                heads, heads // self.k.shape[1], self.params.scale, band_lo, band_hi)

    def meta(self, kind: str, **flags) -> tuple[tuple[int, int], dict]:
        """(BLOCK_M, BLOCK_N) and the constexpr/launch keywords for one sweep kind."""
        block_m, block_n, warps, stages = _blocks(kind, self.block_d, self.q.dtype)
        use_tf32 = self.q.dtype == torch.float32 and self.q.is_cuda and torch.backends.cuda.matmul.allow_tf32
        if kind not in _SPLIT_HEAD_DIM:
            head_dim_tiles = dict(BLOCK_D=self.block_d)
        elif _SPLIT_HEAD_DIM[kind]:
            head_dim_tiles = dict(zip(("BLOCK_D0", "BLOCK_D1"), _head_dim_parts(self.q.shape[-1])))
        else:
            head_dim_tiles = dict(BLOCK_D0=self.block_d, BLOCK_D1=0)
        meta = dict(
            HEAD_DIM=self.q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, **head_dim_tiles,
            BANDED=self.params.banded, EVEN_K=not self.varlen and self.k.shape[2] % block_n == 0,
            VARLEN=self.varlen, BOTTOM_RIGHT=self.varlen and self.params.bottom_right,
            ACC_DTYPE=tl.float64 if self.q.dtype == torch.float64 else tl.float32,
            PRECISION="tf32" if use_tf32 else "ieee", num_warps=warps, num_stages=stages, **flags,
        )
        return (block_m, block_n), meta

    def row_grid(self, block_m: int) -> tuple[int, ...]:
        """One program per query block of one query head of one sequence (``_program``)."""
        batch, heads = self.q.shape[:2]
        if self.varlen:
            return cdiv(self.max_seqlen_q, block_m), self.cu_seqlens_q.numel() - 1, batch * heads
        return cdiv(self.q.shape[2], block_m), batch * heads

    def column_grid(self, block_n: int, splits: int = 1) -> tuple[int, ...]:
        """One program per key block of one key/value head of one sequence, or per share of its
        query heads when ``splits`` > 1 (``group_split``)."""
        batch, heads_kv = self.k.shape[:2]
        if self.varlen:
            return cdiv(self.max_seqlen_k, block_n), self.cu_seqlens_k.numel() - 1, batch * heads_kv * splits
        return cdiv(self.k.shape[2], block_n), batch * heads_kv * splits

    def group_split(self, block_n: int) -> int:
        """Into how many shares the column kernels split each grouped-query group: the smallest
        divisor of the group that gives ``_COLUMN_PROGRAMS_PER_SM`` programs per multiprocessor."""
        group = self.q.shape[1] // self.k.shape[1]
        target = _COLUMN_PROGRAMS_PER_SM * multiprocessor_count(self.q.device)
        programs = math.prod(self.column_grid(block_n))
        return next(s for s in range(1, group + 1) if group % s == 0 and (programs * s >= target or s == group))


def _prepare(q, k, v, params, query_like=(), key_like=(), **varlen):
    """Unit last stride on q and k; other tensors moved into q's / k's layout (see above)."""
    # Outputs are allocated in q's and k's layouts, so those must not overlap themselves
    # (a broadcast, e.g. from vmap over k alone, has stride 0).
    q = q if q.stride(-1) == 1 and 0 not in q.stride() else q.contiguous()
    k = k if k.stride(-1) == 1 and 0 not in k.stride() else k.contiguous()
    call = _Call(q, k, params, **varlen_keywords(q, **varlen))
    queries = [None if t is None else _in_layout(t, q) for t in query_like]
    keys = [None if t is None else _in_layout(t, k) for t in (v, *key_like)]
    return call, queries, keys


def varlen_keywords(q, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> dict:
    """The launchers' varlen keywords, checked without a host read (types, shapes, dtypes, devices)
    and made contiguous; {} for a fixed-length call. The torch adapter calls it first too."""
    given = [x is not None for x in (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)]
    if not any(given):
        return {}
    if not all(given):
        raise ValueError("variable-length attention needs all of cu_seqlens_q, cu_seqlens_k, max_seqlen_q, "
                         "max_seqlen_k")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(cu).__name__}")
    validate_cu_seqlens(cu_seqlens_q.shape, cu_seqlens_k.shape, (dtype_name(cu_seqlens_q.dtype),
                        dtype_name(cu_seqlens_k.dtype)), max_seqlen_q, max_seqlen_k)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    return dict(cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous(),
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(q, k, v, params, tangent=None, direction=None, *, out=None, lse=None, out_dot=None,
             lse_dot=None, out_second=None, lse_second=None, **varlen):
    """One forward sweep; ``tangent`` (q̇, k̇, v̇) adds the JVP, ``direction`` (q^y, k^y, v^y)
    the second derivative along both."""
    query_like = [t[0] for t in (tangent, direction) if t is not None]
    key_like = [t for pair in (tangent, direction) if pair is not None for t in pair[1:]]
    call, query_like, (v, *key_like) = _prepare(q, k, v, params, query_like, key_like, **varlen)
    q, k = call.q, call.k
    out, lse = _output(out, q, "out"), _row_output(lse, q)
    has_tangent, second_order = tangent is not None, direction is not None
    # Slots a specialisation does not read or write get q-shaped stand-ins (never touched).
    dummies = (q, k, v, out, lse)
    tangents = dummies
    if has_tangent:
        out_dot, lse_dot = _output(out_dot, q, "out_dot"), _row_output(lse_dot, q)
        tangents = (query_like[0], *key_like[:2], out_dot, lse_dot)
    seconds = dummies
    if second_order:
        out_second, lse_second = _output(out_second, q, "out_second"), _row_output(lse_second, q)
        seconds = (query_like[1], *key_like[2:], out_second, lse_second)
    if q.numel() == 0:
        return out, lse, out_dot, lse_dot, out_second, lse_second
    kind = "forward_second" if second_order else "jvp" if has_tangent else "forward"
    (block_m, _), meta = call.meta(kind, HAS_TANGENT=has_tangent, SECOND_ORDER=second_order)
    with _device_guard(q):
        _attn_fwd_kernel[call.row_grid(block_m)](q, k, v, out, lse, *tangents, *seconds, *call.scalars(), **meta)
    return out, lse, out_dot, lse_dot, out_second, lse_second


def attention_forward(q, k, v, params: AttentionParams, *, out=None, lse=None, **varlen):
    """Fused attention forward.

    Arguments:
        q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D), H % H_kv == 0; fp16, bf16, fp32 or fp64.
        varlen: cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k for packed sequences
            (T = total tokens; see the section comment), as every launcher takes them.
    Returns:
        out (B, H, T_q, D) in q's dtype; lse (B, H, T_q) in float32 (float64 for fp64 inputs),
        +inf on rows that see no key.
    """
    return _forward(q, k, v, params, out=out, lse=lse, **varlen)[:2]


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, params: AttentionParams, *, out=None, lse=None,
                  out_dot=None, lse_dot=None, **varlen):
    """Forward and forward-mode derivative in one sweep: returns (out, lse, out_dot, lse_dot),
    the tangents for input tangents (q_dot, k_dot, v_dot) shaped like (q, k, v)."""
    return _forward(q, k, v, params, (q_dot, k_dot, v_dot), out=out, lse=lse, out_dot=out_dot,
                    lse_dot=lse_dot, **varlen)[:4]


def attention_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, params: AttentionParams, *,
                             out_second=None, lse_second=None, **varlen):
    """Second directional derivative of (out, lse) along x_dot = (q_dot, k_dot, v_dot) and
    y = (q_y, k_y, v_y), both shaped like (q, k, v): f''(x)[x_dot, y], symmetric and bilinear in
    the two directions (the forward-over-forward derivative without its linear part J ẍ).

    Returns:
        (out_second, lse_second) shaped like (out, lse); zero on rows that see no key.
    """
    results = _forward(q, k, v, params, (q_dot, k_dot, v_dot), (q_y, k_y, v_y), out_second=out_second,
                       lse_second=lse_second, **varlen)
    return results[4:]


def _row_delta(call: _Call, out, d_out, d_lse):
    q = call.q
    delta = torch.empty(q.shape[:3], dtype=row_stat_dtype(q.dtype), device=q.device)
    (block_m, _), meta = call.meta("backward")
    # Every row of every (packed) entry: the row term does not care where sequences start.
    _row_delta_kernel[(cdiv(q.shape[2], block_m), q.shape[0] * q.shape[1])](
        out, d_out, d_lse if d_lse is not None else delta, delta, *q.stride()[:3], q.shape[2], q.shape[1],
        HEAD_DIM=meta["HEAD_DIM"], BLOCK_M=block_m, BLOCK_D=meta["BLOCK_D"], HAS_D_LSE=d_lse is not None,
        ACC_DTYPE=meta["ACC_DTYPE"],
    )
    return delta


def _row_stat_input(t, q):
    return None if t is None else t.to(row_stat_dtype(q.dtype)).contiguous()


def _column_sweep(kernel, call: _Call, block_n: int, meta: dict, inputs: tuple, outputs: tuple) -> None:
    """Launch column ``kernel`` on ``inputs``, writing the two key-shaped ``outputs``. When the
    group is split (``_Call.group_split``) the shares write float32 (float64) partials in k's
    layout, ``span`` elements apart, and count their arrivals per tile (``_column_store``)."""
    # A column tile needs no key mask (EVEN_K) outside a band: its rows past the sequence's keys
    # are never stored, and its query columns past T_q read lse = +inf, so P is exactly 0 there.
    meta = {name: value for name, value in meta.items() if name != "EVEN_K"}
    group = call.q.shape[1] // call.k.shape[1]
    splits = call.group_split(block_n)
    grid = call.column_grid(block_n, splits)
    if splits == 1:  # the partials and the arrival counter are never touched: stand-ins
        kernel[grid](*inputs, *outputs, *outputs, call.q, group, 0, *call.scalars(), SPLIT=False, **meta)
        return
    k = call.k
    span = 1 + sum((n - 1) * stride for n, stride in zip(k.shape, k.stride()))
    partials = [torch.empty_strided((splits, *k.shape), (span, *k.stride()), dtype=row_stat_dtype(k.dtype),
                                    device=k.device) for _ in outputs]
    arrivals = torch.zeros(math.prod(grid) // splits, dtype=torch.int32, device=k.device)
    kernel[grid](*inputs, *outputs, *partials, arrivals, group // splits, span, *call.scalars(), SPLIT=True, **meta)


def attention_backward(q, k, v, out, lse, d_out, d_lse, params: AttentionParams, *, dq=None, dk=None, dv=None,
                       **varlen):
    """Gradients (dq, dk, dv) of <d_out, out> + <d_lse, lse>; ``d_lse`` may be None (zero)."""
    call, (out, d_out), (v,) = _prepare(q, k, v, params, (out, d_out), **varlen)
    q, k = call.q, call.k
    dq, dk, dv = _output(dq, q, "dq"), _output(dk, k, "dk"), _output(dv, k, "dv")
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse, d_lse = _row_stat_input(lse, q), _row_stat_input(d_lse, q)
    with _device_guard(q):
        delta = _row_delta(call, out, d_out, d_lse)
        (block_m, block_n), meta = call.meta("backward")
        _attn_bwd_dq_kernel[call.row_grid(block_m)](q, k, v, d_out, lse, delta, dq, *call.scalars(), **meta)
        _column_sweep(_attn_bwd_dkdv_kernel, call, block_n, meta, (q, k, v, d_out, lse, delta), (dk, dv))
    return dq, dk, dv


def attention_backward_backward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv,
                                params: AttentionParams, *, cot_q=None, cot_k=None, cot_v=None,
                                cot_d_out=None, cot_d_lse=None, **varlen):
    """VJP of the backward (q, k, v, d_out, d_lse) ↦ (dq, dk, dv) for cotangents
    (cot_dq, cot_dk, cot_dv) (None = zero); out and lse count as functions of q, k, v.

    Returns:
        (cot_q, cot_k, cot_v, cot_d_out, cot_d_lse), shaped like (q, k, v, out, lse).
    """
    call, (out, d_out, cot_dq), (v, cot_dk, cot_dv) = _prepare(
        q, k, v, params, (out, d_out, cot_dq), (cot_dk, cot_dv), **varlen)
    q, k = call.q, call.k
    cot_dq = torch.zeros_like(q) if cot_dq is None else cot_dq
    cot_dk = torch.zeros_like(k) if cot_dk is None else cot_dk
    cot_dv = torch.zeros_like(k) if cot_dv is None else cot_dv
    cot_q, cot_k, cot_v = _output(cot_q, q, "cot_q"), _output(cot_k, k, "cot_k"), _output(cot_v, k, "cot_v")
    cot_d_out, cot_d_lse = _output(cot_d_out, q, "cot_d_out"), _row_output(cot_d_lse, q)
    if q.numel() == 0 or k.numel() == 0:
        return cot_q.zero_(), cot_k.zero_(), cot_v.zero_(), cot_d_out.zero_(), cot_d_lse.zero_()
    lse = _row_stat_input(lse, q)
    d_lse = torch.zeros_like(lse) if d_lse is None else _row_stat_input(d_lse, q)
    rho = torch.empty_like(lse)
    with _device_guard(q):
        delta = _row_delta(call, out, d_out, d_lse)
        (block_m, _), meta = call.meta("backward_backward")
        _attn_bwd_bwd_rows_kernel[call.row_grid(block_m)](
            q, k, v, d_out, lse, delta, d_lse, cot_dq, cot_dk, cot_dv, cot_q, cot_d_out, cot_d_lse, rho,
            *call.scalars(), **meta)
        (_, block_n), meta = call.meta("backward_backward")
        _column_sweep(_attn_bwd_bwd_cols_kernel, call, block_n, meta,
                      (q, k, v, d_out, lse, delta, cot_d_lse, rho, cot_dq, cot_dk, cot_dv), (cot_k, cot_v))
    return cot_q, cot_k, cot_v, cot_d_out, cot_d_lse
