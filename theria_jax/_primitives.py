"""JAX primitives for fused attention, with rules that keep every derivative on the fused kernels.

Arrays are (B, T, H, D) as in ``jax.nn.dot_product_attention``; row statistics (lse and its
tangents and cotangents) are (B, H, T_q) in float32 (float64 for float64 inputs). Each primitive
runs the launch plans of ``theria_kernels.attention`` through :func:`theria_jax._launch.run_plan`
(XLA-native on a GPU, the DLPack bridge in the interpreter).
Write x = (q, k, v), f(x) = (out, lse), J = f'(x), u = (d_out, d_lse) a cotangent of f and
H_u = ∇²_x <u, f(x)> (symmetric):

* ``attention_fwd(x) = (out, lse)``: kernel attention_forward.
* ``attention_fwd_tangent(x, out, lse | x_dot) = J x_dot``: the tangent kernel, which reads the
  forward's (out, lse) instead of recomputing them (``forward_plan``'s ``given_primal``).
* ``attention_fwd_second(x, out, lse, x_dot | y) = f''(x)[x_dot, y]``: attention_forward_second.
* ``attention_bwd(x, out, lse, u) = Jᵀ u``: attention_backward.
* ``attention_bwd_tangent(x, out, lse, u | x_dot, u_dot) = H_u x_dot + Jᵀ u_dot``:
  attention_backward_backward with the second cotangent u_dot (one launch pair), or
  attention_backward alone when x_dot is zero.
* ``attention_bwd_bwd(x, out, lse, u, c) = (H_u c, J c)``: attention_backward_backward. With
  ``cot_d_out=False`` (no rule reads J c's out part) it returns (H_u c, l̇se part of J c) and the
  kernels skip the out part's T × T product. With ``has_dq`` its last operand is the backward's dq
  for (x, u), which the one row sweep reads instead of summing dS K (theory §4.7); the backward's
  jvp passes it on, through ``attention_bwd_tangent``, as a primal.

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

Operands are named, never counted: each primitive's differentiable operands are one of the name
tuples below (``FORWARD`` ... ``BACKWARD_BACKWARD``, ``backward_tangent_names``), and the rules
read and build them as dictionaries. After them come the constants (``constant_names``):

* ``row_slopes`` when ``params.alibi`` (flash-attn's ALiBi): each query row's slope, (B, H, T_q) like
  lse (float32 or float64), a constant at every order (no tangent, no cotangent;
  docs/theory/attention_derivatives.md §8); vmap folds it into B like q.
* ``cu_seqlens_q``, ``cu_seqlens_k`` (int32) for variable-length batches (``flash_attn_varlen_func``),
  which use the same primitives on one packed batch entry, (1, total, H, D): the parameter
  ``lengths = (max_seqlen_q, max_seqlen_k)`` (static; None for fixed-length calls) says so. Every
  rule passes them through unchanged: they have no tangent, no transpose, and vmap shares them
  between the instances (mapping over them raises).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from theria_jax._launch import compute_capability, run_plan
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


def _device() -> Device:
    """The kernels' device; float32 products are TF32 inside ``jax.default_matmul_precision(
    "tensorfloat32")`` (JAX's spelling of torch's ``allow_tf32``), IEEE float32 otherwise. Read at
    trace time, where JAX's own jit cache already keys on the precision setting."""
    return _device_for(jax.config.jax_default_matmul_precision == "tensorfloat32")


@functools.cache
def _device_for(allow_tf32: bool) -> Device:
    if is_interpreter() or jax.default_backend() != "gpu":
        return Device(INTERPRETER_MULTIPROCESSORS, interpreter=is_interpreter(), allow_tf32=allow_tf32)
    return Device(jax.devices()[0].core_count, allow_tf32=allow_tf32, capability=compute_capability())


# ----------------------------------------------------------------------------------------------
# Operand names
# ----------------------------------------------------------------------------------------------

