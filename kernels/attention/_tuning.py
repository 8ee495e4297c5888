"""Attention's tile tables, one per GPU architecture, and what each target gives one program.

A tile is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: row sweeps tile queries by BLOCK_M,
column sweeps keys by BLOCK_N. Each table maps sweep kind → head-dim class (``head_dim_class``:
32 for head dims up to 32, the head dims of MAML's small models, then 64, 128, 256) → dtype class
(bytes per element: 2 for float16 and bfloat16, 4 for float32, 8 for float64) → tile. The forward
kinds key by the padded head dim also where they split it (``_launch.head_dim_parts``): the split
tiles are narrower. ``BANDED_TILES`` holds the entries that banded calls (a causal mask or a
sliding window) take in place of the table's, where timing chose differently for them.
``TMA_KINDS`` says where the sweeps load through tensor descriptors (TMA).

How the tables were chosen and how they are checked: docs/design/tuning.md. In short, sm_90's is
the table tuned by timing on an H100 and H200 (docs/perf-notes.md; scripts/tune_attention.py
retunes it); the others start from it and shrink (fewer stages first, then a narrower tile) where
a kernel would not fit the target's shared memory. tests/test_tile_fit.py compiles every entry
for its target on the CPU (``compile_launch``) and checks shared memory, registers and spills.
Only sm_90's entries are timed; the others are fits, not measurements.

Framework-neutral: imports neither torch nor JAX (nor Triton's compiler until a launch is
compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass


KINDS = ("forward", "jvp", "forward_second", "backward", "backward_rows", "backward_backward",
         "backward_backward_rows", "backward_backward_rows_no_cot_d_out")
HEAD_DIMS = (32, 64, 128, 256)
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

# Shared memory one program may use (CUDA's per-block opt-in limit, bytes): the multiprocessor's
# shared memory less the 1 KB the system keeps per program. sm_80 (A100) 164 KB per SM, sm_86 /
# sm_89 (GA10x, Ada) and sm_120 (RTX 50) 100 / 100 / 128 KB, sm_90 (H100, H200) and sm_100 / sm_103
# (B200, B300) 228 KB.
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                           103: 232448, 120: 101376, 121: 101376}
# Every architecture here has 64 K 32-bit registers per multiprocessor and at most 255 per thread.
REGISTERS_PER_SM = 65536
# Blackwell's tensor memory: 512 columns per multiprocessor (Triton's own launch-time limit).
TENSOR_MEMORY_COLUMNS = 512

Tile = tuple[int, int, int, int]

# Hopper (H100, H200): tuned by timing. The 4- and 8-byte entries halve and quarter the 2-byte tile
# and drop one and two pipeline stages: wider elements need that much more shared memory and
# registers per tile. The 8-byte entries at head dim 256 run two warps: at four and eight the
# compiled float64 backward gave a dK 43-120 % off on the H200, at one and two a right one
# (docs/perf-notes.md, "GPU accuracy runs", session 22). The 32 class (head dims up to 32): the
# 2-byte forward and double backward chosen by timing on the H200 at MAML's t1024 shape
# (docs/design/tuning.md §1), the others the 64 class's tiles (the backward's timed best). The
# 2-byte forward: at head dim 64 two halves of each query block on 128 × 128 × 4 × 3
# (``FORWARD_HALVES``), short sweeps and the other tables one 128 × 64 × 4 × 3 tile a block; at head
# dim 128, 128 × 128 × 8 × 3 (225 KB of shared memory), timed per mask class on the H200: 0.974× the
# former 128 × 64 tile's time without a mask, 0.942× causal (docs/design/tuning.md §1). The double
# backward's column sweep at head dim 128: 32 queries by 128 keys on 8 warps, 3 stages (202 KB),
# whose two warpgroups each take 64 keys on wgmma (the former 64 × 32 tile's 32 keys kept it on
# mma.sync): the double backward 14.68–14.86 → 11.98–12.05 ms, causal 8.45–8.61 → 6.90–6.92
# (B4 H16 T4096; docs/perf-notes.md item 46). It spills 18–32 words a thread as timed; the fastest
# tile without a spill, 16 × 128 × 8 × 3, takes 13.33–13.60 ms.
SM90: dict[str, dict[int, dict[int, Tile]]] = {
    "forward": {
        32: {2: (64, 64, 4, 3), 4: (64, 32, 4, 2), 8: (32, 16, 4, 1)},
        64: {2: (128, 128, 4, 3), 4: (64, 32, 4, 2), 8: (32, 16, 4, 1)},
        128: {2: (128, 128, 8, 3), 4: (64, 32, 8, 2), 8: (32, 16, 8, 1)},
        256: {2: (64, 32, 4, 2), 4: (32, 16, 4, 1), 8: (16, 16, 2, 1)},
    },
    "jvp": {
        32: {2: (64, 64, 4, 2), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        64: {2: (128, 64, 8, 2), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        128: {2: (128, 64, 8, 2), 4: (64, 32, 8, 1), 8: (32, 16, 8, 1)},
        256: {2: (32, 32, 4, 1), 4: (16, 16, 4, 1), 8: (16, 16, 2, 1)},
    },
    "forward_second": {
        32: {2: (64, 32, 4, 1), 4: (32, 16, 4, 1), 8: (16, 16, 4, 1)},
        64: {2: (64, 32, 4, 1), 4: (32, 16, 4, 1), 8: (16, 16, 4, 1)},
        128: {2: (32, 32, 4, 1), 4: (16, 16, 4, 1), 8: (16, 16, 4, 1)},
        256: {2: (16, 32, 4, 1), 4: (16, 16, 4, 1), 8: (16, 16, 2, 1)},
    },
    "backward": {
        32: {2: (64, 64, 4, 3), 4: (32, 32, 4, 2), 8: (16, 16, 4, 1)},
        64: {2: (64, 64, 4, 3), 4: (32, 32, 4, 2), 8: (16, 16, 4, 1)},
        128: {2: (64, 64, 4, 2), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        256: {2: (64, 32, 4, 2), 4: (32, 16, 4, 1), 8: (16, 16, 2, 1)},
    },
    "backward_backward": {
        32: {2: (64, 64, 4, 3), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        64: {2: (64, 64, 4, 2), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        128: {2: (32, 128, 8, 3), 4: (32, 16, 4, 1), 8: (16, 16, 4, 1)},
        256: {2: (16, 32, 4, 1), 4: (16, 16, 4, 1), 8: (16, 16, 2, 1)},
    },
    # The double backward's row sweep (``double_backward``), one sweep where ``ROW_ONE_SWEEP`` says
    # so (the 2-byte entries at head dim 64), two elsewhere, on the column sweep's tiles.
    "backward_backward_rows": {
        32: {2: (64, 64, 4, 3), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        64: {2: (64, 32, 4, 2), 4: (32, 32, 4, 1), 8: (16, 16, 4, 1)},
        128: {2: (64, 32, 4, 2), 4: (32, 16, 4, 1), 8: (16, 16, 4, 1)},
        256: {2: (16, 32, 4, 1), 4: (16, 16, 4, 1), 8: (16, 16, 2, 1)},
    },
    # "backward_backward_rows_no_cot_d_out": the row sweep's tiles but where timing chose otherwise
    # (``ROWS_WITHOUT_COT_D_OUT``, below).
}


# Entries that banded calls (a causal mask or a sliding window) take in place of the table's:
# (kind, head-dim class, dtype class) → tile, where timing on the H200 chose differently for them
# (``scripts/tune_attention.py`` times and chooses the two mask classes apart; docs/design/tuning.md
# §1). The JVP's tangent at head dim 64: without a mask 128 × 64 × 8 warps is 0.89× the time of
# 64 × 64 × 4 warps (2.44 against 2.73 ms, B8 H16 T4096), causal it is 1.29× (1.96 against 1.52
# ms). The double backward's column sweep at head dim 64: 32 × 64 × 4 × 3 with dS̄ early takes its
# double backward from 6.78–7.04 to 6.23 ms causal, where without a mask the table's 64 × 64 × 4 × 2
# stays fastest (10.94–10.97 ms against 11.29–11.69; docs/perf-notes.md item 46). sm_100's table,
# sm_90's otherwise, takes these too; sm_80's and sm_89's need none.
SM90_BANDED: dict[tuple[str, int, int], Tile] = {
    ("jvp", 64, 2): (64, 64, 4, 3), ("backward_backward", 64, 2): (32, 64, 4, 3),
}


def _overriding(base: dict, entries: dict) -> dict:
    """``base``'s table with the (kind, padded head dim, dtype bytes) ``entries`` replaced."""
    table = {kind: {head_dim: dict(by_bytes) for head_dim, by_bytes in by_dim.items()}
             for kind, by_dim in base.items()}
    for (kind, head_dim, dtype_bytes), entry in entries.items():
        table[kind][head_dim][dtype_bytes] = entry
    return table


