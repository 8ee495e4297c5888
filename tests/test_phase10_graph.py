"""The phase-10 torch learner with ``cuda_graph``: the meta-gradient replayed as a captured CUDA graph.

On the GPU, training steps replayed from the graph match eager ones (to rounding) for both backends
(each replay reads its own batch and the parameters Adam updated in place) and a batch of another
shape is refused. On the CPU, the option is refused by name, by the setup and by the CLI.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ is scripts, not an installed package

from experiments.phase10 import run  # noqa: E402
from experiments.phase10.frameworks import MetaSetup, make_learner  # noqa: E402
from theria_kernels._models import ModelConfig, init_params  # noqa: E402
from theria_kernels._tasks import make_family, sample_meta_batch  # noqa: E402

FUSED = "triton_full_fused"
# configs/tiny.yaml's sizes
FAMILY = make_family("sequence_classification", vocab_size=12, seq_len=8, n_classes=3, n_signal=2)
MODEL = ModelConfig(d_in=FAMILY.d_in, d_out=FAMILY.d_out, max_len=FAMILY.seq_len, d_model=16, n_heads=2,
                    n_layers=1, causal=True)
STEPS = 4
# Relative error of a replayed meta-gradient against the eager one on the same parameters and
# batch. cuBLAS may pick other algorithms inside a capture, so the two differ by float32 rounding
# (at most 1.8e-7 on an H100, reference backend; the fused one matched exactly); a replay that
# read a stale batch or stale parameters is off by O(1).
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_setup(**options) -> MetaSetup:
    return MetaSetup(family=FAMILY, model=MODEL, inner_lr=0.4, inner_steps=1, outer_lr=0.003, **options)


def draw(seed: int, n_tasks: int = 4):
    return sample_meta_batch(FAMILY, np.random.default_rng(seed), n_tasks, 6, 6)


def relative_error(actual: dict, expected: dict) -> tuple[float, str]:
    """‖actual − expected‖ / ‖expected‖ over all tensors, and the name of the worst tensor."""
    def flat(tree):
        return np.concatenate([tree[name].ravel() for name in sorted(tree)])

    worst = max(expected, key=lambda name: np.abs(actual[name] - expected[name]).max())
    return float(np.linalg.norm(flat(actual) - flat(expected)) / np.linalg.norm(flat(expected))), worst


def test_cuda_graph_needs_a_cuda_device(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda'"):
        tiny_setup(device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda'"):
        run.main(["--frameworks", "torch", "--cuda-graph", "--no-progress", "--out", str(tmp_path)])


def test_cli_records_cuda_graph(tmp_path):
    """The default (false) is written to config.json even when the config file has no such key."""
    assert run.main(["--frameworks", "torch", "--methods", "maml", "--meta-steps", "1", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["train"]["cuda_graph"] is False
    assert run.load_config(run.parse_args(["--cuda-graph"]))["train"]["cuda_graph"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["maml", "fo_maml"])
@pytest.mark.parametrize("backend", ["reference", FUSED])
def test_cuda_graph_steps_follow_eager(backend, method):
    """Each replayed step matches an eager step from the same parameters on the same batch.

    Adam turns rounding-level gradient differences into lr-sized parameter differences (its first
    update is about lr · sign(g)), so the graphed learner is put back on the eager learner's
    parameters after every step, in place: that also checks that a replay reads the live
    parameter storage."""
    eager, graphed = (make_learner("torch", tiny_setup(device="cuda", cuda_graph=graph), init_params(MODEL, 0),
                                   backend=backend, method=method) for graph in (False, True))
    losses = []
    for step in range(STEPS):
        batch = draw(step)
        grads = [learner.numpy(learner.meta_gradient(learner.convert(batch))[0]) for learner in (eager, graphed)]
        error, worst = relative_error(grads[1], grads[0])
        assert error <= TOL, f"step {step}: meta-gradient relative error {error:.3e} > {TOL:g} (worst {worst!r})"
        losses.append([learner.step(learner.convert(batch)) for learner in (eager, graphed)])
        for name, value in eager.params.items():
            graphed.params[name].detach().copy_(value)
    eager_losses, graph_losses = zip(*losses)
    # Different batches give different losses: each replay read its own batch.
    assert len(set(eager_losses)) == STEPS, f"the batches should give different losses: {eager_losses}"
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=TOL, err_msg="meta-train loss per step")

    with pytest.raises(ValueError, match=r"cuda_graph: batch\.support_x is \(2, "):
        graphed.meta_gradient(graphed.convert(draw(0, n_tasks=2)))


@pytest.mark.gpu
def test_cli_cuda_graph(tmp_path):
    """run.py --cuda-graph on the GPU, both backends: exits 0 and records the option."""
    code = run.main(["--frameworks", "torch", "--backends", "reference", FUSED, "--device", "cuda", "--cuda-graph",
                     "--meta-steps", "3", "--set", "train.eval_every=2", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["train"]["cuda_graph"] is True
    assert all(result["status"] == "ok" for result in results["runs"]), results["runs"]
