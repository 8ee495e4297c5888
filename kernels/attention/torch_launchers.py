"""Attention's launchers on torch tensors: each builds (or finds) its plan and runs it with the
torch launcher (``theria_kernels._launch_torch``). ``theria_torch`` calls them, and so does the
JAX bridge on DLPack views of JAX's buffers.

Every tensor is (B, H, T, D) with unit stride on D (any other strides, e.g. a transposed view of a
(B, T, H, D) buffer); query-shaped tensors are indexed with q's strides and key-shaped ones with
k's, so an input laid out differently is copied once into that layout. Outputs may be
preallocated (the JAX bridge passes JAX's own buffers) and must then share the layout; row
statistics (lse and its cotangents) are contiguous (B, H, T_q).

Variable-length batches (flash-attn's varlen interface): every launcher also takes the keywords
``cu_seqlens_q``, ``cu_seqlens_k`` (int32, shape (N + 1,), on the tensors' device: sequence b is
rows cu[b]:cu[b + 1] along T) and ``max_seqlen_q``, ``max_seqlen_k`` (ints, at least the longest
sequence: they size the grid). The tensors are then (B, H, total, D) views of packed buffers,
B = 1 except under vmap (every entry packed alike). The launchers check shapes and types only; the
values of cu_seqlens (start 0, non-decreasing, end at total) need a host read, which the adapters
do once per call (``validate_cu_seqlens_values``).
"""

from __future__ import annotations

import torch

from theria_kernels._common import dtype_name, multiprocessor_count
from theria_kernels._contracts import AttentionParams, is_interpreter, validate_cu_seqlens
from theria_kernels._launch_torch import run_plan
from theria_kernels.attention._launch import (
    AttentionCall,
    Device,
    backward_backward_plan,
    backward_plan,
    forward_plan,
)


def row_stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and the other per-row statistics: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_DEVICES: dict = {}


def _tf32(t: torch.Tensor) -> bool:
    """Whether the kernels may take ``t``'s float32 products in tf32 (torch's ``allow_tf32``)."""
    return t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32


def _device(t: torch.Tensor) -> Device:
    tf32 = _tf32(t)
    key = (t.device, tf32)
    found = _DEVICES.get(key)
    if found is None:
        major, minor = torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)
        found = _DEVICES[key] = Device(multiprocessor_count(t.device), is_interpreter(), tf32, 10 * major + minor)
    return found


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides on every dimension longer than 1 (strides of unit dims are never used)."""
    if a.stride() == b.stride():  # the common case, in one comparison
        return a.shape == b.shape
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _in_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s dtype and layout, copied only if it is not already."""
    if t.dtype == ref.dtype and _same_layout(t, ref):
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=ref.dtype, device=ref.device).copy_(t)


