"""RMSNorm's launchers on torch tensors: each checks its tensors, finds its plan and runs it with
the torch launcher (``theria_kernels._launch_torch``). ``theria_torch`` calls them."""

from __future__ import annotations

import torch

from theria_kernels._common import accumulator_dtype, dtype_name, multiprocessor_count, output_buffer
from theria_kernels._contracts import is_interpreter
from theria_kernels._launch_torch import launch_one, run_plan
from theria_kernels.rmsnorm._launch import (
    DEFAULT_TUNING,
    RMSNormCall,
    RMSNormDevice,
    RMSNormTuning,
    backward_backward_plan,
    backward_plan,
    column_sum_launch,
    forward_plan,
    forward_second_plan,
)

_DEVICES: dict = {}


def _device(x: torch.Tensor) -> RMSNormDevice:
    found = _DEVICES.get(x.device)
    if found is None:
        shared = (torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
                  if x.is_cuda and not is_interpreter() else 2**62)
        found = _DEVICES[x.device] = RMSNormDevice(multiprocessor_count(x.device), shared)
    return found


def _call(x: torch.Tensor, weight: torch.Tensor, tuning: RMSNormTuning) -> RMSNormCall:
    return RMSNormCall(tuple(x.shape), tuple(weight.shape), dtype_name(x.dtype), _device(x), tuning)


