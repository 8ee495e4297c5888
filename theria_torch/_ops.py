"""The attention and rmsnorm launchers registered as torch operators (``torch.ops.theria.*``), and
the entry points the autograd Functions call.

Registration is what lets the kernels compose with torch's transforms and compiler: functorch
unwraps its tensor wrappers before an operator runs (``torch.func.jvp`` over ``torch.func.grad``
hands plain tensors to the launchers), and each operator has a fake implementation, so
``torch.compile`` traces it as one opaque call instead of tracing into the launcher's Python and
Triton's. The attention operators also have a batching rule that folds a vmapped dimension into
the batch dimension B, so one launch serves every vmapped instance (the rmsnorm Functions fold
vmap themselves before their operators run). Every attention operator ends with the
variable-length arguments (``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``,
``max_seqlen_k``; None and 0 for fixed-length calls), which vmap shares between the instances, and
``row_slopes``, ALiBi's slope of each query row ((B, H, T_q) like lse, None without ALiBi), which
vmap folds into B like the other floating tensors.

An operator call costs tens of microseconds of Python in the dispatcher (its autograd fallback
binds the signature on every call), which dominates small calls such as those of a MAML inner
loop. So each entry point calls the launcher directly when its tensors are plain and nothing
traces them, and goes through the operator only under an active functorch transform (vmap's
batched tensors, grad's tracking tensors), ``torch.compile`` or fake tensors. Both paths run the
same launches. Attention's entry points take the autograd Functions' ``Static`` (the
``AttentionParams`` and the varlen arguments) as it is; only the operator path spells it out as
scalars and builds it back inside the operator.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch._C import _get_dispatch_mode
from torch._functorch.autograd_function import custom_function_call
from torch._functorch.utils import unwrap_dead_wrappers
from torch._subclasses.fake_tensor import FakeTensor

from theria_kernels import attention as kernels
from theria_kernels.attention import torch_launchers
from theria_kernels.rmsnorm import torch_launchers as rmsnorm_kernels
from theria_kernels._common import accumulator_dtype


class Static(NamedTuple):
    """What attention's autograd Functions pass on without differentiating it: the mask, scale and
    cap, for packed variable-length batches the cu_seqlens and the max lengths, and ALiBi's row
    slopes (constants at every order, §8). A NamedTuple, so that torch.func transforms see its
    tensors (and unwrap them like the other inputs). The Functions hand it to the entry points
    below as it is; only a call that goes through a registered operator spells it out as the
    operator's scalar arguments."""

    params: kernels.AttentionParams
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    row_slopes: Optional[Tensor] = None

    def operator_arguments(self) -> tuple:
        """The registered operators' arguments after their tensors."""
        params = self.params
        return (params.scale, params.causal, *params.window_size, params.bottom_right, params.softcap, *self[1:])

    def launcher_keywords(self) -> dict:
        """The launchers' varlen and ALiBi keywords ({} for a fixed-length call without ALiBi)."""
        keywords = {} if self.row_slopes is None else {"row_slopes": self.row_slopes}
        if self.cu_seqlens_q is not None:
            keywords.update(cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k,
                            max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k)
        return keywords


_STATICS: dict = {}


def _operator_static(scale: float, causal: bool, window_left: int, window_right: int, bottom_right: bool,
                     softcap: float, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                     max_seqlen_q: int, max_seqlen_k: int, row_slopes: Optional[Tensor]) -> Static:
    """An operator's scalar arguments as the ``Static`` they were spelled from."""
    key = (scale, causal, window_left, window_right, bottom_right, softcap, row_slopes is not None)
    params = _STATICS.get(key)
    if params is None:  # the same few masks recur on every call of a training loop
        params = _STATICS[key] = kernels.AttentionParams(scale, causal, (window_left, window_right), bottom_right,
                                                         softcap, row_slopes is not None)
    return Static(params, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, row_slopes)


# The launches behind attention's entry points, on plain tensors and a Static.

def _launch_forward(q, k, v, static: Static) -> tuple[Tensor, Tensor]:
    return torch_launchers.attention_forward(q, k, v, static.params, **static.launcher_keywords())


