"""JAX primitives for fused attention, with rules that keep every derivative on the fused kernels.

Arrays are (B, T, H, D) as in ``jax.nn.dot_product_attention``; row statistics (lse and its
tangents and cotangents) are (B, H, T_q) in float32 (float64 for float64 inputs). Each primitive
runs the launch plans of ``theria_kernels.attention`` through :func:`theria_jax._launch.run_plan`
(XLA-native on a GPU, the DLPack bridge in the interpreter).
Write x = (q, k, v), f(x) = (out, lse), J = f'(x), u = (d_out, d_lse) a cotangent of f and
H_u = ∇²_x <u, f(x)> (symmetric):

* ``attention_fwd(x) = (out, lse)``: kernel attention_forward.
* ``attention_fwd_tangent(x, out, lse | x_dot) = J x_dot``: attention_jvp.
* ``attention_fwd_second(x, out, lse, x_dot | y) = f''(x)[x_dot, y]``: attention_forward_second.
* ``attention_bwd(x, out, lse, u) = Jᵀ u``: attention_backward.
* ``attention_bwd_tangent(x, out, lse, u | x_dot, u_dot) = H_u x_dot + Jᵀ u_dot``:
  attention_backward_backward and attention_backward.
* ``attention_bwd_bwd(x, out, lse, u, c) = (H_u c, J c)``: attention_backward_backward.

Operands after ``|`` are the ones the primitive is linear in (the ones a transpose rule solves for).

The rules (docs/design/jax_bridge.md):

* jvp(fwd) = fwd_tangent; transpose(fwd_tangent) = bwd. That is grad.
* jvp(bwd) = bwd_tangent, because bwd(x, u) = ∇_x <u, f(x)> has ∂/∂x = H_u (a symmetric
  Hessian, so H_u x_dot is the backward-of-backward kernel with cotangent x_dot) and ∂/∂u = Jᵀ.
  transpose(bwd_tangent) applied to c is (H_u c, J c) = bwd_bwd: all five outputs of one kernel.
  That is grad∘grad, jvp∘grad (Hessian-vector products) and jax.hessian.
* jvp(fwd_tangent) = fwd_tangent on the tangent's tangent + fwd_second: forward over forward
  (jvp∘jvp, jacfwd∘jacfwd). Its transpose needs no kernel of its own: <c, f''[x_dot, y]> =
  <y, H_c x_dot>, so transpose(fwd_second) = bwd_bwd with u = c and cotangent x_dot. That is
  reverse over forward (grad∘jvp).
* Any third derivative raises NotImplementedError naming ``backend='reference'``.
* out and lse enter the derivative primitives only because the kernels reuse them; they are
  f(x), so every rule differentiates through x alone (their own tangents are ignored).
* vmap folds the mapped axis into B (an unmapped operand is broadcast first).

Variable-length batches (``flash_attn_varlen_func``) use the same primitives on one packed batch
entry, (1, total, H, D): the parameter ``lengths = (max_seqlen_q, max_seqlen_k)`` (static; None
for fixed-length calls) says so, and the last two operands are then ``cu_seqlens_q`` and
``cu_seqlens_k`` (int32). Every rule passes them through unchanged: they have no tangent, no
transpose, and vmap shares them between the instances (mapping over them raises).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from theria_jax._launch import run_plan
from theria_kernels._contracts import (
    INTERPRETER_MULTIPROCESSORS,
    THIRD_ORDER_ERROR,
    is_interpreter,
    row_stat_dtype_name,
)
from theria_kernels.attention import (
    VMAP_CU_SEQLENS_ERROR,
    AttentionCall,
    AttentionParams,
    Device,
    backward_backward_plan,
    backward_plan,
    forward_plan,
)


# ----------------------------------------------------------------------------------------------
# Plans: what each primitive launches
# ----------------------------------------------------------------------------------------------


@functools.cache
def _device() -> Device:
    if is_interpreter() or jax.default_backend() != "gpu":
        return Device(INTERPRETER_MULTIPROCESSORS, interpreter=is_interpreter())
    return Device(jax.devices()[0].core_count)


def _attention_call(q, k, params: AttentionParams, lengths, seqs) -> AttentionCall:
    """The kernels' view of (B, T, H, D) row-major arrays: (B, H, T, D) with strides (T·H·D, D, H·D, 1)."""
    (batch, t_q, heads, dim), (batch_k, t_k, heads_kv, _) = q.shape, k.shape
    varlen = None if lengths is None else (*lengths, seqs[0].shape[0] - 1)
    return AttentionCall((batch, heads, t_q, dim), (t_q * heads * dim, dim, heads * dim, 1),
                         (batch_k, heads_kv, t_k, dim), (t_k * heads_kv * dim, dim, heads_kv * dim, 1),
                         jnp.dtype(q.dtype).name, params, _device(), varlen)