# A100 (164 KB a multiprocessor, 163 KB a program): sm_90's tiles except the double backward's
# row sweeps at head dim 64 (two sweeps here, ``ROW_ONE_SWEEP``, on their former tile), the 2-byte
# forward (one tile a query block here: 128 × 64 × 4 × 3 at head dim 64, as sm_90's banded calls;
# at 128 sm_90's 128 × 128 × 3 stages need 225 KB, so its former 128 × 64, 112 KB here), and the
# 2-byte JVP: at head dim 128 sm_90's 128 × 64 × 8 warps fits (144 KB) but ptxas settles on 32
# registers and spills 8.3 KB a thread (128 × 32: 4 KB); the 64 × 64 tile it takes instead spills
# 696 B. At head dim 64 the tangent kernel spills 1 KB a thread at sm_90's 128 × 64 × 8 warps and
# 376 B at the 64 × 64 × 4 warps that sm_90 gives banded calls, which the A100 takes for every
# call. The double backward's column sweep at head dim 128 keeps sm_90's former 64 × 32 × 4 × 2
# (sm_90's 32 × 128 × 8 × 3 needs 202 KB).
SM80 = _overriding(SM90, {
    ("jvp", 64, 2): (64, 64, 4, 3), ("backward_backward_rows", 64, 2): (64, 64, 4, 2),
    ("forward", 64, 2): (128, 64, 4, 3), ("forward", 128, 2): (128, 64, 8, 3),
    ("jvp", 128, 2): (64, 64, 4, 2), ("jvp", 128, 4): (32, 32, 4, 1), ("jvp", 128, 8): (16, 16, 4, 1),
    ("backward_backward", 128, 2): (64, 32, 4, 2),
})

