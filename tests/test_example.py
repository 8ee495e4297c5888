"""examples/minimal_decoder_transformer.py: runs on the fused kernels by itself, learns, reports
what it promises, rejects bad flags.

One run goes through a fresh process, as README's command does, so that the example's own set-up
(``TRITON_INTERPRET=1`` before triton is imported, on a machine without a GPU) is what is tested;
the others call ``main`` in this process, where the imports are already paid for.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minimal_decoder_transformer.py"
FUSED = "triton_full_fused"


def _load_example():
    spec = importlib.util.spec_from_file_location("minimal_decoder_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def run_main(capsys):
    """``main(flags)`` in this process -> (exit status, stdout, stderr); restores torch's threads,
    which the example sets to one on the CPU."""
    threads = torch.get_num_threads()

    def run(*flags):
        try:
            status = example.main(list(flags))
        except SystemExit as exit:  # argparse's errors
            status = exit.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    torch.set_num_threads(threads)


def test_defaults_are_the_fused_kernels_and_64_held_out_sequences():
    args = example.parse_args([])
    assert args.backend == FUSED and args.device == "auto" and args.eval_batch >= 64 and args.compare


def test_fresh_process_runs_the_fused_kernels_and_reports():
    """README's command with fewer steps and held-out sequences, in a process that has not imported
    triton and has no TRITON_INTERPRET: the example arranges the interpreter itself on a CPU."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "2", "--batch", "2", "--eval_batch", "8"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    if not torch.cuda.is_available():
        assert "fused Triton kernels in Triton's interpreter on the CPU" in out, out
    assert "training" in done.stderr and "2/2" in done.stderr, done.stderr[-2000:]  # tqdm's bar
    assert re.search(r"held-out loss \d+\.\d+  accuracy \d\.\d+ over 8 sequences", out), out
    assert re.search(r"\d+\.\d ms per step", out), out
    logits, grads = re.search(r"logits max \|diff\| (\S+), gradients max relative diff (\S+)", out).groups()
    assert float(logits) < 1e-4 and float(grads) < 1e-4, out


def test_reference_run_learns(run_main):
    status, out, _ = run_main("--backend", "reference", "--no-compare")
    assert status == 0
    loss, accuracy, count = re.search(r"held-out loss (\d+\.\d+)  accuracy (\d\.\d+) over (\d+)", out).groups()
    # Chance is ln 4 ≈ 1.39 and 25 %.
    assert float(loss) < 0.5 and float(accuracy) > 0.8 and int(count) == 64, out


def test_backends_print_the_same_losses(run_main):
    flags = ("--steps", "2", "--batch", "2", "--eval_batch", "4", "--no-compare", "--verbose")
    runs = {backend: run_main("--backend", backend, *flags) for backend in ("reference", FUSED)}
    losses = {}
    for backend, (status, out, err) in runs.items():
        assert status == 0, err[-2000:]
        losses[backend] = [float(x) for x in re.findall(r"(?<!chance: )loss (\d+\.\d+)", out)]
    assert len(losses[FUSED]) == 2 + 2  # every step, then the final and held-out losses
    assert losses[FUSED] == pytest.approx(losses["reference"], rel=1e-5), losses


@pytest.mark.parametrize("flags, message", [
    (["--d_model", "30", "--n_heads", "4"], "divisible by n_heads"),
    (["--backend", FUSED, "--d_model", "8", "--n_heads", "2"], "head dim 4"),
    (["--steps", "0"], "--steps must be positive"),
    (["--eval_batch", "0"], "--eval_batch must be positive"),
    (["--backend", "flash"], "invalid choice"),
], ids=["d_model-not-divisible", "head-dim-4-fused", "zero-steps", "zero-eval-batch", "unknown-backend"])
def test_bad_flags_exit_nonzero_with_a_clear_message(run_main, flags, message):
    status, _, err = run_main(*flags)
    assert status == 2
    assert message in err, err[-2000:]
