"""Every entry of the per-architecture tile tables (kernels/attention/_tuning.py) fits its target:
each kernel the entry launches, compiled for sm_80, sm_89, sm_90 and sm_100 with Triton's own
compiler and ptxas on the CPU (no GPU), needs no more shared memory than the target gives one
program, spills no registers, fits the register file and keeps its wgmma asynchronous on sm_90
(``_tuning.Resources.problems``), except the launches the ``KNOWN_`` lists name (docs/design/tuning.md
§3).

The launches come from the real plan builders (``forward_plan``, ``backward_plan``,
``backward_backward_plan``) for one call per entry, so signatures and constexprs follow the kernels
as they change. The call takes the heaviest specialisation the plans make: a causal mask (BANDED),
a length no tile divides (masked key loads), grouped-query heads split over several programs
(SPLIT: the partial stores), and every optional input given (d_lse, every cotangent; d_out's own
cotangent formed, but for the kinds of ``_tuning.WITHOUT_COT_D_OUT``). Where
``_tuning.BANDED_TILES`` gives banded calls a tile of their own, the entry is compiled a second
time without a mask, on the table's tile (an entry's optional fifth element, ``banded``).

The compiler runs in a child process: this one may have Triton's interpreter on (tests/_device.py),
which replaces every kernel by an interpreted function. ``python tests/test_tile_fit.py 90 100``
prints the table of resources for those targets; ``--known`` prints the ``KNOWN_`` lists instead.

The default run compiles the 2-byte entries at head dim 128 of the forward, JVP, backward and
double backward on every target (28 launches: about 110 s of CPU, a minute on 2 cores);
``-m slow`` adds the whole matrix (every kind, head dim and dtype class: 372 launches, about
20 minutes of CPU, longer for the entries that spill kilobytes).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor

import pytest

TARGETS = (80, 89, 90, 100)
DTYPE_OF_CLASS = {2: "bfloat16", 4: "float32", 8: "float64"}
# Multiprocessors of the GPU each target names (A100, L40S, H100 SXM, B200): they only decide the
# grouped-query split, which the call below forces anyway.
MULTIPROCESSORS = {80: 108, 89: 142, 90: 132, 100: 148}
# (B, H, H_kv, T): a group of 8 query heads on one key head over few key blocks, so the column
# kernels split the group (SPLIT); T = 1960 is a multiple of no tile, so keys are masked, and long
# enough that a causal call is no short sweep (``_tuning.SHORT_SWEEP_KEYS``).
SHAPE = (1, 8, 1, 1960)
# A sliding window whose queries see fewer than ``_tuning.SHORT_SWEEP_KEYS`` keys: a short sweep.
SHORT_WINDOW = (255, 0)
# The default run: every kernel at head dim 128 in 2-byte dtypes, the entries with the deepest
# pipelines (the second-order forward is the JVP's kernel with one more tangent, at smaller tiles).
DEFAULT_SUBSET = [(kind, 128, 2) for kind in ("forward", "jvp", "backward", "backward_rows", "backward_backward",
                                                "backward_backward_rows", "backward_backward_rows_no_cot_d_out")]

# Launches (capability, kind, head dim, dtype class, kernel) that misfit today, found by
# ``python tests/test_tile_fit.py --known``: the test fails on any other misfit and warns about any
# of these that fits (take it off). docs/design/tuning.md §3 says why they exist. Every target and
# dtype class is recorded (``pytest -m slow tests/test_tile_fit.py`` holds the whole matrix to them).
KNOWN_SPILLS = {
    (80, "backward", 64, 2, "bwd_dkdv"), (80, "backward", 128, 2, "bwd_dkdv"),
    (80, "backward", 256, 2, "bwd_dkdv"), (80, "backward_rows", 256, 2, "bwd_dq"),
    (80, "backward_backward", 64, 2, "bwd_bwd_cols"),
    (80, "backward_backward", 128, 2, "bwd_bwd_cols"),
    (80, "backward_backward", 256, 2, "bwd_bwd_cols"),
    (80, "forward_second", 64, 2, "fwd"), (80, "forward_second", 128, 2, "fwd"),
    (80, "forward_second", 256, 2, "fwd"), (80, "jvp", 64, 2, "fwd"),
    (80, "jvp", 128, 2, "fwd"), (80, "jvp", 256, 2, "fwd"),
    (89, "backward", 64, 2, "bwd_dkdv"), (89, "backward", 128, 2, "bwd_dkdv"),
    (89, "backward", 256, 2, "bwd_dkdv"), (89, "backward_backward", 64, 2, "bwd_bwd_cols"),
    (89, "backward_backward", 128, 2, "bwd_bwd_cols"),
    (89, "backward_backward", 256, 2, "bwd_bwd_cols"),
    (89, "forward_second", 64, 2, "fwd"),
    (89, "forward_second", 64, 4, "fwd"), (89, "forward_second", 64, 8, "fwd"),
    (89, "forward_second", 128, 2, "fwd"), (89, "forward_second", 128, 4, "fwd"),
    (89, "forward_second", 128, 8, "fwd"), (89, "forward_second", 256, 2, "fwd"),
    (89, "forward_second", 256, 4, "fwd"), (89, "jvp", 64, 2, "fwd"),
    (89, "jvp", 64, 4, "fwd"), (89, "jvp", 64, 8, "fwd"),
    (89, "jvp", 128, 2, "fwd"), (89, "jvp", 128, 4, "fwd"),
    (89, "jvp", 128, 8, "fwd"), (89, "jvp", 256, 2, "fwd"),
    (89, "jvp", 256, 4, "fwd"), (89, "jvp", 256, 8, "fwd"),
    # the D64 forward's two halves on 128 × 128 × 4 × 3: 14 words here without a mask, 6 causal; at
    # lengths the key block divides, the timed ones, 16 and 6 (docs/perf-notes.md item 54)
    (90, "forward", 64, 2, "fwd"),
    (90, "backward", 64, 4, "bwd_dkdv"),
    (90, "backward", 64, 8, "bwd_dkdv"), (90, "backward", 128, 2, "bwd_dkdv"),
    (90, "backward", 128, 4, "bwd_dkdv"), (90, "backward", 128, 8, "bwd_dkdv"),
    (90, "backward", 256, 2, "bwd_dkdv"), (90, "backward", 256, 4, "bwd_dkdv"),
    (90, "backward", 256, 8, "bwd_dkdv"), (90, "backward_rows", 256, 8, "bwd_dq"),
    (90, "backward_backward", 64, 2, "bwd_bwd_cols"),
    (90, "backward_backward", 64, 4, "bwd_bwd_cols"),
    (90, "backward_backward", 64, 8, "bwd_bwd_cols"),
    (90, "backward_backward", 128, 2, "bwd_bwd_cols"),
    (90, "backward_backward", 128, 4, "bwd_bwd_cols"),
    (90, "backward_backward", 128, 8, "bwd_bwd_cols"),
    (90, "backward_backward", 256, 2, "bwd_bwd_cols"),
    (90, "backward_backward", 256, 4, "bwd_bwd_cols"),
    (90, "backward_backward", 256, 8, "bwd_bwd_cols"),
    (90, "forward", 256, 8, "fwd"), (90, "forward_second", 64, 2, "fwd"),
    (90, "forward_second", 64, 4, "fwd"), (90, "forward_second", 64, 8, "fwd"),
    (90, "forward_second", 128, 2, "fwd"), (90, "forward_second", 128, 4, "fwd"),
    (90, "forward_second", 128, 8, "fwd"), (90, "forward_second", 256, 2, "fwd"),
    (90, "forward_second", 256, 4, "fwd"), (90, "forward_second", 256, 8, "fwd"),
    (90, "jvp", 64, 4, "fwd"), (90, "jvp", 64, 8, "fwd"),
    (90, "jvp", 128, 2, "fwd"), (90, "jvp", 128, 4, "fwd"),
    (90, "jvp", 128, 8, "fwd"), (90, "jvp", 256, 2, "fwd"),
    (90, "jvp", 256, 4, "fwd"), (90, "jvp", 256, 8, "fwd"),
    (100, "backward", 128, 2, "bwd_dkdv"), (100, "backward", 256, 2, "bwd_dkdv"),
    (100, "backward_backward", 64, 2, "bwd_bwd_cols"),
    (100, "backward_backward", 128, 2, "bwd_bwd_cols"),
    (100, "backward_backward", 256, 2, "bwd_bwd_cols"),
    (100, "forward_second", 128, 2, "fwd"), (100, "forward_second", 256, 2, "fwd"),
    (100, "jvp", 256, 2, "fwd"),
    # the 32 head-dim class (the 64 class's tiles)
    (80, "backward", 32, 2, "bwd_dkdv"), (80, "backward_backward", 32, 2, "bwd_bwd_cols"),
    (80, "forward_second", 32, 2, "fwd"),
    (89, "backward", 32, 2, "bwd_dkdv"), (89, "backward_backward", 32, 2, "bwd_bwd_cols"),
    (89, "forward_second", 32, 2, "fwd"),
    (90, "backward", 32, 4, "bwd_dkdv"), (90, "backward_backward", 32, 2, "bwd_bwd_cols"),
    (90, "backward_backward", 32, 4, "bwd_bwd_cols"),
    (90, "backward_backward", 32, 8, "bwd_bwd_cols"), (90, "forward_second", 32, 4, "fwd"),
    (90, "forward_second", 32, 8, "fwd"), (90, "jvp", 32, 4, "fwd"),
    (100, "backward_backward", 32, 2, "bwd_bwd_cols"),
    # the double backward's row sweep (its own kind since it can run as one sweep)
    (80, "backward_backward_rows", 32, 2, "bwd_bwd_rows"), (80, "backward_backward_rows", 32, 4, "bwd_bwd_rows"),
    (80, "backward_backward_rows", 64, 2, "bwd_bwd_rows"), (80, "backward_backward_rows", 64, 4, "bwd_bwd_rows"),
    (80, "backward_backward_rows", 64, 8, "bwd_bwd_rows"), (80, "backward_backward_rows", 128, 2, "bwd_bwd_rows"),
    (80, "backward_backward_rows", 128, 4, "bwd_bwd_rows"), (80, "backward_backward_rows", 128, 8, "bwd_bwd_rows"),
    (80, "backward_backward_rows", 256, 2, "bwd_bwd_rows"), (80, "backward_backward_rows", 256, 4, "bwd_bwd_rows"),
    (80, "backward_backward_rows", 256, 8, "bwd_bwd_rows"), (89, "backward_backward_rows", 32, 2, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 32, 4, "bwd_bwd_rows"), (89, "backward_backward_rows", 32, 8, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 64, 2, "bwd_bwd_rows"), (89, "backward_backward_rows", 64, 4, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 64, 8, "bwd_bwd_rows"), (89, "backward_backward_rows", 128, 2, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 128, 4, "bwd_bwd_rows"), (89, "backward_backward_rows", 128, 8, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 256, 2, "bwd_bwd_rows"), (89, "backward_backward_rows", 256, 4, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 256, 8, "bwd_bwd_rows"), (90, "backward_backward_rows", 32, 4, "bwd_bwd_rows"),
    (90, "backward_backward_rows", 64, 4, "bwd_bwd_rows"), (90, "backward_backward_rows", 64, 8, "bwd_bwd_rows"),
    (90, "backward_backward_rows", 128, 2, "bwd_bwd_rows"), (90, "backward_backward_rows", 128, 4, "bwd_bwd_rows"),
    (90, "backward_backward_rows", 128, 8, "bwd_bwd_rows"), (90, "backward_backward_rows", 256, 2, "bwd_bwd_rows"),
    (90, "backward_backward_rows", 256, 4, "bwd_bwd_rows"), (90, "backward_backward_rows", 256, 8, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 32, 4, "bwd_bwd_rows"), (100, "backward_backward_rows", 32, 8, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 64, 4, "bwd_bwd_rows"), (100, "backward_backward_rows", 64, 8, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 128, 2, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 128, 4, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 128, 8, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 256, 2, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 256, 4, "bwd_bwd_rows"),
    (100, "backward_backward_rows", 256, 8, "bwd_bwd_rows"),
    # sm_90's float32 dQ sweeps at D128 and D256, the 2-byte JVP of the 32 class on sm_80 and sm_89
    # (unlisted until the whole matrix ran again in session 19), and the 4- and 8-byte entries of
    # sm_80, sm_89 and sm_100
    (90, "backward_rows", 128, 4, "bwd_dq"), (90, "backward_rows", 256, 4, "bwd_dq"),
    (80, "jvp", 32, 2, "fwd"), (89, "jvp", 32, 2, "fwd"),
    (80, "backward", 32, 4, "bwd_dkdv"), (80, "backward", 64, 4, "bwd_dkdv"), (80, "backward", 128, 4, "bwd_dkdv"),
    (80, "backward_rows", 128, 4, "bwd_dq"), (80, "backward", 128, 8, "bwd_dkdv"),
    (80, "backward", 256, 4, "bwd_dkdv"), (80, "backward_rows", 256, 4, "bwd_dq"),
    (80, "backward", 256, 8, "bwd_dkdv"), (80, "backward_rows", 256, 8, "bwd_dq"),
    (80, "backward_backward", 32, 4, "bwd_bwd_cols"), (80, "backward_backward", 32, 8, "bwd_bwd_cols"),
    (80, "backward_backward", 64, 4, "bwd_bwd_cols"), (80, "backward_backward", 64, 8, "bwd_bwd_cols"),
    (80, "backward_backward", 128, 4, "bwd_bwd_cols"), (80, "backward_backward", 128, 8, "bwd_bwd_cols"),
    (80, "backward_backward", 256, 4, "bwd_bwd_cols"), (80, "backward_backward", 256, 8, "bwd_bwd_cols"),
    (80, "forward", 256, 8, "fwd"), (80, "forward_second", 32, 4, "fwd"), (80, "forward_second", 32, 8, "fwd"),
    (80, "forward_second", 64, 4, "fwd"), (80, "forward_second", 64, 8, "fwd"),
    (80, "forward_second", 128, 4, "fwd"), (80, "forward_second", 128, 8, "fwd"),
    (80, "forward_second", 256, 4, "fwd"), (80, "forward_second", 256, 8, "fwd"), (80, "jvp", 32, 4, "fwd"),
    (80, "jvp", 64, 4, "fwd"), (80, "jvp", 128, 4, "fwd"), (80, "jvp", 128, 8, "fwd"), (80, "jvp", 256, 4, "fwd"),
    (80, "jvp", 256, 8, "fwd"), (89, "backward", 32, 4, "bwd_dkdv"), (89, "backward", 32, 8, "bwd_dkdv"),
    (89, "backward", 64, 4, "bwd_dkdv"), (89, "backward", 64, 8, "bwd_dkdv"),
    (89, "backward_rows", 64, 8, "bwd_dq"),
    (89, "backward", 128, 4, "bwd_dkdv"), (89, "backward_rows", 128, 4, "bwd_dq"),
    (89, "backward", 128, 8, "bwd_dkdv"), (89, "backward_rows", 128, 8, "bwd_dq"),
    (89, "backward", 256, 4, "bwd_dkdv"), (89, "backward_rows", 256, 4, "bwd_dq"),
    (89, "backward", 256, 8, "bwd_dkdv"), (89, "backward_rows", 256, 8, "bwd_dq"),
    (89, "backward_backward", 32, 4, "bwd_bwd_cols"), (89, "backward_backward", 32, 8, "bwd_bwd_cols"),
    (89, "backward_backward", 64, 4, "bwd_bwd_cols"), (89, "backward_backward", 64, 8, "bwd_bwd_cols"),
    (89, "backward_backward", 128, 4, "bwd_bwd_cols"), (89, "backward_backward", 128, 8, "bwd_bwd_cols"),
    (89, "backward_backward", 256, 4, "bwd_bwd_cols"), (89, "backward_backward", 256, 8, "bwd_bwd_cols"),
    (89, "forward_second", 32, 4, "fwd"), (89, "forward_second", 32, 8, "fwd"),
    (89, "forward_second", 256, 8, "fwd"), (89, "jvp", 32, 4, "fwd"), (89, "jvp", 32, 8, "fwd"),
    (100, "backward", 32, 4, "bwd_dkdv"), (100, "backward", 32, 8, "bwd_dkdv"),
    (100, "backward", 64, 4, "bwd_dkdv"), (100, "backward", 64, 8, "bwd_dkdv"),
    (100, "backward_rows", 64, 8, "bwd_dq"),
    (100, "backward", 128, 4, "bwd_dkdv"), (100, "backward_rows", 128, 4, "bwd_dq"),
    (100, "backward", 128, 8, "bwd_dkdv"), (100, "backward_rows", 128, 8, "bwd_dq"),
    (100, "backward", 256, 4, "bwd_dkdv"), (100, "backward_rows", 256, 4, "bwd_dq"),
    (100, "backward", 256, 8, "bwd_dkdv"), (100, "backward_rows", 256, 8, "bwd_dq"),
    (100, "backward_backward", 32, 4, "bwd_bwd_cols"), (100, "backward_backward", 32, 8, "bwd_bwd_cols"),
    (100, "backward_backward", 64, 4, "bwd_bwd_cols"), (100, "backward_backward", 64, 8, "bwd_bwd_cols"),
    (100, "backward_backward", 128, 4, "bwd_bwd_cols"), (100, "backward_backward", 128, 8, "bwd_bwd_cols"),
    (100, "backward_backward", 256, 4, "bwd_bwd_cols"), (100, "backward_backward", 256, 8, "bwd_bwd_cols"),
    (100, "forward", 64, 8, "fwd"), (100, "forward_second", 32, 4, "fwd"), (100, "forward_second", 32, 8, "fwd"),
    # float64 at head dim 256 on two warps (sm_90's table, which sm_89's and sm_100's take there):
    # right numbers, more registers a thread
    (89, "forward", 256, 8, "fwd"), (100, "forward", 256, 8, "fwd"),
    # float64's dQ sweep at the 128 class on 64 + 64 head-dim parts (``float64_head_dim_parts``,
    # session 22): 14 words a thread on sm_80, 28 on sm_90 (found by the whole matrix in session 23)
    (80, "backward_rows", 128, 8, "bwd_dq"), (90, "backward_rows", 128, 8, "bwd_dq"),
    (100, "forward_second", 64, 4, "fwd"), (100, "forward_second", 64, 8, "fwd"),
    (100, "forward_second", 128, 4, "fwd"), (100, "forward_second", 128, 8, "fwd"),
    (100, "forward_second", 256, 4, "fwd"), (100, "forward_second", 256, 8, "fwd"), (100, "jvp", 32, 4, "fwd"),
    (100, "jvp", 32, 8, "fwd"), (100, "jvp", 64, 4, "fwd"), (100, "jvp", 64, 8, "fwd"), (100, "jvp", 128, 4, "fwd"),
    (100, "jvp", 128, 8, "fwd"), (100, "jvp", 256, 4, "fwd"), (100, "jvp", 256, 8, "fwd"),
}
# sm_89's float64 JVP at head dim 256 and sm_90's float64 double-backward columns at 256 need more
# shared memory than the target has at the smallest tile, 16 × 16.
KNOWN_SHARED_MEMORY = {
    (89, "jvp", 256, 8, "fwd"), (90, "backward_backward", 256, 8, "bwd_bwd_cols"),
    # the double backward's row sweep (its own kind since it can run as one sweep)
    (80, "backward_backward_rows", 256, 8, "bwd_bwd_rows"), (89, "backward_backward_rows", 128, 8, "bwd_bwd_rows"),
    (89, "backward_backward_rows", 256, 4, "bwd_bwd_rows"), (89, "backward_backward_rows", 256, 8, "bwd_bwd_rows"),
    # the 8-byte entries of sm_80 and sm_89 and Ada's 4-byte double backward at D256
    (80, "backward_backward", 256, 8, "bwd_bwd_cols"), (89, "backward", 256, 8, "bwd_dkdv"),
    (89, "backward_rows", 256, 8, "bwd_dq"), (89, "backward_backward", 128, 8, "bwd_bwd_cols"),
    (89, "backward_backward", 256, 4, "bwd_bwd_cols"), (89, "backward_backward", 256, 8, "bwd_bwd_cols"),
    (89, "forward_second", 256, 8, "fwd"),
}
# sm_90 launches whose 16-bit dots run on mma.sync rather than Hopper's wgmma, which needs 64 rows
# per warpgroup: a tile side below 64 in the dot's row dimension (BLOCK_N for column kernels,
# BLOCK_M for row kernels) keeps it there (docs/perf-notes.md item 13).
KNOWN_LEGACY_MMA = {
    (90, "jvp", 256, 2, "fwd"), (90, "forward_second", 128, 2, "fwd"), (90, "forward_second", 256, 2, "fwd"),
    (90, "backward", 256, 2, "bwd_dkdv"), (90, "backward_backward", 256, 2, "bwd_bwd_cols"),
    # the double backward's row sweep (its own kind since it can run as one sweep)
    (90, "backward_backward_rows", 256, 2, "bwd_bwd_rows"),
}
# ptxas's C7513: every wgmma of the kernel serialised (docs/perf-notes.md item 53). None today.
KNOWN_SERIALIZED_WGMMA: set = set()

# The row sweep without d_out's cotangent misfits wherever the row sweep with it does. At sm_90's
# 2-byte head dim 128 it sweeps once on its own tile, reading the backward's dq, and spills a few
# words (6 a thread as timed); at 64 it fits (without dq it spilled 24 words a thread).
for _known in (KNOWN_SPILLS, KNOWN_SHARED_MEMORY, KNOWN_LEGACY_MMA):
    _known |= {(c, "backward_backward_rows_no_cot_d_out", d, b, kernel)
               for c, kind, d, b, kernel in list(_known) if kind == "backward_backward_rows"}


# Launches that are not a table kind of their own, and the kind whose tile they take.
TABLE_KIND = {"tangent": "jvp"}


def entry_launches(capability: int, kind: str, head_dim: int, dtype_bytes: int, banded: bool = True):
    """The launches (and the dtype of each buffer) that the tile-table entry (capability, kind,
    head dim, dtype class) runs, built by the real plan builders, for a causal call (``banded``
    True), one without a mask (False) or one under ``SHORT_WINDOW`` ("short")."""
    from theria_kernels.attention import AttentionParams, _launch, _tuning

    batch, heads, heads_kv, seq = SHAPE
    dtype = DTYPE_OF_CLASS[dtype_bytes]
    q_shape, k_shape = (batch, heads, seq, head_dim), (batch, heads_kv, seq, head_dim)
    strides = lambda shape: (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)  # noqa: E731
    device = _launch.Device(MULTIPROCESSORS[capability], capability=capability)
    params = AttentionParams(scale=head_dim ** -0.5, causal=banded is True,
                             window_size=SHORT_WINDOW if banded == "short" else (-1, -1))
    call = _launch.AttentionCall(q_shape, strides(q_shape), k_shape, strides(k_shape), dtype, params, device)
    plans = {
        "forward": lambda: _launch.forward_plan(call),
        "jvp": lambda: _launch.forward_plan(call, True),
        # not a table kind: forward-mode AD's tangent on a forward's results, on the JVP's tile
        "tangent": lambda: _launch.forward_plan(call, True, given_primal=True),
        "forward_second": lambda: _launch.forward_plan(call, True, True),
        "backward": lambda: _launch.backward_plan(call, True),
        # with the backward's dq, as both adapters' double backward after a backward has it
        "backward_backward": lambda: _launch.backward_backward_plan(
            call, frozenset({"d_lse", "cot_dq", "cot_dk", "cot_dv", "dq"}),
            cot_d_out=kind not in _tuning.WITHOUT_COT_D_OUT),
    }
    plan = plans[_tuning.PLAN_KIND.get(kind, kind)]()
    return [(launch, plan.buffer_dtypes) for launch in plan.launches
            if _tuning.takes_tile(kind, launch.kernel.__name__)]


def _compile_one(job):
    """Child process: compile one launch of one entry; its resources or the compiler's error."""
    from theria_kernels.attention._tuning import compile_launch, tile

    *entry, index = job
    capability, kind, head_dim, dtype_bytes, banded = (*entry, True)[:5]
    launch, dtypes = entry_launches(*entry)[index]
    row = dict(capability=capability, kind=kind, head_dim=head_dim, dtype_bytes=dtype_bytes, banded=banded,
               tile=tile(capability, TABLE_KIND.get(kind, kind), head_dim, DTYPE_OF_CLASS[dtype_bytes], bool(banded),
                         banded == "short"),
               kernel=launch.kernel.__name__, num_warps=launch.num_warps, num_stages=launch.num_stages,
               halves=bool(launch.arguments.get("HALVES")))
    try:
        resources = compile_launch(launch, dtypes, capability)
    except Exception as error:  # a compiler or ptxas failure is a finding, reported with the entry
        return dict(row, error=f"{type(error).__name__}: {str(error)[:400]}")
    return dict(row, shared=resources.shared, registers=resources.registers, spills=resources.spills,
                tensor_memory=resources.tensor_memory, tensor_loads=resources.tensor_loads,
                global_scratch=resources.global_scratch, serialized_wgmma=resources.serialized_wgmma,
                problems=resources.problems())