# Ada (L4, L40S, RTX 40; 100 KB a multiprocessor, 99 KB a program): sm_90's tiles except the
# 2-byte forward (one tile a query block, as on the A100; at head dim 128 two stages: 80 KB; a
# third needs 112), the JVP at 128 (64 × 32: 68 KB; 64 × 64 needs 104 on sm_80) and the backward
# at 256 (32 × 32, one stage: at BLOCK_M 64 the dK/dV sweep needs 100 KB with two stages and 112 KB
# with one). Float64 at head dim 256 fits no tile
# here (the JVP needs 128 KB at 16 × 16); Ada's float64 rate is 1/64 of its float32 anyway. The
# 2-byte JVP at head dim 64, the double backward's row sweeps and its column sweep at head dim 128
# as on the A100.
SM89 = _overriding(SM90, {
    ("jvp", 64, 2): (64, 64, 4, 3), ("backward_backward_rows", 64, 2): (64, 64, 4, 2),
    ("forward", 64, 2): (128, 64, 4, 3), ("forward", 128, 2): (128, 64, 8, 2),
    ("forward", 128, 4): (64, 32, 8, 1),
    ("jvp", 128, 2): (64, 32, 4, 2), ("jvp", 128, 4): (32, 16, 4, 1), ("jvp", 128, 8): (16, 16, 4, 1),
    ("backward", 256, 2): (32, 32, 4, 1), ("backward", 256, 4): (16, 16, 4, 1),
    ("backward_backward", 128, 2): (64, 32, 4, 2),
})

# Blackwell (B200, 228 KB a multiprocessor, and 512 columns of tensor memory, where tcgen05 keeps
# its accumulators): sm_90's tiles except the 2-byte JVP at head dim 128, whose 128 × 64 tile needs
# 640 columns (the output and its tangent, 128 each, and six BLOCK_N-wide score tiles): BLOCK_N 32;
# the 2-byte forward at head dim 64, one 128 × 64 × 4 × 3 tile a query block as sm_90's banded
# calls (the halves were timed against Hopper's wgmma only), and the double backward's column sweep
# at head dim 128, sm_90's former 64 × 32 × 4 × 2 (its 32 × 128 × 8 × 3 needs 592 columns).
SM100 = _overriding(SM90, {("jvp", 128, 2): (128, 32, 8, 2), ("jvp", 128, 4): (64, 16, 8, 1),
                           ("forward", 64, 2): (128, 64, 4, 3), ("backward_backward", 128, 2): (64, 32, 4, 2)})

# The backward's dQ sweep (``backward_rows``) takes each table's ``backward`` tiles (its dK/dV
# sweep's) except these (head-dim class, dtype class) entries, where timing chose otherwise.
BACKWARD_ROWS: dict[int, dict[tuple[int, int], Tile]] = {}

# The double backward's row sweep without d_out's cotangent (``backward_backward_rows_no_cot_d_out``,
# which ``_launch.backward_backward_plan(cot_d_out=False)`` runs: d_out a constant of the caller's,
# as in an HVP of a fixed output weight and JAX's reverse over reverse) takes each table's row-sweep
# tiles except these (head-dim class, dtype class) entries, where timing chose otherwise: one
# accumulator and one GEMM fewer, so a wider tile pays at head dim 64. H200, B8 H16 T4096, the
# double backward without it: 128 × 64 × 8 × 3 9.82 ms (causal 6.59) against the row sweep's
# 64 × 32 × 4 × 2 at 10.50; it spills 22 words a thread (24 causal), the fastest tile that does
# not, 64 × 32 × 4 × 3, takes 10.36 (docs/design/tuning.md §1); reading the backward's dq it
# spills 12 (item 48). At head dim 128 it is the one sweep (``ROW_ONE_SWEEP``) reading the
# backward's dq on 128 × 32 × 8 × 3, two warpgroups of 64 rows: 8.52 ms (causal 5.06) against 10.09
# (5.83) on 128 × 16 × 8 × 3, the tile of the one sweep that sums dS K itself (10.61 there, causal
# 6.24), and the two sweeps' 11.44 (6.70) on 64 × 32 × 4 × 2 (B4 H16 T4096; docs/perf-notes.md items
# 47 and 48); it spills 6 words a thread (16 causal). Not sm_100's: the 128 × 64 tile needs 672
# columns of tensor memory there, and the 128 × 32 one is untimed.
ROWS_WITHOUT_COT_D_OUT = {90: {(64, 2): (128, 64, 8, 3), (128, 2): (128, 32, 8, 3)}}


