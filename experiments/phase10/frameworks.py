"""One meta-learner interface over ``theria_torch.maml`` and ``theria_jax.maml``.

The experiment loop (run.py) and the long-context benchmark (long_context.py) are written once
against :class:`TorchMetaLearner` / :class:`JaxMetaLearner`, which share their arguments and
methods. Both start from the same numpy parameters and see the same numpy task batches, so with
the same seed the two frameworks follow the same trajectory up to rounding. The outer optimiser
is Adam in both (``torch.optim.Adam``, ``optax.adam``: the same update rule and defaults).

JAX compiles the whole meta-step (``jax.jit``); torch runs it eagerly, where at long sequences the
host's work (Python, torch.func's transform layers, hundreds of launches) takes several times the
device's. ``MetaSetup.cuda_graph`` has the torch learner replay its meta-gradient as a captured
CUDA graph instead (docs/results/device_time.md measures both).

Several devices (docs/distributed.md): ``MetaSetup.group`` splits each meta-batch over the ranks of
a ``torch.distributed`` process group, ``MetaSetup.jax_devices`` over a mesh of that many local JAX
devices. Every learner still takes and reports the global meta-batch: its losses and parameter
updates are those of one device running the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from theria_kernels._models import ModelConfig
from theria_kernels._tasks import TaskBatch
from theria_torch import maml as torch_maml
from theria_torch import models as torch_models
from theria_torch import tasks as torch_tasks

FRAMEWORKS = ("torch", "jax")
METHODS = {"maml": False, "fo_maml": True}  # method -> first_order
# Eager calls before a capture, as in PyTorch's CUDA-graph recipe: they compile the Triton kernels
# and set up cuBLAS, neither of which may happen while a graph is being captured.
CUDA_GRAPH_WARMUP_CALLS = 3


@dataclasses.dataclass(frozen=True)
class MetaSetup:
    """Everything a learner needs besides the backend and the method.

    ``dtype`` is a name ("float32", "float64", "bfloat16"); ``device`` is "cpu" or "cuda".
    ``cuda_graph`` (needs ``device="cuda"``): the torch learner replays its meta-gradient as a
    captured CUDA graph (:meth:`TorchMetaLearner.meta_gradient`). The JAX learner, compiled by
    ``jax.jit`` already, accepts and ignores it, so one setup serves a grid of both frameworks.
    ``group``: a ``torch.distributed`` process group the torch learner splits each meta-batch over
    (None: one device). ``jax_devices``: the JAX learner splits each meta-batch over a mesh of the
    first ``jax_devices`` local devices (None: one device, no mesh). Each framework ignores the
    other's.
    """

    family: object
    model: ModelConfig
    inner_lr: float
    inner_steps: int
    outer_lr: float
    dtype: str = "float32"
    device: str = "cpu"
    cuda_graph: bool = False
    group: object = None
    jax_devices: int | None = None

    def __post_init__(self):
        if self.cuda_graph and torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graph=True needs device='cuda', got device={self.device!r}")
        if self.jax_devices is not None and self.jax_devices < 1:
            raise ValueError(f"jax_devices must be None or at least 1, got {self.jax_devices}")


class TorchMetaLearner:
    """Meta-training state in torch: parameters, Adam, and calls into theria_torch.maml, eager or
    (``setup.cuda_graph``) the meta-gradient as a CUDA-graph replay; over ``setup.group``'s ranks
    when it is set (every rank holds the parameters and Adam's state, and applies the same
    averaged meta-gradient)."""

    framework = "torch"

    def __init__(self, setup: MetaSetup, params: dict[str, np.ndarray], *, backend: str, method: str):
        self.setup, self.first_order = setup, METHODS[method]
        self.dtype, self.device = getattr(torch, setup.dtype), torch.device(setup.device)
        model = torch_models.TransformerStack(setup.model, backend=backend, dtype=self.dtype, device=self.device)
        self.loss_fn = torch_models.make_loss_fn(model, setup.family.loss)
        self.params = torch_models.torch_params(params, dtype=self.dtype, device=self.device)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=setup.outer_lr)
        self._options = dict(inner_lr=setup.inner_lr, steps=setup.inner_steps, first_order=self.first_order)
        self._graph = None  # (CUDAGraph, its input batch, its (grads, loss)) once captured

    def convert(self, batch):
        return torch_tasks.as_torch(batch, dtype=self.dtype, device=self.device)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict, torch.Tensor]:
        """(meta-gradient dict shaped like ``self.params``, mean query loss) of a converted batch,
        the global meta-batch: with ``setup.group``, this rank adapts its share and the result is
        the mean over every rank's tasks.

        With ``setup.cuda_graph`` the first call captures the meta-gradient of a copy of this
        rank's share of ``batch`` into a CUDA graph; every call (the first included) copies the
        share into the graph's input buffers and replays it. The graph reads ``self.params``'
        storage, so in-place updates (Adam's) are seen by later replays; a tensor put in place of
        one in ``self.params`` is not. The returned tensors are then the graph's outputs,
        overwritten by the next call. The all-reduce over ``setup.group`` runs after the replay,
        outside the graph.

        Raises:
            ValueError: with ``cuda_graph``, a field of ``batch`` whose shape or dtype differs
                from the captured batch's. A graph replays fixed shapes; capturing again per
                shape would hold every graph's memory without telling, so the learner raises.
                With ``group``, a meta-batch that does not divide by the group's size.
        """
        if not self.setup.cuda_graph:
            return torch_maml.meta_gradient(self.params, batch, self.loss_fn, group=self.setup.group,
                                            **self._options)
        share = torch_maml.shard_tasks(batch, self.setup.group)
        if self._graph is None:
            self._graph = self._capture(share)
        graph, inputs, (grads, loss) = self._graph
        for name, buffer, value in zip(TaskBatch._fields, inputs, share):
            if buffer.shape != value.shape or buffer.dtype != value.dtype:
                raise ValueError(f"cuda_graph: batch.{name} is {tuple(value.shape)} {value.dtype}, but the graph "
                                 f"was captured for {tuple(buffer.shape)} {buffer.dtype}; use one batch shape "
                                 f"per learner")
            buffer.copy_(value)
        graph.replay()
        *means, loss = torch_maml.all_reduce_mean([*grads.values(), loss], self.setup.group)
        return dict(zip(grads, means)), loss

    def _eager_meta_gradient(self, share: TaskBatch) -> tuple[dict, torch.Tensor]:
        """The meta-gradient of this rank's tasks alone (what a graph captures)."""
        return torch_maml.meta_gradient(self.params, share, self.loss_fn, **self._options)

    def _capture(self, share: TaskBatch) -> tuple[torch.cuda.CUDAGraph, TaskBatch, tuple[dict, torch.Tensor]]:
        """A CUDA graph of one meta-gradient of this rank's tasks, its input buffers (a copy of
        ``share``) and outputs."""
        inputs = TaskBatch(*(field.clone() for field in share))
        # PyTorch's recipe: warm up on a side stream ordered after the caller's work and before
        # the capture. The meta-gradient is pure: these calls leave the parameters and Adam alone.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(CUDA_GRAPH_WARMUP_CALLS):
                self._eager_meta_gradient(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._eager_meta_gradient(inputs)
        return graph, inputs, outputs

    def step(self, batch) -> float:
        """One Adam step on the meta-gradient of a converted batch; returns the meta-train loss.
        Adam runs eagerly (a few launches) in both modes."""
        grads, loss = self.meta_gradient(batch)
        for name, p in self.params.items():
            p.grad = grads[name]
        self.optimizer.step()
        return float(loss)

    def evaluate(self, batch) -> float:
        return float(torch_maml.evaluate(self.params, batch, self.loss_fn, inner_lr=self.setup.inner_lr,
                                         steps=self.setup.inner_steps, group=self.setup.group))

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def numpy(self, tree: dict) -> dict[str, np.ndarray]:
        return {name: value.detach().double().cpu().numpy() for name, value in tree.items()}


class JaxMetaLearner:
    """Meta-training state in JAX: parameters, optax Adam, and jitted theria_jax.maml calls; with
    ``setup.jax_devices``, parameters and Adam's state replicated over a mesh of that many local
    devices and each meta-batch's tasks split over it."""

    framework = "jax"

    def __init__(self, setup: MetaSetup, params: dict[str, np.ndarray], *, backend: str, method: str):
        # JAX is an optional extra: imported only when a JAX learner is asked for.
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from theria_jax import maml, models, tasks

        if setup.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        self._jax, self._tasks, self._maml = jax, tasks, maml
        self.setup = setup
        self.dtype = getattr(jnp, setup.dtype)
        devices = jax.local_devices(backend="gpu" if setup.device.startswith("cuda") else "cpu")
        # Where parameters, Adam's state and (without a mesh) batches live: one device, or
        # replicated over the mesh so that every device applies the same update.
        if setup.jax_devices is None:
            self.mesh, self.placement = None, devices[0]
        elif setup.jax_devices > len(devices):
            raise ValueError(f"jax_devices={setup.jax_devices}, but this process has {len(devices)} "
                             f"{devices[0].platform} devices")
        else:
            self.mesh = Mesh(np.array(devices[:setup.jax_devices]), ("tasks",))
            self.placement = NamedSharding(self.mesh, PartitionSpec())
        loss_fn = models.make_loss_fn(setup.model, setup.family.loss, backend=backend)
        options = dict(loss_fn=loss_fn, inner_lr=setup.inner_lr, steps=setup.inner_steps, mesh=self.mesh)
        optimizer = optax.adam(setup.outer_lr)
        self.params = jax.device_put(models.jax_params(params, dtype=self.dtype), self.placement)
        # Committed to the device like the step's outputs, or the second step compiles again.
        self.opt_state = jax.device_put(optimizer.init(self.params), self.placement)
        meta_gradient = functools.partial(maml.meta_gradient, first_order=METHODS[method], **options)

        def step(params, opt_state, batch):
            grads, loss = meta_gradient(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._meta_gradient = jax.jit(meta_gradient)
        self._step = jax.jit(step)
        self._evaluate = jax.jit(functools.partial(maml.evaluate, **options))

    def convert(self, batch):
        """A numpy meta-batch on the device, or with a mesh split over its devices."""
        if self.mesh is not None:
            return self._maml.shard_tasks(self._tasks.as_jax(batch, dtype=self.dtype), self.mesh)
        return self._jax.device_put(self._tasks.as_jax(batch, dtype=self.dtype), self.placement)

    def meta_gradient(self, batch) -> tuple[dict, object]:
        return self._jax.block_until_ready(self._meta_gradient(self.params, batch))

    def step(self, batch) -> float:
        """One Adam step on the meta-gradient of a converted batch; returns the meta-train loss."""
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, batch)
        return float(loss)

    def evaluate(self, batch) -> float:
        return float(self._evaluate(self.params, batch))

    def synchronize(self):
        self._jax.block_until_ready(self.params)

    def numpy(self, tree: dict) -> dict[str, np.ndarray]:
        return {name: np.asarray(value, dtype=np.float64) for name, value in tree.items()}


def make_learner(framework: str, setup: MetaSetup, params: dict[str, np.ndarray], *, backend: str,
                 method: str):
    """A :class:`TorchMetaLearner` or :class:`JaxMetaLearner` by name."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    learners = {"torch": TorchMetaLearner, "jax": JaxMetaLearner}
    if framework not in learners:
        raise ValueError(f"unknown framework {framework!r}; choose from {FRAMEWORKS}")
    return learners[framework](setup, params, backend=backend, method=method)