def compile_entries(entries, workers: int | None = None) -> list[dict]:
    """Child process: compile every launch of ``entries`` (capability, kind, head dim, dtype class),
    one launch per job over ``workers`` processes; the row delta kernel, the same in both backward
    plans, once per entry all the same."""
    jobs = [(*entry, index) for entry in entries for index in range(len(entry_launches(*entry)))]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_one, jobs))


def run_compiler(entries, **environment) -> list[dict]:
    """Compile ``entries`` in a child process without Triton's interpreter, with ``environment``
    added to its environment; the rows it returns."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"} | environment
    result = subprocess.run([sys.executable, __file__, "--json", json.dumps(entries)], env=env,
                            capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise AssertionError(f"the compiler process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def format_rows(rows) -> str:
    """A markdown table of compiled launches: what each uses of its target."""
    lines = ["| target | kind | D | bytes | tile (M, N, warps, stages) | kernel | shared KB | regs | spills | fits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            used, fits = "— | — | —", r["error"].splitlines()[0]
        else:
            used = f"{r['shared'] / 1024:.1f} | {r['registers']} | {r['spills']}"
            fits = "yes" if not r["problems"] else "; ".join(r["problems"])
        lines.append(f"| sm_{r['capability']} | {r['kind']} | {r['head_dim']} | {r['dtype_bytes']} | "
                     f"{tuple(r['tile'])} | {r['kernel']} | {used} | {fits} |")
    return "\n".join(lines)


def _short(kernel: str) -> str:
    return kernel.removeprefix("_attn_").removeprefix("_").removesuffix("_kernel")


def _misfits(rows) -> dict[str, set]:
    """(capability, kind, head dim, dtype class, kernel) of each launch that spills, that needs more
    shared memory than its target has, whose 16-bit dots miss Hopper's wgmma on sm_90, whose wgmma
    ptxas serialises, or that fails otherwise (compiler errors, register file)."""
    found = {"spills": set(), "shared_memory": set(), "legacy_mma": set(), "serialized_wgmma": set(), "other": set()}
    for row in rows:
        key = (row["capability"], row["kind"], row["head_dim"], row["dtype_bytes"], _short(row["kernel"]))
        problems = [row["error"]] if "error" in row else row["problems"]
        for problem in problems:
            found["spills" if "spilled" in problem else "shared_memory" if "shared memory" in problem
                  else "legacy_mma" if "mma.sync" in problem else "serialized_wgmma" if "C7513" in problem
                  else "other"].add(key)
    return found


def _assert_fit(entries):
    """Every launch of ``entries`` fits, except those ``KNOWN_SPILLS``, ``KNOWN_SHARED_MEMORY``,
    ``KNOWN_LEGACY_MMA`` and ``KNOWN_SERIALIZED_WGMMA`` list; a listed one that fits now is reported
    (a warning: take it off its list). The compiled rows."""
    rows = run_compiler(entries)
    found = _misfits(rows)
    known = dict(spills=KNOWN_SPILLS, shared_memory=KNOWN_SHARED_MEMORY, legacy_mma=KNOWN_LEGACY_MMA,
                 serialized_wgmma=KNOWN_SERIALIZED_WGMMA, other=set())
    covered = {tuple(entry[:4]) for entry in entries}
    new = {problem: found[problem] - known[problem] for problem in found}
    fixed = {problem: {key for key in known[problem] - found[problem] if key[:4] in covered} for problem in found}
    new_keys = set().union(*new.values())
    unexpected = [r for r in rows if (r["capability"], r["kind"], r["head_dim"], r["dtype_bytes"],
                                      _short(r["kernel"])) in new_keys]
    assert not unexpected, (f"{len(unexpected)} of {len(rows)} launches do not fit their target:\n"
                            f"{format_rows(unexpected)}")
    if any(fixed.values()):
        warnings.warn(f"these fit now; take them off their lists: {fixed}", stacklevel=2)
    return rows


@pytest.mark.parametrize("capability", TARGETS, ids=[f"sm_{c}" for c in TARGETS])
def test_tiles_fit_representative(capability):
    """``DEFAULT_SUBSET`` on every target."""
    _assert_fit(unbanded([(capability, *entry) for entry in DEFAULT_SUBSET]))


@pytest.mark.slow
@pytest.mark.parametrize("capability", TARGETS, ids=[f"sm_{c}" for c in TARGETS])
def test_tiles_fit_every_entry(capability):
    """Every kind × head dim × dtype class of the target's table."""
    from theria_kernels.attention._tuning import HEAD_DIMS, KINDS

    _assert_fit(unbanded([(capability, kind, head_dim, dtype_bytes) for kind, head_dim, dtype_bytes
                          in itertools.product(KINDS, HEAD_DIMS, DTYPE_OF_CLASS)]))