def _add_derived_kind(table: dict, kind: str, source: str, entries: dict) -> None:
    """Give ``table`` the kind ``kind``: a copy of its ``source`` kind's tiles with the (head-dim
    class, dtype class) ``entries`` replaced."""
    tiles = {head_dim: dict(by_bytes) for head_dim, by_bytes in table[source].items()}
    for (head_dim, dtype_bytes), entry in entries.items():
        tiles[head_dim][dtype_bytes] = entry
    table[kind] = tiles


for _capability, _table in ((80, SM80), (89, SM89), (90, SM90), (100, SM100)):
    _add_derived_kind(_table, "backward_rows", "backward", BACKWARD_ROWS.get(_capability, {}))
    _add_derived_kind(_table, "backward_backward_rows_no_cot_d_out", "backward_backward_rows",
                      ROWS_WITHOUT_COT_D_OUT.get(_capability, {}))

TILE_TABLES = {80: SM80, 89: SM89, 90: SM90, 100: SM100}
BANDED_TILES = {80: {}, 89: {}, 90: SM90_BANDED, 100: SM90_BANDED}
# Short sweeps: calls whose queries see fewer than SHORT_SWEEP_KEYS keys on average
# (``_launch.AttentionCall.mean_keys``: a short sequence under a causal mask, a narrow sliding
# window). Their query blocks sweep a few key blocks, the band's edges among them, so a schedule that
# pays over a long sweep can lose there: they take these (kind, head-dim class, dtype class) entries
# before the banded ones, and never the halves (``uses_halves``). sm_90's 2-byte forward at head dim
# 64 (H200, B8 H16, ``scripts/ab_forward_halves.py``; docs/perf-notes.md item 54), one
# 128 × 64 × 4 × 3 tile a block against the halves on the table's 128 × 128 × 4 × 3, by the keys a
# query sees on average: 248 (T4096 under a window of 255 keys to the left) 0.220 against 0.248 ms;
# 480 (a window of 511) 0.283 against 0.304; 512 (T1024 causal) 0.068–0.069 against 0.070; 896 (a
# window of 1023) 0.403–0.407 against 0.397–0.399; 1024 (T1024 without a mask) 0.098–0.099 against
# 0.091, (T2048 causal) 0.211–0.212 against 0.202–0.203. Between 512 and 896 untimed: the bound
# sits at 768.
SHORT_SWEEP_KEYS = 768
SHORT_SWEEP_TILES: dict[int, dict[tuple[str, int, int], Tile]] = {90: {("forward", 64, 2): (128, 64, 4, 3)}}


def short_sweep(mean_keys: float) -> bool:
    """Whether a call whose queries see ``mean_keys`` keys on average is a short sweep."""
    return mean_keys < SHORT_SWEEP_KEYS


# Architectures without a table of their own take the table of the tabled one with the same
# shared memory and tensor-core generation: GA10x like Ada, Orin like the A100, B300 like B200,
# consumer Blackwell (mma.sync, 99 KB a program) like Ada.
TABLE_ALIASES = {86: 89, 87: 80, 103: 100, 120: 89, 121: 89}
# Anything else, and a device whose capability is unknown (0): the table made for the least shared
# memory, which launches on every architecture Triton's tensor-core kernels run on.
FALLBACK_CAPABILITY = 89


# Kinds that tile one kernel of another kind's plan, and that plan's kind: the backward's plan runs
# its dQ (row) kernel on the ``backward_rows`` tile, its dK/dV (column) kernel on the ``backward``
# one; the double backward's plan runs its row kernel on the ``backward_backward_rows`` tile (on the
# ``backward_backward_rows_no_cot_d_out`` one when it forms no cotangent for d_out), its column
# kernel on the ``backward_backward`` one.
PLAN_KIND = {"backward_rows": "backward", "backward_backward_rows": "backward_backward",
             "backward_backward_rows_no_cot_d_out": "backward_backward"}
ROW_KERNELS = frozenset({"_attn_bwd_dq_kernel", "_attn_bwd_bwd_rows_kernel"})
# Kinds timed and compiled on their plan without d_out's cotangent (``cot_d_out=False``).
WITHOUT_COT_D_OUT = frozenset({"backward_backward_rows_no_cot_d_out"})


def takes_tile(kind: str, kernel: str) -> bool:
    """Whether a launch of the kernel named ``kernel``, in the plan ``kind`` times (its own, or
    ``PLAN_KIND[kind]``), runs on ``kind``'s tile."""
    if kind.startswith("backward"):
        return (kernel in ROW_KERNELS) == ("rows" in kind)
    return True


def table_capability(capability: int) -> int:
    """The compute capability (major * 10 + minor) whose tile table a device of ``capability`` uses."""
    if capability in TILE_TABLES:
        return capability
    return TABLE_ALIASES.get(capability, FALLBACK_CAPABILITY)


