"""The MAML experiments' tiny pre-norm transformer, as pure JAX functions.

The network, its sizes (``ModelConfig``), its parameter layout (``param_shapes``) and its numpy
initialisation (``init_params``) are defined once in ``theria_kernels._models`` and re-exported
here; ``theria_torch.models`` implements the same network on the same layout, so a parameter dict
crosses between the frameworks by name with :func:`from_torch` / :func:`to_torch`. Layouts follow
JAX's attention, (N, T, H, head_dim). The ``backend`` is that of every op with a fused kernel:
attention goes through ``theria_jax.attention`` and every rmsnorm through ``theria_jax.rmsnorm``
(eps ``RMSNORM_EPS``), both with the given ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from theria_jax.attention import attention
from theria_jax.rmsnorm import rmsnorm
from theria_kernels._models import RMSNORM_EPS, ModelConfig, init_params, param_shapes

__all__ = ["RMSNORM_EPS", "ModelConfig", "init_params", "param_shapes", "jax_params", "from_torch", "to_torch",
           "apply", "task_loss", "make_loss_fn"]

Params = dict[str, jax.Array]


def jax_params(params: dict[str, np.ndarray], *, dtype) -> Params:
    """Numpy parameters as JAX arrays of ``dtype`` (float64 needs jax_enable_x64)."""
    return {name: jnp.asarray(value, dtype=dtype) for name, value in params.items()}


def from_torch(params: dict[str, torch.Tensor]) -> Params:
    """Torch parameters as JAX arrays of the same dtype on the same device (DLPack, of a copy:
    the JAX arrays must not change when torch later updates its tensors in place)."""
    return {name: jax.dlpack.from_dlpack(value.detach().clone()) for name, value in params.items()}


def to_torch(params: Params, *, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """JAX parameters as torch tensors of the same dtype (DLPack, then a copy that torch owns),
    moved to ``device`` when given."""
    # Imported here: only these converters need torch, and the model itself does not.
    import torch

    return {name: torch.from_dlpack(value).clone().to(device) for name, value in params.items()}


def self_attention(params: Params, prefix: str, x, config: ModelConfig, backend: str):
    """x: (N, T, d_model) -> (N, T, d_model); heads split to (N, T, H, head_dim)."""
    def heads(name):
        return (x @ params[prefix + name]).reshape(*x.shape[:2], config.n_heads, config.head_dim)

    out = attention(heads("wq"), heads("wk"), heads("wv"), causal=config.causal, backend=backend)
    return out.reshape(x.shape) @ params[prefix + "wo"]


def mlp(params: Params, prefix: str, x):
    hidden = jax.nn.silu(x @ params[prefix + "w1"] + params[prefix + "b1"])
    return hidden @ params[prefix + "w2"] + params[prefix + "b2"]


def apply(params: Params, x, config: ModelConfig, *, backend: str = "reference"):
    """The network of ``theria_kernels._models``: x (N, T, d_in), T <= max_len -> (N, T, d_out).

    ``backend`` ("reference" or "triton_full_fused") is passed to every attention and rmsnorm.
    """
    if x.ndim != 3 or x.shape[-1] != config.d_in or x.shape[1] > config.max_len:
        raise ValueError(f"inputs must be (N, T <= {config.max_len}, {config.d_in}), got {tuple(x.shape)}")

    def norm(name, h):
        return rmsnorm(h, params[name], RMSNORM_EPS, backend=backend)

    h = x @ params["embed.weight"] + params["embed.bias"] + params["pos"][: x.shape[1]]
    for i in range(config.n_layers):
        block = f"blocks.{i}."
        h = h + self_attention(params, block + "attn.", norm(block + "norm1.scale", h), config, backend)
        h = h + mlp(params, block + "mlp.", norm(block + "norm2.scale", h))
    return norm("norm.scale", h) @ params["head.weight"] + params["head.bias"]


def task_loss(outputs, targets, loss: str):
    """Mean loss of last-position predictions.

    Arguments:
        outputs: (N, d_out) logits ("cross_entropy") or (N, 1) predictions ("mse").
        targets: (N,) integer labels or float targets.
    """
    if loss == "cross_entropy":
        log_probs = jax.nn.log_softmax(outputs, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))
    if loss == "mse":
        return jnp.mean((outputs[:, 0] - targets) ** 2)
    raise ValueError(f"unknown loss {loss!r}; expected 'cross_entropy' or 'mse'")


def make_loss_fn(config: ModelConfig, loss: str, *, backend: str = "reference") -> Callable:
    """``loss_fn(params, (inputs, targets)) -> scalar``: :func:`apply` with ``backend`` scored at
    the last position; the form ``theria_jax.maml`` differentiates."""

    def loss_fn(params: Params, batch):
        inputs, targets = batch
        return task_loss(apply(params, inputs, config, backend=backend)[:, -1], targets, loss)

    return loss_fn