def unbanded(entries) -> list[tuple]:
    """``entries`` and, for each that ``_tuning.BANDED_TILES`` overrides for banded calls, the
    same entry without a mask (on the table's own tile)."""
    from theria_kernels.attention._tuning import BANDED_TILES, table_capability

    return list(entries) + [(c, k, d, b, False) for c, k, d, b in entries
                            if (TABLE_KIND.get(k, k), d, b) in BANDED_TILES[table_capability(c)]]


def test_banded_entries_and_the_tiles_they_replace_fit():
    """Every ``BANDED_TILES`` override, on every target: the banded call on the override and the
    call without a mask on the table's tile fit (the JVP's with the tangent kernel that takes its
    tile), so a tile chosen for one mask class cannot hide a misfit in the other."""
    from theria_kernels.attention._tuning import BANDED_TILES, table_capability

    entries = [(capability, launch_kind, head_dim, dtype_bytes) for capability in TARGETS
               for kind, head_dim, dtype_bytes in BANDED_TILES[table_capability(capability)]
               for launch_kind in [kind] + [k for k, of in TABLE_KIND.items() if of == kind]]
    assert entries
    _assert_fit(unbanded(entries))


def test_short_sweep_entries_fit():
    """Every ``SHORT_SWEEP_TILES`` entry, on every target that reads it, compiled for a short sweep
    (a narrow window): it fits, with no misfit listed or not, one tile a block (short sweeps take no
    halves)."""
    from theria_kernels.attention._tuning import SHORT_SWEEP_TILES, table_capability

    entries = [(capability, kind, head_dim, dtype_bytes, "short") for capability in TARGETS
               for kind, head_dim, dtype_bytes in SHORT_SWEEP_TILES.get(table_capability(capability), {})]
    assert entries
    rows = run_compiler(entries)
    for row in rows:
        expected = SHORT_SWEEP_TILES[table_capability(row["capability"])][(row["kind"], row["head_dim"],
                                                                             row["dtype_bytes"])]
        assert "error" not in row and not row["problems"] and not row["halves"], row
        assert tuple(row["tile"]) == expected, row


