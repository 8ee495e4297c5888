"""PyTorch RMSNorm over the fused kernels, with every derivative the kernels provide.

Autograd Functions, each calling one launcher of ``theria_kernels.rmsnorm`` through its entry in
``theria_torch._ops`` (the registered operator ``torch.ops.theria.rmsnorm_*`` under ``torch.compile``,
so the compiler traces one opaque call, not the launcher's Python):

* ``_RMSNorm``: (x, weight) -> (y, rstd). Its backward is ``_RMSNormBackward`` and its forward-mode
  rule is ``_RMSNormJVP``, both Functions themselves, so they can be differentiated again.
* ``_RMSNormBackward``: (x, weight, rstd, dy) -> (dx, dweight). Reverse mode: the double-backward
  kernel. Forward mode (forward-over-reverse, jvp∘grad): the backward is the gradient
  g = ∇_{(x,w)} <dy, y>, so ∂g/∂(x, w) is a symmetric Hessian and ∂g/∂dy = Jᵀ, giving
  tangent(g) = doublebackward(cot = (x_dot, w_dot))[:2] + backward(dy_dot).
* ``_RMSNormJVP``: (x, weight, x_dot, weight_dot) -> (y_dot, rstd). y_dot = J (x_dot, w_dot) is
  linear in the tangents, so its VJP with cotangent c is backward(c) for the tangents and, for
  (x, w), the double backward with dy = c and cot = (x_dot, w_dot) (reverse over forward). Its
  own JVP (forward over forward) is the same map on the tangents' tangents plus the second
  directional derivative ``_RMSNormForwardSecond``.
* ``_RMSNormDoubleBackward`` and ``_RMSNormForwardSecond``: second-order kernels; differentiating
  them (third order) raises.

``rstd`` travels as an input of the derivative Functions but is never differentiated: the
kernels treat it as the function of x it is. Every Function has a ``vmap`` rule that folds the
mapped dimension into the kernels' row groups (``theria_kernels.rmsnorm``: weight (*G, N),
x (*G, ..., N)), so vmap over inputs, cotangents or weights is one launch.
"""

from __future__ import annotations

import torch
from theria_torch._ops import Function