# Where the double backward's row kernel sweeps the keys once (``double_backward``: two more
# (BLOCK_M, D) float32 accumulators, one where it reads the backward's dq, two to four fewer GEMMs
# a tile pair, theory §4.7, no second pass over K and V),
# per table: (row kind, head-dim class, dtype class) entries where a timing showed it pays, on that
# kind's tile. H200, bf16, the double backward alone (CUDA-graph replay): at head dim 64 (B8 H16
# T4096, docs/perf-notes.md item 35) 12.24 → 11.28 ms (10.48 without d_out's cotangent, 12.09
# before), causal 7.92 → 7.36 (7.00 / 7.66). At head dim 128 (B4 H16 T4096) the extra accumulators
# spill: with d_out's cotangent 230 words a thread on the one sweep's best tile (untimed); without
# it one sweep takes 10.61 ms on 128 × 16 × 8 × 3 against the two sweeps' 11.44 on their tile
# (causal 6.24 / 6.70; item 47), and 8.52 (5.06) on 128 × 32 × 8 × 3 where it reads the backward's
# dq for dS K (item 48). Elsewhere untimed: two sweeps.
_ONE_SWEEP_AT_64 = frozenset({("backward_backward_rows", 64, 2), ("backward_backward_rows_no_cot_d_out", 64, 2)})
ROW_ONE_SWEEP: dict[int, frozenset] = {
    90: _ONE_SWEEP_AT_64 | {("backward_backward_rows_no_cot_d_out", 128, 2)}, 100: _ONE_SWEEP_AT_64}
# THERIA_ATTENTION_ONE_SWEEP=1 / =0 runs the one sweep everywhere / nowhere (how
# scripts/tune_attention.py times a schedule the table does not choose); ONE_SWEEP_OVERRIDE is
# what the plans read (the tests set it).
ONE_SWEEP_OVERRIDE = {"1": True, "0": False}.get(os.environ.get("THERIA_ATTENTION_ONE_SWEEP", ""))


def uses_one_sweep(capability: int, kind: str, block_d: int, dtype: str) -> bool:
    """Whether the double backward's row kernel of ``kind`` (``backward_backward_rows`` or
    ``backward_backward_rows_no_cot_d_out``) sweeps the keys once (``ROW_ONE_SWEEP``) on a device of
    ``capability`` at padded head dim ``block_d`` in ``dtype``."""
    if ONE_SWEEP_OVERRIDE is not None:
        return ONE_SWEEP_OVERRIDE
    entry = (kind, head_dim_class(block_d), DTYPE_BYTES[dtype])
    return entry in ROW_ONE_SWEEP.get(table_capability(capability), ())


# Where the forward alone (no tangent) sweeps each query block as two halves that share the key
# block's loads, so that one half's P V overlaps the other's softmax (``forward._forward_halves``),
# per table: (head-dim class, dtype class, banded) entries where a timing showed it pays, on the
# ``forward`` tile (short sweeps never: ``SHORT_SWEEP_TILES``). H200, bf16, B8 H16 T4096,
# alternating in one call (``scripts/ab_forward_halves.py``, CUDA-graph replay; docs/perf-notes.md
# items 37, 53, 54): at head dim 64 without a mask 1.323 / 1.334 ms on one 128 × 64 × 4 × 3 tile,
# 1.229 / 1.236 in halves on 128 × 128 × 4 × 2, 1.207 / 1.215 on 128 × 128 × 4 × 3 (cuDNN 1.201);
# causal 0.725 / 0.732, 0.701 / 0.702 and 0.669 / 0.682 (cuDNN 0.664). Causal they lost (0.735 →
# 0.879 ms) until ptxas stopped serialising their wgmma (item 53). At B8 H16 T1024 causal they are
# level with one tile (0.070 against 0.068–0.069 ms; without a mask 0.091 against 0.098). At head
# dim 128 (B4) the one 128 × 128 × 8 × 3 tile is faster both ways (1.03 against 1.08–1.56 ms;
# causal 0.59 against 0.67–1.03). Elsewhere untimed: one tile.
FORWARD_HALVES: dict[int, frozenset] = {90: frozenset({(64, 2, False), (64, 2, True)})}
# Where the backward's dK/dV sweep takes each whole query block as two halves
# (``_sweeps._column_tile``'s HALVES: both halves' K Qᵀ first, so that one half's exp2 runs beside the
# other's accumulating products), per table as ``FORWARD_HALVES``, on the ``backward`` tile: nowhere
# now. H200, bf16, fwd + bwd alternating in one call (``scripts/ab_backward_halves.py``): at B4 H16
# T4096 D128 causal they once won (2.780 / 2.788 → 2.639 / 2.660 ms on 64 × 64 × 4 × 2; perf-notes
# item 39); after the longest-first order and the first-row statistics (items 50, 51) one tile is
# faster there too, 2.373 / 2.369 ms against 2.518 / 2.569 (cuDNN 2.006), and in the second-order
# pipeline 7.13 / 7.22 against 7.31 / 7.37 (item 52). Without a mask at D128 (4.21 against 4.53) and
# at D64 either way (item 39) they lose. The dQ sweep and the double backward's column sweep were
# built and timed in halves too and lost at every shape (the double backward's at D128 causal 13×,
# its halves' spills): one tile. The schedule stays for ``THERIA_ATTENTION_HALVES`` and its tests.
BACKWARD_COLUMNS_HALVES: dict[int, frozenset] = {90: frozenset()}
HALVES = {"forward": FORWARD_HALVES, "backward": BACKWARD_COLUMNS_HALVES}
# THERIA_ATTENTION_HALVES=1 / =0 runs every sweep that can as two halves everywhere (tiles of 32 rows
# and more; any in the interpreter) / nowhere; HALVES_OVERRIDE is what the plans read (the tests set
# it). It is for timing and testing the schedule: not every table tile fits in halves (sm_90's
# 2-byte forward at head dim 128, 128 × 128 × 8 × 3, asks for 240 KB of shared memory and does not
# launch).
HALVES_OVERRIDE = {"1": True, "0": False}.get(os.environ.get("THERIA_ATTENTION_HALVES", ""))


