"""Attention's launch plans: tile tables, grids and every kernel argument by name.

The plan builders take an :class:`AttentionCall` — shapes, strides and dtype of a (B, H, T, D) view
of q and k, the mask and scale, the varlen lengths and the device facts that pick tiles — and
return a ``theria_kernels._plan.Plan`` that any launcher runs. Query-shaped buffers (q, out, d_out
and their tangents and cotangents) share q's strides and key-shaped ones (k, v, ...) share k's;
row statistics (lse and its tangents and cotangents, delta, rho) are contiguous (B, H, T_q) in
float32, float64 for float64 inputs.

Variable-length batches (flash-attn's ``cu_seqlens``): the inputs ``cu_seqlens_q`` and
``cu_seqlens_k`` (int32, N + 1 entries) are added and T is the total token count; B = 1 except
under vmap (every entry packed alike). ``max_seqlen_q`` / ``max_seqlen_k`` size the grid.

Plans depend only on hashable facts, so the builders are cached: a call of a known shape costs a
dictionary lookup.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import triton.language as tl

from theria_kernels._contracts import AttentionParams, row_stat_dtype_name
from theria_kernels._plan import Allocation, Buffer, Launch, Plan
from theria_kernels.attention._tuning import (
    DTYPE_BYTES,
    TILE_TABLES,
    lpt_section,
    short_sweep,
    tile,
    uses_halves,
    uses_late_bar,
    uses_one_sweep,
    uses_tma,
)
from theria_kernels.attention.backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from theria_kernels.attention.double_backward import _attn_bwd_bwd_cols_kernel, _attn_bwd_bwd_rows_kernel
from theria_kernels.attention.forward import _attn_fwd_kernel


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0), as ``triton.next_power_of_2`` (which is a
    constexpr_function: ~7 µs per host call)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(x: int, y: int) -> int:
    """⌈x / y⌉ for positive y, as ``triton.cdiv``."""
    return (x + y - 1) // y


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per compute capability, sweep kind, padded head dim and
# dtype class: the per-architecture tile tables of ``_tuning`` (how they are chosen and checked:
# docs/design/tuning.md). A device's capability picks its table (``_tuning.tile``).
GPU_BLOCKS = TILE_TABLES
# Grouped-query attention: a column program sums over a whole group of query heads, which leaves
# the column kernels H / H_kv times fewer and longer programs than multi-head attention, and the
# last wave of them runs on a partly idle GPU (under a causal or window mask their lengths also
# differ along the diagonal, so the longest end alone). The group is split until about this many
# programs per multiprocessor run, at the price of a float32 partial per share summed by the last
# share of each tile (``_column_store``). H100, bf16, B8 H16 T4096 D64, 8:1, forward + backward:
# 32 per SM and no split without a mask (8 shares causal, whole groups otherwise) 3.16 ms causal /
# 5.45 ms not; 12 per SM (2 shares) 3.08 / 5.40; multi-head attention 3.12 / 5.47. (Causal
# backward alone by shares 1 / 2 / 4 / 8: 2.32 / 2.27 / 2.27 / 2.38 ms.)
COLUMN_PROGRAMS_PER_SM = 12
# The interpreter runs one program at a time on the CPU: the smallest tiles tl.dot accepts keep
# test shapes tiny while still crossing several blocks and block boundaries.
INTERPRETER_BLOCKS = (16, 16, 1, 1)
# Whether each sweep kind splits the head dim into two power-of-two tiles (``head_dim_parts``)
# where that is narrower than padding it: every kernel supports the split (BLOCK_D0, BLOCK_D1), but
# at some tiles ptxas handles the split kernel worse than the padded one. Compiled for sm_90 at head
# dim 80, bf16 (tests/test_tile_fit.py's launches; registers, spilled bytes): the backward's dK/dV
# kernel 255 / 44 padded, 255 / 8 split (dQ 211 / 0 and 171 / 0), so the backward splits; the
# double backward's column kernel 255 / 328 padded but 32 / 2,118 split, and the second-order
# forward at its 32 × 32 tiles 255 registers and 1.1 KB of stack padded but 32 and ~8 KB split,
# so those two keep the padded tile until they have tiles of their own. float64 ignores this table
# and takes the head-dim tiles that gave right numbers on the H200 in every kind
# (``float64_head_dim_parts``): there the compiled float64 column kernels went wrong on some tiles
# the interpreter computes right to 1e-15 (a 128-wide tile at head dims 80, 96 and 128, the
# backward's dK 51-109 % off and the backward's tangent 17-55 %; at head dim 40 split 32 + 16, the
# backward's tangent 7-18 % off in one call shape and right in another), and right on one tile up to
# 64 wide and on 64 + the rest up to 128 (docs/perf-notes.md, "GPU accuracy runs", sessions 21 and
# 22); float64 is for checking, where speed does not count.
SPLIT_HEAD_DIM = {"forward": True, "jvp": True, "forward_second": False, "backward": True, "backward_rows": True,
                  "backward_backward": False, "backward_backward_rows": False,
                  "backward_backward_rows_no_cot_d_out": False}

_TL_DTYPES = {"float16": tl.float16, "bfloat16": tl.bfloat16, "float32": tl.float32, "float64": tl.float64}


def float64_head_dim_parts(head_dim: int) -> tuple[int, int]:
    """``head_dim_parts`` for float64 in every sweep kind (``SPLIT_HEAD_DIM``): one tile up to head
    dim 64 (40 → 64 padded), a 64-wide part and the rest up to 128 (128 = 64 + 64, 100 = 64 + 64
    padded, 80 = 64 + 16), so that no part there is 128 wide; above 128 as the other dtypes."""
    if head_dim <= 64:
        return max(next_power_of_2(head_dim), 16), 0
    if head_dim <= 128:
        return 64, max(next_power_of_2(head_dim - 64), 16)
    return head_dim_parts(head_dim)


def head_dim_parts(head_dim: int) -> tuple[int, int]:
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


@dataclass(frozen=True)
class Device:
    """What the plans need to know of the device: its multiprocessors (they size the grouped-query
    split), whether kernels run in Triton's interpreter (tiny tiles), whether float32 matmuls
    may use tf32, and its compute capability (major * 10 + minor: it picks the tile table; 0 for
    unknown takes the table that fits every architecture)."""

    multiprocessors: int
    interpreter: bool = False
    allow_tf32: bool = False
    capability: int = 0


@dataclass(frozen=True)
class AttentionCall:
    """Geometry of one attention call as the kernels see it: (B, H, T, D) views of q and k (any
    strides with unit stride on D), the dtype name, the mask and scale, and for varlen calls
    ``(max_seqlen_q, max_seqlen_k, number of sequences)``."""

    q_shape: tuple[int, int, int, int]
    q_strides: tuple[int, int, int, int]
    k_shape: tuple[int, int, int, int]
    k_strides: tuple[int, int, int, int]
    dtype: str
    params: AttentionParams
    device: Device
    varlen: tuple[int, int, int] | None = None

    @property
    def block_d(self) -> int:
        return max(next_power_of_2(self.q_shape[-1]), 16)

    @property
    def group(self) -> int:
        return self.q_shape[1] // self.k_shape[1]

    def blocks(self, kind: str) -> tuple[int, int, int, int]:
        if self.device.interpreter:
            return INTERPRETER_BLOCKS
        return tile(self.device.capability, kind, self.block_d, self.dtype, self.params.banded,
                    short_sweep(self.mean_keys))

    @property
    def mean_keys(self) -> float:
        """The keys a query sees on average under the call's mask (a varlen call's at its longest
        lengths; averaged over at most about 256 rows, each the middle one of its stretch)."""
        t_q, t_k = self.varlen[:2] if self.varlen else (self.q_shape[2], self.k_shape[2])
        lo, hi = self.params.diagonal_band(t_q, t_k)
        step = max(1, t_q // 256)
        rows = range(step // 2, t_q, step)
        return sum(max(0, min(row + hi, t_k - 1) - max(row + lo, 0) + 1) for row in rows) / max(len(rows), 1)

    def geometry(self) -> dict:
        """The scalar arguments every attention kernel takes, by name."""
        _, heads, t_q, _ = self.q_shape
        # VARLEN kernels get the band of shift 0 and add each sequence's own bottom-right shift.
        band_lo, band_hi = (self.params.diagonal_band(0, 0) if self.varlen
                            else self.params.diagonal_band(t_q, self.k_shape[2]))
        return dict(
            stride_qb=self.q_strides[0], stride_qh=self.q_strides[1], stride_qt=self.q_strides[2],
            stride_kb=self.k_strides[0], stride_kh=self.k_strides[1], stride_kt=self.k_strides[2],
            t_q=t_q, t_k=self.k_shape[2], heads=heads, group=self.group, sm_scale=float(self.params.scale),
            softcap=float(self.params.softcap), band_lo=band_lo, band_hi=band_hi,
            Cu_q=Buffer("cu_seqlens_q") if self.varlen else None,
            Cu_k=Buffer("cu_seqlens_k") if self.varlen else None,
            Slopes=Buffer("row_slopes") if self.params.alibi else None,
        )

    def meta(self, kind: str) -> tuple[dict, int, int, int, int]:
        """The constexprs of one sweep kind, and (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
        block_m, block_n, warps, stages = self.blocks(kind)
        tf32 = self.dtype == "float32" and self.device.allow_tf32 and not self.device.interpreter
        if self.dtype == "float64":
            head_dim_tiles = dict(zip(("BLOCK_D0", "BLOCK_D1"), float64_head_dim_parts(self.q_shape[-1])))
        elif SPLIT_HEAD_DIM[kind]:
            head_dim_tiles = dict(zip(("BLOCK_D0", "BLOCK_D1"), head_dim_parts(self.q_shape[-1])))
        else:
            head_dim_tiles = dict(BLOCK_D0=self.block_d, BLOCK_D1=0)
        meta = dict(
            HEAD_DIM=self.q_shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, **head_dim_tiles,
            BANDED=self.params.banded, VARLEN=self.varlen is not None,
            # Fixed-length bands arrive shifted; BOTTOM_RIGHT also tells ALiBi where its diagonal is (§8).
            BOTTOM_RIGHT=(self.varlen is not None or self.params.alibi) and self.params.bottom_right,
            SOFTCAP=self.params.softcap > 0, ALIBI=self.params.alibi,
            ACC_DTYPE=tl.float64 if self.dtype == "float64" else tl.float32,
            PRECISION="tf32" if tf32 else "ieee",
        )
        return meta, block_m, block_n, warps, stages

    def tma(self, kind: str, tma_ok: bool) -> bool:
        """Whether the sweep ``kind`` loads through tensor descriptors (the kernels' TMA: K and V, with
        their directions in the forward kinds, in the row sweeps; Q and dO in the backward kinds'
        column sweeps): where ``_tuning.uses_tma`` says so for the device and the call allows it,
        that is one head-dim tile exactly as wide as the head dim (a power of two from 16), k's and
        v's rows at 16-byte offsets (strides; for the backward kinds, which load q and d_out so too,
        also q's), and ``tma_ok``: the launcher says that the descriptor-loaded tensors' data start
        at 16-byte boundaries and that it can give the kernel Triton's global scratch, where the
        descriptors are built (the torch launcher checks the pointers per call; XLA's buffers are
        aligned, and JAX's calls carry the scratch as a buffer of their own)."""
        head_dim = self.q_shape[-1]
        strides = self.k_strides[:3] + (self.q_strides[:3] if kind.startswith("backward") else ())
        return (tma_ok and uses_tma(self.device.capability, kind, head_dim, self.dtype) and head_dim >= 16
                and head_dim_parts(head_dim) == (head_dim, 0)
                and all(stride * DTYPE_BYTES[self.dtype] % 16 == 0 for stride in strides))

    def even_k(self, block_n: int) -> bool:
        return self.varlen is None and self.k_shape[2] % block_n == 0

    def row_grid(self, block_m: int) -> tuple[int, ...]:
        """One program per query block of one query head of one sequence (``_program``)."""
        batch, heads = self.q_shape[:2]
        if self.varlen:
            return cdiv(self.varlen[0], block_m), self.varlen[2], batch * heads
        return cdiv(self.q_shape[2], block_m), batch * heads

    def column_grid(self, block_n: int, splits: int = 1) -> tuple[int, ...]:
        """One program per key block of one key/value head of one sequence, or per share of its
        query heads when ``splits`` > 1 (``group_split``)."""
        batch, heads_kv = self.k_shape[:2]
        if self.varlen:
            return cdiv(self.varlen[1], block_n), self.varlen[2], batch * heads_kv * splits
        return cdiv(self.k_shape[2], block_n), batch * heads_kv * splits

    def ordered(self, grid: tuple[int, ...], columns: bool, members: int = 1) -> tuple[tuple[int, ...], dict]:
        """The grid a sweep over ``grid`` (``row_grid``, ``column_grid``) launches on, and its
        ``LPT`` and ``HEAVY_LAST`` (``_tiles._program``): its programs longest first, in sections of
        grid rows (``_tuning.lpt_section``), where they differ in length along the diagonal, that is
        at fixed lengths under a band bounded on one side only (causal, or a window open to the
        right); grid order otherwise. A grid row streams K and V of one key/value head through a row
        sweep, Q and dO of ``members`` query heads through a column sweep. Bounded above (causal), a
        row sweep's last query blocks and a column sweep's first key blocks are the longest; bounded
        below, the reverse. The blocks move to the grid's second dimension, whose CUDA limit is
        65535: past it, grid order."""
        length = self.q_shape[2] * members if columns else self.k_shape[2]
        streamed = 2 * length * self.block_d * DTYPE_BYTES[self.dtype]
        bounded_above = self.params.causal or self.params.window_size[1] >= 0
        one_sided = bounded_above != (self.params.window_size[0] >= 0)
        section = 0 if self.varlen or grid[0] > 65535 else lpt_section(one_sided, streamed, grid[1])
        if not section:
            return grid, dict(LPT=False, HEAVY_LAST=False)
        return (section, grid[0], grid[1] // section), dict(LPT=True, HEAVY_LAST=bounded_above != columns)

    def group_split(self, block_n: int) -> int:
        """Into how many shares the column kernels split each grouped-query group: the smallest
        divisor of the group that gives ``COLUMN_PROGRAMS_PER_SM`` programs per multiprocessor."""
        group = self.group
        target = COLUMN_PROGRAMS_PER_SM * self.device.multiprocessors
        programs = math.prod(self.column_grid(block_n))
        return next(s for s in range(1, group + 1) if group % s == 0 and (programs * s >= target or s == group))

    def inputs(self, tensors: tuple[str, ...], statistics: tuple[str, ...] = ()) -> dict[str, str]:
        """A plan's inputs with their dtypes: ``tensors`` (q-, k- or v-like) in the call's dtype,
        ``statistics`` (B, H, T_q) row statistics in theirs, then the inputs every plan of the call
        reads: the ALiBi ``row_slopes`` (a row statistic: each query row's slope, §8) and the
        varlen ``cu_seqlens`` (int32)."""
        stat = row_stat_dtype_name(self.dtype)
        found = dict.fromkeys(tensors, self.dtype)
        found.update(dict.fromkeys(statistics, stat))
        if self.params.alibi:
            found["row_slopes"] = stat
        if self.varlen:
            found.update(cu_seqlens_q="int32", cu_seqlens_k="int32")
        return found


_Q, _K = Allocation("q"), Allocation("k")


def _rows(call: AttentionCall) -> Allocation:
    """One statistic per query row: (B, H, T_q) in float32 (float64 for float64 inputs)."""
    return Allocation(shape=call.q_shape[:3], dtype=row_stat_dtype_name(call.dtype))


def _column_launch(kernel, call: AttentionCall, kind: str, arguments: dict, outputs: dict,
                   allocations: dict) -> Launch:
    """A column sweep writing two key-shaped ``outputs`` (kernel parameter -> buffer name). When
    the group is split (``AttentionCall.group_split``) the shares write float32 (float64) partials
    in k's layout, ``span`` elements apart, and count their arrivals per tile (``_column_store``);
    those temporaries join ``allocations``."""
    meta, _, block_n, warps, stages = call.meta(kind)
    splits = call.group_split(block_n)
    members = call.group // splits  # the query heads one program serves
    grid, order = call.ordered(call.column_grid(block_n, splits), True, members)
    names = {"Part_k": None, "Part_v": None, "Arrivals": None}
    span = 0
    if splits > 1:
        span = 1 + sum((n - 1) * stride for n, stride in zip(call.k_shape, call.k_strides))
        acc = row_stat_dtype_name(call.dtype)
        allocations["part_k"] = Allocation(shape=(splits * span,), dtype=acc)
        allocations["part_v"] = Allocation(shape=(splits * span,), dtype=acc)
        allocations["arrivals"] = Allocation(shape=(math.prod(grid) // splits,), dtype="int32", zeroed=True)
        names = {"Part_k": Buffer("part_k"), "Part_v": Buffer("part_v"), "Arrivals": Buffer("arrivals")}
        writes_extra = ("Part_k", "Part_v", "Arrivals")
    else:
        writes_extra = ()
    # A column tile needs no key mask (EVEN_K) outside a band: its rows past the sequence's keys
    # are never stored, and its query columns past T_q read lse = +inf, so P is exactly 0 there.
    return Launch(
        kernel, grid,
        dict(arguments, **{param: Buffer(name) for param, name in outputs.items()}, **names,
             members=members, stride_split=span, **call.geometry(), **order, **meta,
             SPLIT=splits > 1),
        writes=(*outputs, *writes_extra), num_warps=warps, num_stages=stages)


def _halves(call: AttentionCall, kind: str, block: int) -> bool:
    """Whether the sweep ``kind`` takes its blocks of ``block`` rows (or keys) as two halves
    (``_tuning.uses_halves``): when compiled, only halves of 16 at least, Triton's smallest dot."""
    return ((call.device.interpreter or block >= 32)
            and uses_halves(call.device.capability, call.block_d, call.dtype, call.params.banded, kind,
                            short_sweep(call.mean_keys)))


@functools.lru_cache(maxsize=4096)
def forward_plan(call: AttentionCall, has_tangent: bool = False, second_order: bool = False,
                 tma_ok: bool = True, given_primal: bool = False) -> Plan:
    """One forward sweep: outputs (out, lse); with ``has_tangent`` also (out_dot, lse_dot) along
    the inputs (q_dot, k_dot, v_dot); with ``second_order`` only (out_second, lse_second), the
    second derivative along (q_dot, k_dot, v_dot) and (q_y, k_y, v_y). With ``given_primal``
    (and ``has_tangent`` alone) out and lse are inputs, a forward's results, and the outputs are
    (out_dot, lse_dot) alone: the tangent without recomputing the primal, as forward-mode AD
    needs it. ``tma_ok``: the launcher allows TMA loads for this call (``AttentionCall.tma``). The
    forward alone sweeps its query blocks as two halves where ``_halves`` says so."""
    if given_primal and (second_order or not has_tangent):
        raise ValueError("given_primal is the tangent alone: it needs has_tangent and no second_order")
    kind = "forward_second" if second_order else "jvp" if has_tangent else "forward"
    meta, block_m, block_n, warps, stages = call.meta(kind)
    halves = not has_tangent and _halves(call, "forward", block_m)
    pointers = {name: None for name in ("Q_dot", "K_dot", "V_dot", "Out_dot", "Lse_dot",
                                        "Q_y", "K_y", "V_y", "Out_second", "Lse_second")}
    inputs = ["q", "k", "v"]
    # Given the primal, out and lse are inputs the sweep reads, not outputs it writes.
    allocations = {} if given_primal else {"out": _Q, "lse": _rows(call)}
    writes = [] if given_primal else ["Out", "Lse"]
    if has_tangent:
        inputs += ["q_dot", "k_dot", "v_dot"]
        allocations.update(out_dot=_Q, lse_dot=_rows(call))
        writes += ["Out_dot", "Lse_dot"]
    if second_order:
        inputs += ["q_y", "k_y", "v_y"]
        allocations.update(out_second=_Q, lse_second=_rows(call))
        writes += ["Out_second", "Lse_second"]
    for name in inputs[3:] + [name for name in allocations if name not in ("out", "lse")]:
        param = name[0].upper() + name[1:]
        pointers[param] = Buffer(name)
    grid, order = call.ordered(call.row_grid(block_m), False)
    launch = Launch(
        _attn_fwd_kernel, grid,
        dict(Q=Buffer("q"), K=Buffer("k"), V=Buffer("v"), Out=Buffer("out"), Lse=Buffer("lse"), **pointers,
             **call.geometry(), **order, **meta, EVEN_K=call.even_k(block_n), HAS_TANGENT=has_tangent,
             SECOND_ORDER=second_order, GIVEN_PRIMAL=given_primal, TMA=call.tma(kind, tma_ok), HALVES=halves),
        writes=tuple(writes), num_warps=warps, num_stages=stages)
    outputs = ("out_second", "lse_second") if second_order else tuple(allocations)
    tensors = (*inputs[:3], "out", *inputs[3:]) if given_primal else tuple(inputs)
    return Plan(call.inputs(tensors, ("lse",) if given_primal else ()), outputs, allocations, (launch,))


@functools.lru_cache(maxsize=4096)
def backward_plan(call: AttentionCall, has_d_lse: bool, tma_ok: bool = True) -> Plan:
    """Gradients (dq, dk, dv) of <d_out, out> + <d_lse, lse> (§2) from the inputs (q, k, v, out,
    lse, d_out[, d_lse]): the dQ row sweep on the ``backward_rows`` tile, which also stores the
    row term delta, then the dK/dV column sweep on the ``backward`` tile, which takes its whole
    query blocks as two halves where ``_halves`` says so. ``tma_ok``: the launcher allows TMA
    loads for this call (``AttentionCall.tma``: K and V in the row sweep, Q and dO in the column
    sweep; one choice, the ``backward`` kind's, for both)."""
    meta, block_m, block_n, warps, stages = call.meta("backward_rows")
    allocations = {"dq": _Q, "dk": _K, "dv": _K, "delta": _rows(call)}
    shared = dict(Q=Buffer("q"), K=Buffer("k"), V=Buffer("v"), D_out=Buffer("d_out"), Lse=Buffer("lse"),
                  Delta=Buffer("delta"), TMA=call.tma("backward", tma_ok))
    grid, order = call.ordered(call.row_grid(block_m), False)
    launches = (
        Launch(_attn_bwd_dq_kernel, grid,
               dict(shared, Out=Buffer("out"), D_lse=Buffer("d_lse") if has_d_lse else None, DQ=Buffer("dq"),
                    **call.geometry(), **order, **meta, EVEN_K=call.even_k(block_n)),
               writes=("Delta", "DQ"), num_warps=warps, num_stages=stages),
        _column_launch(_attn_bwd_dkdv_kernel, call, "backward",
                       dict(shared, HALVES=_halves(call, "backward", call.blocks("backward")[0])),
                       dict(DK="dk", DV="dv"), allocations),
    )
    inputs = call.inputs(("q", "k", "v", "out", "d_out"), ("lse", "d_lse") if has_d_lse else ("lse",))
    return Plan(inputs, ("dq", "dk", "dv"), allocations, launches, skip_if_empty=("q", "k"))


@functools.lru_cache(maxsize=4096)
def backward_backward_plan(call: AttentionCall, given: frozenset, tma_ok: bool = True,
                           cot_d_out: bool = True) -> Plan:
    """VJP of the backward (q, k, v, d_out, d_lse) ↦ (dq, dk, dv) for cotangents (cot_dq, cot_dk,
    cot_dv) (§4): outputs (cot_q, cot_k, cot_v, cot_d_out, cot_d_lse). ``given`` names which of
    d_lse, cot_dq, cot_dk, cot_dv are inputs; the others are zero (d_lse a None pointer, the
    cotangents zeroed temporaries). The row kernel (one sweep or two, ``_tuning.uses_one_sweep``,
    on the ``backward_backward_rows`` tile, ``backward_backward_rows_no_cot_d_out`` without
    ``cot_d_out``) stores delta, sigma and rho for the column sweep. With ``dq`` in ``given`` (the
    backward's dq for these q, k, v, d_out and d_lse, as ``backward_plan`` gives it) the one sweep
    reads dS K from it instead of summing it (§4.7); two sweeps do not read it.

    With ``d_out_dot`` in ``given`` (and optionally ``d_lse_dot``), (cot_q, cot_k, cot_v) also hold
    the backward for the second cotangent u̇ = (d_out_dot, d_lse_dot): with (cot_dq, cot_dk,
    cot_dv) = ẋ they are H_u ẋ + Jᵀ u̇, the tangent of the backward along (ẋ, u̇). ``tma_ok``: as
    ``backward_plan``'s (K and V in the row sweeps, Q and dO in the column sweep). Without
    ``cot_d_out`` (d_out is a constant of the caller's, e.g. a fixed output weight) the outputs are
    (cot_q, cot_k, cot_v, cot_d_lse) and the row sweep skips its dP̄ V product."""
    row_kind = "backward_backward_rows" if cot_d_out else "backward_backward_rows_no_cot_d_out"
    row_meta, block_m, block_n, warps, stages = call.meta(row_kind)
    one_sweep = uses_one_sweep(call.device.capability, row_kind, call.block_d, call.dtype)
    tangent = "d_out_dot" in given
    allocations = {"cot_q": _Q, "cot_k": _K, "cot_v": _K, "cot_d_out": _Q, "cot_d_lse": _rows(call),
                   "delta": _rows(call), "rho": _rows(call)}
    if not cot_d_out:
        del allocations["cot_d_out"]
    if tangent:
        allocations["delta_dot"] = _rows(call)
    # An absent d_lse is a None pointer (the kernel reads zero); absent cotangents are zeroed buffers.
    cotangents = {"cot_dq": Allocation("q", zeroed=True), "cot_dk": Allocation("k", zeroed=True),
                  "cot_dv": Allocation("k", zeroed=True)}
    allocations.update((name, allocation) for name, allocation in cotangents.items() if name not in given)
    shared = dict(Q=Buffer("q"), K=Buffer("k"), V=Buffer("v"), D_out=Buffer("d_out"), Lse=Buffer("lse"),
                  Delta=Buffer("delta"), Cot_dq=Buffer("cot_dq"), Cot_dk=Buffer("cot_dk"), Cot_dv=Buffer("cot_dv"),
                  D_out_dot=Buffer("d_out_dot") if tangent else None,
                  Delta_dot=Buffer("delta_dot") if tangent else None, TANGENT=tangent)
    grid, order = call.ordered(call.row_grid(block_m), False)
    launches = (
        Launch(_attn_bwd_bwd_rows_kernel, grid,
               dict(shared, Out=Buffer("out"), D_lse=Buffer("d_lse") if "d_lse" in given else None,
                    D_lse_dot=Buffer("d_lse_dot") if "d_lse_dot" in given else None,
                    Dq=Buffer("dq") if one_sweep and "dq" in given else None,
                    Cot_q=Buffer("cot_q"), Cot_d_out=Buffer("cot_d_out") if cot_d_out else None,
                    Sigma=Buffer("cot_d_lse"), Rho=Buffer("rho"), **call.geometry(), **order, **row_meta,
                    EVEN_K=call.even_k(block_n), TMA=call.tma(row_kind, tma_ok),
                    ONE_SWEEP=one_sweep),
               writes=("Delta", *(("Delta_dot",) if tangent else ()), "Cot_q", *(("Cot_d_out",) if cot_d_out else ()),
                       "Sigma", "Rho"),
               num_warps=warps, num_stages=stages),
        _column_launch(_attn_bwd_bwd_cols_kernel, call, "backward_backward",
                       dict(shared, Sigma=Buffer("cot_d_lse"), Rho=Buffer("rho"),
                            TMA=call.tma("backward_backward", tma_ok),
                            LATE_BAR=uses_late_bar(call.device.capability, call.block_d, call.dtype,
                                                   call.params.banded)), dict(Cot_k="cot_k", Cot_v="cot_v"),
                       allocations),
    )
    inputs = call.inputs(("q", "k", "v", "out", "d_out", *(n for n in ("cot_dq", "cot_dk", "cot_dv", "d_out_dot", "dq")
                                                            if n in given)),
                         ("lse", *(n for n in ("d_lse", "d_lse_dot") if n in given)))
    outputs = ("cot_q", "cot_k", "cot_v", *(("cot_d_out",) if cot_d_out else ()), "cot_d_lse")
    return Plan(inputs, outputs, allocations, launches, skip_if_empty=("q", "k"))
