"""scripts/gluon_forward.py, the warp-specialised Gluon forward measured against theria's forward
(docs/perf-notes.md items 42 and 43): on any machine it compiles for sm_90 at its tiles the way the
A/B script times it (warp-specialised, on wgmma, through TMA, no spills in the key loop, within
Hopper's shared memory); on a Hopper GPU it matches theria's forward, persistent and not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _device import ON_GPU

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import gluon_forward  # noqa: E402

from theria_kernels.attention._tuning import SHARED_MEMORY_PER_BLOCK  # noqa: E402


@pytest.mark.parametrize("head_dim", sorted(gluon_forward.TILES), ids=lambda d: f"D{d}")
def test_compiles_for_hopper(head_dim):
    """Compiled by Triton's compiler and ptxas on the CPU (a child process without Triton's
    interpreter), with and without the causal mask: a loader warp beside one warpgroup a consumer
    (the kernel's 4 warps, a worker warpgroup per further consumer, the loader's warp rounded up to
    a warpgroup), registers moved between them, products on wgmma only, K and V (and Q) through
    TMA, at most 32 words a thread spilled. What spills are the last key block's mask predicates,
    which ptxas hoists out of the key loop into the work-item loop (read off the SASS: no local
    memory access in the loops that hold the products, docs/perf-notes.md item 43)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPTS / "gluon_forward.py"), str(head_dim), "--json"],
                            env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    consumers = gluon_forward.TILES[head_dim][3]
    assert [row["causal"] for row in rows] == [False, True]
    for found in rows:
        assert found["warps"] == 4 * (consumers + 1), found
        assert found["setmaxnreg"] > 0 and found["wgmma"] > 0 and found["mma_sync"] == 0, found
        assert found["tensor_loads"] >= 3 and found["spills"] <= 32, found
        assert found["shared"] <= SHARED_MEMORY_PER_BLOCK[90], found


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() != (9, 0), reason="needs a Hopper GPU")
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-item"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", sorted(gluon_forward.TILES), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("shape", [(2, 3, 3, 256, False), (1, 4, 2, 389, False), (2, 2, 1, 77, True),
                                   (3, 6, 2, 1500, False)],
                         ids=["H3-T256", "H4/2-T389", "flash-layout-T77", "B3-H6/2-T1500"])
def test_matches_theria_forward(shape, head_dim, causal, persistent):
    """out within twice theria's forward's error against float32 attention, lse within 1e-3 of
    theria's: odd lengths, grouped-query heads, flash-attn's (B, T, H, D) storage, both masks; the
    persistent grid and one program per work item. At B3 H6 T1500 there are 216 work items of
    128 query rows (432 of 64), more than the programs of a persistent grid on an H200 (132
    multiprocessors, ``gluon_forward.programs_per_sm``): its programs take two or more items each,
    which carries the ring's and the barriers' phases across items."""
    batch, heads, heads_kv, seq, flash_layout = shape
    error, theria_error, lse, theria_lse = gluon_forward.against_theria(batch, heads, heads_kv, seq, head_dim,
                                                                        causal, flash_layout, persistent=persistent)
    assert error <= 2 * theria_error
    torch.testing.assert_close(lse, theria_lse, rtol=0, atol=1e-3)
