"""The MAML experiments' tiny pre-norm transformer, as far as it is framework-neutral: its sizes
(:class:`ModelConfig`), its parameter layout (:func:`param_shapes`) and its seeded numpy
initialisation (:func:`init_params`). ``theria_torch.models`` and ``theria_jax.models`` implement
the network on this layout and re-export these names; a parameter dict crosses between the two
frameworks by name. Imports neither torch nor JAX.

Network (inputs ``x``: (N, T, d_in) float; linear maps are ``x @ W`` with W: (fan_in, fan_out))::

    h = x @ embed.weight + embed.bias + pos[:T]
    for each block:  h = h + attn(rmsnorm(h));  h = h + mlp(rmsnorm(h))
    out = rmsnorm(h) @ head.weight + head.bias          # (N, T, d_out)

with ``attn`` multi-head self-attention (causal when ``ModelConfig.causal``), ``mlp`` =
``silu(x @ w1 + b1) @ w2 + b2`` and every rmsnorm with eps :data:`RMSNORM_EPS`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

RMSNORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the network; ``d_ff = None`` means ``2 * d_model``."""

    d_in: int
    d_out: int
    max_len: int
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None
    causal: bool = True

    def __post_init__(self):
        for name in ("d_in", "d_out", "max_len", "d_model", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): "
                f"each head gets d_model / n_heads features")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return 2 * self.d_model if self.d_ff is None else self.d_ff


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameter layout shared by both frameworks, in a fixed order: name -> shape."""
    d, f = config.d_model, config.ff_dim
    shapes = {"embed.weight": (config.d_in, d), "embed.bias": (d,), "pos": (config.max_len, d)}
    for i in range(config.n_layers):
        block = f"blocks.{i}."
        shapes.update({
            block + "norm1.scale": (d,),
            block + "attn.wq": (d, d), block + "attn.wk": (d, d),
            block + "attn.wv": (d, d), block + "attn.wo": (d, d),
            block + "norm2.scale": (d,),
            block + "mlp.w1": (d, f), block + "mlp.b1": (f,),
            block + "mlp.w2": (f, d), block + "mlp.b2": (d,),
        })
    shapes.update({"norm.scale": (d,), "head.weight": (d, config.d_out), "head.bias": (config.d_out,)})
    return shapes


def init_params(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded float64 numpy parameters, identical for torch and JAX.

    Weights are N(0, 1/fan_in); the two projections that write into the residual stream (attn.wo,
    mlp.w2) are further scaled by 1/sqrt(2 n_layers) so the stream's size does not grow with
    depth. Biases start at 0, norm scales at 1, positions at N(0, 0.02²).
    """
    rng = np.random.default_rng(seed)
    residual_scale = 1.0 / math.sqrt(2 * config.n_layers)
    params = {}
    for name, shape in param_shapes(config).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "scale":
            params[name] = np.ones(shape)
        elif leaf in ("bias", "b1", "b2"):
            params[name] = np.zeros(shape)
        elif leaf == "pos":
            params[name] = 0.02 * rng.standard_normal(shape)
        else:
            std = 1.0 / math.sqrt(shape[0]) * (residual_scale if leaf in ("wo", "w2") else 1.0)
            params[name] = std * rng.standard_normal(shape)
    return params