def test_tangent_kernel_needs_no_more_than_the_jvp():
    """The tangent kernel (forward-mode AD's tangent on a forward's results, ``given_primal``) runs on
    the JVP's tiles, so it must fit wherever the JVP kernel does: compiled for sm_80 and sm_90 at
    the 2-byte D64 and D128 entries it takes no more shared memory, registers or spills."""
    entries = [(capability, kind, head_dim, 2) for capability in (80, 90) for head_dim in (64, 128)
               for kind in ("jvp", "tangent")]
    rows = {(r["capability"], r["kind"], r["head_dim"]): r for r in run_compiler(entries)}
    for capability in (80, 90):
        for head_dim in (64, 128):
            jvp, tangent = rows[capability, "jvp", head_dim], rows[capability, "tangent", head_dim]
            assert "error" not in tangent, tangent
            for resource in ("shared", "registers", "spills"):
                assert tangent[resource] <= jvp[resource], (capability, head_dim, resource, tangent, jvp)


def test_backward_halves_compile_for_hopper(monkeypatch):
    """The backward's dK/dV sweep in halves (``_sweeps._column_tile``'s HALVES) compiles for sm_90
    at the 2-byte D64 and D128 entries with the table's TMA and adds no misfit to one tile's (at D128
    it takes the one tile's spills away); by default no entry takes it (``BACKWARD_COLUMNS_HALVES``:
    one tile was faster on the H200 once the programs ran longest first)."""
    entries = [(90, "backward", head_dim, 2) for head_dim in (64, 128)]
    halves = run_compiler(entries, THERIA_ATTENTION_HALVES="1")
    one_tile = run_compiler(entries, THERIA_ATTENTION_HALVES="0")
    columns = [row for row in halves if row["kernel"] == "_attn_bwd_dkdv_kernel"]
    assert len(columns) == 2 and all("error" not in row and row["halves"] for row in columns), halves
    assert not any(row["halves"] for row in one_tile)
    misfits_halves, misfits_one_tile = _misfits(halves), _misfits(one_tile)
    for problem, launches in misfits_halves.items():
        assert launches <= misfits_one_tile[problem], (problem, launches - misfits_one_tile[problem])
    # The tables' own choice needs no compiler: the plans built here for the same (causal) calls
    from theria_kernels.attention import _launch, _tuning

    monkeypatch.setattr(_tuning, "HALVES_OVERRIDE", None)
    _launch.backward_plan.cache_clear()
    try:
        by_default = {head_dim for *_, head_dim, _ in entries
                      if any(launch.arguments.get("HALVES")
                             for launch, _ in entry_launches(90, "backward", head_dim, 2))}
    finally:
        _launch.backward_plan.cache_clear()
    assert by_default == set()


