"""MAML and first-order MAML as pure functions on parameter dicts, built on ``jax.grad``.

The same functions, arguments and semantics as ``theria_torch.maml``: ``loss_fn(params,
(inputs, targets)) -> scalar`` is any function of a parameter pytree (e.g.
``theria_jax.models.make_loss_fn``). Full MAML differentiates through the inner steps (the
meta-gradient contains Hessian-vector products of the support loss); first-order MAML wraps each
inner gradient in ``jax.lax.stop_gradient``. docs/theory/maml_derivation.md derives both.

The tasks of a meta-batch are mapped with ``jax.vmap`` (every theria JAX op has a batching
rule). All functions are traceable: wrap them in ``jax.jit`` with ``loss_fn``, ``inner_lr``,
``steps``, ``first_order`` and ``mesh`` static (e.g. through ``functools.partial``).

Several devices: ``meta_gradient``, ``meta_step`` and ``evaluate`` take an optional ``mesh``, a
``jax.sharding.Mesh`` (of the local devices, or of every process's after
``jax.distributed.initialize``). The task axis is split over all of the mesh's devices in
contiguous blocks, as ``theria_torch.maml`` splits it over ranks; each device adapts its block
inside ``jax.shard_map`` and the devices average with ``jax.lax.pmean``. theria's ops are custom
calls that XLA's partitioner cannot split, which is why the split is written out with
``shard_map`` (each device runs the whole per-device program on its own block) rather than left to
``jit``'s sharding propagation. Every device returns the mean over the whole meta-batch, as one
device running all of it would (up to the order of the additions). docs/distributed.md shows how
to launch it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from theria_jax.tasks import TaskBatch, tasks_per_device

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


def shard_tasks(tasks: TaskBatch, mesh: Mesh | None) -> TaskBatch:
    """The global meta-batch placed on ``mesh`` with its task axis split over all of the mesh's
    devices in contiguous blocks, the layout :func:`meta_gradient` computes in (so a call under
    ``jax.jit`` moves no data first). Call it outside ``jax.jit``; None returns ``tasks``.

    Arguments:
        tasks: the global :class:`TaskBatch` (numpy or JAX arrays). With a mesh over several
            processes (``jax.distributed.initialize``), every process passes the same batch and
            places the blocks of its own devices only.
    Raises:
        ValueError: the meta-batch does not divide by the mesh's size.
    """
    if mesh is None:
        return tasks
    tasks_per_device(tasks.support_x.shape[0], mesh.size, devices="mesh")
    sharding = NamedSharding(mesh, _task_axis(mesh))

    def place(field):
        return jax.make_array_from_callback(field.shape, sharding, lambda index: field[index])

    return TaskBatch(*(place(field) for field in tasks))


def _task_axis(mesh: Mesh) -> PartitionSpec:
    """Axis 0 split over every axis of the mesh (in the mesh's device order)."""
    return PartitionSpec(tuple(mesh.axis_names))


def _over_mesh(per_device: Callable, params: Params, tasks: TaskBatch, mesh: Mesh | None):
    """``per_device(params, tasks)``, a tree of means over its tasks, as the mean over the whole
    meta-batch: directly without a mesh, else each device on its block of tasks and a pmean."""
    if mesh is None:
        return per_device(params, tasks)
    tasks_per_device(tasks.support_x.shape[0], mesh.size, devices="mesh")
    axes = tuple(mesh.axis_names)

    def on_device(params, tasks):
        return jax.lax.pmean(per_device(params, tasks), axes)

    # check_vma=False: the cotangents of theria's custom derivative rules do not carry shard_map's
    # varying-axes type (with the check, the fused backend's grad raises "Expected cotangent type
    # float64[..]{V:tasks} but got float64[..]"). The pmean makes every output the same on all
    # devices, which is what out_specs P() promises.
    return jax.shard_map(on_device, mesh=mesh, in_specs=(PartitionSpec(), _task_axis(mesh)),
                         out_specs=PartitionSpec(), check_vma=False)(params, tasks)


def meta_gradient(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
                  first_order: bool, mesh: Mesh | None = None) -> tuple[Params, jax.Array]:
    """Gradient of the mean post-adaptation query loss over a meta-batch.

    Arguments:
        tasks: a :class:`TaskBatch` with a leading task axis: the global meta-batch (placed by
            :func:`shard_tasks` or anywhere; ``shard_map`` moves it).
        mesh: a ``jax.sharding.Mesh`` whose devices split the tasks (each adapts its block), or
            None for one device. ``params`` are replicated over it.
    Returns:
        (meta-gradient dict shaped like ``params``, mean query loss as a 0-d array), both means
        over every task of ``tasks``; with a mesh, replicated over its devices.
    Raises:
        ValueError: with a mesh, a meta-batch that does not divide by the mesh's size.
    """
    def one_task(params, task):
        loss, grads = jax.value_and_grad(meta_loss)(params, task, loss_fn, inner_lr=inner_lr,
                                                    steps=steps, first_order=first_order)
        return grads, loss

    def mean_over_tasks(params, tasks):
        grads, losses = jax.vmap(one_task, in_axes=(None, 0))(params, tasks)
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), jnp.mean(losses)

    return _over_mesh(mean_over_tasks, params, tasks, mesh)


def meta_step(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, outer_lr: float,
              steps: int, first_order: bool, mesh: Mesh | None = None) -> tuple[Params, jax.Array]:
    """One meta-update by plain gradient descent: ``params - outer_lr * meta_gradient``.

    ``mesh`` as for :func:`meta_gradient`; the updated parameters stay replicated over it.

    Returns:
        (updated parameters, mean query loss before the update).
    """
    grads, loss = meta_gradient(params, tasks, loss_fn, inner_lr=inner_lr, steps=steps,
                                first_order=first_order, mesh=mesh)
    return jax.tree.map(lambda p, g: p - outer_lr * g, params, grads), loss


def evaluate(params: Params, tasks: TaskBatch, loss_fn: LossFn, *, inner_lr: float, steps: int,
             mesh: Mesh | None = None) -> jax.Array:
    """Mean query loss after adaptation (meta-test loss) over every task of ``tasks``; no outer
    derivative is formed, so the inner steps are first order whatever the training method.
    ``mesh`` splits the tasks over devices as for :func:`meta_gradient`."""
    def mean_over_tasks(params, tasks):
        losses = jax.vmap(lambda task: meta_loss(params, task, loss_fn, inner_lr=inner_lr, steps=steps,
                                                 first_order=True))(tasks)
        return jnp.mean(losses)

    return _over_mesh(mean_over_tasks, params, tasks, mesh)
