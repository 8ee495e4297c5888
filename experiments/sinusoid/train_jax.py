"""The sinusoid protocol in JAX, through ``theria_jax.maml`` (jax.grad, vmap over tasks).

The same functions, arguments and result layout as ``train_torch``. A chunk of meta-iterations
is one compiled ``lax.scan``, so Python runs once per chunk rather than once per iteration.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments.sinusoid import protocol as P
from theria_jax import maml
from theria_jax.tasks import TaskBatch, as_jax

FRAMEWORK = "jax"


def mlp_loss(params: maml.Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean squared error of the ReLU MLP on one task's points.

    Arguments:
        params: :func:`protocol.init_mlp`'s layout as arrays.
        batch: inputs (k, 1, 1) (theria's sequence layout, length 1) and targets (k,).
    Returns:
        A 0-d array.
    """
    x, y = batch
    n_layers = len(params) // 2
    h = x.reshape(-1, 1)
    for i in range(n_layers):
        h = h @ params[f"layer{i}.weight"] + params[f"layer{i}.bias"]
        if i < n_layers - 1:
            h = jax.nn.relu(h)
    return jnp.mean((h[:, 0] - y) ** 2)


def to_params(arrays: dict[str, np.ndarray], dtype) -> maml.Params:
    return {name: jnp.asarray(array, dtype=dtype) for name, array in arrays.items()}


@functools.partial(jax.jit, static_argnames=("inner_lr", "max_steps"))
def _adaptation_losses(params, tasks, *, inner_lr, max_steps):
    def one_task(task):
        adapted, losses = params, [mlp_loss(params, (task.query_x, task.query_y))]
        for _ in range(max_steps):
            adapted = maml.inner_adapt(adapted, (task.support_x, task.support_y), mlp_loss, inner_lr=inner_lr,
                                       steps=1, first_order=True)
            losses.append(mlp_loss(adapted, (task.query_x, task.query_y)))
        return jnp.stack(losses)

    return jax.vmap(one_task, out_axes=1)(tasks)


def adaptation_losses(params: maml.Params, tasks: TaskBatch, *, inner_lr: float, max_steps: int) -> np.ndarray:
    """Per-task query loss after 0 .. ``max_steps`` inner steps (first order: no outer derivative).

    Returns:
        (max_steps + 1, n_tasks) float64.
    """
    return np.asarray(_adaptation_losses(params, tasks, inner_lr=inner_lr, max_steps=max_steps), np.float64)


@functools.partial(jax.jit, static_argnames=("inner_lr", "steps"))
def _evaluate(params, tasks, *, inner_lr, steps):
    return maml.evaluate(params, tasks, mlp_loss, inner_lr=inner_lr, steps=steps)


def _train_chunk(optimizer, settings):
    """A compiled function (params, opt_state, batches) -> (params, opt_state, losses) that runs
    one meta-iteration per leading slice of ``batches``."""
    def one_iteration(carry, tasks):
        params, opt_state = carry
        grads, loss = maml.meta_gradient(params, tasks, mlp_loss, **settings)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run(params, opt_state, batches):
        (params, opt_state), losses = jax.lax.scan(one_iteration, (params, opt_state), batches)
        return params, opt_state, losses

    return run


def train(protocol: P.Protocol, shots: int, method: str, *, dtype=jnp.float32, progress: bool = True) -> dict:
    """Meta-train one method at K = ``shots`` with Adam, then evaluate it on the held-out tasks.

    Returns:
        The layout of ``train_torch.train``.
    """
    settings = P.method_settings(protocol, method)
    params = to_params(P.init_mlp(protocol), dtype)
    optimizer = optax.adam(protocol.outer_lr)
    opt_state = optimizer.init(params)
    run_chunk = _train_chunk(optimizer, settings)
    held_out = as_jax(P.test_tasks(protocol, shots), dtype=dtype)
    curve = {"iteration": [], "train_loss": [], "test_loss_1": [], f"test_loss_{protocol.eval_steps}": []}
    window = []
    bar = tqdm(total=protocol.iterations, desc=f"{FRAMEWORK} K={shots} {method}", disable=not progress,
               mininterval=1.0)
    start = time.perf_counter()
    for first in range(0, protocol.iterations, protocol.chunk):
        batches = P.train_batches(protocol, shots, first, protocol.chunk)
        if method == "pretrained":
            batches = P.joint_regression_tasks(batches)
        params, opt_state, losses = run_chunk(params, opt_state, as_jax(batches, dtype=dtype))
        window.append(losses)
        bar.update(protocol.chunk)
        done = first + protocol.chunk
        if done % protocol.curve_every == 0:
            curve["iteration"].append(done)
            curve["train_loss"].append(float(jnp.mean(jnp.concatenate(window))))
            window = []
            for steps in (1, protocol.eval_steps):
                curve[f"test_loss_{steps}"].append(
                    float(_evaluate(params, held_out, inner_lr=protocol.inner_lr, steps=steps)))
            bar.set_postfix(test_loss_1=f"{curve['test_loss_1'][-1]:.3f}")
    train_s = time.perf_counter() - start
    bar.close()
    lrs = (protocol.inner_lr, *(protocol.baseline_lrs if method == "pretrained" else ()))
    final = {str(lr): [P.summarise(row) for row in adaptation_losses(params, held_out, inner_lr=lr,
                                                                       max_steps=protocol.eval_steps)]
             for lr in lrs}
    return {"framework": FRAMEWORK, "shots": shots, "method": method, "train_s": train_s,
            "params": {name: np.asarray(p, np.float64) for name, p in params.items()},
            "curve": curve, "final": final}
