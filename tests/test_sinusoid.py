"""experiments/sinusoid: the task stream, torch against JAX on one meta-gradient, a short training.

The experiment runs both frameworks through theria's MAML functions on numpy tasks and weights;
these tests check that the tasks are the paper's distribution and reproducible, that the two
frameworks compute the same meta-gradient (float64), and that training lowers the loss after
adaptation.
"""

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ is scripts, not an installed package

from experiments.sinusoid import protocol as P  # noqa: E402
from experiments.sinusoid import train_jax, train_torch  # noqa: E402
from theria_jax import maml as jax_maml  # noqa: E402
from theria_jax.tasks import as_jax  # noqa: E402
from theria_torch import maml as torch_maml  # noqa: E402
from theria_torch.tasks import as_torch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit_sinusoids(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and phase of each task from its points: y = A sin(x - φ) = a sin x - b cos x with
    (a, b) = A (cos φ, sin φ) is linear in (a, b), so noise-free points determine them exactly."""
    features = np.stack([np.sin(x), -np.cos(x)], axis=-1)
    a, b = np.linalg.solve(features.swapaxes(-1, -2) @ features, (features.swapaxes(-1, -2) @ y[..., None]))[..., 0].T
    return np.hypot(a, b), np.arctan2(b, a)


def test_tasks_follow_the_paper_distribution():
    tasks = P.sample_tasks(np.random.default_rng(0), 20_000, 5, 7)
    assert tasks.support_x.shape == (20_000, 5, 1, 1) and tasks.query_y.shape == (20_000, 7)
    x = np.concatenate([tasks.support_x[..., 0, 0], tasks.query_x[..., 0, 0]], axis=1)
    y = np.concatenate([tasks.support_y, tasks.query_y], axis=1)
    assert -5 <= x.min() and x.max() <= 5 and np.abs(y).max() <= 5
    np.testing.assert_allclose([x.mean(), x.var()], [0.0, 10.0 ** 2 / 12], atol=0.05)
    # Fitted on the support points alone, each sinusoid must reproduce the query points too.
    amplitude, phase = fit_sinusoids(tasks.support_x[..., 0, 0], tasks.support_y)
    fitted = amplitude[:, None] * np.sin(tasks.query_x[..., 0, 0] - phase[:, None])
    np.testing.assert_allclose(fitted, tasks.query_y, atol=1e-9)
    assert 0.1 - 1e-9 <= amplitude.min() and amplitude.max() <= 5 + 1e-9
    assert -1e-9 <= phase.min() and phase.max() <= np.pi + 1e-9
    # U[0.1, 5]: mean 2.55, sd 4.9/√12; U[0, π]: mean π/2, sd π/√12 (20,000 draws: se ≈ 0.01).
    np.testing.assert_allclose([amplitude.mean(), amplitude.std()], [2.55, 4.9 / 12 ** 0.5], atol=0.04)
    np.testing.assert_allclose([phase.mean(), phase.std()], [np.pi / 2, np.pi / 12 ** 0.5], atol=0.03)


def test_task_stream_is_seeded_per_iteration():
    protocol = P.QUICK
    whole = P.train_batches(protocol, 5, 0, 6)
    part = P.train_batches(protocol, 5, 4, 2)
    assert whole.support_x.shape == (6, protocol.meta_batch, 5, 1, 1)
    for a, b in zip(whole, part):
        np.testing.assert_array_equal(a[4:], b)
    other_seed = P.train_batches(dataclasses.replace(protocol, seed=1), 5, 4, 2)
    assert not np.allclose(other_seed.support_y, part.support_y)
    assert not np.allclose(whole.support_y[0], whole.support_y[1])
    joint = P.joint_regression_tasks(part)
    np.testing.assert_array_equal(joint.query_y, np.concatenate([part.support_y, part.query_y], axis=-1))
    assert joint.query_x.shape == (2, protocol.meta_batch, 10, 1, 1)
    held_out = P.test_tasks(protocol, 5)
    assert held_out.query_y.shape == (protocol.eval_tasks, protocol.eval_query)
    np.testing.assert_array_equal(held_out.support_y, P.test_tasks(protocol, 5).support_y)
    assert not np.allclose(held_out.support_y[: protocol.meta_batch], whole.support_y[0])


def _jax_meta_gradient(params, tasks, settings):
    # Compiled: JAX's op-by-op dispatch of grad-of-grad under vmap costs seconds more on a CPU.
    step = jax.jit(functools.partial(jax_maml.meta_gradient, loss_fn=train_jax.mlp_loss, **settings))
    return step(params, tasks)


@pytest.mark.parametrize("method", ["maml", "fo_maml"])
def test_torch_and_jax_meta_gradients_agree(method):
    protocol = P.FULL
    # A larger inner lr than the protocol's makes the second-order term big enough to tell apart.
    settings = {**P.method_settings(protocol, method), "inner_lr": 0.1}
    tasks = P.train_batches(protocol, 5, 0, 1)
    tasks = type(tasks)(*(field[0] for field in tasks))
    weights = P.init_mlp(protocol)
    params_j, tasks_j = train_jax.to_params(weights, jnp.float64), as_jax(tasks, dtype=jnp.float64)
    grads_t, loss_t = torch_maml.meta_gradient(train_torch.to_params(weights, torch.float64),
                                               as_torch(tasks, dtype=torch.float64), train_torch.mlp_loss, **settings)
    grads_j, loss_j = _jax_meta_gradient(params_j, tasks_j, settings)
    np.testing.assert_allclose(float(loss_t), float(loss_j), rtol=1e-12)
    for name in weights:
        g_t, g_j = grads_t[name].numpy(), np.asarray(grads_j[name])
        error = np.linalg.norm(g_t - g_j) / np.linalg.norm(g_j)
        assert error <= 1e-10, f"{name}: relative error {error:.2e} (max abs diff {np.abs(g_t - g_j).max():.2e})"
    if method == "maml":
        # Full and first-order MAML must differ, or the test could not see the second-order term.
        first_order, _ = torch_maml.meta_gradient(train_torch.to_params(weights, torch.float64),
                                                  as_torch(tasks, dtype=torch.float64), train_torch.mlp_loss,
                                                  **{**settings, "first_order": True})
        gap = max((first_order[n] - grads_t[n]).norm() / grads_t[n].norm() for n in weights)
        assert gap > 1e-3, f"MAML and first-order MAML meta-gradients differ by only {gap:.1e}"


def test_short_training_lowers_the_adapted_loss():
    # Adam at 1e-2 (ten times the protocol's) so that 60 iterations show progress.
    protocol = dataclasses.replace(P.QUICK, shots=(5,), outer_lr=1e-2, iterations=60, chunk=60, curve_every=60,
                                   eval_tasks=50, eval_query=20, eval_steps=1)
    untrained = train_torch.adaptation_losses(train_torch.to_params(P.init_mlp(protocol), torch.float64),
                                              as_torch(P.test_tasks(protocol, 5), dtype=torch.float64),
                                              inner_lr=protocol.inner_lr, max_steps=1)[1].mean()
    result = train_torch.train(protocol, 5, "maml", dtype=torch.float64, progress=False)
    final = result["final"][str(protocol.inner_lr)]
    assert final[1]["mean"] < 0.8 * untrained, f"adapted loss {untrained:.3f} -> {final[1]['mean']:.3f}"
    assert final[1]["mean"] < final[0]["mean"], "one inner step does not lower the loss"
    # The curve's last point (theria's evaluate) and the final table (per-task losses) agree.
    np.testing.assert_allclose(result["curve"]["test_loss_1"][-1], final[1]["mean"], rtol=1e-9)
