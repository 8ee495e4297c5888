"""A tiny pre-norm transformer (decoder when causal, encoder otherwise) for MAML experiments.

``theria_jax.models`` implements the same network on the same parameter layout: a flat dict
from the names of :func:`param_shapes` to arrays of those shapes, so weights move between the
frameworks by name (``theria_jax.models.to_torch`` / ``from_torch``). The layout and the numpy
initialisation live here, once; ``theria_jax.models`` imports them.

Network (inputs ``x``: (N, T, d_in) float; linear maps are ``x @ W`` with W: (fan_in, fan_out))::

    h = x @ embed.weight + embed.bias + pos[:T]
    for each block:  h = h + attn(rmsnorm(h));  h = h + mlp(rmsnorm(h))
    out = rmsnorm(h) @ head.weight + head.bias          # (N, T, d_out)

The model's ``backend`` is the backend of every op that has a fused kernel: attention goes
through ``theria_torch.sdpa_custom`` and every rmsnorm through ``theria_torch.rmsnorm``, both with
that backend ("reference": plain torch; "triton_full_fused": the fused kernels). Everything else
(the linear maps, SiLU, the loss) is plain torch, so the backend is the only thing that changes
between runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from theria_torch.attention import sdpa_custom
from theria_torch.rmsnorm import rmsnorm

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


def torch_params(params: dict[str, np.ndarray], *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Numpy parameters as torch tensors (copies) of ``dtype`` on ``device``."""
    return {name: torch.tensor(value, dtype=dtype, device=device) for name, value in params.items()}


class RMSNorm(nn.Module):
    """``theria_torch.rmsnorm`` over the last axis with eps :data:`RMSNORM_EPS`; the learned
    scale is the parameter ``scale`` (d,)."""

    def __init__(self, d: int, backend: str):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(d))
        self.backend = backend

    def forward(self, x):
        return rmsnorm(x, self.scale, RMSNORM_EPS, backend=self.backend)


class Affine(nn.Module):
    """``x @ weight + bias`` with weight (fan_in, fan_out), the JAX side's layout."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out))
        self.bias = nn.Parameter(torch.empty(fan_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        d = config.d_model
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.empty(d, d)) for _ in range(4))
        self.n_heads, self.causal, self.backend = config.n_heads, config.causal, backend

    def forward(self, x):
        """x: (N, T, d_model) -> (N, T, d_model); heads split to sdpa's (N, H, T, head_dim)."""
        def heads(w):
            return (x @ w).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

        out = sdpa_custom(heads(self.wq), heads(self.wk), heads(self.wv), backend=self.backend,
                          causal=self.causal)
        return out.transpose(1, 2).flatten(2) @ self.wo


class MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.empty(d, f)), nn.Parameter(torch.empty(f))
        self.w2, self.b2 = nn.Parameter(torch.empty(f, d)), nn.Parameter(torch.empty(d))

    def forward(self, x):
        return F.silu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class Block(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.norm1, self.attn = RMSNorm(config.d_model, backend), SelfAttention(config, backend)
        self.norm2, self.mlp = RMSNorm(config.d_model, backend), MLP(config.d_model, config.ff_dim)

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class TransformerStack(nn.Module):
    """The network of the module docstring; parameter names are those of :func:`param_shapes`.

    Arguments:
        config: sizes; ``config.causal`` makes it a decoder.
        backend: backend of the ops with fused kernels, passed to ``sdpa_custom`` and ``rmsnorm``:
            "reference" (plain torch) or "triton_full_fused" (CUDA, or CPU under TRITON_INTERPRET=1).
        seed: :func:`init_params` seed. dtype, device: of the parameters.
    """

    def __init__(self, config: ModelConfig, *, backend: str = "reference", seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.embed = Affine(config.d_in, config.d_model)
        self.pos = nn.Parameter(torch.empty(config.max_len, config.d_model))
        self.blocks = nn.ModuleList(Block(config, backend) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, backend)
        self.head = Affine(config.d_model, config.d_out)
        self.to(device=device, dtype=dtype)  # first, so the float64 initial values are not rounded
        self.load_state_dict(torch_params(init_params(config, seed), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, d_in) with T <= max_len -> outputs (N, T, d_out)."""
        if x.ndim != 3 or x.shape[-1] != self.config.d_in or x.shape[1] > self.config.max_len:
            raise ValueError(f"inputs must be (N, T <= {self.config.max_len}, {self.config.d_in}), "
                             f"got {tuple(x.shape)}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of last-position predictions.

    Arguments:
        outputs: (N, d_out) logits ("cross_entropy") or (N, 1) predictions ("mse").
        targets: (N,) int64 labels or float targets.
    """
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets)
    if loss == "mse":
        return (outputs[:, 0] - targets).pow(2).mean()
    raise ValueError(f"unknown loss {loss!r}; expected 'cross_entropy' or 'mse'")


def make_loss_fn(model: TransformerStack, loss: str) -> Callable:
    """``loss_fn(params, (inputs, targets)) -> scalar``: ``model`` run on ``params`` by
    ``torch.func.functional_call``, scored at the last position; the form ``theria_torch.maml``
    differentiates."""

    def loss_fn(params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        inputs, targets = batch
        return task_loss(functional_call(model, params, (inputs,))[:, -1], targets, loss)

    return loss_fn