_X = ("q", "k", "v")
_STATS = ("out", "lse")
_X_DOT = ("q_dot", "k_dot", "v_dot")
_Y = ("q_y", "k_y", "v_y")
_U = ("d_out", "d_lse")
_U_DOT = ("d_out_dot", "d_lse_dot")
_COT = ("cot_dq", "cot_dk", "cot_dv")

FORWARD = _X
FORWARD_TANGENT = _X + _STATS + _X_DOT
FORWARD_SECOND = FORWARD_TANGENT + _Y
BACKWARD = _X + _STATS + _U
BACKWARD_BACKWARD = BACKWARD + _COT


def backward_tangent_names(has_x_dot: bool, has_u_dot: bool) -> tuple[str, ...]:
    """``attention_bwd_tangent``'s operands: the backward's, its result dq, then the tangents it
    carries."""
    return BACKWARD + ("dq",) + (_X_DOT if has_x_dot else ()) + (_U_DOT if has_u_dot else ())


def backward_backward_names(params: dict) -> tuple[str, ...]:
    """``attention_bwd_bwd``'s operands: the backward's, the cotangents, and dq where it is given."""
    return BACKWARD_BACKWARD + (("dq",) if params["has_dq"] else ())


def constant_names(params: AttentionParams, lengths) -> tuple[str, ...]:
    """The operands after the differentiable ones: the ALiBi slopes, then the cu_seqlens."""
    return (("row_slopes",) if params.alibi else ()) + (("cu_seqlens_q", "cu_seqlens_k") if lengths else ())


def _named(values, names: tuple[str, ...], params: AttentionParams, lengths) -> dict:
    """A primitive's operands (or their tangents or cotangents) by name: ``names``, then the constants."""
    names = names + constant_names(params, lengths)
    values = list(values)
    if len(values) != len(names):
        raise TypeError(f"attention primitive: {len(values)} operands for the {len(names)} names {names}")
    return dict(zip(names, values))


def _operands(arrays: dict, names: tuple[str, ...], params: AttentionParams, lengths) -> list:
    """The operand list of a primitive taking ``names``: the named arrays, then the constants."""
    return [arrays[name] for name in names + constant_names(params, lengths)]


def _attention_call(arrays: dict, params: AttentionParams, lengths) -> AttentionCall:
    """The kernels' view of (B, T, H, D) row-major arrays: (B, H, T, D) with strides (T·H·D, D, H·D, 1)."""
    (batch, t_q, heads, dim), (batch_k, t_k, heads_kv, _) = arrays["q"].shape, arrays["k"].shape
    varlen = None if lengths is None else (*lengths, arrays["cu_seqlens_q"].shape[0] - 1)
    return AttentionCall((batch, heads, t_q, dim), (t_q * heads * dim, dim, heads * dim, 1),
                         (batch_k, heads_kv, t_k, dim), (t_k * heads_kv * dim, dim, heads_kv * dim, 1),
                         jnp.dtype(arrays["q"].dtype).name, params, _device(), varlen)


def _run(plan_of, arrays: dict, params: AttentionParams, lengths) -> list:
    """Run the plan ``plan_of(call)`` on named arrays (the plan reads the ones it names). TMA loads
    follow the tile tables as in torch (``AttentionCall.tma``): XLA's buffers start at 16-byte
    boundaries, and each call carries the descriptors' scratch as a buffer of its own."""
    return run_plan(plan_of(_attention_call(arrays, params, lengths)), arrays)


def _avals(kinds: str, q, k, v) -> list[ShapedArray]:
    """Result types named by letters: q/k/v shaped like that operand, s = a row statistic."""
    batch, t_q, heads, _ = q.shape
    row_stat = ShapedArray((batch, heads, t_q), jnp.dtype(row_stat_dtype_name(jnp.dtype(q.dtype).name)))
    like = {"q": ShapedArray(q.shape, q.dtype), "k": ShapedArray(k.shape, k.dtype),
            "v": ShapedArray(v.shape, v.dtype), "s": row_stat}
    return [like[kind] for kind in kinds]


# ----------------------------------------------------------------------------------------------
# vmap
# ----------------------------------------------------------------------------------------------


