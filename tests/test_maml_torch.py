"""theria_torch.maml: full and first-order MAML against hand-derived meta-gradients (float64).

For one inner step from θ with rate α, θ' = θ − α ∇L_s(θ) and (docs/theory/maml_derivation.md)
    full MAML:  ∇θ L_q(θ') = ∇L_q(θ') − α H_s(θ) ∇L_q(θ')      (H_s: Hessian of the support loss)
    FO-MAML:    ∇L_q(θ')
each averaged over the tasks of the meta-batch. Both are built here from independent pieces
(torch.func.grad of the query loss, a forward-over-reverse HVP) and compared with meta_gradient.

The reference-backend tests run on the CPU; the fused backend's runs on ``DEVICE`` (tests/_device.py:
the CUDA GPU, or the CPU under Triton's interpreter), its reference side with it.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import grad, jvp

from _device import DEVICE
from theria_torch import maml, models, tasks

REPO = Path(__file__).resolve().parents[1]
FUSED = "triton_full_fused"
FAMILIES = {
    "sequence_classification": dict(vocab_size=10, seq_len=6, n_classes=3, n_signal=2),
    "sinusoid": {},
    "in_context_regression": dict(dim=3, n_context=5),
}


# One intra-op thread: at these tiny sizes more threads only synchronise (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")



def setup(family_name: str, *, backend: str = "reference", n_tasks: int = 3, k: int = 4, n_layers: int = 2,
          device: str = "cpu"):
    """Float64 model, loss, parameters and a meta-batch on ``device``, all seeded."""
    family = tasks.make_family(family_name, **FAMILIES[family_name])
    config = models.ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, d_model=16,
                                n_heads=2, n_layers=n_layers)
    model = models.TransformerStack(config, backend=backend, seed=1, dtype=torch.float64, device=device)
    params = {name: p.detach() for name, p in model.named_parameters()}
    batch = tasks.as_torch(tasks.sample_meta_batch(family, np.random.default_rng(2), n_tasks, k, k),
                           dtype=torch.float64, device=device)
    return models.make_loss_fn(model, family.loss), params, batch


def assert_close(actual: dict, expected: dict, rtol: float, what: str):
    for name in expected:
        error = (actual[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-300)
        assert error <= rtol, f"{what}: {name} relative error {error:.3e} > {rtol:g}"


def mean_over_tasks(per_task: list[dict]) -> dict:
    return {name: torch.stack([g[name] for g in per_task]).mean(0) for name in per_task[0]}


def hand_derived(loss_fn, params, batch, inner_lr: float, first_order: bool) -> dict:
    """The one-step formulas of the module docstring, task by task."""
    per_task = []
    for i in range(batch.support_x.shape[0]):
        task = batch.task(i)
        support = (task.support_x, task.support_y)
        support_grad = grad(loss_fn)(params, support)
        adapted = {name: p - inner_lr * support_grad[name] for name, p in params.items()}
        query_grad = grad(loss_fn)(adapted, (task.query_x, task.query_y))
        if not first_order:
            hvp = jvp(lambda p: grad(loss_fn)(p, support), (params,), (query_grad,))[1]
            query_grad = {name: g - inner_lr * hvp[name] for name, g in query_grad.items()}
        per_task.append(query_grad)
    return mean_over_tasks(per_task)


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fo_maml"])
def test_meta_gradient_matches_hand_derived(family_name, first_order):
    loss_fn, params, batch = setup(family_name)
    grads, _ = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.3, steps=1, first_order=first_order)
    assert_close(grads, hand_derived(loss_fn, params, batch, 0.3, first_order), 1e-12,
                 f"{family_name} first_order={first_order}")


def test_first_order_drops_the_hessian_term():
    loss_fn, params, batch = setup("in_context_regression")
    full, loss_full = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.3, steps=2, first_order=False)
    first, loss_first = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.3, steps=2, first_order=True)
    torch.testing.assert_close(loss_full, loss_first, rtol=1e-14, atol=0)  # same forward pass
    difference = max(((full[n] - first[n]).norm() / full[n].norm()).item() for n in full)
    assert difference > 1e-3, f"FO-MAML equals full MAML (max relative difference {difference:.2e})"


def test_multi_step_first_order_is_query_gradient_at_adapted_params():
    loss_fn, params, batch = setup("sequence_classification")
    grads, _ = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.3, steps=3, first_order=True)
    expected = []
    for i in range(batch.support_x.shape[0]):
        task = batch.task(i)
        adapted = maml.inner_adapt(params, (task.support_x, task.support_y), loss_fn, inner_lr=0.3, steps=3,
                                   first_order=True)
        expected.append(grad(loss_fn)(adapted, (task.query_x, task.query_y)))
    assert_close(grads, mean_over_tasks(expected), 1e-12, "3-step FO-MAML")


def test_multi_step_full_maml_matches_autograd_unrolled():
    """vmap + torch.func against an independent loop of torch.autograd.grad(create_graph=True)."""
    loss_fn, params, batch = setup("sequence_classification", n_layers=1)
    grads, loss = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.3, steps=2, first_order=False)
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    total = 0.0
    for i in range(batch.support_x.shape[0]):
        task, adapted = batch.task(i), leaves
        for _ in range(2):
            step = torch.autograd.grad(loss_fn(adapted, (task.support_x, task.support_y)),
                                       list(adapted.values()), create_graph=True)
            adapted = {name: p - 0.3 * g for (name, p), g in zip(adapted.items(), step)}
        total = total + loss_fn(adapted, (task.query_x, task.query_y))
    total = total / batch.support_x.shape[0]
    expected = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
    torch.testing.assert_close(loss, total.detach(), rtol=1e-13, atol=0)
    assert_close(grads, expected, 1e-12, "2-step full MAML")


def test_inner_adapt_and_meta_step_are_plain_gradient_descent():
    loss_fn, params, batch = setup("sinusoid", n_layers=1)
    task = batch.task(0)
    support = (task.support_x, task.support_y)
    assert maml.inner_adapt(params, support, loss_fn, inner_lr=0.3, steps=0, first_order=False) is params
    adapted = maml.inner_adapt(params, support, loss_fn, inner_lr=0.3, steps=1, first_order=False)
    step = grad(loss_fn)(params, support)
    assert_close(adapted, {n: p - 0.3 * step[n] for n, p in params.items()}, 1e-15, "inner step")
    updated, _ = maml.meta_step(params, batch, loss_fn, inner_lr=0.3, outer_lr=0.1, steps=1, first_order=False)
    grads, _ = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.3, steps=1, first_order=False)
    assert_close(updated, {n: p - 0.1 * grads[n] for n, p in params.items()}, 1e-15, "meta step")


def test_fused_backend_meta_gradient_matches_reference():
    """Full MAML (double backward through the fused kernels, vmapped over tasks) in float64, both
    backends on DEVICE."""
    shape = dict(n_tasks=2, k=2, n_layers=1, device=DEVICE)
    loss_ref, params, batch = setup("sequence_classification", **shape)
    loss_fused, _, _ = setup("sequence_classification", backend=FUSED, **shape)
    for first_order in (False, True):
        expected, _ = maml.meta_gradient(params, batch, loss_ref, inner_lr=0.3, steps=1, first_order=first_order)
        actual, _ = maml.meta_gradient(params, batch, loss_fused, inner_lr=0.3, steps=1, first_order=first_order)
        assert_close(actual, expected, 1e-10, f"fused vs reference, first_order={first_order}")


def test_parameter_layout_names_and_shapes():
    config = models.ModelConfig(d_in=5, d_out=3, max_len=7, d_model=16, n_heads=4, n_layers=2)
    model = models.TransformerStack(config, seed=3, dtype=torch.float64)
    layout = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert layout == models.param_shapes(config)
    initial = models.init_params(config, 3)
    for name, p in model.named_parameters():  # bit-identical to the numpy initialisation
        assert np.array_equal(p.detach().numpy(), initial[name]), name
    with pytest.raises(ValueError, match="divisible by n_heads"):
        models.ModelConfig(d_in=5, d_out=3, max_len=7, d_model=18, n_heads=4)


def test_phase10_cli_torch_smoke(tmp_path):
    """The experiment CLI end to end on the torch half of the tiny config (JAX compiles are slow)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments/phase10/run.py"), "--frameworks", "torch", "--meta-steps", "3",
         "--set", "train.eval_every=2", "--no-progress", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("results.json", "metrics.csv", "config.json", "loss.png", "step_time.png"):
        assert (tmp_path / name).exists(), name
    assert "torch/reference/maml" in done.stdout and "torch/reference/fo_maml" in done.stdout


def test_meta_gradient_of_an_unused_parameter_is_zero():
    """A parameter the loss never reads gets a zero meta-gradient (as torch.func.grad gives it),
    not an error from torch.autograd.grad."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 1, dtype=torch.float64, generator=gen), "unused": torch.ones(2, dtype=torch.float64)}

    def loss_fn(p, batch):
        x, y = batch
        return ((x @ p["w"])[:, 0] - y).pow(2).mean()

    batch = tasks.TaskBatch(*(torch.randn(4, 5, *extra, dtype=torch.float64, generator=gen)
                              for extra in ((3,), (), (3,), ())))
    grads, loss = maml.meta_gradient(params, batch, loss_fn, inner_lr=0.1, steps=1, first_order=False)
    assert torch.equal(grads["unused"], torch.zeros(2, dtype=torch.float64))
    assert grads["w"].abs().sum() > 0 and torch.isfinite(loss)
