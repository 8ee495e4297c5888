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

Several devices: ``meta_gradient``, ``meta_step`` and ``evaluate`` take an optional ``group``, a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs; e.g. ``torch.distributed.group.WORLD``
under ``torchrun``). Every rank passes the same global meta-batch; rank ``r`` of ``n`` adapts its
contiguous share (:func:`shard_tasks`), and the ranks average their meta-gradients and losses in one
all-reduce of one flat buffer (:func:`all_reduce_mean`), so every rank returns the mean over the
whole meta-batch, as one device running all of it would (up to the order of the additions).
``theria_jax.maml`` does the same over a ``jax.sharding.Mesh``. docs/distributed.md shows how to
launch it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.func import grad, vmap

from theria_torch.tasks import TaskBatch, tasks_per_device

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


def shard_tasks(tasks: TaskBatch, group: dist.ProcessGroup | None) -> TaskBatch:
    """This rank's share of a global meta-batch: tasks ``[r m, (r + 1) m)`` for rank ``r`` of the
    group, ``m`` = meta-batch / group size (views, no copies).

    Arguments:
        tasks: the global :class:`TaskBatch`, the same on every rank. group: a process group, or
            None for one device (``tasks`` is returned as it is).
    Raises:
        ValueError: the meta-batch does not divide by the group's size.
    """
    if group is None:
        return tasks
    share = tasks_per_device(tasks.support_x.shape[0], dist.get_world_size(group), devices="group")
    start = dist.get_rank(group) * share
    return TaskBatch(*(field[start:start + share] for field in tasks))


def all_reduce_mean(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """The mean of each tensor over the ranks of ``group`` (identity for None), in one
    ``all_reduce`` per dtype: the tensors are packed into one flat buffer, so a meta-gradient of
    many small parameters costs one collective's latency, not one per parameter.

    Arguments:
        tensors: the same names, shapes and dtypes on every rank, in the same order.
    Returns:
        New tensors of the same shapes (views into the reduced buffers).
    """
    if group is None:
        return tensors
    ranks = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    means = [None] * len(tensors)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        # A sum then a division: ReduceOp.AVG exists on NCCL only, not on gloo.
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= ranks
        for i, chunk in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            means[i] = chunk.view(tensors[i].shape)
    return means


def meta_gradient(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
                  first_order: bool, group: dist.ProcessGroup | None = None) -> tuple[Params, torch.Tensor]:
    """Gradient of the mean post-adaptation query loss over a meta-batch.

    Arguments:
        tasks: a :class:`TaskBatch` with a leading task axis: the global meta-batch, the same on
            every rank when ``group`` is given.
        group: a ``torch.distributed`` process group over which the tasks are split (each rank
            adapts its share, :func:`shard_tasks`), or None for one device.
    Returns:
        (meta-gradient dict shaped like ``params``, mean query loss as a 0-d tensor), both means
        over every task of ``tasks``; with a group, every rank returns the same values. Plain
        tensors: ``params`` are detached first, so the result carries no graph back to them.
    Raises:
        ValueError: with a group, a meta-batch that does not divide by the group's size.
    """
    # The outer derivative is taken by torch.autograd, not by torch.func.grad around the vmap:
    # every op and every autograd Function then passes two functorch layers (vmap, the inner
    # grad) instead of three, which makes an eager meta-step about 2.6x fewer Python calls.
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    with torch.enable_grad():
        losses = vmap(lambda task: meta_loss(leaves, task, loss_fn, inner_lr=inner_lr, steps=steps,
                                             first_order=first_order))(shard_tasks(tasks, group))
        loss = losses.mean()
        # A parameter the loss does not use gets a zero meta-gradient, as torch.func.grad gives it.
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    *means, loss = all_reduce_mean([*grads, loss.detach()], group)
    return dict(zip(leaves, means)), loss


def meta_step(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, outer_lr: float,
              steps: int, first_order: bool,
              group: dist.ProcessGroup | None = None) -> tuple[Params, torch.Tensor]:
    """One meta-update by plain gradient descent: ``params - outer_lr * meta_gradient``.

    ``group`` as for :func:`meta_gradient`: every rank applies the same averaged update, so ranks
    that start from the same parameters stay equal.

    Returns:
        (updated parameters, mean query loss before the update).
    """
    grads, loss = meta_gradient(params, tasks, loss_fn, inner_lr=inner_lr, steps=steps,
                                first_order=first_order, group=group)
    return {name: p - outer_lr * grads[name] for name, p in params.items()}, loss


def evaluate(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
             group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean query loss after adaptation (meta-test loss) over every task of ``tasks``; no outer
    derivative is formed, so the inner steps are first order whatever the training method.
    ``group`` splits the tasks over ranks as for :func:`meta_gradient`."""
    losses = vmap(lambda task: meta_loss(params, task, loss_fn, inner_lr=inner_lr, steps=steps,
                                         first_order=True))(shard_tasks(tasks, group))
    return all_reduce_mean([losses.mean().detach()], group)[0]