def test_serialized_wgmma_is_a_misfit(tmp_path):
    """ptxas says that it serialises a kernel's wgmma (its C7513: each product waited for as soon as
    it is issued) only in its verbose report; ``_tuning._wgmma_serialized`` reads it there (from a
    stand-in ptxas here) and ``Resources.problems`` counts it as a misfit."""
    from theria_kernels.attention import _tuning

    def stand_in(name, report):
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\necho '{report}' >&2\n")
        path.chmod(0o755)
        return str(path)

    says = stand_in("says", "ptxas info    : (C7513) Potential Performance Loss: wgmma.mma_async instructions "
                            "are serialized")
    quiet = stand_in("quiet", "ptxas info    : Used 128 registers")
    ptx = ".version 8.7\n.target sm_90a\n.address_size 64\n\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ;\n"
    assert _tuning._wgmma_serialized(ptx, says)
    assert not _tuning._wgmma_serialized(ptx, quiet)
    assert not _tuning._wgmma_serialized(ptx.replace("wgmma.mma_async", "mma.sync"), says)  # no wgmma: not asked
    resources = _tuning.Resources(kernel="k", capability=90, shared=0, registers=128, spills=0, threads=128,
                                  tensor_memory=0, serialized_wgmma=True)
    assert any("C7513" in problem for problem in resources.problems())


