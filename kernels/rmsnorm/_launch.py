"""RMSNorm's launch plans: tuning, how rows map onto programs, and every kernel argument by name.

Grouped weights: ``weight`` has shape (*G, N) and ``x`` has shape (*G, *R, N); the rows of group
g use weight[g], and weight-shaped outputs (dweight, cot_weight) are summed over each group's
rows. The public API uses G = () (one weight for every row); vmap over a weight folds the mapped
dimension into G, so a batch of weights is still one launch.

Precision: loads are cast to ``ACC`` (float32, float64 for float64 inputs); rstd and the
per-program partial sums stay in ``ACC``; outputs are cast to their buffer's dtype on store.
Weight-shaped reductions never use atomics: every program writes its own partial row and
``_column_sum_kernel`` adds them in a fixed order, so results are deterministic.

Every buffer is contiguous. Plans depend only on hashable facts and are cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import triton.language as tl

from theria_kernels._contracts import row_stat_dtype_name
from theria_kernels._plan import Allocation, Buffer, Launch, Plan
from theria_kernels.attention._launch import cdiv, next_power_of_2
from theria_kernels.rmsnorm._kernels import (
    _backward_kernel,
    _column_sum_kernel,
    _double_backward_kernel,
    _forward_kernel,
    _forward_second_kernel,
)

# A whole row lives in registers (one sweep reads each input once), so N is bounded by what a
# 32-warp program can hold; beyond it the reference backend applies.
MAX_N = 65536


@dataclass(frozen=True)
class SweepTuning:
    """Launch shape of one kind of row sweep.

    ``tile_elements``: a program handles ``max(1, tile_elements // BLOCK_N)`` rows at once, so
    short rows are packed into tiles as large as one long row.
    ``elements_per_thread``: num_warps = tile / (32 · elements_per_thread), clamped to [1, 32].
    ``programs_per_sm``: 0 for one tile per program; otherwise a persistent grid of about this
    many programs per multiprocessor, each looping over tiles. Kernels with a weight-shaped
    reduction need it: every program writes one N-long partial row, so fewer programs mean less
    partial-sum traffic.
    ``loop_stages``: software-pipelining depth of the persistent loop (``tl.range``'s num_stages):
    above 1 the next tiles' loads are issued while the current tile is reduced, so a program keeps
    more bytes in flight than one load-reduce-store round; lowered where the staged tiles would not
    fit in half the device's shared memory.
    """

    tile_elements: int
    elements_per_thread: int
    programs_per_sm: int = 0
    loop_stages: int = 1


@dataclass(frozen=True)
class RMSNormTuning:
    """Launch shapes, exposed so ``scripts/bench_rmsnorm.py`` can sweep them: ``row_local`` for
    the forward (with JVP) and second-order forward, ``reducing`` for the backward and double
    backward. The defaults are the best of that sweep on an H100 at (2, 1024, 4096) bfloat16
    (docs/benchmarks.md): a small tile per program for the row-local kernels; for the reducing
    ones one program per multiprocessor over two-row tiles, three tiles in flight."""

    row_local: SweepTuning = SweepTuning(tile_elements=4096, elements_per_thread=32)
    reducing: SweepTuning = SweepTuning(tile_elements=8192, elements_per_thread=32, programs_per_sm=1,
                                        loop_stages=3)


DEFAULT_TUNING = RMSNormTuning()


@dataclass(frozen=True)
class RMSNormDevice:
    """What the plans need of the device: multiprocessors (persistent grids) and the shared
    memory one program may use (pipelining depth; unbounded in the interpreter)."""

    multiprocessors: int
    shared_memory: int = 2**62


@dataclass(frozen=True)
class RMSNormCall:
    """One rmsnorm call: x (*G, *R, N) and weight (*G, N), contiguous, of dtype ``dtype`` (a name)."""

    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    dtype: str
    device: RMSNormDevice
    tuning: RMSNormTuning = DEFAULT_TUNING

    def __post_init__(self):
        group_shape = self.weight_shape[:-1]
        if (len(self.x_shape) < len(self.weight_shape) or self.x_shape[:len(group_shape)] != group_shape
                or self.x_shape[-1] != self.weight_shape[-1]):
            raise ValueError(f"rmsnorm kernels: weight of shape {self.weight_shape} = (*G, N) needs x of shape "
                             f"(*G, ..., N), got {self.x_shape}")
        if not 1 <= self.x_shape[-1] <= MAX_N:
            raise ValueError(f"rmsnorm kernels: need 1 <= N <= {MAX_N}, got N = {self.x_shape[-1]}")

    @property
    def acc(self) -> str:
        return row_stat_dtype_name(self.dtype)

    def inputs(self, *names: str) -> dict[str, str]:
        """A plan's inputs with their dtypes: ``rstd`` a row statistic, the rest the call's dtype."""
        return {name: self.acc if name == "rstd" else self.dtype for name in names}


@dataclass(frozen=True)
class _Layout:
    """How a (*G, *R, N) input maps onto programs for one ``SweepTuning``: per group, tiles of
    ``tile_rows`` rows, ``programs`` programs (one per tile unless the grid is persistent)."""

    n_groups: int
    rows_per_group: int
    n_cols: int
    block_n: int
    tile_rows: int
    num_warps: int
    programs: int
    loop_stages: int

    @property
    def grid(self) -> tuple[int]:
        return (self.n_groups * self.programs,)


def _layout(call: RMSNormCall, sweep: SweepTuning, staged_tensors: int = 0) -> _Layout:
    """``staged_tensors``: how many x-shaped inputs the persistent loop pipelines (they bound
    ``loop_stages`` by shared memory)."""
    n_cols = call.x_shape[-1]
    n_groups = math.prod(call.weight_shape[:-1])
    rows_per_group = math.prod(call.x_shape) // n_cols // n_groups if n_groups else 0
    block_n = next_power_of_2(n_cols)
    tile_rows = min(max(1, sweep.tile_elements // block_n), next_power_of_2(max(rows_per_group, 1)))
    num_warps = min(32, max(1, tile_rows * block_n // (32 * sweep.elements_per_thread)))
    tiles = cdiv(rows_per_group, tile_rows)
    programs = tiles
    if sweep.programs_per_sm:  # persistent: the budget is shared among the groups
        budget = sweep.programs_per_sm * call.device.multiprocessors
        programs = max(1, min(tiles, cdiv(budget, max(n_groups, 1))))
    element_size = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[call.dtype]
    stage_bytes = tile_rows * block_n * element_size * staged_tensors
    stages = max(1, min(sweep.loop_stages, call.device.shared_memory // 2 // max(stage_bytes, 1)))
    return _Layout(n_groups, rows_per_group, n_cols, block_n, tile_rows, next_power_of_2(num_warps),
                   programs, stages)


_TL = {"float32": tl.float32, "float64": tl.float64}
_X, _W = Allocation("x"), Allocation("weight")


def _rows(call: RMSNormCall) -> Allocation:
    return Allocation(shape=call.x_shape[:-1], dtype=call.acc)


def _sweep(kernel, call: RMSNormCall, layout: _Layout, pointers: dict, writes: tuple, **constexprs) -> Launch:
    scalars = dict(rows_per_group=layout.rows_per_group, n_cols=layout.n_cols, programs_per_group=layout.programs)
    return Launch(kernel, layout.grid, dict(pointers, **scalars, ACC=_TL[call.acc], TILE_ROWS=layout.tile_rows,
                                            BLOCK_N=layout.block_n, **constexprs),
                  writes=writes, num_warps=layout.num_warps, num_stages=1)


def column_sum_launch(n_groups: int, n_partials: int, n_cols: int, partial: str, out: str) -> Launch:
    """Reduce (G, P, N) per-program partial rows ``partial`` into ``out`` (*G, N).

    The partials were just written and sit in L2, so latency, not bandwidth, bounds this kernel:
    a program loads a tile of up to 512 partial rows (a persistent grid of a few programs per
    multiprocessor fits in one round of loads) by 8192 / rows columns, which for N = 4096 and
    132 partials gives 128 programs of 32 columns."""
    block_p = min(next_power_of_2(n_partials), 512)
    block_c = min(next_power_of_2(n_cols), max(1, 8192 // block_p))
    return Launch(_column_sum_kernel, (n_groups, cdiv(n_cols, block_c)),
                  dict(partial_ptr=Buffer(partial), out_ptr=Buffer(out), n_partials=n_partials, n_cols=n_cols,
                       BLOCK_P=block_p, BLOCK_C=block_c),
                  writes=("out_ptr",), num_warps=4, num_stages=1)


def _column_sum(call: RMSNormCall, layout: _Layout, partial: str, out: str, allocations: dict) -> Launch:
    allocations[partial] = Allocation(shape=(layout.n_groups, layout.programs, layout.n_cols), dtype=call.acc)
    return column_sum_launch(layout.n_groups, layout.programs, layout.n_cols, partial, out)


def _given(name: str, present: bool):
    return Buffer(name) if present else None


@functools.lru_cache(maxsize=1024)
def forward_plan(call: RMSNormCall, eps: float, has_x_dot: bool = False, has_w_dot: bool = False) -> Plan:
    """Outputs (y, rstd), and y_dot with a tangent (inputs x_dot and/or weight_dot), in one sweep."""
    layout = _layout(call, call.tuning.row_local)
    has_tangent = has_x_dot or has_w_dot
    allocations = {"y": _X, "rstd": _rows(call), **({"y_dot": _X} if has_tangent else {})}
    launch = _sweep(_forward_kernel, call, layout,
                    dict(x_ptr=Buffer("x"), w_ptr=Buffer("weight"), x_dot_ptr=_given("x_dot", has_x_dot),
                         w_dot_ptr=_given("weight_dot", has_w_dot), y_ptr=Buffer("y"), rstd_ptr=Buffer("rstd"),
                         y_dot_ptr=_given("y_dot", has_tangent), eps=float(eps)),
                    ("y_ptr", "rstd_ptr", "y_dot_ptr"), HAS_X_DOT=has_x_dot, HAS_W_DOT=has_w_dot)
    inputs = call.inputs("x", "weight", *(("x_dot",) if has_x_dot else ()), *(("weight_dot",) if has_w_dot else ()))
    return Plan(inputs, tuple(allocations), allocations, (launch,) if layout.grid[0] else (), skip_if_empty=())


@functools.lru_cache(maxsize=1024)
def backward_plan(call: RMSNormCall) -> Plan:
    """(dx, dweight) from (x, weight, rstd, dy): dx = J (w ∘ dy), dweight = Σ_rows dy ∘ x̂ (§3)."""
    layout = _layout(call, call.tuning.reducing, staged_tensors=2)
    allocations = {"dx": _X, "dweight": _W}
    launches = ()
    if layout.n_groups:
        launches = (
            _sweep(_backward_kernel, call, layout,
                   dict(x_ptr=Buffer("x"), w_ptr=Buffer("weight"), rstd_ptr=Buffer("rstd"), dy_ptr=Buffer("dy"),
                        dx_ptr=Buffer("dx"), dw_partial_ptr=Buffer("dweight_partial")),
                   ("dx_ptr", "dw_partial_ptr"), LOOP_STAGES=layout.loop_stages),
            _column_sum(call, layout, "dweight_partial", "dweight", allocations),
        )
    return Plan(call.inputs("x", "weight", "rstd", "dy"), ("dx", "dweight"), allocations, launches, skip_if_empty=())


@functools.lru_cache(maxsize=1024)
def backward_backward_plan(call: RMSNormCall, has_cot_dx: bool, has_cot_dw: bool) -> Plan:
    """(cot_x, cot_weight, cot_dy), the VJP of (x, weight, dy) ↦ (dx, dweight) for the inputs
    cot_dx and/or cot_dweight (§4)."""
    layout = _layout(call, call.tuning.reducing, staged_tensors=2 + has_cot_dx)
    allocations = {"cot_x": _X, "cot_weight": _W, "cot_dy": _X}
    launches = ()
    if layout.n_groups:
        launches = (
            _sweep(_double_backward_kernel, call, layout,
                   dict(x_ptr=Buffer("x"), w_ptr=Buffer("weight"), rstd_ptr=Buffer("rstd"), dy_ptr=Buffer("dy"),
                        cot_dx_ptr=_given("cot_dx", has_cot_dx), cot_dw_ptr=_given("cot_dweight", has_cot_dw),
                        cot_x_ptr=Buffer("cot_x"), cot_w_partial_ptr=Buffer("cot_weight_partial"),
                        cot_dy_ptr=Buffer("cot_dy")),
                   ("cot_x_ptr", "cot_w_partial_ptr", "cot_dy_ptr"), LOOP_STAGES=layout.loop_stages,
                   HAS_COT_DX=has_cot_dx, HAS_COT_DW=has_cot_dw),
            _column_sum(call, layout, "cot_weight_partial", "cot_weight", allocations),
        )
    inputs = call.inputs("x", "weight", "rstd", "dy", *(("cot_dx",) if has_cot_dx else ()),
                         *(("cot_dweight",) if has_cot_dw else ()))
    return Plan(inputs, ("cot_x", "cot_weight", "cot_dy"), allocations, launches, skip_if_empty=())


@functools.lru_cache(maxsize=1024)
def forward_second_plan(call: RMSNormCall, present: tuple[bool, bool, bool, bool]) -> Plan:
    """y_ddot = f''[(x_dot, weight_dot), (x_dot2, weight_dot2)] from (x, weight, rstd) and the
    present directions (§5); absent ones are zero."""
    layout = _layout(call, call.tuning.row_local)
    names = ("x_dot", "weight_dot", "x_dot2", "weight_dot2")
    params = ("x_dot_ptr", "w_dot_ptr", "x_dot2_ptr", "w_dot2_ptr")
    pointers = {param: _given(name, here) for param, name, here in zip(params, names, present)}
    launch = _sweep(_forward_second_kernel, call, layout,
                    dict(x_ptr=Buffer("x"), w_ptr=Buffer("weight"), rstd_ptr=Buffer("rstd"), **pointers,
                         out_ptr=Buffer("y_ddot")),
                    ("out_ptr",), HAS_X_DOT=present[0], HAS_W_DOT=present[1], HAS_X_DOT2=present[2],
                    HAS_W_DOT2=present[3])
    allocations = {"y_ddot": _X}
    inputs = call.inputs("x", "weight", "rstd", *(name for name, here in zip(names, present) if here))
    return Plan(inputs, ("y_ddot",), allocations, (launch,) if layout.grid[0] else (), skip_if_empty=())