# Where the double backward's column tiles form dS̄ after dS's product rather than before it
# (``_sweeps._second_order_dots``' LATE_BAR), per table as ``FORWARD_HALVES``, on the
# ``backward_backward`` tile. Late, dS̄'s products wait for dS's accumulating one, so it pays only
# where the spills it saves cost more than that wait. H200, bf16, B8 H16 T4096 D64, alternating in
# one call (docs/perf-notes.md item 45): the column kernel 4.85 → 4.68–4.75 ms, its spills 52 → 34
# words a thread compiled for sm_90. The one row sweep late was 38 % slower: not there. The column
# tiles as timed in session 27 (item 46; the double backward alone, B8 H16 T4096 D64 and B4 H16 T4096
# D128): at D64 without a mask late 10.94–10.97 ms, early 11.04–11.15; at D128 on the wgmma tile
# 32 × 128 × 8 × 3 without a mask late 11.98 / 12.05, early 12.59 / 12.59; banded calls early (D64
# on their own 32 × 64 × 4 × 3: 6.23 against 6.30; D128 6.90 / 6.92 against 6.98 / 7.01).
COLUMNS_LATE_BAR: dict[int, frozenset] = {90: frozenset({(64, 2, False), (128, 2, False)})}
# THERIA_ATTENTION_LATE_BAR=1 / =0 forms dS̄ late everywhere / nowhere (how scripts/tune_attention.py
# times a column tile on the order the table does not give it); LATE_BAR_OVERRIDE is what the plans
# read (the tests set it).
LATE_BAR_OVERRIDE = {"1": True, "0": False}.get(os.environ.get("THERIA_ATTENTION_LATE_BAR", ""))

# Launches at fixed lengths under a band bounded on one side hand their programs out longest
# first (``_tiles._program``): there the programs differ in length along the diagonal, and in grid
# order the longest of the last heads start in the last wave and run on alone. They go in sections
# of grid rows whose streamed tensors (K and V of a row sweep's key/value head, Q and dO of a
# column sweep's query heads) take at most this many bytes together (``_launch.AttentionCall.
# ordered``): a third of Hopper's 50 MB L2, so that a section's heads stay in L2 as the few heads
# that grid order runs at once do; eight heads at B4 H16 T4096 D128 in bf16, sixteen at D64. H200,
# causal, alternating with grid order (docs/perf-notes.md item 50): the forward 0.726 → 0.712 ms
# (D64) and 0.587 → 0.561 (D128), forward + backward 2.88 → 2.81 and 2.66 → 2.56, the torch
# second-order pipeline 8.09 → 8.01 and 7.72 → 7.46.
LPT_SECTION_BYTES = 16 << 20
# THERIA_ATTENTION_LPT=1 / =0 orders every fixed-length launch so / none (grid order); LPT_OVERRIDE
# is what the plans read (the tests set it).
LPT_OVERRIDE = {"1": True, "0": False}.get(os.environ.get("THERIA_ATTENTION_LPT", ""))


def lpt_section(uneven: bool, streamed: int, rows: int) -> int:
    """``section`` of a fixed-length launch of ``rows`` grid rows that each stream ``streamed``
    bytes (``_tiles._program``) where its programs are ``uneven`` in length (or ``LPT_OVERRIDE``
    says so): the most grid rows that stream at most ``LPT_SECTION_BYTES`` and divide ``rows``
    (sections are a grid dimension), at least one; 0, grid order, otherwise."""
    if not (uneven if LPT_OVERRIDE is None else LPT_OVERRIDE):
        return 0
    most = LPT_SECTION_BYTES // max(streamed, 1)  # empty sequences stream nothing
    return next(section for section in range(min(rows, max(most, 1)), 0, -1) if rows % section == 0)


def _scheduled(entries: dict[int, frozenset], capability: int, block_d: int, dtype: str, banded: bool) -> bool:
    """Whether a schedule table's ``entries`` hold (head-dim class, dtype class, banded) for a
    device of ``capability``."""
    entry = (head_dim_class(block_d), DTYPE_BYTES[dtype], banded)
    return entry in entries.get(table_capability(capability), ())


