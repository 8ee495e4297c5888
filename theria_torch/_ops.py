"""The attention launchers registered as torch operators (``torch.ops.theria.*``), and the
entry points the autograd Functions call.

Registration is what lets the kernels compose with torch's transforms: functorch unwraps its
tensor wrappers before an operator runs (``torch.func.jvp`` over ``torch.func.grad`` hands plain
tensors to the launchers), each operator has a fake implementation so ``torch.compile`` can trace
it, and a batching rule that folds a vmapped dimension into the batch dimension B, so one launch
serves every vmapped instance. Every operator ends with the variable-length arguments
(``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``, ``max_seqlen_k``; None and 0 for
fixed-length calls), which vmap shares between the instances.

An operator call costs tens of microseconds of Python in the dispatcher (its autograd fallback
binds the signature on every call), which dominates small attention calls such as those of a
MAML inner loop. So each entry point calls the launcher directly when its tensors are plain and
nothing traces them, and goes through the operator only under a functorch transform's wrappers
(vmap's batched tensors, grad's tracking tensors) or ``torch.compile``. Both paths run the same
implementation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from theria_kernels import attention as kernels


def _launch_args(scale: float, causal: bool, window_left: int, window_right: int, bottom_right: bool,
                 cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                 max_seqlen_k: int) -> tuple[kernels.AttentionParams, dict]:
    """The operators' trailing scalar arguments as the launchers' params and varlen keywords."""
    params = kernels.AttentionParams(scale, causal, (window_left, window_right), bottom_right)
    if cu_seqlens_q is None:
        return params, {}
    return params, dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                        max_seqlen_k=max_seqlen_k)


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
             window_right: int, bottom_right: bool, cu_seqlens_q: Optional[Tensor],
             cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int) -> tuple[Tensor, Tensor]:
    params, varlen = _launch_args(scale, causal, window_left, window_right, bottom_right, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return kernels.attention_forward(q, k, v, params, **varlen)


def _jvp(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, scale: float,
         causal: bool, window_left: int, window_right: int, bottom_right: bool, cu_seqlens_q: Optional[Tensor],
         cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int) -> tuple[Tensor, Tensor]:
    params, varlen = _launch_args(scale, causal, window_left, window_right, bottom_right, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return kernels.attention_jvp(q, k, v, q_dot, k_dot, v_dot, params, **varlen)[2:]


def _forward_second(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor,
                    q_y: Tensor, k_y: Tensor, v_y: Tensor, scale: float, causal: bool, window_left: int,
                    window_right: int, bottom_right: bool, cu_seqlens_q: Optional[Tensor],
                    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int) -> tuple[Tensor, Tensor]:
    params, varlen = _launch_args(scale, causal, window_left, window_right, bottom_right, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return kernels.attention_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, params, **varlen)


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
              d_lse: Optional[Tensor], scale: float, causal: bool, window_left: int,
              window_right: int, bottom_right: bool, cu_seqlens_q: Optional[Tensor],
              cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
              max_seqlen_k: int) -> tuple[Tensor, Tensor, Tensor]:
    params, varlen = _launch_args(scale, causal, window_left, window_right, bottom_right, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return kernels.attention_backward(q, k, v, out, lse, d_out, d_lse, params, **varlen)


def _backward_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, d_lse: Optional[Tensor],
    cot_dq: Optional[Tensor], cot_dk: Optional[Tensor], cot_dv: Optional[Tensor], scale: float, causal: bool,
    window_left: int, window_right: int, bottom_right: bool, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    params, varlen = _launch_args(scale, causal, window_left, window_right, bottom_right, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return kernels.attention_backward_backward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, params,
                                               **varlen)


def _like(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _rows(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=kernels.row_stat_dtype(q.dtype))


# Fake implementations: output shapes, strides and dtypes only.
_FAKES = {
    "forward": lambda q, *rest: (_like(q), _rows(q)),
    "jvp": lambda q, *rest: (_like(q), _rows(q)),
    "forward_second": lambda q, *rest: (_like(q), _rows(q)),
    "backward": lambda q, k, *rest: (_like(q), _like(k), _like(k)),
    "backward_backward": lambda q, k, *rest: (_like(q), _like(k), _like(k), _like(q), _rows(q)),
}


def fold(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """Merge a vmapped dimension into the leading batch dimension B."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.flatten(0, 1)


def _fold_batching(op):
    """Every floating tensor argument of these operators leads with B, and so does every output;
    the integer cu_seqlens describe how each batch entry is packed and are shared by all of them
    (the varlen kernels take B entries packed alike)."""

    def batched(info, in_dims, *args):
        folded = []
        for a, d in zip(args, in_dims):
            if isinstance(a, Tensor) and not a.is_floating_point():
                if d is not None:
                    raise NotImplementedError(kernels.VMAP_CU_SEQLENS_ERROR)
                folded.append(a)
            else:
                folded.append(fold(a, d, info.batch_size) if isinstance(a, Tensor) or d is not None else a)
        outputs = op(*folded)
        return tuple(o.unflatten(0, (info.batch_size, -1)) for o in outputs), (0,) * len(outputs)

    return batched


def _register(name: str, impl):
    """``torch.ops.theria.attention_<name>`` for ``impl``, and the entry point that picks it or
    ``impl`` itself (see the module docstring)."""
    op = torch.library.custom_op(f"theria::attention_{name}", mutates_args=())(impl)
    op.register_fake(_FAKES[name])
    torch.library.register_vmap(op, _fold_batching(op))

    def entry(*args):
        traced = torch.compiler.is_compiling() or any(
            isinstance(a, Tensor) and is_functorch_wrapped_tensor(a) for a in args)
        return op(*args) if traced else impl(*args)

    entry.__name__ = entry.__qualname__ = f"attention_{name}"
    entry.__doc__ = f"``theria_kernels.attention`` launcher behind ``torch.ops.theria.attention_{name}``."
    return entry


attention_forward = _register("forward", _forward)
attention_jvp = _register("jvp", _jvp)
attention_forward_second = _register("forward_second", _forward_second)
attention_backward = _register("backward", _backward)
attention_backward_backward = _register("backward_backward", _backward_backward)
