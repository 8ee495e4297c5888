"""scripts/double_backward_rows_error.py, the emulation behind perf-notes items 30 and 35: without
rounding both row schedules give the reference's row outputs, and with it the run prints each
case's errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "double_backward_rows_error.py"


def _module():
    spec = importlib.util.spec_from_file_location("double_backward_rows_error", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("causal", [False, True])
def test_both_schedules_are_the_hvp_in_exact_arithmetic(causal):
    """The emulation's algebra (sigma, rho, S̄, dP̄; the one sweep's decompositions) against autograd
    of the float64 reference, with no rounding: cot_q and cot_dO of both schedules."""
    module = _module()
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(37, 16, generator=gen, dtype=torch.float64) for _ in range(7)]
    exact = module.reference_rows(*x[:4], x[4:], causal)
    rows = module.row_outputs(*x, causal, rounding=lambda t: t)
    for schedule in ("two", "one"):
        for got, want in zip(rows[schedule], exact):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_script_prints_every_case():
    result = subprocess.run([sys.executable, str(SCRIPT), "--lengths", "33", "--seeds", "1", "--scales", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.lstrip().startswith("33")]
    assert [row.split()[1] for row in rows] == ["full", "full", "causal", "causal"]
    assert [row.split()[4] for row in rows] == ["cot_q", "cot_dO"] * 2
