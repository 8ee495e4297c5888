"""JAX RMSNorm over the fused kernels: primitives whose rules keep every derivative on them.

Write p = (x, w) for the differentiable inputs, f(p) = y, J = f'(p), and for a cotangent dy
H_dy = ∇²_p <dy, f(p)> (symmetric). rstd is the forward's saved per-row statistic; it enters the
derivative primitives only because the kernels reuse it, so every rule differentiates through
p alone (rstd's tangent is ignored; the public function never returns rstd). Each primitive
runs plans of ``theria_kernels.rmsnorm`` through :func:`theria_jax._launch.run_plan` (XLA-native
on a GPU, the DLPack bridge in the interpreter):

===================  ===================================  =================  =========================
primitive            operands (linear ones after ``|``)   results            kernel
===================  ===================================  =================  =========================
rmsnorm_fwd          x, w                                 y, rstd            forward_plan
rmsnorm_fwd_tangent  x, w, rstd | ẋ, ẇ                    J ṗ                forward_plan
rmsnorm_fwd_second   x, w, rstd, ẋ, ẇ | δx, δw            f''(p)[ṗ, δ]       forward_second_plan
rmsnorm_bwd          x, w, rstd, dy                       Jᵀ dy              backward_plan
rmsnorm_bwd_tangent  x, w, rstd, dy | ẋ, ẇ, dẏ            H_dy ṗ + Jᵀ dẏ     backward_backward_plan,
                                                                             backward_plan
rmsnorm_bwd_bwd      x, w, rstd, dy, a, b                 H_dy c, J c        backward_backward_plan
===================  ===================================  =================  =========================

(c = (a, b), the cotangents of (dx, dweight).) The rules:

* jvp(fwd) = fwd_tangent; transpose(fwd_tangent) = bwd. That is grad.
* jvp(bwd) = bwd_tangent: bwd(p, dy) = ∇_p <dy, f(p)> has ∂/∂p = H_dy (symmetric, so H_dy ṗ is
  the double backward with cotangent ṗ) and ∂/∂dy = Jᵀ. transpose(bwd_tangent) applied to c is
  (H_dy c, J c): the double backward's three outputs. That is grad∘grad, jvp∘grad, hessian.
* jvp(fwd_tangent) = fwd_tangent of the tangent's tangent + fwd_second (jvp∘jvp, jacfwd∘jacfwd).
  <c, f''[ṗ, δ]> = <δ, H_c ṗ>, so transpose(fwd_second) is the double backward with dy = c and
  cotangent ṗ (grad∘jvp).
* Third derivatives raise NotImplementedError naming backend='reference'.
* Linear operands that are symbolic zeros are left out (static ``present`` flags) and reach
  the kernels as None, so e.g. grad in the weight alone never materialises a zero x tangent.
* vmap moves the mapped axis to the front of every operand (broadcasting unmapped ones), which
  the kernels read as a row group with its own weight: one launch for any vmap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from theria_jax._launch import compute_capability, run_plan
from theria_kernels import _contracts
from theria_kernels._contracts import is_interpreter
from theria_kernels.rmsnorm import (
    BEYOND_SECOND_ORDER,
    RMSNormCall,
    RMSNormDevice,
    backward_backward_plan,
    backward_plan,
    check_arguments,
    forward_plan,
    forward_second_plan,
)


def rmsnorm_reference(x, weight, eps: float = 1e-6):
    """Plain jax.numpy RMSNorm in the inputs' dtype (the ground truth; every order via JAX).

    Arguments:
        x: (..., N). weight: (N,). eps: added to mean(x²).
    Returns:
        y = x · rsqrt(mean(x², -1) + eps) · weight, shaped like x.
    """
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rmsnorm(x, weight, eps: float = 1e-6, *, backend: str = "triton_full_fused"):
    """RMSNorm over the last axis with a learned scale, on the fused kernels.

    Works under ``jax.jit``, ``jax.vmap`` (over x, weight or both), ``jax.grad``, ``jax.jvp`` and
    every second-order composition of them (``jax.hessian`` included); third derivatives raise
    ``NotImplementedError`` on the fused backend.

    Arguments:
        x: (..., N) float16/bfloat16/float32/float64; rows = prod(leading axes).
        weight: (N,), x's dtype.
        eps: a Python float ≥ 0 added to mean(x²) inside the square root.
        backend: "triton_full_fused" (Triton kernels; GPU, or CPU under TRITON_INTERPRET=1)
            or "reference" (jax.numpy, any order).
    Returns:
        y = x · rsqrt(mean(x², -1) + eps) · weight, shaped like x, in x's dtype.
    Raises:
        ValueError / TypeError naming the offending array (docs/design/rmsnorm.md).
    """
    for name, array in (("x", x), ("weight", weight)):
        if not isinstance(array, (jax.Array, np.ndarray)):
            raise TypeError(f"rmsnorm: {_contracts.array_type_error(name, array, 'jax')}")
    check_arguments(x.shape, x.dtype, weight.shape, weight.dtype, eps, backend=backend)
    if backend == "reference":
        return rmsnorm_reference(x, weight, eps)
    platform = jax.default_backend()
    if platform != "gpu" and not is_interpreter():
        raise ValueError(
            f"rmsnorm: x is on {platform}, but the Triton kernels need a CUDA device; use "
            "backend=\"reference\", or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU "
            "interpreter (slow)"
        )
    if platform != "gpu":
        _contracts.check_interpreter_in_time()
    y, _ = forward_p.bind(jnp.asarray(x), jnp.asarray(weight), eps=float(eps))
    return y


# ----------------------------------------------------------------------------------------------
# Plans: what each primitive launches. Optional tangents/cotangents are left out of the operands
# (static ``present`` flags say which slots the trailing arrays fill) and the plans skip them.
# ----------------------------------------------------------------------------------------------

# Shared memory one program may use, by compute capability (it only bounds the reducing kernels'
# pipelining depth, never the numbers); devices not listed get the smallest current value.
_SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448}


@functools.cache
def _device() -> RMSNormDevice:
    if is_interpreter() or jax.default_backend() != "gpu":
        return RMSNormDevice(_contracts.INTERPRETER_MULTIPROCESSORS)
    device = jax.devices()[0]
    return RMSNormDevice(device.core_count, _SHARED_MEMORY.get(compute_capability(), 101376))


def _slots(arrays, present):
    """Spread the present arrays over their slots, None elsewhere."""
    arrays = iter(arrays)
    return [next(arrays) if here else None for here in present]


def _run(plan_of, x, w, **arrays):
    call = RMSNormCall(tuple(x.shape), tuple(w.shape), jnp.dtype(x.dtype).name, _device())
    arrays = {name: a for name, a in arrays.items() if a is not None}
    return run_plan(plan_of(call), dict(x=x, weight=w, **arrays))


def _forward_impl(x, w, *, eps):
    return _run(lambda call: forward_plan(call, eps), x, w)


def _forward_tangent_impl(x, w, rstd, *tangents, eps, present):
    # The JVP kernel recomputes y and rstd in its sweep; the primitive keeps only y_dot.
    x_dot, w_dot = _slots(tangents, present)
    return _run(lambda call: forward_plan(call, eps, *present), x, w, x_dot=x_dot, weight_dot=w_dot)[2:]


def _forward_second_impl(x, w, rstd, *rest, present, delta_present):
    n_dot = sum(present)
    x_dot, w_dot = _slots(rest[:n_dot], present)
    x_dot2, w_dot2 = _slots(rest[n_dot:], delta_present)
    return _run(lambda call: forward_second_plan(call, (*present, *delta_present)), x, w, rstd=rstd, x_dot=x_dot,
                weight_dot=w_dot, x_dot2=x_dot2, weight_dot2=w_dot2)


def _backward_impl(x, w, rstd, dy):
    return _run(backward_plan, x, w, rstd=rstd, dy=dy)


def _backward_backward_impl(x, w, rstd, dy, *cotangents, present):
    cot_dx, cot_dw = _slots(cotangents, present)
    return _run(lambda call: backward_backward_plan(call, *present), x, w, rstd=rstd, dy=dy, cot_dx=cot_dx,
                cot_dweight=cot_dw)


def _avals(kinds: str, x, w) -> list[ShapedArray]:
    """Result types named by letters: x/w shaped like that operand, s = rstd (x.shape[:-1],
    float32, float64 for float64 x)."""
    stat_dtype = jnp.dtype(jnp.float64) if x.dtype == jnp.float64 else jnp.dtype(jnp.float32)
    like = {"x": ShapedArray(x.shape, x.dtype), "w": ShapedArray(w.shape, w.dtype),
            "s": ShapedArray(x.shape[:-1], stat_dtype)}
    return [like[kind] for kind in kinds]


def _backward_tangent_impl(x, w, rstd, dy, *tangents, present):
    """H_dy ṗ (the double backward with cotangent ṗ; H is symmetric) + Jᵀ dẏ (the backward)."""
    x_dot, w_dot, dy_dot = _slots(tangents, present)
    terms = []
    if present[0] or present[1]:
        terms.append(_backward_backward_impl(x, w, rstd, dy, *tangents[:sum(present[:2])],
                                             present=present[:2])[:2])
    if dy_dot is not None:
        terms.append(_backward_impl(x, w, rstd, dy_dot))
    return [sum(parts) for parts in zip(*terms)]


# ----------------------------------------------------------------------------------------------
# vmap: the mapped axis becomes a leading row group of every operand
# ----------------------------------------------------------------------------------------------


def _batch_in_front(primitive, operands, axes, **params):
    size = next(op.shape[axis] for op, axis in zip(operands, axes) if axis is not None)
    moved = [jnp.broadcast_to(op, (size, *op.shape)) if axis is None else jnp.moveaxis(op, axis, 0)
             for op, axis in zip(operands, axes)]
    results = primitive.bind(*moved, **params)
    return results, [0] * len(results)


def _primitive(name: str, kinds: str, impl) -> Primitive:
    primitive = Primitive(name)
    primitive.multiple_results = True
    primitive.def_impl(impl)
    primitive.def_abstract_eval(lambda x, w, *rest, **params: _avals(kinds, x, w))
    mlir.register_lowering(primitive, mlir.lower_fun(impl, multiple_results=True))
    batching.primitive_batchers[primitive] = functools.partial(_batch_in_front, primitive)
    return primitive


forward_p = _primitive("rmsnorm_fwd", "xs", _forward_impl)
forward_tangent_p = _primitive("rmsnorm_fwd_tangent", "x", _forward_tangent_impl)
forward_second_p = _primitive("rmsnorm_fwd_second", "x", _forward_second_impl)
backward_p = _primitive("rmsnorm_bwd", "xw", _backward_impl)
backward_tangent_p = _primitive("rmsnorm_bwd_tangent", "xw", _backward_tangent_impl)
backward_backward_p = _primitive("rmsnorm_bwd_bwd", "xwx", _backward_backward_impl)


# ----------------------------------------------------------------------------------------------
# Differentiation rules
# ----------------------------------------------------------------------------------------------


def _present(tangents) -> tuple[bool, ...]:
    return tuple(type(t) is not ad.Zero for t in tangents)


def _nonzero(tangents) -> list:
    return [t for t in tangents if type(t) is not ad.Zero]


def _transposed(cotangents, linear_operands) -> list:
    """Cotangents for the linear operands that are being transposed, None for the others."""
    return [c if ad.is_undefined_primal(op) else None for c, op in zip(cotangents, linear_operands)]


def _zero_like(value):
    return ad.Zero(jax.typeof(value).to_tangent_aval())


def _forward_jvp(primals, tangents, *, eps):
    y, rstd = forward_p.bind(*primals, eps=eps)
    present = _present(tangents)
    if not any(present):
        return (y, rstd), (_zero_like(y), _zero_like(rstd))
    (y_dot,) = forward_tangent_p.bind(*primals, rstd, *_nonzero(tangents), eps=eps, present=present)
    return (y, rstd), (y_dot, _zero_like(rstd))


def _forward_tangent_jvp(primals, tangents, *, eps, present):
    x, w, rstd, *p_dot = primals
    results = forward_tangent_p.bind(*primals, eps=eps, present=present)
    terms = []
    # Linear in ṗ: the same map applied to ṗ's own tangents (which fill ṗ's present slots).
    inner_present = tuple(t is not None and type(t) is not ad.Zero for t in _slots(tangents[3:], present))
    if any(inner_present):
        terms.append(forward_tangent_p.bind(x, w, rstd, *_nonzero(tangents[3:]), eps=eps, present=inner_present))
    # The derivative of J(p) ṗ in p along δ: the second-order forward kernel.
    delta_present = _present(tangents[:2])
    if any(delta_present):
        terms.append(forward_second_p.bind(x, w, rstd, *p_dot, *_nonzero(tangents[:2]), present=present,
                                           delta_present=delta_present))
    if not terms:  # only rstd moved, which happens only off f(p): nothing to differentiate
        return results, [_zero_like(r) for r in results]
    return results, [sum(parts) for parts in zip(*terms)]


def _forward_tangent_transpose(cotangents, x, w, rstd, *p_dot, eps, present):
    grads = backward_p.bind(x, w, rstd, ad.instantiate_zeros(cotangents[0]))
    return [None] * 3 + _transposed([g for g, here in zip(grads, present) if here], p_dot)


def _forward_second_transpose(cotangents, x, w, rstd, *rest, present, delta_present):
    p_dot, delta = rest[:sum(present)], rest[sum(present):]
    # <c, f''[ṗ, δ]> = <δ, H_c ṗ>: the double backward with dy = c and cotangent ṗ.
    cots = backward_backward_p.bind(x, w, rstd, ad.instantiate_zeros(cotangents[0]), *p_dot, present=present)
    return [None] * (3 + len(p_dot)) + _transposed([c for c, here in zip(cots[:2], delta_present) if here],
                                                   delta)


def _backward_jvp(primals, tangents):
    results = backward_p.bind(*primals)
    linear = (tangents[0], tangents[1], tangents[3])  # rstd's tangent: see the module docstring
    present = _present(linear)
    if not any(present):
        return results, [_zero_like(r) for r in results]
    return results, backward_tangent_p.bind(*primals, *_nonzero(linear), present=present)


def _backward_tangent_transpose(cotangents, x, w, rstd, dy, *linear, present):
    cot_dx, cot_dw = cotangents
    cot_present = _present(cotangents)
    if not any(cot_present):
        return [None] * (4 + len(linear))
    cots = backward_backward_p.bind(x, w, rstd, dy, *_nonzero(cotangents), present=cot_present)
    # (H_dy c, J c): cotangents of ṗ = (ẋ, ẇ) and of dẏ, for the slots this call carries.
    return [None] * 4 + _transposed([c for c, here in zip(cots, present) if here], linear)


def _third_order(*args, **params):
    raise NotImplementedError(BEYOND_SECOND_ORDER)


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_jvps[forward_tangent_p] = _forward_tangent_jvp
ad.primitive_transposes[forward_tangent_p] = _forward_tangent_transpose
ad.primitive_jvps[forward_second_p] = _third_order
ad.primitive_transposes[forward_second_p] = _forward_second_transpose
ad.primitive_jvps[backward_p] = _backward_jvp
ad.primitive_jvps[backward_tangent_p] = _third_order
ad.primitive_transposes[backward_tangent_p] = _backward_tangent_transpose
ad.primitive_jvps[backward_backward_p] = _third_order
