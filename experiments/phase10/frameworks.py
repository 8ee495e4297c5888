"""One meta-learner interface over ``theria_torch.maml`` and ``theria_jax.maml``.

The experiment loop (run.py) and the long-context benchmark (long_context.py) are written once
against :class:`TorchMetaLearner` / :class:`JaxMetaLearner`, which share their arguments and
methods. Both start from the same numpy parameters and see the same numpy task batches, so with
the same seed the two frameworks follow the same trajectory up to rounding. The outer optimiser
is Adam in both (``torch.optim.Adam``, ``optax.adam``: the same update rule and defaults).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from theria_torch import maml as torch_maml
from theria_torch import models as torch_models
from theria_torch import tasks as torch_tasks
from theria_torch.models import ModelConfig

FRAMEWORKS = ("torch", "jax")
METHODS = {"maml": False, "fo_maml": True}  # method -> first_order


@dataclasses.dataclass(frozen=True)
class MetaSetup:
    """Everything a learner needs besides the backend and the method.

    ``dtype`` is a name ("float32", "float64", "bfloat16"); ``device`` is "cpu" or "cuda".
    """

    family: object
    model: ModelConfig
    inner_lr: float
    inner_steps: int
    outer_lr: float
    dtype: str = "float32"
    device: str = "cpu"


class TorchMetaLearner:
    """Meta-training state in torch: parameters, Adam, and eager calls into theria_torch.maml."""

    framework = "torch"

    def __init__(self, setup: MetaSetup, params: dict[str, np.ndarray], *, backend: str, method: str):
        self.setup, self.first_order = setup, METHODS[method]
        self.dtype, self.device = getattr(torch, setup.dtype), torch.device(setup.device)
        model = torch_models.TransformerStack(setup.model, backend=backend, dtype=self.dtype, device=self.device)
        self.loss_fn = torch_models.make_loss_fn(model, setup.family.loss)
        self.params = torch_models.torch_params(params, dtype=self.dtype, device=self.device)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=setup.outer_lr)

    def convert(self, batch):
        return torch_tasks.as_torch(batch, dtype=self.dtype, device=self.device)

    def meta_gradient(self, batch) -> tuple[dict, object]:
        return torch_maml.meta_gradient(self.params, batch, self.loss_fn, inner_lr=self.setup.inner_lr,
                                        steps=self.setup.inner_steps, first_order=self.first_order)

    def step(self, batch) -> float:
        """One Adam step on the meta-gradient of a converted batch; returns the meta-train loss."""
        grads, loss = self.meta_gradient(batch)
        for name, p in self.params.items():
            p.grad = grads[name]
        self.optimizer.step()
        return float(loss)

    def evaluate(self, batch) -> float:
        return float(torch_maml.evaluate(self.params, batch, self.loss_fn, inner_lr=self.setup.inner_lr,
                                         steps=self.setup.inner_steps))

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def numpy(self, tree: dict) -> dict[str, np.ndarray]:
        return {name: value.detach().double().cpu().numpy() for name, value in tree.items()}


class JaxMetaLearner:
    """Meta-training state in JAX: parameters, optax Adam, and jitted theria_jax.maml calls."""

    framework = "jax"

    def __init__(self, setup: MetaSetup, params: dict[str, np.ndarray], *, backend: str, method: str):
        # JAX is an optional extra: imported only when a JAX learner is asked for.
        import jax
        import jax.numpy as jnp
        import optax

        from theria_jax import maml, models, tasks

        if setup.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        self._jax, self._tasks = jax, tasks
        self.setup = setup
        self.dtype = getattr(jnp, setup.dtype)
        self.device = jax.devices("gpu" if setup.device.startswith("cuda") else "cpu")[0]
        loss_fn = models.make_loss_fn(setup.model, setup.family.loss, backend=backend)
        options = dict(loss_fn=loss_fn, inner_lr=setup.inner_lr, steps=setup.inner_steps)
        optimizer = optax.adam(setup.outer_lr)
        self.params = jax.device_put(models.jax_params(params, dtype=self.dtype), self.device)
        # Committed to the device like the step's outputs, or the second step compiles again.
        self.opt_state = jax.device_put(optimizer.init(self.params), self.device)
        meta_gradient = functools.partial(maml.meta_gradient, first_order=METHODS[method], **options)

        def step(params, opt_state, batch):
            grads, loss = meta_gradient(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._meta_gradient = jax.jit(meta_gradient)
        self._step = jax.jit(step)
        self._evaluate = jax.jit(functools.partial(maml.evaluate, **options))

    def convert(self, batch):
        return self._jax.device_put(self._tasks.as_jax(batch, dtype=self.dtype), self.device)

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