def _row_stat_input(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    dtype = row_stat_dtype(q.dtype)
    if t.dtype == dtype and t.is_contiguous():  # as the forward saved it: no dispatcher round trips
        return t
    return t.to(dtype).contiguous()


def varlen_keywords(q, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> dict:
    """The launchers' varlen keywords, checked without a host read (types, shapes, dtypes, devices)
    and made contiguous; {} for a fixed-length call. The torch adapter calls it first too."""
    given = [x is not None for x in (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)]
    if not any(given):
        return {}
    if not all(given):
        raise ValueError("variable-length attention needs all of cu_seqlens_q, cu_seqlens_k, max_seqlen_q, "
                         "max_seqlen_k")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(cu).__name__}")
    validate_cu_seqlens(cu_seqlens_q.shape, cu_seqlens_k.shape, (dtype_name(cu_seqlens_q.dtype),
                        dtype_name(cu_seqlens_k.dtype)), max_seqlen_q, max_seqlen_k)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    return dict(cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous(),
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """q or k as the kernels take it: as it is when its last stride is 1 and no stride is 0, else a
    contiguous copy. Outputs are allocated in q's and k's layouts, so those must not overlap
    themselves (a broadcast, e.g. from vmap over k alone, has stride 0). The operators' fakes
    follow the same rule."""
    return t if t.stride(-1) == 1 and 0 not in t.stride() else t.contiguous()


# Calls whose every tensor the kernels take as it is (no copy into q's or k's layout, no dtype
# change; preallocated outputs checked), keyed by each tensor's name, shape, strides and dtype, the
# params and the tf32 mode: a training loop repeats a few calls, and checking each tensor against
# q's or k's layout costs more than reading its metadata once for the key.
_AS_GIVEN: dict = {}


def _prepare(q, k, params: AttentionParams, query_like: dict, key_like: dict, rows: dict, outputs: dict,
             varlen: dict) -> tuple[AttentionCall, dict]:
    """The plan's call and its tensors by name: q and k with unit last stride, the other inputs
    moved into q's / k's layout, row statistics contiguous in their dtype, preallocated outputs
    checked."""
    if varlen:
        return _prepare_checked(q, k, params, query_like, key_like, rows, outputs, varlen)
    tensors = {"q": q, "k": k}
    for given in (query_like, key_like, rows, outputs):
        for name, t in given.items():
            if t is not None:
                tensors[name] = t
    key = (params, _tf32(q), q.device, *[(name, t.shape, t.stride(), t.dtype) for name, t in tensors.items()])
    call = _AS_GIVEN.get(key)
    if call is not None:
        return call, tensors
    call, checked = _prepare_checked(q, k, params, query_like, key_like, rows, outputs, varlen)
    if all(checked[name] is t for name, t in tensors.items()):
        _AS_GIVEN[key] = call
    return call, checked


def _prepare_checked(q, k, params: AttentionParams, query_like: dict, key_like: dict, rows: dict, outputs: dict,
                     varlen: dict) -> tuple[AttentionCall, dict]:
    """``_prepare``, checking and converting every tensor."""
    q, k = kernel_layout(q), kernel_layout(k)
    lengths = None
    if varlen:
        varlen = varlen_keywords(q, **varlen)
        lengths = (varlen["max_seqlen_q"], varlen["max_seqlen_k"], varlen["cu_seqlens_q"].numel() - 1)
    call = _call(q, k, params, lengths)
    tensors = {"q": q, "k": k}
    tensors.update((name, _in_layout(t, q)) for name, t in query_like.items() if t is not None)
    tensors.update((name, _in_layout(t, k)) for name, t in key_like.items() if t is not None)
    tensors.update((name, _row_stat_input(t, q)) for name, t in rows.items() if t is not None)
    if varlen:
        tensors.update(cu_seqlens_q=varlen["cu_seqlens_q"], cu_seqlens_k=varlen["cu_seqlens_k"])
    for name, given in outputs.items():
        if given is not None:
            _check_output(given, name, q, k)
            tensors[name] = given
    return call, tensors


_CALLS: dict = {}


def _call(q: torch.Tensor, k: torch.Tensor, params: AttentionParams, lengths) -> AttentionCall:
    """The ``AttentionCall`` of these tensors, found by a key of plain tuples: building and hashing
    the frozen dataclass on every call costs more than the lookup (calls of one shape repeat)."""
    key = (q.shape, q.stride(), k.shape, k.stride(), q.dtype, q.device, params, lengths, _tf32(q))
    found = _CALLS.get(key)
    if found is None:
        found = _CALLS[key] = AttentionCall(tuple(q.shape), q.stride(), tuple(k.shape), k.stride(),
                                            dtype_name(q.dtype), params, _device(q), lengths)
    return found


# The tensors each kind of sweep loads through tensor descriptors (``AttentionCall.tma``).
_FORWARD_DESCRIBED, _BACKWARD_DESCRIBED = ("k", "v"), ("q", "k", "v", "d_out")
_JVP_DESCRIBED = _FORWARD_DESCRIBED + ("k_dot", "v_dot")
_SECOND_DESCRIBED = _JVP_DESCRIBED + ("k_y", "v_y")


def _aligned(tensors: dict, names=_FORWARD_DESCRIBED) -> bool:
    """Whether the data of the tensors ``names`` start at 16-byte boundaries, which tensor
    descriptors need (``AttentionCall.tma``); a view that starts inside a row does not."""
    return all(tensors[name].data_ptr() % 16 == 0 for name in names)


_OUTPUT_LIKE = {"out": "q", "dq": "q", "cot_q": "q", "cot_d_out": "q", "out_dot": "q", "out_second": "q",
                "dk": "k", "dv": "k", "cot_k": "k", "cot_v": "k"}


def _check_output(given: torch.Tensor, name: str, q: torch.Tensor, k: torch.Tensor) -> None:
    like = _OUTPUT_LIKE.get(name)
    if like is None:
        if not given.is_contiguous() or given.shape != q.shape[:3]:
            raise ValueError(f"preallocated {name} must be a contiguous {tuple(q.shape[:3])} row statistic")
        return
    ref = q if like == "q" else k
    if not _same_layout(given, ref) or given.dtype != ref.dtype:
        raise ValueError(f"preallocated {name} must have the dtype and layout of {like}")


_PLANS: dict = {}


def clear_plans() -> None:
    """Forget every cached plan (after changing a tile table or the grouped-query split rule)."""
    _PLANS.clear()
    _AS_GIVEN.clear()
    for builder in (forward_plan, backward_plan, backward_backward_plan):
        builder.cache_clear()


def _plan(builder, call: AttentionCall, *flags):
    """``builder(call, *flags)``, found by the identity of the cached call (``_call``), so a call of a
    known shape skips hashing the call's dataclass."""
    key = (builder, id(call), *flags)
    found = _PLANS.get(key)
    if found is None:
        found = _PLANS[key] = builder(call, *flags)
    return found


def attention_forward(q, k, v, params: AttentionParams, *, out=None, lse=None, row_slopes=None, **varlen):
    """Fused attention forward.

    Arguments:
        q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D), H % H_kv == 0; fp16, bf16, fp32 or fp64.
        row_slopes: with ``params.alibi``, each query row's ALiBi slope, (B, H, T_q) like lse
            (docs/theory/attention_derivatives.md §8), as every launcher takes it.
        varlen: cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k for packed sequences
            (T = total tokens; see the module docstring), as every launcher takes them.
    Returns:
        out (B, H, T_q, D) in q's dtype; lse (B, H, T_q) in float32 (float64 for fp64 inputs),
        +inf on rows that see no key.
    """
    call, tensors = _prepare(q, k, params, {}, {"v": v}, {"row_slopes": row_slopes}, {"out": out, "lse": lse}, varlen)
    return run_plan(_plan(forward_plan, call, False, False, _aligned(tensors)), tensors)


def attention_jvp(q, k, v, q_dot, k_dot, v_dot, params: AttentionParams, *, out=None, lse=None,
                  out_dot=None, lse_dot=None, row_slopes=None, **varlen):
    """Forward and forward-mode derivative in one sweep: returns (out, lse, out_dot, lse_dot),
    the tangents for input tangents (q_dot, k_dot, v_dot) shaped like (q, k, v)."""
    call, tensors = _prepare(q, k, params, {"q_dot": q_dot}, {"v": v, "k_dot": k_dot, "v_dot": v_dot},
                             {"row_slopes": row_slopes},
                             dict(out=out, lse=lse, out_dot=out_dot, lse_dot=lse_dot), varlen)
    return run_plan(_plan(forward_plan, call, True, False, _aligned(tensors, _JVP_DESCRIBED)), tensors)


def attention_tangent(q, k, v, out, lse, q_dot, k_dot, v_dot, params: AttentionParams, *, out_dot=None,
                      lse_dot=None, row_slopes=None, **varlen):
    """The forward-mode derivative alone, from a forward's (out, lse) of the same (q, k, v):
    returns (out_dot, lse_dot) for input tangents (q_dot, k_dot, v_dot), in one sweep that
    reads the forward's results instead of recomputing them (``forward_plan``'s
    ``given_primal``)."""
    call, tensors = _prepare(q, k, params, {"out": out, "q_dot": q_dot}, {"v": v, "k_dot": k_dot, "v_dot": v_dot},
                             {"lse": lse, "row_slopes": row_slopes}, dict(out_dot=out_dot, lse_dot=lse_dot), varlen)
    return run_plan(_plan(forward_plan, call, True, False, _aligned(tensors, _JVP_DESCRIBED), True), tensors)


def attention_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, params: AttentionParams, *,
                             out_second=None, lse_second=None, row_slopes=None, **varlen):
    """Second directional derivative of (out, lse) along x_dot = (q_dot, k_dot, v_dot) and
    y = (q_y, k_y, v_y), both shaped like (q, k, v): f''(x)[x_dot, y], symmetric and bilinear in
    the two directions (the forward-over-forward derivative without its linear part J ẍ).

    Returns:
        (out_second, lse_second) shaped like (out, lse); zero on rows that see no key.
    """
    call, tensors = _prepare(q, k, params, {"q_dot": q_dot, "q_y": q_y},
                             {"v": v, "k_dot": k_dot, "v_dot": v_dot, "k_y": k_y, "v_y": v_y}, {"row_slopes": row_slopes},
                             dict(out_second=out_second, lse_second=lse_second), varlen)
    return run_plan(_plan(forward_plan, call, True, True, _aligned(tensors, _SECOND_DESCRIBED)), tensors)


def attention_backward(q, k, v, out, lse, d_out, d_lse, params: AttentionParams, *, dq=None, dk=None, dv=None,
                       row_slopes=None, **varlen):
    """Gradients (dq, dk, dv) of <d_out, out> + <d_lse, lse>; ``d_lse`` may be None (zero)."""
    call, tensors = _prepare(q, k, params, {"out": out, "d_out": d_out}, {"v": v},
                             {"lse": lse, "d_lse": d_lse, "row_slopes": row_slopes}, dict(dq=dq, dk=dk, dv=dv), varlen)
    return run_plan(_plan(backward_plan, call, d_lse is not None, _aligned(tensors, _BACKWARD_DESCRIBED)), tensors)


def attention_backward_backward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv,
                                params: AttentionParams, *, d_out_dot=None, d_lse_dot=None, dq=None, cot_q=None,
                                cot_k=None, cot_v=None, cot_d_out=None, cot_d_lse=None, row_slopes=None,
                                wants_cot_d_out=True, **varlen):
    """VJP of the backward (q, k, v, d_out, d_lse) ↦ (dq, dk, dv) for cotangents
    (cot_dq, cot_dk, cot_dv); ``d_lse`` and any cotangent may be None (zero); out and lse count as
    functions of q, k, v.

    With ``d_out_dot`` (and optionally ``d_lse_dot``: None is zero) the first three outputs also hold
    the backward for that second cotangent: for (cot_dq, cot_dk, cot_dv) = (q̇, k̇, v̇) they are the
    tangent of (dq, dk, dv) along (q̇, k̇, v̇, d_out_dot, d_lse_dot), in one pair of launches.

    ``dq`` (optional, an input here) is ``attention_backward``'s dq for the same q, k, v, out, lse,
    d_out and d_lse: where the row kernel sweeps the keys once it reads dS K from it instead of
    summing it, one T×T GEMM a tile fewer (theory §4.7). A dq of other inputs gives wrong numbers.

    Returns:
        (cot_q, cot_k, cot_v, cot_d_out, cot_d_lse), shaped like (q, k, v, out, lse); cot_d_out is
        None with ``wants_cot_d_out=False`` (d_out is the caller's constant), which spares the
        row sweep one T×T GEMM a tile.
    """
    call, tensors = _prepare(q, k, params, {"out": out, "d_out": d_out, "cot_dq": cot_dq, "d_out_dot": d_out_dot,
                                            "dq": dq},
                             {"v": v, "cot_dk": cot_dk, "cot_dv": cot_dv},
                             {"lse": lse, "d_lse": d_lse, "d_lse_dot": d_lse_dot, "row_slopes": row_slopes},
                             dict(cot_q=cot_q, cot_k=cot_k, cot_v=cot_v, cot_d_out=cot_d_out,
                                  cot_d_lse=cot_d_lse), varlen)
    if "d_lse_dot" in tensors and "d_out_dot" not in tensors:
        raise ValueError("d_lse_dot needs d_out_dot (pass zeros for a zero d_out_dot)")
    given = frozenset(name for name in ("d_lse", "cot_dq", "cot_dk", "cot_dv", "d_out_dot", "d_lse_dot", "dq")
                      if name in tensors)
    plan = _plan(backward_backward_plan, call, given, _aligned(tensors, _BACKWARD_DESCRIBED), wants_cot_d_out)
    found = run_plan(plan, tensors)
    return found if wants_cot_d_out else (*found[:3], None, found[3])