def _check_like(name: str, tensor: torch.Tensor, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Tangents and cotangents must match their primal exactly; returned contiguous."""
    if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(
            f"rmsnorm kernels: {name} must match {like_name} ({like.dtype}, {tuple(like.shape)}, "
            f"{like.device}), got ({tensor.dtype}, {tuple(tensor.shape)}, {tensor.device})"
        )
    return tensor.contiguous()


def _check_rstd(rstd: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    acc = accumulator_dtype(x.dtype)
    if rstd.shape != x.shape[:-1] or rstd.dtype != acc or rstd.device != x.device:
        raise ValueError(
            f"rmsnorm kernels: rstd must be the forward's ({acc}, {tuple(x.shape[:-1])}, {x.device}), "
            f"got ({rstd.dtype}, {tuple(rstd.shape)}, {rstd.device})"
        )
    return rstd.contiguous()


def _optional(tensors: dict, **given) -> dict:
    tensors.update((name, t) for name, t in given.items() if t is not None)
    return tensors


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                    y: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
                    tuning: RMSNormTuning = DEFAULT_TUNING):
    """y = x · rsqrt(mean(x², -1) + eps) · weight, and the per-row rstd.

    Arguments:
        x: (*G, ..., N), float16/bfloat16/float32/float64.
        weight: (*G, N), x's dtype (G = () for one weight shared by all rows).
        eps: added to mean(x²) inside the square root.
        y, rstd: optional preallocated outputs (contiguous), written in place.
    Returns:
        (y, rstd): y like x; rstd of shape x.shape[:-1] in float32 (float64 for float64 x).
    """
    return rmsnorm_jvp(x, weight, None, None, eps, y=y, rstd=rstd, tuning=tuning)[:2]


def rmsnorm_jvp(x: torch.Tensor, weight: torch.Tensor, x_dot: torch.Tensor | None,
                weight_dot: torch.Tensor | None, eps: float, *,
                y: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
                y_dot: torch.Tensor | None = None, tuning: RMSNormTuning = DEFAULT_TUNING):
    """Forward and forward-mode derivative in one sweep.

    Arguments:
        x, weight, eps: as in ``rmsnorm_forward``.
        x_dot: tangent of x (x's shape), or None for zero.
        weight_dot: tangent of weight (weight's shape), or None for zero.
        y, rstd, y_dot: optional preallocated outputs. y_dot is only written (and only
        returned non-None) when a tangent is given.
    Returns:
        (y, rstd, y_dot) with y_dot = ∂y/∂x · x_dot + ∂y/∂weight · weight_dot, like x.
    """
    call = _call(x, weight, tuning)
    has_tangent = x_dot is not None or weight_dot is not None
    tensors = {"x": x.contiguous(), "weight": weight.contiguous(),
               "y": output_buffer(y, "y", x.shape, x.dtype, x.device),
               "rstd": output_buffer(rstd, "rstd", x.shape[:-1], accumulator_dtype(x.dtype), x.device)}
    if has_tangent:
        tensors["y_dot"] = output_buffer(y_dot, "y_dot", x.shape, x.dtype, x.device)
    _optional(tensors, x_dot=x_dot if x_dot is None else _check_like("x_dot", x_dot, x, "x"),
              weight_dot=weight_dot if weight_dot is None else _check_like("weight_dot", weight_dot, weight, "weight"))
    outputs = run_plan(forward_plan(call, float(eps), x_dot is not None, weight_dot is not None), tensors)
    return (*outputs, None) if not has_tangent else outputs


def rmsnorm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, *,
                     dx: torch.Tensor | None = None, dweight: torch.Tensor | None = None,
                     tuning: RMSNormTuning = DEFAULT_TUNING):
    """Reverse-mode derivative (VJP) of rmsnorm with cotangent dy.

    Arguments:
        x, weight: the forward's inputs. rstd: the forward's saved rstd (x.shape[:-1]).
        dy: cotangent of y (x's shape and dtype).
        dx, dweight: optional preallocated outputs.
    Returns:
        (dx, dweight): dx like x; dweight like weight (summed over each group's rows).
    """
    call = _call(x, weight, tuning)
    tensors = {"x": x.contiguous(), "weight": weight.contiguous(), "rstd": _check_rstd(rstd, x),
               "dy": _check_like("dy", dy, x, "x"),
               "dx": output_buffer(dx, "dx", x.shape, x.dtype, x.device),
               "dweight": output_buffer(dweight, "dweight", weight.shape, weight.dtype, weight.device)}
    return run_plan(backward_plan(call), tensors)


def rmsnorm_backward_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                              cot_dx: torch.Tensor | None, cot_dweight: torch.Tensor | None, *,
                              cot_x: torch.Tensor | None = None, cot_weight: torch.Tensor | None = None,
                              cot_dy: torch.Tensor | None = None, tuning: RMSNormTuning = DEFAULT_TUNING):
    """VJP of the backward, (x, weight, dy) ↦ (dx, dweight), with cotangents (cot_dx, cot_dweight).

    rstd is treated as the function of x it is (total derivative), so no cotangent flows to it.

    Arguments:
        x, weight, rstd, dy: as in ``rmsnorm_backward``.
        cot_dx: cotangent of dx (x's shape), or None for zero.
        cot_dweight: cotangent of dweight (weight's shape), or None for zero.
        cot_x, cot_weight, cot_dy: optional preallocated outputs.
    Returns:
        (cot_x, cot_weight, cot_dy), shaped like x, weight and dy.
    """
    call = _call(x, weight, tuning)
    tensors = {"x": x.contiguous(), "weight": weight.contiguous(), "rstd": _check_rstd(rstd, x),
               "dy": _check_like("dy", dy, x, "x"),
               "cot_x": output_buffer(cot_x, "cot_x", x.shape, x.dtype, x.device),
               "cot_weight": output_buffer(cot_weight, "cot_weight", weight.shape, weight.dtype, weight.device),
               "cot_dy": output_buffer(cot_dy, "cot_dy", x.shape, x.dtype, x.device)}
    _optional(tensors, cot_dx=cot_dx if cot_dx is None else _check_like("cot_dx", cot_dx, x, "x"),
              cot_dweight=cot_dweight if cot_dweight is None else _check_like("cot_dweight", cot_dweight, weight,
                                                                               "weight"))
    return run_plan(backward_backward_plan(call, cot_dx is not None, cot_dweight is not None), tensors)


def rmsnorm_forward_second(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                           x_dot: torch.Tensor | None, weight_dot: torch.Tensor | None,
                           x_dot2: torch.Tensor | None, weight_dot2: torch.Tensor | None, *,
                           y_ddot: torch.Tensor | None = None, tuning: RMSNormTuning = DEFAULT_TUNING):
    """Second directional derivative f''(x, weight)[(x_dot, weight_dot), (x_dot2, weight_dot2)].

    Forward over forward (jvp of jvp) needs it; symmetric in the two directions.

    Arguments:
        x, weight, rstd: as in ``rmsnorm_backward``.
        x_dot, x_dot2: tangents of x (x's shape), or None for zero.
        weight_dot, weight_dot2: tangents of weight (weight's shape), or None for zero.
        y_ddot: optional preallocated output.
    Returns:
        y_ddot, like x.
    """
    call = _call(x, weight, tuning)
    tensors = {"x": x.contiguous(), "weight": weight.contiguous(), "rstd": _check_rstd(rstd, x),
               "y_ddot": output_buffer(y_ddot, "y_ddot", x.shape, x.dtype, x.device)}
    directions = {"x_dot": (x_dot, x, "x"), "weight_dot": (weight_dot, weight, "weight"),
                  "x_dot2": (x_dot2, x, "x"), "weight_dot2": (weight_dot2, weight, "weight")}
    for name, (t, like, like_name) in directions.items():
        if t is not None:
            tensors[name] = _check_like(name, t, like, like_name)
    present = tuple(t is not None for t, _, _ in directions.values())
    return run_plan(forward_second_plan(call, present), tensors)[0]


def _sum_partials(partial: torch.Tensor, out: torch.Tensor) -> None:
    """out (*G, N) = the sum over P of partial (G, P, N): the column sum every weight-shaped
    reduction ends with, launched on its own (tests give it more partial rows than one tile)."""
    launch_one(column_sum_launch(*partial.shape, "partial", "out"), {"partial": partial, "out": out})