from theria_kernels import _contracts
from theria_kernels._common import is_interpreter
from theria_kernels.rmsnorm import BEYOND_SECOND_ORDER, check_arguments
from theria_torch._ops import (
    rmsnorm_backward,
    rmsnorm_backward_backward,
    rmsnorm_forward,
    rmsnorm_forward_second,
    rmsnorm_jvp,
)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch RMSNorm in the inputs' dtype (the ground truth; every order via autograd).

    Arguments:
        x: (..., N). weight: (N,). eps: added to mean(x²).
    Returns:
        y = x · rsqrt(mean(x², -1) + eps) · weight, shaped like x.
    """
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
            backend: str = "triton_full_fused") -> torch.Tensor:
    """RMSNorm over the last dimension with a learned scale, differentiable to second order.

    Works under ``torch.autograd`` (``create_graph=True``, gradgradcheck), ``torch.autograd.forward_ad``
    and ``torch.func`` (grad, jvp, vjp, vmap over x, weight or both, and every second-order
    composition, ``torch.func.hessian`` included); third derivatives raise ``NotImplementedError``.

    Arguments:
        x: (..., N) float16/bfloat16/float32/float64; rows = prod(leading dims).
        weight: (N,), same dtype and device as x.
        eps: added to mean(x²) inside the square root (a Python float ≥ 0).
        backend: "triton_full_fused" (the fused kernels; CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1) or "reference" (plain PyTorch, any device, any order).
    Returns:
        y = x · rsqrt(mean(x², -1) + eps) · weight, shaped like x, in x's dtype.
    Raises:
        ValueError / TypeError naming the offending tensor (see docs/design/rmsnorm.md).
    """
    for name, tensor in (("x", x), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"rmsnorm: {_contracts.array_type_error(name, tensor, 'torch')}")
    check_arguments(x.shape, x.dtype, weight.shape, weight.dtype, eps, backend=backend)
    if weight.device != x.device:
        raise ValueError(f"rmsnorm: weight is on {weight.device} but x is on {x.device}; "
                         "put both on one device")
    if backend == "reference":
        return rmsnorm_reference(x, weight, eps)
    if x.device.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"rmsnorm: x is on {x.device}, but the Triton kernels need a CUDA device; use "
            "backend=\"reference\", or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU "
            "interpreter (slow)"
        )
    if x.device.type != "cuda":
        _contracts.check_interpreter_in_time()
    y, _ = _RMSNorm.apply(x, weight, float(eps))
    return y


def _vmap_folded(function, info, in_dims, *args):
    """vmap rule shared by all the Functions: every tensor argument gets the mapped dimension
    in front (unmapped ones are expanded), which makes it a leading row-group dimension of the
    kernels (weight (B, *G, N), x (B, *G, ..., N)); every output then has it in front."""
    folded = []
    for arg, dim in zip(args, in_dims):
        if not isinstance(arg, torch.Tensor):
            folded.append(arg)
        elif dim is None:
            folded.append(arg.expand(info.batch_size, *arg.shape))
        else:
            folded.append(arg.movedim(dim, 0))
    outputs = function.apply(*folded)
    if isinstance(outputs, torch.Tensor):
        return outputs, 0
    return outputs, tuple(0 for _ in outputs)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class _RMSNorm(Function):
    @staticmethod
    def forward(x, weight, eps):
        return rmsnorm_forward(x, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.save_for_forward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, _d_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _RMSNormBackward.apply(x, weight, rstd, dy)
        return dx, dweight, None

    @staticmethod
    def jvp(ctx, x_dot, weight_dot, _eps_dot):
        x, weight = ctx.saved_tensors
        y_dot, _ = _RMSNormJVP.apply(x, weight, x_dot, weight_dot, ctx.eps)
        return y_dot, None

    @staticmethod
    def vmap(info, in_dims, x, weight, eps):
        return _vmap_folded(_RMSNorm, info, in_dims, x, weight, eps)


class _RMSNormJVP(Function):
    @staticmethod
    def forward(x, weight, x_dot, weight_dot, eps):
        return rmsnorm_jvp(x, weight, x_dot, weight_dot, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, x_dot, weight_dot, eps = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd, x_dot, weight_dot)
        ctx.save_for_forward(x, weight, rstd, x_dot, weight_dot)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, d_y_dot, _d_rstd):
        x, weight, rstd, x_dot, weight_dot = ctx.saved_tensors
        d_x, d_weight, _ = _RMSNormDoubleBackward.apply(x, weight, rstd, d_y_dot, x_dot, weight_dot)
        d_x_dot, d_weight_dot = _RMSNormBackward.apply(x, weight, rstd, d_y_dot)
        return (d_x, d_weight, d_x_dot if x_dot is not None else None,
                d_weight_dot if weight_dot is not None else None, None)

    @staticmethod
    def jvp(ctx, x_dot2, weight_dot2, x_dot_dot, weight_dot_dot, _eps_dot):
        x, weight, rstd, x_dot, weight_dot = ctx.saved_tensors
        y_dot_dot = None
        if x_dot_dot is not None or weight_dot_dot is not None:
            y_dot_dot, _ = _RMSNormJVP.apply(x, weight, x_dot_dot, weight_dot_dot, ctx.eps)
        if x_dot2 is not None or weight_dot2 is not None:
            second = _RMSNormForwardSecond.apply(x, weight, rstd, x_dot, weight_dot, x_dot2, weight_dot2)
            y_dot_dot = _add(y_dot_dot, second)
        return (y_dot_dot if y_dot_dot is not None else torch.zeros_like(x)), None

    @staticmethod
    def vmap(info, in_dims, x, weight, x_dot, weight_dot, eps):
        return _vmap_folded(_RMSNormJVP, info, in_dims, x, weight, x_dot, weight_dot, eps)


class _RMSNormBackward(Function):
    @staticmethod
    def forward(x, weight, rstd, dy):
        return rmsnorm_backward(x, weight, rstd, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, cot_dx, cot_dweight):
        x, weight, rstd, dy = ctx.saved_tensors
        cot_x, cot_weight, cot_dy = _RMSNormDoubleBackward.apply(x, weight, rstd, dy, cot_dx, cot_dweight)
        return cot_x, cot_weight, None, cot_dy

    @staticmethod
    def jvp(ctx, x_dot, weight_dot, _rstd_dot, dy_dot):
        x, weight, rstd, dy = ctx.saved_tensors
        dx_dot = dweight_dot = None
        if x_dot is not None or weight_dot is not None:
            dx_dot, dweight_dot, _ = _RMSNormDoubleBackward.apply(x, weight, rstd, dy, x_dot, weight_dot)
        if dy_dot is not None:
            dx_lin, dweight_lin = _RMSNormBackward.apply(x, weight, rstd, dy_dot)
            dx_dot, dweight_dot = _add(dx_dot, dx_lin), _add(dweight_dot, dweight_lin)
        if dx_dot is None:
            dx_dot, dweight_dot = torch.zeros_like(x), torch.zeros_like(weight)
        return dx_dot, dweight_dot

    @staticmethod
    def vmap(info, in_dims, x, weight, rstd, dy):
        return _vmap_folded(_RMSNormBackward, info, in_dims, x, weight, rstd, dy)


class _SecondOrder(Function):
    """Base of the second-order Functions: any derivative of them is third order."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_cotangents):
        raise NotImplementedError(BEYOND_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *_tangents):
        raise NotImplementedError(BEYOND_SECOND_ORDER)


class _RMSNormDoubleBackward(_SecondOrder):
    @staticmethod
    def forward(x, weight, rstd, dy, cot_dx, cot_dweight):
        return rmsnorm_backward_backward(x, weight, rstd, dy, cot_dx, cot_dweight)

    @staticmethod
    def vmap(info, in_dims, x, weight, rstd, dy, cot_dx, cot_dweight):
        return _vmap_folded(_RMSNormDoubleBackward, info, in_dims, x, weight, rstd, dy, cot_dx, cot_dweight)


class _RMSNormForwardSecond(_SecondOrder):
    @staticmethod
    def forward(x, weight, rstd, x_dot, weight_dot, x_dot2, weight_dot2):
        return rmsnorm_forward_second(x, weight, rstd, x_dot, weight_dot, x_dot2, weight_dot2)

    @staticmethod
    def vmap(info, in_dims, x, weight, rstd, x_dot, weight_dot, x_dot2, weight_dot2):
        return _vmap_folded(_RMSNormForwardSecond, info, in_dims, x, weight, rstd, x_dot, weight_dot,
                            x_dot2, weight_dot2)