def test_forward_halves_keep_their_wgmma_asynchronous():
    """The forward's two halves, forced at the D64 entry under a band and without a mask at this
    file's length (1960, which the key block does not divide): with the mask's run-time test in
    their edge loops ptxas serialised every wgmma of the kernel (docs/perf-notes.md item 53); the
    edge loops now apply the mask to every block they run."""
    rows = run_compiler([(90, "forward", 64, 2), (90, "forward", 64, 2, False)], THERIA_ATTENTION_HALVES="1")
    assert [(row["halves"], row["serialized_wgmma"]) for row in rows] == [(True, False)] * 2, rows


def test_tma_compiles_for_hopper():
    """The sweeps that can load through tensor descriptors (the forward kinds, the backward) compile
    for sm_90 at their 2-byte tiles with TMA, issue TMA copies, ask for the descriptors' global
    scratch and fit wherever the entries without TMA do; by default exactly the (kind, head dim, dtype
    class) entries of sm_90's ``TMA_KINDS`` use them (not float32, whose forward spills with TMA,
    nor untimed kinds and head dims)."""
    from theria_kernels.attention._tuning import TMA_CAPABLE, TMA_KINDS

    entries = [(90, kind, head_dim, 2) for kind in TMA_CAPABLE for head_dim in (64, 128)]
    with_tma, without = run_compiler(entries, THERIA_ATTENTION_TMA="1"), run_compiler(entries, THERIA_ATTENTION_TMA="0")
    for row in with_tma:
        assert "error" not in row and row["tensor_loads"] > 0 and row["global_scratch"] > 0, row
    for row in without:
        assert row["tensor_loads"] == 0 and row["global_scratch"] == 0, row
    misfits_with, misfits_without = _misfits(with_tma), _misfits(without)
    for problem, launches in misfits_with.items():  # TMA adds no misfit (it may take one away)
        assert launches <= misfits_without[problem], (problem, launches - misfits_without[problem])
    others = [(90, "forward", 64, 4), (90, "forward", 32, 2)]
    by_default = run_compiler(entries + others, THERIA_ATTENTION_TMA="")  # the tables' choice
    chosen = {(row["kind"], row["head_dim"], row["dtype_bytes"]) for row in by_default if row["tensor_loads"]}
    assert chosen == TMA_KINDS[90] != set()
    for row in by_default:
        entry = (row["kind"], row["head_dim"], row["dtype_bytes"])
        assert (row["global_scratch"] > 0) == (entry in TMA_KINDS[90]), row


