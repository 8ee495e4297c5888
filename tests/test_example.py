"""examples/minimal_decoder_transformer.py: runs, matches across backends, rejects bad flags."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minimal_decoder_transformer.py"
FUSED = "triton_full_fused"
# Few steps of one sequence: the fused run is interpreted on CPU and costs ~1 s per step.
SMALL = ["--steps", "3", "--batch", "1", "--seed", "7", "--verbose"]



def run_example(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *flags], capture_output=True, text=True, timeout=300)


def losses(stdout: str) -> list[float]:
    return [float(value) for value in re.findall(r"loss (\d+\.\d+)", stdout)]


def test_backends_give_matching_losses():
    runs = {backend: run_example("--backend", backend, *SMALL) for backend in ("reference", FUSED)}
    for backend, done in runs.items():
        assert done.returncode == 0, f"{backend}: {done.stderr[-2000:]}"
    reference, fused = losses(runs["reference"].stdout), losses(runs[FUSED].stdout)
    assert len(reference) == 3 + 2, runs["reference"].stdout  # every step, the final and held-out losses
    assert fused == pytest.approx(reference, rel=1e-5), f"reference {reference}\nfused {fused}"


def test_reference_run_learns():
    done = run_example("--backend", "reference", "--steps", "20", "--batch", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    held_out = float(re.search(r"held-out loss (\d+\.\d+)", done.stdout).group(1))
    assert held_out < 0.5, done.stdout  # chance level is ln 4 ≈ 1.39


@pytest.mark.parametrize("flags, message", [
    (["--d_model", "30"], "divisible by n_heads"),
    (["--backend", FUSED, "--d_model", "16"], "head dim 4"),
    (["--steps", "0"], "--steps must be positive"),
    (["--backend", "flash"], "invalid choice"),
], ids=["d_model-not-divisible", "head-dim-4-fused", "zero-steps", "unknown-backend"])
def test_bad_flags_exit_nonzero_with_a_clear_message(flags, message):
    done = run_example(*flags)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
