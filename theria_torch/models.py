"""The MAML experiments' tiny pre-norm transformer (decoder when causal, encoder otherwise) in torch.

The network, its sizes (``ModelConfig``), its parameter layout (``param_shapes``) and its numpy
initialisation (``init_params``) are defined once in ``theria_kernels._models`` and re-exported
here; ``theria_jax.models`` implements the same network on the same layout, so weights move
between the frameworks by name (``theria_jax.models.to_torch`` / ``from_torch``).

The model's ``backend`` is the backend of every op that has a fused kernel: attention goes
through ``theria_torch.sdpa_custom`` and every rmsnorm through ``theria_torch.rmsnorm``, both with
that backend ("reference": plain torch; "triton_full_fused": the fused kernels). Everything else
(the linear maps, SiLU, the loss) is plain torch, so the backend is the only thing that changes
between runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from theria_kernels._models import RMSNORM_EPS, ModelConfig, init_params, param_shapes
from theria_torch.attention import sdpa_custom
from theria_torch.rmsnorm import rmsnorm

__all__ = ["RMSNORM_EPS", "ModelConfig", "init_params", "param_shapes", "torch_params", "TransformerStack",
           "task_loss", "make_loss_fn"]


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
    """The network of ``theria_kernels._models``; parameter names are those of ``param_shapes``.

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