def test_unknown_architectures_fall_back_to_a_table_that_fits():
    """Capabilities without a table of their own take one made for no more shared memory than
    they have; an unknown one takes the smallest."""
    from theria_kernels.attention import _tuning

    for capability, limit in _tuning.SHARED_MEMORY_PER_BLOCK.items():
        assert _tuning.SHARED_MEMORY_PER_BLOCK[_tuning.table_capability(capability)] <= limit, capability
    smallest = min(_tuning.TILE_TABLES, key=_tuning.SHARED_MEMORY_PER_BLOCK.__getitem__)
    for capability in (0, 75, 95, 130):
        assert _tuning.table_capability(capability) == smallest
    for table in _tuning.TILE_TABLES.values():
        assert set(table) == set(_tuning.KINDS)
        for kind in _tuning.KINDS:
            assert set(table[kind]) == set(_tuning.HEAD_DIMS)
            assert all(set(row) == set(DTYPE_OF_CLASS) for row in table[kind].values())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--json"]:  # the child process of run_compiler
        print(json.dumps(compile_entries([tuple(e) for e in json.loads(sys.argv[2])])))
    else:  # python tests/test_tile_fit.py [--known] [capability ...]
        from theria_kernels.attention._tuning import HEAD_DIMS, KINDS

        known = "--known" in sys.argv
        targets = [int(c) for c in sys.argv[1:] if c != "--known"] or list(TARGETS)
        rows = compile_entries(list(itertools.product(targets, KINDS, HEAD_DIMS, DTYPE_OF_CLASS)))
        if known:  # the lists of misfits, as the KNOWN_ lists spell them
            for problem, keys in _misfits(rows).items():
                print(f"{problem}:\n" + "".join(f"    {key!r},\n".replace("'", '"') for key in sorted(keys)))
        else:
            print(format_rows(rows))