def _launch_jvp(q, k, v, q_dot, k_dot, v_dot, static: Static) -> tuple[Tensor, Tensor]:
    return torch_launchers.attention_jvp(q, k, v, q_dot, k_dot, v_dot, static.params,
                                         **static.launcher_keywords())[2:]


def _launch_tangent(q, k, v, out, lse, q_dot, k_dot, v_dot, static: Static) -> tuple[Tensor, Tensor]:
    return torch_launchers.attention_tangent(q, k, v, out, lse, q_dot, k_dot, v_dot, static.params,
                                             **static.launcher_keywords())


def _launch_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, static: Static) -> tuple[Tensor, Tensor]:
    return torch_launchers.attention_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, static.params,
                                                    **static.launcher_keywords())


def _launch_backward(q, k, v, out, lse, d_out, d_lse, static: Static) -> tuple[Tensor, Tensor, Tensor]:
    return torch_launchers.attention_backward(q, k, v, out, lse, d_out, d_lse, static.params,
                                              **static.launcher_keywords())


def _launch_backward_backward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, d_out_dot, d_lse_dot, dq,
                              wants_cot_d_out: bool, static: Static) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    found = torch_launchers.attention_backward_backward(
        q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, static.params, d_out_dot=d_out_dot,
        d_lse_dot=d_lse_dot, dq=dq, wants_cot_d_out=wants_cot_d_out, **static.launcher_keywords())
    # An operator returns tensors only: a cot_d_out nobody wants is an empty one.
    return found if wants_cot_d_out else (*found[:3], q.new_empty(0), found[4])


# The operators' implementations: typed signatures (the operator schema) over the same launches.

def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window_left: int,
             window_right: int, bottom_right: bool, softcap: float, cu_seqlens_q: Optional[Tensor],
             cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
             row_slopes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _launch_forward(q, k, v, _operator_static(
        scale, causal, window_left, window_right, bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, row_slopes))


