"""scripts/simulate_program_order.py, the simulation behind the longest-first program order under a
causal band (docs/perf-notes.md item 50): its program lengths are the causal sweeps' tile pairs, its
scheduler starts each program on the first free slot, and its anchor table shows the tail the order
removes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import simulate_program_order as simulation  # noqa: E402


def test_program_lengths_are_the_causal_tile_pairs():
    # 300 rows in 128-row query blocks over 64-key blocks: the blocks end at rows 128, 256, 300.
    assert simulation.lengths("rows", 300, 128, 64) == [2, 4, 5]
    # 64-key blocks over 128-row query blocks: keys 0-127 are seen from query block 0 on, keys 128-255
    # from query block 1 on.
    assert simulation.lengths("columns", 256, 128, 64) == [2, 2, 1, 1]
    total = sum(simulation.lengths("rows", 4096, 64, 64))
    assert total == sum(simulation.lengths("columns", 4096, 64, 64)) == 64 * 65 // 2


def test_the_scheduler_starts_each_program_on_the_first_free_slot():
    assert simulation.makespan([3, 1, 1, 1], 2) == 3  # the three short ones share the second slot
    assert simulation.makespan([1, 1, 1, 3], 2) == 4  # the long one starts last and runs on alone
    assert simulation.makespan([5, 4, 3], 1) == 12


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_every_order_runs_the_same_programs(kind):
    found = simulation.orders(kind, 2, 8, 1024, 64, 64, 64, overhead=1.0)
    assert len(found) == 3
    first, *others = found.values()
    assert all(sorted(other) == sorted(first) for other in others)


def test_the_anchor_table_shows_the_tail():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate_program_order.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("forward", "dQ", "dK/dV"))]
    assert len(rows) == len(simulation.ANCHOR_SWEEPS)
    for row in rows:
        ratios = [float(part.split()[-1]) for part in row.split("|")]
        assert ratios[2] < min(ratios[:2]) and ratios[2] < 1.01 < 1.03 < ratios[0], row