def _run(plan_of, names: tuple[str, ...], operands, params: AttentionParams, lengths) -> list:
    """Run the plan ``plan_of(call)`` on operands named ``names`` (then the cu_seqlens, if varlen)."""
    operands, seqs = _split(operands, lengths)
    arrays = dict(zip(names, operands))
    call = _attention_call(arrays["q"], arrays["k"], params, lengths, seqs)
    arrays.update(zip(call.inputs_varlen, seqs))
    return run_plan(plan_of(call), arrays)


def _avals(kinds: str, q, k, v) -> list[ShapedArray]:
    """Result types named by letters: q/k/v shaped like that operand, s = a row statistic."""
    batch, t_q, heads, _ = q.shape
    row_stat = ShapedArray((batch, heads, t_q), jnp.dtype(row_stat_dtype_name(jnp.dtype(q.dtype).name)))
    like = {"q": ShapedArray(q.shape, q.dtype), "k": ShapedArray(k.shape, k.dtype),
            "v": ShapedArray(v.shape, v.dtype), "s": row_stat}
    return [like[kind] for kind in kinds]


def _split(operands, lengths) -> tuple[list, list]:
    """(the attention operands, the cu_seqlens): varlen calls carry the two cu_seqlens last."""
    operands = list(operands)
    end = len(operands) - (2 if lengths is not None else 0)
    return operands[:end], operands[end:]


# ----------------------------------------------------------------------------------------------
# vmap
# ----------------------------------------------------------------------------------------------