def _jvp(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor, scale: float,
         causal: bool, window_left: int, window_right: int, bottom_right: bool, softcap: float,
         cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
         row_slopes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _launch_jvp(q, k, v, q_dot, k_dot, v_dot, _operator_static(
        scale, causal, window_left, window_right, bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, row_slopes))


def _tangent(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_dot: Tensor, k_dot: Tensor,
             v_dot: Tensor, scale: float, causal: bool, window_left: int, window_right: int, bottom_right: bool,
             softcap: float, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
             max_seqlen_k: int, row_slopes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _launch_tangent(q, k, v, out, lse, q_dot, k_dot, v_dot, _operator_static(
        scale, causal, window_left, window_right, bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, row_slopes))


def _forward_second(q: Tensor, k: Tensor, v: Tensor, q_dot: Tensor, k_dot: Tensor, v_dot: Tensor,
                    q_y: Tensor, k_y: Tensor, v_y: Tensor, scale: float, causal: bool, window_left: int,
                    window_right: int, bottom_right: bool, softcap: float, cu_seqlens_q: Optional[Tensor],
                    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                    row_slopes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _launch_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, _operator_static(
        scale, causal, window_left, window_right, bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, row_slopes))


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor,
              d_lse: Optional[Tensor], scale: float, causal: bool, window_left: int,
              window_right: int, bottom_right: bool, softcap: float, cu_seqlens_q: Optional[Tensor],
              cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
              max_seqlen_k: int, row_slopes: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _launch_backward(q, k, v, out, lse, d_out, d_lse, _operator_static(
        scale, causal, window_left, window_right, bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, row_slopes))


def _backward_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, d_out: Tensor, d_lse: Optional[Tensor],
    cot_dq: Optional[Tensor], cot_dk: Optional[Tensor], cot_dv: Optional[Tensor], d_out_dot: Optional[Tensor],
    d_lse_dot: Optional[Tensor], dq: Optional[Tensor], wants_cot_d_out: bool, scale: float, causal: bool,
    window_left: int,
    window_right: int, bottom_right: bool, softcap: float, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, row_slopes: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    static = _operator_static(scale, causal, window_left, window_right, bottom_right, softcap, cu_seqlens_q,
                              cu_seqlens_k, max_seqlen_q, max_seqlen_k, row_slopes)
    return _launch_backward_backward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, d_out_dot, d_lse_dot,
                                     dq, wants_cot_d_out, static)


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__


class Function(torch.autograd.Function):
    """``torch.autograd.Function`` for callers that pass every argument positionally.

    ``Function.apply`` binds the call against ``inspect.signature(forward)`` on every call of a
    Function that has ``setup_context`` (which torch.func needs) to fill in default arguments:
    tens of microseconds, and a MAML step applies dozens of Functions. theria's Functions take no
    defaults and are always applied with all their arguments, so the binding is skipped and the
    two paths of ``Function.apply`` are taken directly. A call that nothing differentiates (no
    input requires grad or grad mode is off, no forward-mode level is open, no functorch transform
    is active) runs ``forward`` alone: there is no graph node to build and nothing to save, which
    is the case of every backward Function run by a backward pass without ``create_graph``.
    """

    @classmethod
    def apply(cls, *args):
        if torch.compiler.is_compiling():  # Dynamo models Function.apply itself
            return _FUNCTION_APPLY(cls, *args)
        if torch._C._are_functorch_transforms_active():
            return custom_function_call(cls, *args)
        args = unwrap_dead_wrappers(args)
        if forward_ad._current_level < 0 and not (torch.is_grad_enabled() and any(
                isinstance(a, Tensor) and a.requires_grad for a in args)):
            return cls.forward(*args)
        return super(torch.autograd.Function, cls).apply(*args)


def _like(t: Tensor) -> Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _rows(t: Tensor) -> Tensor:
    """Row statistics (lse, rstd) of ``t``: one per row of its last dimension, in the accumulator
    dtype (float32, float64 for float64), contiguous."""
    return t.new_empty(t.shape[:-1], dtype=accumulator_dtype(t.dtype))


def _attention_fake(kinds: str):
    """The fake of an attention operator whose outputs are named by letters: q / k an output
    allocated in q's / k's kernel layout, s a row statistic (as theria_jax's ``_avals``)."""

    def fake(q, k, *rest):
        like = {"q": torch_launchers.kernel_layout(q), "k": torch_launchers.kernel_layout(k)}
        return tuple(_rows(q) if kind == "s" else _like(like[kind]) for kind in kinds)

    return fake


def _backward_backward_fake(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, d_out_dot, d_lse_dot, dq,
                            wants_cot_d_out, *scalars):
    """The double backward's fake: its cot_d_out is empty where it was not wanted."""
    cot_q, cot_k, cot_v, cot_d_out, cot_d_lse = _attention_fake("qkkqs")(q, k)
    return cot_q, cot_k, cot_v, cot_d_out if wants_cot_d_out else q.new_empty(0), cot_d_lse


# Fake implementations: output shapes, strides and dtypes only.
_ATTENTION_FAKES = {name: _attention_fake(kinds) for name, kinds in (
    ("forward", "qs"), ("jvp", "qs"), ("tangent", "qs"), ("forward_second", "qs"), ("backward", "qkk"))}
_ATTENTION_FAKES["backward_backward"] = _backward_backward_fake


def fold(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """Merge a vmapped dimension into the leading batch dimension B."""
    if t is None:
        return None
    t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.flatten(0, 1)


def unfold(outputs: tuple[Tensor, ...], size: int) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """Outputs of a call on folded tensors with B split back into (size, B), and their vmap out_dims."""
    return tuple(o.unflatten(0, (size, -1)) for o in outputs), (0,) * len(outputs)


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
        return unfold(outputs, info.batch_size)

    return batched


_FAKE_MODE = torch._C._TorchDispatchModeKey.FAKE


def _traced(first: Tensor) -> bool:
    """Whether an entry point must go through its registered operator: under ``torch.compile``,
    a functorch transform (its wrapped tensors) or ``FakeTensorMode`` (torch.export, opcheck, shape
    propagation), or with fake tensors, the launcher would reach Triton with what it cannot launch
    on. Wrappers outside an active transform are dead ones, which ``Function.apply`` unwraps
    before any entry point runs, and fake tensors come together, so the first tensor tells."""
    return (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
            or _get_dispatch_mode(_FAKE_MODE) is not None or isinstance(first, FakeTensor))


def _register(name: str, impl, fake, *, batching=None, launch=None, spell=None):
    """``torch.ops.theria.<name>`` for ``impl``, and its entry point: ``launch`` (default ``impl``)
    on plain tensors, the operator otherwise (see the module docstring); ``spell`` turns the entry's
    arguments into the operator's."""
    op = torch.library.custom_op(f"theria::{name}", mutates_args=())(impl)
    op.register_fake(fake)
    if batching is not None:
        torch.library.register_vmap(op, batching(op))
    launch = impl if launch is None else launch

    def entry(*args):
        if _traced(args[0]):
            return op(*(args if spell is None else spell(args)))
        return launch(*args)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"``theria_kernels`` launcher behind ``torch.ops.theria.{name}``."
    return entry


def _spell_static(args: tuple) -> tuple:
    """Attention's entry arguments (tensors, then a ``Static``) as its operator's."""
    return (*args[:-1], *args[-1].operator_arguments())


# Attention's entry points take their tensors and a Static: (q, k, v, static) and so on, in the
# order of the launchers' arguments.
(attention_forward, attention_jvp, attention_tangent, attention_forward_second, attention_backward,
 attention_backward_backward) = (
    _register(f"attention_{name}", impl, _ATTENTION_FAKES[name], batching=_fold_batching, launch=launch,
              spell=_spell_static)
    for name, impl, launch in (
        ("forward", _forward, _launch_forward), ("jvp", _jvp, _launch_jvp), ("tangent", _tangent, _launch_tangent),
        ("forward_second", _forward_second, _launch_forward_second), ("backward", _backward, _launch_backward),
        ("backward_backward", _backward_backward, _launch_backward_backward)))


# rmsnorm: the launchers of theria_kernels.rmsnorm with typed signatures (the operator schema),
# returning what the autograd Functions of theria_torch.rmsnorm use.

def _rmsnorm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd)."""
    return rmsnorm_kernels.rmsnorm_forward(x, weight, eps)


def _rmsnorm_jvp(x: Tensor, weight: Tensor, x_dot: Optional[Tensor], weight_dot: Optional[Tensor],
                 eps: float) -> tuple[Tensor, Tensor]:
    """(y_dot, rstd); at least one tangent is given."""
    _, rstd, y_dot = rmsnorm_kernels.rmsnorm_jvp(x, weight, x_dot, weight_dot, eps)
    return y_dot, rstd


def _rmsnorm_backward(x: Tensor, weight: Tensor, rstd: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dweight)."""
    return rmsnorm_kernels.rmsnorm_backward(x, weight, rstd, dy)


def _rmsnorm_backward_backward(x: Tensor, weight: Tensor, rstd: Tensor, dy: Tensor, cot_dx: Optional[Tensor],
                               cot_dweight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(cot_x, cot_weight, cot_dy)."""
    return rmsnorm_kernels.rmsnorm_backward_backward(x, weight, rstd, dy, cot_dx, cot_dweight)


def _rmsnorm_forward_second(x: Tensor, weight: Tensor, rstd: Tensor, x_dot: Optional[Tensor],
                            weight_dot: Optional[Tensor], x_dot2: Optional[Tensor],
                            weight_dot2: Optional[Tensor]) -> Tensor:
    """y_ddot."""
    return rmsnorm_kernels.rmsnorm_forward_second(x, weight, rstd, x_dot, weight_dot, x_dot2, weight_dot2)


# The launchers allocate contiguous outputs shaped like x and weight, and x's row statistics.
def _dense(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


rmsnorm_forward = _register("rmsnorm_forward", _rmsnorm_forward, lambda x, *rest: (_dense(x), _rows(x)))
rmsnorm_jvp = _register("rmsnorm_jvp", _rmsnorm_jvp, lambda x, *rest: (_dense(x), _rows(x)))
rmsnorm_backward = _register("rmsnorm_backward", _rmsnorm_backward,
                             lambda x, weight, *rest: (_dense(x), _dense(weight)))
rmsnorm_backward_backward = _register("rmsnorm_backward_backward", _rmsnorm_backward_backward,
                                      lambda x, weight, *rest: (_dense(x), _dense(weight), _dense(x)))
rmsnorm_forward_second = _register("rmsnorm_forward_second", _rmsnorm_forward_second, lambda x, *rest: _dense(x))
