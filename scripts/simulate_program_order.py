"""How long one causal sweep's programs take to run in three launch orders, simulated: the tail
that ``_tiles._program``'s longest-first order removes (docs/perf-notes.md item 50; the design in
docs/design/attention.md, "Program order under a band").

The GPU starts a grid's programs in launch order, one on each free slot (a slot: room for one
program on a multiprocessor). The simulation does the same with programs whose length is their
number of tile pairs plus ``--overhead`` (a program's start and end, in tile pairs), and prints
each order's makespan over the even share of the work, ``total / slots``:

- grid order, the blocks of one head, then the next head (theria's order without a band);
- grid order with each head's blocks reversed (session 17's order, perf-notes item 32);
- longest first in sections of heads, the order theria launches under a causal band, with the
  section the plans give the sweep (``_launch.AttentionCall.ordered``, bf16).

    python scripts/simulate_program_order.py                 # the anchor shapes' causal sweeps
    python scripts/simulate_program_order.py --sweep rows,8,16,1024,64,128,64,264

A sweep is KIND,B,H,T,D,BLOCK_M,BLOCK_N,SLOTS: KIND ``rows`` (query blocks of BLOCK_M rows, each
over the keys it sees) or ``columns`` (key blocks of BLOCK_N keys, each over the queries that see
them), top-left causal at T_q = T_k = T. Programs are taken as equal in speed, which the GPU's
are not (two programs of one multiprocessor share it), so the measured gain is smaller than this.
"""

from __future__ import annotations

import argparse
import heapq
import math

from theria_kernels.attention import AttentionParams, _launch

# The anchor shapes' causal sweeps on their sm_90 tiles; slots: programs the H200's 132
# multiprocessors hold at once (two a multiprocessor but for the D128 forward's 225 KB tile).
ANCHOR_SWEEPS = [
    ("forward D64", ("rows", 8, 16, 4096, 64, 128, 64, 264)),
    ("forward D128", ("rows", 4, 16, 4096, 128, 128, 128, 132)),
    ("dQ D128", ("rows", 4, 16, 4096, 128, 64, 64, 264)),
    ("dK/dV D128", ("columns", 4, 16, 4096, 128, 64, 64, 264)),
    ("dK/dV D64", ("columns", 8, 16, 4096, 64, 64, 64, 264)),
]


def sweep_argument(text: str) -> tuple:
    """``--sweep``' KIND,B,H,T,D,BLOCK_M,BLOCK_N,SLOTS."""
    kind, *numbers = text.split(",")
    if kind not in ("rows", "columns") or len(numbers) != 7 or not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"a sweep is KIND,B,H,T,D,BLOCK_M,BLOCK_N,SLOTS with KIND rows or "
                                         f"columns and positive integers, got {text!r}")
    return (kind, *map(int, numbers))


def lengths(kind: str, seq: int, block_m: int, block_n: int) -> list[int]:
    """Tile pairs of each program of one head under a top-left causal mask, in block order."""
    if kind == "rows":
        return [math.ceil(min((i + 1) * block_m, seq) / block_n) for i in range(math.ceil(seq / block_m))]
    query_blocks = math.ceil(seq / block_m)
    return [query_blocks - j * block_n // block_m for j in range(math.ceil(seq / block_n))]


def makespan(programs: list[float], slots: int) -> float:
    """When the last of ``programs`` (lengths, in launch order) ends, each started on the first
    slot to come free."""
    free = [0.0] * slots
    for length in programs:
        heapq.heappush(free, heapq.heappop(free) + length)
    return max(free)


def lpt_section(kind: str, batch: int, heads: int, seq: int, head_dim: int, blocks: int) -> int:
    """The section the plans give this causal sweep (``_launch.AttentionCall.ordered``, bf16 on an
    H200), or 1 where they keep grid order (``THERIA_ATTENTION_LPT=0``)."""
    shape = (batch, heads, seq, head_dim)
    strides = (heads * seq * head_dim, seq * head_dim, head_dim, 1)
    call = _launch.AttentionCall(shape, strides, shape, strides, "bfloat16",
                                 AttentionParams(scale=head_dim ** -0.5, causal=True),
                                 _launch.Device(132, capability=90))
    grid, order = call.ordered((blocks, batch * heads), kind == "columns")
    return grid[0] if order["LPT"] else 1


def orders(kind: str, batch: int, heads: int, seq: int, head_dim: int, block_m: int, block_n: int,
           overhead: float) -> dict[str, list[float]]:
    """The program lengths of one sweep in each launch order, and the section of the last."""
    own = [length + overhead for length in lengths(kind, seq, block_m, block_n)]
    rows = batch * heads
    section = lpt_section(kind, batch, heads, seq, head_dim, len(own))
    longest_first = sorted(own, reverse=True)
    return {
        "grid order": [length for _ in range(rows) for length in own],
        "each head reversed": [length for _ in range(rows) for length in reversed(own)],
        f"longest first, {section} heads a section": [length for _ in range(rows // section)
                                                      for length in longest_first for _ in range(section)],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", nargs="+", type=sweep_argument,
                        help="KIND,B,H,T,D,BLOCK_M,BLOCK_N,SLOTS (default: the anchor shapes' causal sweeps)")
    parser.add_argument("--overhead", type=float, default=1.0, help="a program's start and end, in tile pairs")
    args = parser.parse_args(argv)
    sweeps = [(",".join(map(str, sweep)), sweep) for sweep in args.sweep] if args.sweep else ANCHOR_SWEEPS
    print("# makespan / (total / slots), programs of equal speed, top-left causal")
    for name, (kind, batch, heads, seq, head_dim, block_m, block_n, slots) in sweeps:
        found = orders(kind, batch, heads, seq, head_dim, block_m, block_n, args.overhead)
        even = sum(next(iter(found.values()))) / slots
        print(f"{name:16s} " + " | ".join(f"{order} {makespan(programs, slots) / even:.3f}"
                                          for order, programs in found.items()))


if __name__ == "__main__":
    main()