def _fold_batch_axis(primitive, operands, axes, **params):
    """Run one call with the mapped axis folded into B (every attention operand's leading axis);
    the cu_seqlens describe how each batch entry is packed, shared by all of them."""
    operands, seqs = _split(operands, params["lengths"])
    axes, seq_axes = _split(axes, params["lengths"])
    if any(axis is not None for axis in seq_axes):
        raise NotImplementedError(VMAP_CU_SEQLENS_ERROR)
    size = next(x.shape[axis] for x, axis in zip(operands, axes) if axis is not None)

    def fold(x, axis):
        x = jnp.broadcast_to(x, (size, *x.shape)) if axis is None else jnp.moveaxis(x, axis, 0)
        return x.reshape(size * x.shape[1], *x.shape[2:])

    results = primitive.bind(*map(fold, operands, axes), *seqs, **params)
    return [r.reshape(size, r.shape[0] // size, *r.shape[1:]) for r in results], [0] * len(results)


# ----------------------------------------------------------------------------------------------
# Primitives: implementation (also the lowering, through lower_fun) and abstract evaluation
# ----------------------------------------------------------------------------------------------


def _primitive(name: str, kinds: str, impl) -> Primitive:
    primitive = Primitive(name)
    primitive.multiple_results = True
    primitive.def_impl(impl)
    primitive.def_abstract_eval(lambda q, k, v, *rest, **params: _avals(kinds, q, k, v))
    mlir.register_lowering(primitive, mlir.lower_fun(impl, multiple_results=True))
    batching.primitive_batchers[primitive] = functools.partial(_fold_batch_axis, primitive)
    return primitive


_X = ("q", "k", "v")
_STATS = ("out", "lse")
_X_DOT = ("q_dot", "k_dot", "v_dot")
_U = ("d_out", "d_lse")


def _forward_impl(*operands, params, lengths):
    return _run(forward_plan, _X, operands, params, lengths)


def _forward_tangent_impl(*operands, params, lengths):
    # The JVP kernel recomputes out and lse in the same sweep; those two results are scratch.
    plan = functools.partial(forward_plan, has_tangent=True)
    return _run(plan, _X + ("_out", "_lse") + _X_DOT, operands, params, lengths)[2:]


def _forward_second_impl(*operands, params, lengths):
    plan = functools.partial(forward_plan, has_tangent=True, second_order=True)
    return _run(plan, _X + ("_out", "_lse") + _X_DOT + ("q_y", "k_y", "v_y"), operands, params, lengths)


def _backward_impl(*operands, params, lengths):
    plan = functools.partial(backward_plan, has_d_lse=True)
    return _run(plan, _X + _STATS + _U, operands, params, lengths)


_ALL_GIVEN = frozenset(("d_lse", "cot_dq", "cot_dk", "cot_dv"))


def _backward_backward_impl(*operands, params, lengths):
    plan = functools.partial(backward_backward_plan, given=_ALL_GIVEN)
    return _run(plan, _X + _STATS + _U + ("cot_dq", "cot_dk", "cot_dv"), operands, params, lengths)


def _backward_tangent_impl(*operands, has_x_dot, has_u_dot, **static):
    operands, seqs = _split(operands, static["lengths"])
    primals, tangents = operands[:7], operands[7:]
    terms = []
    if has_x_dot:  # H_u x_dot: the Hessian is symmetric, so it is the double backward with cotangent x_dot.
        terms.append(_backward_backward_impl(*primals, *tangents[:3], *seqs, **static)[:3])
    if has_u_dot:  # Jᵀ u_dot: the backward is linear in u.
        terms.append(_backward_impl(*primals[:5], *tangents[-2:], *seqs, **static))
    return [sum(parts) for parts in zip(*terms)]


forward_p = _primitive("attention_fwd", "qs", _forward_impl)
forward_tangent_p = _primitive("attention_fwd_tangent", "qs", _forward_tangent_impl)
forward_second_p = _primitive("attention_fwd_second", "qs", _forward_second_impl)
backward_p = _primitive("attention_bwd", "qkv", _backward_impl)
backward_tangent_p = _primitive("attention_bwd_tangent", "qkv", _backward_tangent_impl)
backward_backward_p = _primitive("attention_bwd_bwd", "qkvqs", _backward_backward_impl)


def attention_fused(q, k, v, params: AttentionParams, cu_seqlens=(), lengths=None):
    """(out, lse) = attention of (B, T, H, D) arrays on the fused kernels; differentiable. For
    packed variable-length sequences, ``cu_seqlens = (cu_seqlens_q, cu_seqlens_k)`` and
    ``lengths = (max_seqlen_q, max_seqlen_k)``."""
    out, lse = forward_p.bind(q, k, v, *cu_seqlens, params=params, lengths=lengths)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Differentiation rules
# ----------------------------------------------------------------------------------------------


def _nonzero(tangents) -> bool:
    return any(type(t) is not ad.Zero for t in tangents)


def _dense(tangents) -> list:
    return [ad.instantiate_zeros(t) for t in tangents]


def _forward_jvp(primals, tangents, **static):
    x, seqs = _split(primals, static["lengths"])
    out, lse = forward_p.bind(*x, *seqs, **static)
    out_dot, lse_dot = forward_tangent_p.bind(*x, out, lse, *_dense(tangents[:3]), *seqs, **static)
    return (out, lse), (out_dot, lse_dot)


def _forward_tangent_jvp(primals, tangents, **static):
    operands, seqs = _split(primals, static["lengths"])
    x_and_stats, x_dot = operands[:5], operands[5:]
    results = forward_tangent_p.bind(*primals, **static)
    terms = []
    if _nonzero(tangents[5:8]):  # linear in x_dot
        terms.append(forward_tangent_p.bind(*x_and_stats, *_dense(tangents[5:8]), *seqs, **static))
    if _nonzero(tangents[:3]):  # derivative of J(x) x_dot in x
        terms.append(forward_second_p.bind(*x_and_stats, *x_dot, *_dense(tangents[:3]), *seqs, **static))
    if not terms:  # only out/lse moved, which happens only off f(x): nothing to differentiate
        return results, [jnp.zeros_like(r) for r in results]
    return results, [sum(parts) for parts in zip(*terms)]


def _forward_tangent_transpose(cotangents, *operands, **static):
    operands, seqs = _split(operands, static["lengths"])
    x_and_stats, x_dot = operands[:5], operands[5:]
    grads = backward_p.bind(*x_and_stats, *_dense(cotangents), *seqs, **static)
    return [None] * 5 + [g if ad.is_undefined_primal(t) else None for g, t in zip(grads, x_dot)] + [None] * len(seqs)


def _forward_second_transpose(cotangents, *operands, **static):
    operands, seqs = _split(operands, static["lengths"])
    x_and_stats, x_dot, y = operands[:5], operands[5:8], operands[8:]
    # <c, f''[x_dot, y]> = <y, H_c x_dot>: the double backward with d_out, d_lse = c, cotangent x_dot.
    cots = backward_backward_p.bind(*x_and_stats, *_dense(cotangents), *x_dot, *seqs, **static)
    return [None] * 8 + [c if ad.is_undefined_primal(t) else None for c, t in zip(cots[:3], y)] + [None] * len(seqs)


def _backward_jvp(primals, tangents, **static):
    results = backward_p.bind(*primals, **static)
    x_dot, u_dot = tangents[:3], tangents[5:7]
    has_x_dot, has_u_dot = _nonzero(x_dot), _nonzero(u_dot)
    if not (has_x_dot or has_u_dot):
        return results, [jnp.zeros_like(r) for r in results]
    operands, seqs = _split(primals, static["lengths"])
    linear = (_dense(x_dot) if has_x_dot else []) + (_dense(u_dot) if has_u_dot else [])
    result_dots = backward_tangent_p.bind(*operands, *linear, *seqs, has_x_dot=has_x_dot, has_u_dot=has_u_dot,
                                          **static)
    return results, result_dots


def _backward_tangent_transpose(cotangents, *operands, has_x_dot, has_u_dot, **static):
    operands, seqs = _split(operands, static["lengths"])
    primals, linear = operands[:7], operands[7:]
    cots = backward_backward_p.bind(*primals, *_dense(cotangents), *seqs, **static)
    # (H_u c, J c): cotangents of x_dot and of u_dot, for whichever of them this call carries.
    cots = (cots[:3] if has_x_dot else []) + (cots[3:] if has_u_dot else [])
    return [None] * 7 + [c if ad.is_undefined_primal(t) else None for c, t in zip(cots, linear)] + [None] * len(seqs)


def _third_order(*args, **params):
    raise NotImplementedError(THIRD_ORDER_ERROR)


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_jvps[forward_tangent_p] = _forward_tangent_jvp
ad.primitive_transposes[forward_tangent_p] = _forward_tangent_transpose
ad.primitive_jvps[forward_second_p] = _third_order
ad.primitive_transposes[forward_second_p] = _forward_second_transpose
ad.primitive_jvps[backward_p] = _backward_jvp
ad.primitive_jvps[backward_tangent_p] = _third_order
ad.primitive_transposes[backward_tangent_p] = _backward_tangent_transpose
ad.primitive_jvps[backward_backward_p] = _third_order
