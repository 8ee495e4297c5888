"""MAML and first-order MAML as pure functions on parameter dicts, built on ``jax.grad``.

The same functions, arguments and semantics as ``theria_torch.maml``: ``loss_fn(params,
(inputs, targets)) -> scalar`` is any function of a parameter pytree (e.g.
``theria_jax.models.make_loss_fn``). Full MAML differentiates through the inner steps (the
meta-gradient contains Hessian-vector products of the support loss); first-order MAML wraps each
inner gradient in ``jax.lax.stop_gradient``. docs/theory/maml_derivation.md derives both.

The tasks of a meta-batch are mapped with ``jax.vmap`` (every theria JAX op has a batching
rule). All functions are traceable: wrap them in ``jax.jit`` with ``loss_fn``, ``inner_lr``,
``steps`` and ``first_order`` static (e.g. through ``functools.partial``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from theria_torch.tasks import TaskBatch

Params = dict[str, jax.Array]
LossFn = Callable[[Params, tuple[jax.Array, jax.Array]], jax.Array]


def inner_adapt(params: Params, batch, loss_fn: LossFn, *, inner_lr: float, steps: int,
                first_order: bool) -> Params:
    """``steps`` gradient-descent steps on ``loss_fn(·, batch)`` from ``params``.

    Arguments:
        params: name -> array. batch: (inputs, targets) of one task's support set.
        first_order: stop the gradient through each inner gradient, so that outer derivatives
            see the adapted parameters as ``params`` plus a constant (FO-MAML).
    Returns:
        The adapted parameters, a new dict with the same names and shapes.
    """
    inner_grad = jax.grad(loss_fn)
    for _ in range(steps):
        grads = inner_grad(params, batch)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        params = jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)
    return params


def meta_loss(params: Params, task: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
              first_order: bool) -> jax.Array:
    """Query loss after adapting on the support set, for one task (fields without task axis)."""
    adapted = inner_adapt(params, (task.support_x, task.support_y), loss_fn, inner_lr=inner_lr,
                          steps=steps, first_order=first_order)
    return loss_fn(adapted, (task.query_x, task.query_y))


def meta_gradient(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
                  first_order: bool) -> tuple[Params, jax.Array]:
    """Gradient of the mean post-adaptation query loss over a meta-batch.

    Arguments:
        tasks: a :class:`TaskBatch` with a leading task axis.
    Returns:
        (meta-gradient dict shaped like ``params``, mean query loss as a 0-d array).
    """
    def one_task(task):
        loss, grads = jax.value_and_grad(meta_loss)(params, task, loss_fn, inner_lr=inner_lr,
                                                    steps=steps, first_order=first_order)
        return grads, loss

    grads, losses = jax.vmap(one_task)(tasks)
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), jnp.mean(losses)


def meta_step(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, outer_lr: float,
              steps: int, first_order: bool) -> tuple[Params, jax.Array]:
    """One meta-update by plain gradient descent: ``params - outer_lr * meta_gradient``.

    Returns:
        (updated parameters, mean query loss before the update).
    """
    grads, loss = meta_gradient(params, tasks, loss_fn, inner_lr=inner_lr, steps=steps,
                                first_order=first_order)
    return jax.tree.map(lambda p, g: p - outer_lr * g, params, grads), loss


def evaluate(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int) -> jax.Array:
    """Mean query loss after adaptation (meta-test loss); no outer derivative is formed, so the
    inner steps are first order whatever the training method."""
    losses = jax.vmap(lambda task: meta_loss(params, task, loss_fn, inner_lr=inner_lr, steps=steps,
                                             first_order=True))(tasks)
    return jnp.mean(losses)