def uses_halves(capability: int, block_d: int, dtype: str, banded: bool, kind: str = "forward",
                short: bool = False) -> bool:
    """Whether the sweep ``kind`` ("forward": the forward alone; "backward": the backward's dK/dV
    sweep) takes its blocks as two halves (``HALVES[kind]``) on a device of ``capability`` at
    padded head dim ``block_d`` in ``dtype``, with a band or without; a ``short`` sweep
    (``SHORT_SWEEP_KEYS``) never does."""
    if HALVES_OVERRIDE is not None:
        return HALVES_OVERRIDE
    return not short and _scheduled(HALVES[kind], capability, block_d, dtype, banded)


def uses_late_bar(capability: int, block_d: int, dtype: str, banded: bool) -> bool:
    """Whether the double backward's column tiles form dS̄ after dS's product
    (``COLUMNS_LATE_BAR``), as ``uses_halves`` reads its tables."""
    if LATE_BAR_OVERRIDE is not None:
        return LATE_BAR_OVERRIDE
    return _scheduled(COLUMNS_LATE_BAR, capability, block_d, dtype, banded)


# Where the sweeps load through the tensor memory accelerator (TMA: tensor descriptors, sm_90 and
# later), per table: (kind, head-dim class, dtype class) entries where a timing showed it pays
# (docs/design/tuning.md §1). On the H200 (bf16, T 4096) TMA takes the forward from 1.174 to 1.099
# ms at D128 (causal 0.710 to 0.643) and 1.395 to 1.374 ms at D64, the JVP from 4.43 to 4.19 ms
# (D128) and 5.23 to 5.02 (D64); the forward + backward from 5.174 to 4.931 ms (D64) and 4.678 to
# 4.335 (D128). The double backward as its tiles are now (``_sweeps._second_order_dots``;
# ``scripts/tune_attention.py --tma``): D64 12.21 → 12.12 ms, causal 10.01 → 7.80, on; D128 level
# (14.81 → 14.78 ms) but causal 8.43 → 10.54, off. Not the wider dtypes: compiled for sm_90 with
# TMA, the float32 forward spills (876 words a thread at D128, none without), and none is timed;
# nor the head-dim classes 32 and 256 or the second-order forward (none timed), or sm_100 (no such
# GPU here). Each descriptor takes 128 bytes of global scratch a program.
TMA_KINDS: dict[int, frozenset] = {
    90: frozenset({(kind, head_dim, 2) for kind in ("forward", "jvp", "backward") for head_dim in (64, 128)}
                  | {("backward_backward", 64, 2), ("backward_backward_rows", 64, 2),
                     ("backward_backward_rows_no_cot_d_out", 64, 2)}),
    100: frozenset(),
}
# The sweeps that can load through tensor descriptors: the forward kinds (K and V), the backward and
# the double backward (K and V in the row sweeps, Q and dO in the column sweep).
TMA_CAPABLE = ("forward", "jvp", "forward_second", "backward", "backward_backward", "backward_backward_rows",
               "backward_backward_rows_no_cot_d_out")
# THERIA_ATTENTION_TMA=1 turns TMA on for every capable sweep and dtype wherever a call allows it
# (the interpreter included, which is how the CPU tests run it); =0 turns it off everywhere.
# TMA_OVERRIDE is what the sweeps read; tools that change it (scripts/tune_attention.py --tma)
# restore the process's own choice from TMA_FROM_ENVIRONMENT.
TMA_FROM_ENVIRONMENT = {"1": True, "0": False}.get(os.environ.get("THERIA_ATTENTION_TMA", ""))
TMA_OVERRIDE = TMA_FROM_ENVIRONMENT


def uses_tma(capability: int, kind: str, block_d: int, dtype: str) -> bool:
    """Whether a sweep ``kind`` at padded head dim ``block_d`` in ``dtype`` loads through TMA
    (``TMA_CAPABLE``) on a device of ``capability`` (0: the interpreter or unknown), where the call
    allows it (``AttentionCall.tma``)."""
    if TMA_OVERRIDE is not None:
        return TMA_OVERRIDE and kind in TMA_CAPABLE
    entry = (kind, head_dim_class(block_d), DTYPE_BYTES[dtype])
    return capability >= 90 and entry in TMA_KINDS.get(table_capability(capability), ())


def head_dim_class(block_d: int) -> int:
    """The tables' head-dim key of a head dim padded to ``block_d``: the smallest of ``HEAD_DIMS``
    at least as large."""
    return next(head_dim for head_dim in HEAD_DIMS if block_d <= head_dim)