_SHARED = ("cu_seqlens_q", "cu_seqlens_k")


def _fold_batch_axis(primitive, names_of, operands, axes, **params):
    """Run one call with the mapped axis folded into B (the leading axis of every attention operand,
    the ALiBi row slopes included); the cu_seqlens describe how each batch entry is packed, shared
    by all of them."""
    names = names_of(params)
    operands = _named(operands, names, params["params"], params["lengths"])
    axes = _named(axes, names, params["params"], params["lengths"])
    if any(axes[name] is not None for name in _SHARED if name in axes):
        raise NotImplementedError(VMAP_CU_SEQLENS_ERROR)
    size = next(operands[name].shape[axis] for name, axis in axes.items() if axis is not None)

    def fold(x, axis):
        x = jnp.broadcast_to(x, (size, *x.shape)) if axis is None else jnp.moveaxis(x, axis, 0)
        return x.reshape(size * x.shape[1], *x.shape[2:])

    folded = {name: x if name in _SHARED else fold(x, axes[name]) for name, x in operands.items()}
    results = primitive.bind(*_operands(folded, names, params["params"], params["lengths"]), **params)
    return [r.reshape(size, r.shape[0] // size, *r.shape[1:]) for r in results], [0] * len(results)


# ----------------------------------------------------------------------------------------------
# Primitives: implementation (also the lowering, through lower_fun) and abstract evaluation
# ----------------------------------------------------------------------------------------------


def _primitive(name: str, kinds, names_of, impl) -> Primitive:
    """A primitive whose operands are ``names_of(params)`` then the constants, whose results are
    ``kinds`` (``_avals``; or ``kinds(params)``), and whose implementation takes the operands as a
    dictionary: ``impl(arrays, **params)``."""

    def run(*operands, **params):
        return impl(_named(operands, names_of(params), params["params"], params["lengths"]), **params)

    primitive = Primitive(name)
    primitive.multiple_results = True
    primitive.def_impl(run)
    primitive.def_abstract_eval(
        lambda q, k, v, *rest, **params: _avals(kinds(params) if callable(kinds) else kinds, q, k, v))
    mlir.register_lowering(primitive, mlir.lower_fun(run, multiple_results=True))
    batching.primitive_batchers[primitive] = functools.partial(_fold_batch_axis, primitive, names_of)
    return primitive


def _forward_impl(arrays, *, params, lengths):
    return _run(forward_plan, arrays, params, lengths)


def _recomputed(arrays: dict) -> dict:
    """The arrays without out and lse, which the second-order forward recomputes in its sweep (the
    plan allocates its own; the primitive returns only the second derivative)."""
    return {name: x for name, x in arrays.items() if name not in _STATS}


def _forward_tangent_impl(arrays, *, params, lengths):
    plan = functools.partial(forward_plan, has_tangent=True, given_primal=True)
    return _run(plan, arrays, params, lengths)


def _forward_second_impl(arrays, *, params, lengths):
    plan = functools.partial(forward_plan, has_tangent=True, second_order=True)
    return _run(plan, _recomputed(arrays), params, lengths)


def _backward_impl(arrays, *, params, lengths):
    plan = functools.partial(backward_plan, has_d_lse=True)
    return _run(plan, arrays, params, lengths)


_ALL_GIVEN = frozenset(("d_lse",) + _COT)


def _backward_backward_impl(arrays, *, cot_d_out, has_dq, params, lengths):
    given = _ALL_GIVEN | (frozenset(("dq",)) if has_dq else frozenset())
    plan = functools.partial(backward_backward_plan, given=given, cot_d_out=cot_d_out)
    return _run(plan, arrays, params, lengths)


def _backward_tangent_impl(arrays, *, has_x_dot, has_u_dot, **static):
    if has_x_dot:
        # H_u x_dot (+ Jᵀ u_dot): the Hessian is symmetric, so H_u x_dot is the double backward with
        # cotangent x_dot, whose kernels also add the backward for u_dot when it is given.
        cotangents = dict(zip(_COT, (arrays[name] for name in _X_DOT)))
        given = _ALL_GIVEN | {"dq"} | (frozenset(_U_DOT) if has_u_dot else frozenset())
        plan = functools.partial(backward_backward_plan, given=given, cot_d_out=False)  # only [:3] is read
        return _run(plan, {**arrays, **cotangents}, **static)[:3]
    # Jᵀ u_dot alone: the backward is linear in u.
    return _backward_impl({**arrays, **dict(zip(_U, (arrays[name] for name in _U_DOT)))}, **static)


def _names(names: tuple[str, ...]):
    return lambda params: names


forward_p = _primitive("attention_fwd", "qs", _names(FORWARD), _forward_impl)
forward_tangent_p = _primitive("attention_fwd_tangent", "qs", _names(FORWARD_TANGENT), _forward_tangent_impl)
forward_second_p = _primitive("attention_fwd_second", "qs", _names(FORWARD_SECOND), _forward_second_impl)
backward_p = _primitive("attention_bwd", "qkv", _names(BACKWARD), _backward_impl)
backward_tangent_p = _primitive("attention_bwd_tangent", "qkv",
                                lambda params: backward_tangent_names(params["has_x_dot"], params["has_u_dot"]),
                                _backward_tangent_impl)
backward_backward_p = _primitive("attention_bwd_bwd", lambda params: "qkvqs" if params["cot_d_out"] else "qkvs",
                                 backward_backward_names, _backward_backward_impl)


def attention_fused(q, k, v, params: AttentionParams, cu_seqlens=(), lengths=None, row_slopes=None):
    """(out, lse) = attention of (B, T, H, D) arrays on the fused kernels; differentiable in q, k, v.
    For packed variable-length sequences, ``cu_seqlens = (cu_seqlens_q, cu_seqlens_k)`` and
    ``lengths = (max_seqlen_q, max_seqlen_k)``. With ``params.alibi``, ``row_slopes`` (B, H, T_q)
    holds the ALiBi slope of each query row, a constant."""
    arrays = dict(q=q, k=k, v=v, row_slopes=row_slopes, **dict(zip(_SHARED, cu_seqlens)))
    out, lse = forward_p.bind(*_operands(arrays, FORWARD, params, lengths), params=params, lengths=lengths)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Differentiation rules
# ----------------------------------------------------------------------------------------------


def _nonzero(tangents: dict, names: tuple[str, ...]) -> bool:
    return any(type(tangents[name]) is not ad.Zero for name in names)


def _dense(tangents: dict, names: tuple[str, ...], as_names: tuple[str, ...]) -> dict:
    """The tangents (or cotangents) ``names``, symbolic zeros made arrays, renamed ``as_names``."""
    return {new: ad.instantiate_zeros(tangents[old]) for old, new in zip(names, as_names)}


def _linear_cotangents(cots: dict, operands: dict) -> list:
    """A transpose rule's result, one entry per named operand in order: the cotangent from ``cots``
    of each operand the primitive is linear in (an undefined primal), None for every other one."""
    return [cots.get(name) if ad.is_undefined_primal(x) else None for name, x in operands.items()]


def _forward_jvp(primals, tangents, *, params, lengths):
    static = dict(params=params, lengths=lengths)
    x, x_dot = _named(primals, FORWARD, params, lengths), _named(tangents, FORWARD, params, lengths)
    out, lse = forward_p.bind(*_operands(x, FORWARD, params, lengths), **static)
    arrays = {**x, "out": out, "lse": lse, **_dense(x_dot, _X, _X_DOT)}
    out_dot, lse_dot = forward_tangent_p.bind(*_operands(arrays, FORWARD_TANGENT, params, lengths), **static)
    return (out, lse), (out_dot, lse_dot)


def _forward_tangent_jvp(primals, tangents, *, params, lengths):
    static = dict(params=params, lengths=lengths)
    arrays = _named(primals, FORWARD_TANGENT, params, lengths)
    moved = _named(tangents, FORWARD_TANGENT, params, lengths)
    results = forward_tangent_p.bind(*primals, **static)
    terms = []
    if _nonzero(moved, _X_DOT):  # linear in x_dot
        along = {**arrays, **_dense(moved, _X_DOT, _X_DOT)}
        terms.append(forward_tangent_p.bind(*_operands(along, FORWARD_TANGENT, params, lengths), **static))
    if _nonzero(moved, _X):  # derivative of J(x) x_dot in x
        along = {**arrays, **_dense(moved, _X, _Y)}
        terms.append(forward_second_p.bind(*_operands(along, FORWARD_SECOND, params, lengths), **static))
    if not terms:  # only out/lse moved, which happens only off f(x): nothing to differentiate
        return results, [jnp.zeros_like(r) for r in results]
    return results, [sum(parts) for parts in zip(*terms)]


def _forward_tangent_transpose(cotangents, *operands, params, lengths):
    arrays = _named(operands, FORWARD_TANGENT, params, lengths)
    given = {**arrays, **_dense(dict(zip(_U, cotangents)), _U, _U)}
    grads = backward_p.bind(*_operands(given, BACKWARD, params, lengths), params=params, lengths=lengths)
    return _linear_cotangents(dict(zip(_X_DOT, grads)), arrays)


def _forward_second_transpose(cotangents, *operands, params, lengths):
    arrays = _named(operands, FORWARD_SECOND, params, lengths)
    # <c, f''[x_dot, y]> = <y, H_c x_dot>: the double backward with d_out, d_lse = c, cotangent x_dot.
    given = {**arrays, **_dense(dict(zip(_U, cotangents)), _U, _U), **_dense(arrays, _X_DOT, _COT)}
    cot_q, cot_k, cot_v, _ = backward_backward_p.bind(*_operands(given, BACKWARD_BACKWARD, params, lengths),
                                                      cot_d_out=False, has_dq=False, params=params, lengths=lengths)
    return _linear_cotangents(dict(zip(_Y, (cot_q, cot_k, cot_v))), arrays)


def _backward_jvp(primals, tangents, *, params, lengths):
    static = dict(params=params, lengths=lengths)
    results = backward_p.bind(*primals, **static)
    moved = _named(tangents, BACKWARD, params, lengths)
    has_x_dot, has_u_dot = _nonzero(moved, _X), _nonzero(moved, _U)
    if not (has_x_dot or has_u_dot):
        return results, [jnp.zeros_like(r) for r in results]
    arrays = {**_named(primals, BACKWARD, params, lengths), "dq": results[0], **_dense(moved, _X, _X_DOT),
              **_dense(moved, _U, _U_DOT)}
    names = backward_tangent_names(has_x_dot, has_u_dot)
    result_dots = backward_tangent_p.bind(*_operands(arrays, names, params, lengths), has_x_dot=has_x_dot,
                                          has_u_dot=has_u_dot, **static)
    return results, result_dots


def _backward_tangent_transpose(cotangents, *operands, has_x_dot, has_u_dot, params, lengths):
    names = backward_tangent_names(has_x_dot, has_u_dot)
    arrays = _named(operands, names, params, lengths)
    given = {**arrays, **_dense(dict(zip(_COT, cotangents)), _COT, _COT)}
    # J c's out part only where d_out_dot is solved for: a d_out that nothing differentiates (a
    # constant output weight, as in rev-over-rev of a fixed loss) costs no T × T product.
    cot_d_out = has_u_dot and ad.is_undefined_primal(arrays["d_out_dot"])
    names = backward_backward_names(dict(has_dq=True))
    results = backward_backward_p.bind(*_operands(given, names, params, lengths),
                                       cot_d_out=cot_d_out, has_dq=True, params=params, lengths=lengths)
    # (H_u c, J c): cotangents of x_dot and of u_dot, for whichever of them this call carries.
    cot_u = (results[3] if cot_d_out else None, results[-1])
    cots = {**dict(zip(_X_DOT, results[:3])), **dict(zip(_U_DOT, cot_u))}
    return _linear_cotangents(cots, arrays)


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
