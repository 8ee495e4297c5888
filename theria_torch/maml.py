"""MAML and first-order MAML as pure functions on parameter dicts, built on ``torch.func``.

``loss_fn(params, (inputs, targets)) -> scalar`` is any function of a parameter dict (e.g.
``theria_torch.models.make_loss_fn``); nothing here knows about the model or the backend of its
fused ops (attention, rmsnorm). ``theria_jax.maml`` has the same functions with the same arguments.

Full MAML differentiates through the inner gradient steps, so the meta-gradient contains
Hessian-vector products of the support loss (double backward through attention and rmsnorm);
first-order MAML detaches the inner gradients, which drops them. docs/theory/maml_derivation.md
derives both.

The tasks of a meta-batch are mapped with ``torch.func.vmap``, as ``theria_jax.maml`` maps them
with ``jax.vmap``: the model is a ``functional_call`` of plain torch ops and theria's fused ops,
whose batching rules (attention's registered operators, rmsnorm's autograd Functions) fold the
task axis into the kernels' batch or row-group axis, so one launch serves every task. (On CPU
this is about 1.7× faster than a Python loop over the tasks; the price is that all tasks'
second-order graphs are alive at once.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, grad_and_value, vmap

from theria_torch.tasks import TaskBatch

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def inner_adapt(params: Params, batch, loss_fn: LossFn, *, inner_lr: float, steps: int,
                first_order: bool) -> Params:
    """``steps`` gradient-descent steps on ``loss_fn(·, batch)`` from ``params``.

    Arguments:
        params: name -> tensor. batch: (inputs, targets) of one task's support set.
        first_order: detach each inner gradient, so that outer derivatives see the adapted
            parameters as ``params`` plus a constant (FO-MAML).
    Returns:
        The adapted parameters, a new dict with the same names and shapes.
    """
    inner_grad = grad(loss_fn)
    for _ in range(steps):
        grads = inner_grad(params, batch)
        if first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        params = {name: p - inner_lr * grads[name] for name, p in params.items()}
    return params


def meta_loss(params: Params, task: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
              first_order: bool) -> torch.Tensor:
    """Query loss after adapting on the support set, for one task (fields without task axis)."""
    adapted = inner_adapt(params, (task.support_x, task.support_y), loss_fn, inner_lr=inner_lr,
                          steps=steps, first_order=first_order)
    return loss_fn(adapted, (task.query_x, task.query_y))


def meta_gradient(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
                  first_order: bool) -> tuple[Params, torch.Tensor]:
    """Gradient of the mean post-adaptation query loss over a meta-batch.

    Arguments:
        tasks: a :class:`TaskBatch` with a leading task axis.
    Returns:
        (meta-gradient dict shaped like ``params``, mean query loss as a 0-d tensor).
    """
    def one_task(task):
        return grad_and_value(meta_loss)(params, task, loss_fn, inner_lr=inner_lr, steps=steps,
                                         first_order=first_order)

    grads, losses = vmap(one_task)(tasks)
    return {name: g.mean(0) for name, g in grads.items()}, losses.mean()


def meta_step(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, outer_lr: float,
              steps: int, first_order: bool) -> tuple[Params, torch.Tensor]:
    """One meta-update by plain gradient descent: ``params - outer_lr * meta_gradient``.

    Returns:
        (updated parameters, mean query loss before the update).
    """
    grads, loss = meta_gradient(params, tasks, loss_fn, inner_lr=inner_lr, steps=steps,
                                first_order=first_order)
    return {name: p - outer_lr * grads[name] for name, p in params.items()}, loss


def evaluate(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float,
             steps: int) -> torch.Tensor:
    """Mean query loss after adaptation (meta-test loss); no outer derivative is formed, so the
    inner steps are first order whatever the training method."""
    losses = vmap(lambda task: meta_loss(params, task, loss_fn, inner_lr=inner_lr, steps=steps,
                                         first_order=True))(tasks)
    return losses.mean().detach()