def tile(capability: int, kind: str, block_d: int, dtype: str, banded: bool = False, short: bool = False) -> Tile:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one sweep ``kind`` on a device of
    ``capability`` for a head dim padded to ``block_d`` and a dtype name; ``banded`` (a causal
    mask or a sliding window) takes the table's ``BANDED_TILES`` entry where it has one, a
    ``short`` sweep (``SHORT_SWEEP_KEYS``) its ``SHORT_SWEEP_TILES`` entry before either."""
    table = table_capability(capability)
    head_dim, dtype_bytes = head_dim_class(block_d), DTYPE_BYTES[dtype]
    for overrides, applies in ((SHORT_SWEEP_TILES, short), (BANDED_TILES, banded)):
        found = overrides.get(table, {}).get((kind, head_dim, dtype_bytes)) if applies else None
        if found is not None:
            return found
    return TILE_TABLES[table][kind][head_dim][dtype_bytes]


# ----------------------------------------------------------------------------------------------
# Checking an entry without a GPU: compile a launch for a target, read what it uses
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel asks of a multiprocessor, per program: ``shared`` bytes of shared
    memory (Triton's dynamic allocation plus the kernel's static one), ``registers`` per thread,
    ``spills`` (local memory per thread in 4-byte words, as Triton's ``CompiledKernel.n_spills``:
    ptxas spills registers there), ``threads``, Blackwell's ``tensor_memory`` columns, and
    ``legacy_mma``: the 16-bit ``mma.sync`` instructions of its PTX, which on sm_90 mean the tensor
    cores run the pre-Hopper path instead of ``wgmma`` (it needs 64 rows per warpgroup, so a tile
    dimension below 64 keeps a dot on mma.sync); ``tensor_loads``: its tensor-memory-accelerator
    copies (``cp.async.bulk.tensor``), ``global_scratch``: the bytes of global scratch a program
    asks (the TMA descriptors it builds), and ``serialized_wgmma``: ptxas serialises every wgmma of
    the kernel (its C7513: it waits for each product as soon as it is issued, so nothing overlaps
    the tensor cores; docs/perf-notes.md item 53)."""

    kernel: str
    capability: int
    shared: int
    registers: int
    spills: int
    threads: int
    tensor_memory: int
    legacy_mma: int = 0
    tensor_loads: int = 0
    global_scratch: int = 0
    serialized_wgmma: bool = False

    def problems(self) -> list[str]:
        """Why this kernel cannot run well on its target; empty when it fits."""
        found = []
        limit = SHARED_MEMORY_PER_BLOCK.get(self.capability)
        if limit is not None and self.shared > limit:
            found.append(f"{self.shared} bytes of shared memory, above sm_{self.capability}'s {limit}")
        if self.spills:
            found.append(f"{4 * self.spills} bytes of local memory per thread (spilled registers)")
        # The register file is allocated per warp in units of 256 (8 per thread).
        if -(-self.registers // 8) * 8 * self.threads > REGISTERS_PER_SM:
            found.append(f"{self.registers} registers × {self.threads} threads exceed the register file")
        if self.tensor_memory > TENSOR_MEMORY_COLUMNS:
            found.append(f"{self.tensor_memory} tensor-memory columns, above {TENSOR_MEMORY_COLUMNS}")
        if self.capability == 90 and self.legacy_mma:
            found.append(f"{self.legacy_mma} 16-bit mma.sync instructions: not Hopper's wgmma")
        if self.serialized_wgmma:
            found.append("ptxas serialises its wgmma (C7513): each product waited for as it is issued")
        return found


def compile_launch(launch, dtypes: dict[str, str], capability: int) -> Resources:
    """Compile ``launch``'s kernel for sm_``capability`` with Triton's own compiler and ptxas (no
    GPU needed), specialised as ``JITFunction.run`` specialises it for 16-byte-aligned buffers, and
    read the resources it uses off the binary (``theria_kernels._plan.compile_for_target``, which
    raises in a process whose Triton runs the interpreter).
    """
    from triton import knobs

    from theria_kernels._plan import compile_for_target

    compiled, _ = compile_for_target(launch, dtypes, capability)
    usage = _resource_usage(compiled.asm["cubin"], knobs.nvidia.cuobjdump.path)
    metadata = compiled.metadata
    return Resources(
        kernel=metadata.name, capability=capability, shared=metadata.shared + usage["SHARED"],
        registers=usage["REG"], spills=(usage["STACK"] + usage["LOCAL"]) // 4, threads=32 * metadata.num_warps,
        tensor_memory=getattr(metadata, "tmem_size", 0) or 0,
        legacy_mma=len(re.findall(r"mma\.sync[^\n]*\.(?:bf16|f16)", compiled.asm["ptx"])),
        tensor_loads=compiled.asm["ptx"].count("cp.async.bulk.tensor"),
        global_scratch=getattr(metadata, "global_scratch_size", 0) or 0,
        serialized_wgmma=_wgmma_serialized(compiled.asm["ptx"], knobs.nvidia.ptxas.path))


def _wgmma_serialized(ptx: str, ptxas: str) -> bool:
    """Whether ptxas (shipped with Triton) serialises the wgmma of ``ptx``: it says so only in its
    verbose report (C7513, a performance note, not an error), which Triton's own run of it drops.
    Kernels without wgmma (any target but sm_90) need no second run."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if "wgmma.mma_async" not in ptx or target is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "--gpu-name", target.group(1), "-v", path, "-o", path + ".cubin"],
                                check=True, capture_output=True, text=True)
    return "C7513" in report.stdout + report.stderr


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """REG, STACK, SHARED (static) and LOCAL of the one function in ``cubin``, as ``cuobjdump
    -res-usage`` (shipped with Triton) reports them: the numbers the driver's function attributes
    give on a GPU."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([cuobjdump, "-res-usage", path], check=True, capture_output=True, text=True).stdout
    line = next(line for line in report.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
