"""theria_jax.maml: full and first-order MAML against hand-derived meta-gradients (float64).

The formulas are those of tests/test_maml_torch.py (docs/theory/maml_derivation.md): one inner
step gives full MAML ∇L_q(θ') − α H_s(θ) ∇L_q(θ') and FO-MAML ∇L_q(θ'), averaged over tasks.
XLA's CPU compiler takes seconds per second-order program, so everything a test checks is
computed in one jitted program per module (the ``results`` fixture) and the tests read from it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theria_jax import maml, models, tasks

FUSED = "triton_full_fused"
INNER_LR = 0.3



def setup(*, backend: str = "reference", n_tasks: int = 3, k: int = 4, n_layers: int = 1):
    """Float64 loss, parameters and meta-batch for in-context regression (attention matters)."""
    family = tasks.InContextRegression(dim=3, n_context=5)
    config = models.ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, d_model=16,
                                n_heads=2, n_layers=n_layers)
    params = models.jax_params(models.init_params(config, 1), dtype=jnp.float64)
    batch = tasks.as_jax(tasks.sample_meta_batch(family, np.random.default_rng(2), n_tasks, k, k),
                         dtype=jnp.float64)
    return models.make_loss_fn(config, family.loss, backend=backend), params, batch


def hand_derived(loss_fn, params, task, first_order: bool):
    """One task's one-step meta-gradient from the formulas (grad of the query loss, one HVP)."""
    support = (task.support_x, task.support_y)
    support_grad = jax.grad(loss_fn)(params, support)
    adapted = jax.tree.map(lambda p, g: p - INNER_LR * g, params, support_grad)
    query_grad = jax.grad(loss_fn)(adapted, (task.query_x, task.query_y))
    if first_order:
        return query_grad
    hvp = jax.jvp(lambda p: jax.grad(loss_fn)(p, support), (params,), (query_grad,))[1]
    return jax.tree.map(lambda g, h: g - INNER_LR * h, query_grad, hvp)


@pytest.fixture(scope="module")
def results():
    loss_fn, params, batch = setup()
    meta_gradient = functools.partial(maml.meta_gradient, loss_fn=loss_fn, inner_lr=INNER_LR)

    @jax.jit
    def everything(params, batch):
        by_formula = {
            name: jax.tree.map(lambda g: g.mean(0), jax.vmap(
                lambda task: hand_derived(loss_fn, params, task, first_order))(batch))
            for name, first_order in (("maml", False), ("fo_maml", True))}
        adapted_2 = jax.vmap(lambda task: maml.inner_adapt(
            params, (task.support_x, task.support_y), loss_fn, inner_lr=INNER_LR, steps=2, first_order=True))(batch)
        query_grads_2 = jax.vmap(lambda p, task: jax.grad(loss_fn)(p, (task.query_x, task.query_y)))(adapted_2, batch)
        return {
            "maml": meta_gradient(params, batch, steps=1, first_order=False),
            "fo_maml": meta_gradient(params, batch, steps=1, first_order=True),
            "formula": by_formula,
            "fo_maml_2": meta_gradient(params, batch, steps=2, first_order=True)[0],
            "query_grad_at_adapted_2": jax.tree.map(lambda g: g.mean(0), query_grads_2),
        }

    return params, everything(params, batch)


def assert_close(actual: dict, expected: dict, rtol: float, what: str):
    for name in expected:
        error = float(jnp.linalg.norm(actual[name] - expected[name]) / jnp.linalg.norm(expected[name]))
        assert error <= rtol, f"{what}: {name} relative error {error:.3e} > {rtol:g}"


@pytest.mark.parametrize("method", ["maml", "fo_maml"])
def test_meta_gradient_matches_hand_derived(results, method):
    _, out = results
    assert_close(out[method][0], out["formula"][method], 1e-12, method)


def test_first_order_drops_the_hessian_term(results):
    _, out = results
    (full, loss_full), (first, loss_first) = out["maml"], out["fo_maml"]
    assert abs(float(loss_full - loss_first)) <= 1e-14 * abs(float(loss_full))  # same forward pass
    difference = max(float(jnp.linalg.norm(full[n] - first[n]) / jnp.linalg.norm(full[n])) for n in full)
    assert difference > 1e-3, f"FO-MAML equals full MAML (max relative difference {difference:.2e})"


def test_multi_step_first_order_is_query_gradient_at_adapted_params(results):
    _, out = results
    assert_close(out["fo_maml_2"], out["query_grad_at_adapted_2"], 1e-12, "2-step FO-MAML")


def test_inner_adapt_and_meta_step_on_a_quadratic():
    """L(θ; A, b) = ½ θᵀAθ − bᵀθ has ∇L = Aθ − b and H = A, so every quantity is closed-form:
    θ' = θ − α(Aθ − b), full MAML (I − αA_s)(A_q θ' − b_q), FO-MAML A_q θ' − b_q."""
    rng = np.random.default_rng(3)
    spd = [(m @ m.T / 4 + np.eye(4)) for m in rng.standard_normal((4, 4, 4))]
    a_s, a_q = jnp.asarray(np.stack(spd[:2])), jnp.asarray(np.stack(spd[2:]))  # two tasks each
    b_s, b_q = jnp.asarray(rng.standard_normal((2, 4))), jnp.asarray(rng.standard_normal((2, 4)))
    batch = tasks.TaskBatch(a_s, b_s, a_q, b_q)
    params = {"theta": jnp.asarray(rng.standard_normal(4))}

    def loss_fn(p, data):
        a, b = data
        return 0.5 * p["theta"] @ a @ p["theta"] - b @ p["theta"]

    theta = params["theta"]
    adapted = theta - 0.1 * (jnp.einsum("tij,j->ti", a_s, theta) - b_s)
    query_grad = jnp.einsum("tij,tj->ti", a_q, adapted) - b_q
    expected = {
        False: (query_grad - 0.1 * jnp.einsum("tij,tj->ti", a_s, query_grad)).mean(0),
        True: query_grad.mean(0),
    }
    one_task = maml.inner_adapt(params, (a_s[0], b_s[0]), loss_fn, inner_lr=0.1, steps=1, first_order=False)
    assert_close(one_task, {"theta": adapted[0]}, 1e-14, "inner step")
    for first_order, grads in expected.items():
        updated, _ = maml.meta_step(params, batch, loss_fn, inner_lr=0.1, outer_lr=0.5, steps=1,
                                    first_order=first_order)
        assert_close(updated, {"theta": theta - 0.5 * grads}, 1e-14, f"meta step, first_order={first_order}")


def test_fused_backend_meta_gradient_matches_reference():
    """Full MAML through the fused kernels' JAX rules (vmap over tasks, grad of grad), float64."""
    shape = dict(n_tasks=2, k=2, n_layers=1)
    loss_ref, params, batch = setup(**shape)
    loss_fused, _, _ = setup(backend=FUSED, **shape)

    def full_maml(loss_fn):
        return jax.jit(lambda p, b: maml.meta_gradient(p, b, loss_fn, inner_lr=INNER_LR, steps=1,
                                                       first_order=False)[0])(params, batch)

    assert_close(full_maml(loss_fused), full_maml(loss_ref), 1e-10, "fused vs reference")
