"""scripts/bench_plain_forward.py, the yardstick theria's forward is timed against on Hopper: its
plain kernel computes attention (checked against torch on any machine: compiled on a Hopper GPU,
in Triton's interpreter elsewhere), and it refuses tiles its loop cannot cover instead of returning
wrong numbers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_plain_forward.py"


def test_the_plain_kernel_matches_torch_attention():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "causal=False" in result.stdout and "causal=True" in result.stdout


def test_tiles_the_loop_cannot_cover_are_refused():
    spec = importlib.util.spec_from_file_location("bench_plain_forward", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q = torch.zeros(1, 1, 192, 64)
    with pytest.raises(ValueError, match="T = 192"):
        module.plain_forward(q, q, q, False, (128, 64, 4, 2))  # 192 rows are not whole 128-row blocks
    q = torch.zeros(1, 1, 256, 64)
    with pytest.raises(ValueError, match="do not fit"):
        module.plain_forward(q, q, q, True, (64, 128, 4, 2))  # the causal diagonal needs BLOCK_M a multiple of BLOCK_N
