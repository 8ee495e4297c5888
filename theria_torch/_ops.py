"""The attention launchers registered as torch operators (``torch.ops.theria.*``).

Registration is what lets the kernels compose with torch's transforms: functorch unwraps its
tensor wrappers before an operator runs (``torch.func.jvp`` over ``torch.func.grad`` hands plain
tensors to the launchers), each operator has a fake implementation so ``torch.compile`` can trace
it, and a batching rule that folds a vmapped dimension into the batch dimension B, so one launch
serves every vmapped instance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from theria_kernels import attention as kernels


def _params(scale: float, causal: bool, window_left: int, window_right: int, bottom_right: bool):
    return kernels.AttentionParams(scale, causal, (window_left, window_right), bottom_right)


def _like(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _rows(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=kernels.row_stat_dtype(q.dtype))


@torch.library.custom_op("theria::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
                      window_right: int, bottom_right: bool) -> tuple[Tensor, Tensor]:
    return kernels.attention_forward(q, k, v, _params(scale, causal, window_left, window_right, bottom_right))


@torch.library.custom_op("theria::attention_jvp", mutates_args=())
def attention_jvp(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, scale: float,
                  causal: bool, window_left: int, window_right: int, bottom_right: bool) -> tuple[Tensor, Tensor]:
    params = _params(scale, causal, window_left, window_right, bottom_right)
    return kernels.attention_jvp(q, k, v, q_dot, k_dot, v_dot, params)[2:]


@torch.library.custom_op("theria::attention_forward_second", mutates_args=())
def attention_forward_second(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor,
                             q_y: Tensor, k_y: Tensor, v_y: Tensor, scale: float, causal: bool, window_left: int,
                             window_right: int, bottom_right: bool) -> tuple[Tensor, Tensor]:
    params = _params(scale, causal, window_left, window_right, bottom_right)
    return kernels.attention_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, params)


@torch.library.custom_op("theria::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
                       d_lse: Optional[Tensor], scale: float, causal: bool, window_left: int,
                       window_right: int, bottom_right: bool) -> tuple[Tensor, Tensor, Tensor]:
    params = _params(scale, causal, window_left, window_right, bottom_right)
    return kernels.attention_backward(q, k, v, out, lse, d_out, d_lse, params)


@torch.library.custom_op("theria::attention_backward_backward", mutates_args=())
def attention_backward_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, d_lse: Optional[Tensor],
    cot_dq: Optional[Tensor], cot_dk: Optional[Tensor], cot_dv: Optional[Tensor], scale: float, causal: bool,
    window_left: int, window_right: int, bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = _params(scale, causal, window_left, window_right, bottom_right)
    return kernels.attention_backward_backward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, params)


@attention_forward.register_fake
def _(q, k, v, *static):
    return _like(q), _rows(q)


@attention_jvp.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, *static):
    return _like(q), _rows(q)


@attention_forward_second.register_fake
def _(q, *rest):
    return _like(q), _rows(q)


@attention_backward.register_fake
def _(q, k, v, *rest):
    return _like(q), _like(k), _like(k)


@attention_backward_backward.register_fake
def _(q, k, v, *rest):
    return _like(q), _like(k), _like(k), _like(q), _rows(q)


def _fold(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """Merge a vmapped dimension into the leading batch dimension B."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.flatten(0, 1)


def _register_fold_batching(op) -> None:
    """Every tensor argument of these operators leads with B, and so does every output."""

    def batched(info, in_dims, *args):
        args = [_fold(a, d, info.batch_size) if isinstance(a, Tensor) or d is not None else a
                for a, d in zip(args, in_dims)]
        outputs = op(*args)
        return tuple(o.unflatten(0, (info.batch_size, -1)) for o in outputs), (0,) * len(outputs)

    torch.library.register_vmap(op, batched)


for _op in (attention_forward, attention_jvp, attention_forward_second, attention_backward,
            attention_backward_backward):
    _register_fold_batching(_op)
