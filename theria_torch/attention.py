"""PyTorch adapter for the fused attention kernels: autograd Functions and the public API.

Five Functions, each calling the launchers of ``theria_kernels.attention`` through the entry points
of ``theria_torch._ops`` (registered operators, so that ``torch.compile`` traces them):

* ``_Attention``: (q, k, v) ↦ (out, lse); backward through ``_AttentionBackward``, forward-mode
  through ``_AttentionTangent`` on the forward's own (out, lse).
* ``_AttentionBackward``: (q, k, v, d_out, d_lse) ↦ (dq, dk, dv), so ``create_graph=True`` works;
  its backward is the double-backward kernel, and its JVP (forward-over-reverse HVPs) follows from
  the symmetry of the Hessian: tangent = double_backward(cot = (q̇, k̇, v̇)) + backward(ḋO, ḋlse).
* ``_AttentionBackwardBackward``: the double backward; third order raises.
* ``_AttentionTangent``: the tangent map (q̇, k̇, v̇) ↦ (ȯut, l̇se) on the forward's (out, lse) (the
  tangent kernel, which does not recompute the primal), so reverse-over-forward works too; its own
  JVP (forward over forward) is the second-order forward kernel through ``_AttentionSecond``.
* ``_AttentionSecond``: the second directional derivative f''(x)[ẋ, y]; any further order raises.

Each Function's vmap rule (``_BatchFolding``) folds the vmapped dimension into B and applies the
Function once below the vmap, so every vmapped instance shares one launch and the launchers see
plain tensors.

``out`` and ``lse`` are handed to the backward Functions only as saved values: the kernels treat
them as functions of (q, k, v), so no gradient flows into them separately.

``flash_attn_varlen_func`` runs the same Functions on (1, H, total, D) views of packed
variable-length batches; its cu_seqlens and max lengths travel in the Functions' ``_ops.Static``
argument, next to the mask, and are never differentiated. So do flash-attn's score modifiers
(docs/theory/attention_derivatives.md §8): the cap in the ``AttentionParams``, ALiBi's slopes as
``row_slopes``, each query row's slope, (B, H, T_q) like lse.
"""

from __future__ import annotations

import math
import torch
from torch.utils.weak import WeakIdKeyDictionary

from theria_kernels import _contracts
from theria_kernels._common import dtype_name, is_interpreter
from theria_kernels.attention import (
    VMAP_CU_SEQLENS_ERROR,
    THIRD_ORDER_ERROR,
    AttentionParams,
    validate_attention_args,
    validate_cu_seqlens_values,
    validate_dropout,
)
from theria_kernels.attention.torch_launchers import row_stat_dtype, varlen_keywords
from theria_torch import _ops
from theria_torch.reference import attention_reference, varlen_attention_reference

def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class _BatchFolding(_ops.Function):
    """The Functions' vmap rule: every tensor argument leads with B and so does every output, so
    the vmapped dimension folds into B (``_ops.fold``) and the Function runs once on the folded
    tensors (flags pass as they are). An explicit rule rather than ``generate_vmap_rule``: the
    generated one wraps the Function in a new vmapped Function per call and leaves the fold to the
    operators' batching rules, which costs about twice the host time per call (a MAML meta-step
    makes dozens)."""

    @classmethod
    def vmap(cls, info, in_dims, *args):
        *tensors, static = args
        static_dims = _ops.Static(*in_dims[-1])
        if static_dims.cu_seqlens_q is not None or static_dims.cu_seqlens_k is not None:
            raise NotImplementedError(VMAP_CU_SEQLENS_ERROR)
        if static.row_slopes is not None:  # one slope per query row: folded like q
            static = static._replace(row_slopes=_ops.fold(static.row_slopes, static_dims.row_slopes, info.batch_size))
        outputs = cls.apply(*(t if isinstance(t, bool) else _ops.fold(t, d, info.batch_size)
                              for t, d in zip(tensors, in_dims)), static)
        return _ops.unfold(outputs, info.batch_size)


class _SecondOrderKernel(_BatchFolding):
    """A Function whose forward is a second-order kernel: differentiating it again is third order."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(THIRD_ORDER_ERROR)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(THIRD_ORDER_ERROR)


class _AttentionBackwardBackward(_SecondOrderKernel):
    """The double backward (cot_q, cot_k, cot_v, cot_d_out, cot_d_lse) for cotangents (cot_dq,
    cot_dk, cot_dv); with a second cotangent (d_out_dot, d_lse_dot) the first three also hold its
    backward (the tangent of the backward, in the same launches). Without ``wants_cot_d_out``
    cot_d_out is empty and its product is never formed. ``dq``, the backward's dq for these inputs
    (or None), spares the one row sweep its dS K product (theory §4.7)."""

    @staticmethod
    def forward(q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, d_out_dot, d_lse_dot, dq, wants_cot_d_out,
                static):
        return _ops.attention_backward_backward(
            q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, d_out_dot, d_lse_dot, dq, wants_cot_d_out,
            static)


class _AttentionBackward(_BatchFolding):
    @staticmethod
    def forward(q, k, v, out, lse, d_out, d_lse, static):
        return _ops.attention_backward(q, k, v, out, lse, d_out, d_lse, static)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, out, lse, d_out, d_lse, static = inputs
        # dq too, an output: the double backward's one row sweep reads dS K from it (theory §4.7).
        ctx.save_for_backward(q, k, v, out, lse, d_out, d_lse, output[0])
        ctx.save_for_forward(q, k, v, out, lse, d_out, d_lse, output[0])
        ctx.static = static
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, cot_dq, cot_dk, cot_dv):
        q, k, v, out, lse, d_out, d_lse, dq = ctx.saved_tensors
        # A d_out that nothing differentiates (a constant output weight) gets no cotangent: one
        # T×T product a tile less in the double backward's row sweep.
        wants_cot_d_out = ctx.needs_input_grad[5]
        cot_q, cot_k, cot_v, cot_d_out, cot_d_lse = _AttentionBackwardBackward.apply(
            q, k, v, out, lse, d_out, d_lse, cot_dq, cot_dk, cot_dv, None, None, dq.detach(), wants_cot_d_out,
            ctx.static)
        return (cot_q, cot_k, cot_v, None, None, cot_d_out if wants_cot_d_out else None,
                cot_d_lse if d_lse is not None else None, None)

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _out_dot, _lse_dot, d_out_dot, d_lse_dot, _static):
        # Through the Functions rather than the raw operators, so that a further transform on top
        # either works or raises instead of seeing constants.
        # H_u ẋ + Jᵀ u̇ in one double-backward launch pair (the kernels add the backward for u̇).
        q, k, v, out, lse, d_out, d_lse, dq = ctx.saved_tensors
        if d_lse_dot is not None:
            d_out_dot = _zeros_if_none(d_out_dot, out)
        return _AttentionBackwardBackward.apply(
            q, k, v, out, lse, d_out, d_lse, q_dot, k_dot, v_dot, d_out_dot, d_lse_dot, dq.detach(), False,
            ctx.static)[:3]


class _AttentionSecond(_SecondOrderKernel):
    """(q, k, v, ẋ, y) ↦ f''(q, k, v)[ẋ, y] for (out, lse): the bilinear part of forward over forward."""

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, static):
        return _ops.attention_forward_second(q, k, v, q_dot, k_dot, v_dot, q_y, k_y, v_y, static)


class _AttentionTangent(_BatchFolding):
    """(q, k, v, out, lse, q̇, k̇, v̇) ↦ (ȯut, l̇se), the forward-mode tangent (linear in the tangents).
    (out, lse) are the forward's results for (q, k, v), which the tangent kernel reads instead of
    recomputing them; as functions of (q, k, v) they get no derivative of their own. Its backward
    (reverse-over-forward) uses the Hessian's symmetry once more: for cotangents c, ∂/∂x <c, J(x) ẋ>
    = double_backward(d_out = c, cot = ẋ)[x part] and ∂/∂ẋ = Jᵀ c = backward(c)."""

    @staticmethod
    def forward(q, k, v, out, lse, q_dot, k_dot, v_dot, static):
        return _ops.attention_tangent(q, k, v, out, lse, q_dot, k_dot, v_dot, static)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, static = inputs
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.static = static
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, cot_out_dot, cot_lse_dot):
        q, k, v, out, lse, q_dot, k_dot, v_dot = ctx.saved_tensors
        if cot_out_dot is None and cot_lse_dot is None:
            return (None,) * 9
        out, lse = out.detach(), lse.detach()
        cot_out_dot = _zeros_if_none(cot_out_dot, out)
        first = _AttentionBackward.apply(q, k, v, out, lse, cot_out_dot, cot_lse_dot, ctx.static)
        # first's dq is the backward's for these inputs: the one row sweep reads dS K from it.
        second = _AttentionBackwardBackward.apply(q, k, v, out, lse, cot_out_dot, cot_lse_dot, q_dot, k_dot, v_dot,
                                                  None, None, first[0].detach(), False, ctx.static)[:3]
        return (*second, None, None, *first, None)

    @staticmethod
    def jvp(ctx, q_y, k_y, v_y, _out_y, _lse_y, q_dot_y, k_dot_y, v_dot_y, _static):
        # d(J(x) ẋ) = f''(x)[ẋ, y] + J(x) ẏ: the second-order kernel plus the tangent kernel on ẏ
        # (out and lse move with x, but as f(x) they enter through the second-order term).
        q, k, v, out, lse, q_dot, k_dot, v_dot = ctx.saved_tensors
        primals = (q, k, v)
        terms = []
        if any(t is not None for t in (q_y, k_y, v_y)):
            direction = [_zeros_if_none(t, x) for t, x in zip((q_y, k_y, v_y), primals)]
            terms.append(_AttentionSecond.apply(q, k, v, q_dot, k_dot, v_dot, *direction, ctx.static))
        if any(t is not None for t in (q_dot_y, k_dot_y, v_dot_y)):
            tangent_y = [_zeros_if_none(t, x) for t, x in zip((q_dot_y, k_dot_y, v_dot_y), primals)]
            terms.append(_AttentionTangent.apply(q, k, v, out, lse, *tangent_y, ctx.static))
        return tuple(sum(parts) for parts in zip(*terms))


class _Attention(_BatchFolding):
    @staticmethod
    def forward(q, k, v, static):
        return _ops.attention_forward(q, k, v, static)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, static = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v, out, lse)
        ctx.static = static
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None and d_lse is None:
            return None, None, None, None
        dq, dk, dv = _AttentionBackward.apply(q, k, v, out, lse, _zeros_if_none(d_out, out), d_lse, ctx.static)
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _static):
        # The forward already ran: the tangent kernel reads its (out, lse) rather than recomputing them.
        q, k, v, out, lse = ctx.saved_tensors
        tangents = [_zeros_if_none(t, x) for t, x in ((q_dot, q), (k_dot, k), (v_dot, v))]
        return _AttentionTangent.apply(q, k, v, out, lse, *tangents, ctx.static)


def _check_tensors(**arrays) -> None:
    for name, value in arrays.items():
        if not isinstance(value, torch.Tensor):
            raise _contracts.array_type_error(name, value, "torch")


def _check_options(causal, scale, window_size, scale_name: str) -> tuple[int, int]:
    """The non-tensor arguments, before anything reads them; returns window_size as two ints."""
    _contracts.validate_causal(causal)
    _contracts.validate_scale(scale, scale_name)
    return _contracts.validate_window_size(window_size)


def _check_slopes(alibi_slopes, q, sequences: int, heads: int, batch_name: str):
    """flash-attn's ``alibi_slopes`` (H,) or (sequences, H), checked, as (sequences, H) constants
    (detached: no gradient flows into them, as in flash-attn). None stays None."""
    if alibi_slopes is None:
        return None
    _check_tensors(alibi_slopes=alibi_slopes)
    _contracts.validate_alibi_slopes(tuple(alibi_slopes.shape), dtype_name(alibi_slopes.dtype), sequences, heads,
                                     batch_name=batch_name)
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    return alibi_slopes.detach().expand(sequences, heads)


def _row_slopes(slopes, t_q: int, dtype: torch.dtype, cu_seqlens_q=None):
    """The kernels' ALiBi input: each query row's slope, (B, H, T_q) like lse (and in lse's dtype
    for kernel inputs of ``dtype``), from (B, H) slopes; for a packed batch, (1, H, total_q) from
    the (sequences, H) slopes and the rows' sequences."""
    slopes = slopes.to(row_stat_dtype(dtype))
    if cu_seqlens_q is None:
        return slopes[:, :, None].expand(*slopes.shape, t_q)
    rows = torch.arange(t_q, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    sequence = torch.searchsorted(cu_seqlens_q, rows, right=True) - 1
    return slopes[sequence.clamp(0, slopes.shape[0] - 1)].T[None]


def _check_devices(q, k, v, backend):
    devices = {t.device for t in (q, k, v)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if backend == "triton_full_fused" and not q.is_cuda:
        if not is_interpreter():
            raise ValueError(
                f"backend='triton_full_fused' needs CUDA tensors, got q on {q.device}; use backend='reference' "
                "or set TRITON_INTERPRET=1 (before importing triton) to run the kernels in Triton's CPU interpreter")
        _contracts.check_interpreter_in_time()


def _compute_dtype(q, backend) -> torch.dtype:
    """q's dtype, or float32 for bfloat16 in Triton's interpreter (``_contracts.interpreter_compute_dtype``)."""
    return getattr(torch, _contracts.interpreter_compute_dtype(dtype_name(q.dtype), backend))


# Calls whose checks passed, keyed by everything the checks read: q, k and v's shapes, dtypes and
# devices, the backend, the layout and the options. A training loop repeats a few calls, and the
# checks cost as much Python as the rest of a small call together.
_CHECKED: dict = {}


def _plain_options(causal, scale, window_size) -> bool:
    """Whether the options can key ``_CHECKED``: only builtin bools, floats and int pairs, since a
    bool window side or a NumPy scalar hashes like a valid value but must meet the checks."""
    return (causal.__class__ is bool and (scale is None or scale.__class__ is float)
            and window_size.__class__ is tuple and len(window_size) == 2
            and window_size[0].__class__ is int and window_size[1].__class__ is int)


def _check_call(q, k, v, *, backend, layout, causal, scale, window_size, bottom_right, scale_name, softcap,
                alibi_slopes) -> tuple[_ops.Static, torch.dtype]:
    """The checks of one call, up front and naming the argument at fault; returns the call's
    ``Static`` (without the ALiBi slopes' values) and the dtype the backend computes in."""
    _check_tensors(q=q, k=k, v=v)
    window_size = _check_options(causal, scale, window_size, scale_name)
    softcap = _contracts.validate_softcap(softcap)
    validate_attention_args(q.shape, k.shape, v.shape, tuple(dtype_name(t.dtype) for t in (q, k, v)),
                            layout=layout, backend=backend, window_size=window_size)
    _check_devices(q, k, v, backend)
    _check_slopes(alibi_slopes, q, q.shape[0], q.shape[layout.strip("()").split(", ").index("H")], "batch size")
    params = AttentionParams(scale=_contracts.default_scale(q.shape[-1], scale), causal=bool(causal),
                             window_size=window_size, bottom_right=bottom_right, softcap=softcap,
                             alibi=alibi_slopes is not None)
    return _ops.Static(params), _compute_dtype(q, backend)


def _attention(q, k, v, *, backend, layout, causal, scale, window_size, bottom_right, scale_name, softcap=0.0,
               alibi_slopes=None):
    """Checked (out, lse) on (B, H, T, D) views, dispatched to a backend."""
    key = None
    if _plain_options(causal, scale, window_size) and softcap.__class__ in (float, int):
        try:
            slopes_key = None if alibi_slopes is None else (alibi_slopes.shape, alibi_slopes.dtype,
                                                            alibi_slopes.device)
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, backend,
                   layout, causal, scale, window_size, bottom_right, softcap, slopes_key)
        except AttributeError:  # not tensors: _check_call names the argument
            pass
    checked = _CHECKED.get(key)
    if checked is None:
        checked = _check_call(q, k, v, backend=backend, layout=layout, causal=causal, scale=scale,
                              window_size=window_size, bottom_right=bottom_right, scale_name=scale_name,
                              softcap=softcap, alibi_slopes=alibi_slopes)
        if key is not None:
            _CHECKED[key] = checked
    static, compute_dtype = checked
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().expand(q.shape[0], alibi_slopes.shape[-1])
    dtype = q.dtype
    if compute_dtype != dtype:
        q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    if layout == "(B, T, H, D)":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "reference":
        params = static.params
        out, lse = attention_reference(q, k, v, causal=params.causal, scale=params.scale,
                                       window_size=params.window_size, bottom_right=bottom_right, return_lse=True,
                                       softcap=params.softcap, alibi_slopes=slopes)
    else:
        if slopes is not None:
            static = static._replace(row_slopes=_row_slopes(slopes, q.shape[2], q.dtype))
        out, lse = _Attention.apply(q, k, v, static)
    if out.dtype != dtype:
        out = out.to(dtype)
    return (out.transpose(1, 2) if layout == "(B, T, H, D)" else out), lse


def sdpa_custom(q, k, v, *, backend: str = "triton_full_fused", causal: bool = False,
                scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                return_lse: bool = False):
    """Scaled dot-product attention with every derivative order, laid out like
    ``torch.nn.functional.scaled_dot_product_attention``.

    Arguments:
        q: (B, H, T_q, D). k, v: (B, H_kv, T_k, D) with ``H % H_kv == 0`` (grouped-query).
            fp16, bf16, fp32 or fp64; head dim 8–256 for the fused backend.
        backend: ``"triton_full_fused"`` (Triton kernels: forward, backward, double backward and
            JVP each fused, O(T) extra memory) or ``"reference"`` (plain torch, O(T²)).
        causal: mask aligned to the top-left corner like torch SDPA (query i sees keys j <= i).
        scale: multiplies q kᵀ; ``None`` means ``1 / sqrt(D)``.
        window_size: (left, right) sliding window, flash-attn's meaning, -1 = unbounded.
        return_lse: also return the row log-sum-exp (B, H, T_q) (float32; float64 for fp64
            inputs), differentiable; rows that see no key have lse = +inf and output 0.
    Returns:
        out (B, H, T_q, D) in q's dtype, or (out, lse) with ``return_lse``.
    """
    out, lse = _attention(q, k, v, backend=backend, layout="(B, H, T, D)", causal=causal, scale=scale,
                          window_size=window_size, bottom_right=False, scale_name="scale")
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, return_lse: bool = False, *,
                    backend: str = "triton_full_fused"):
    """flash-attn / AITER interface on (B, T, H, D) tensors, with every derivative order.

    Arguments:
        q: (B, T_q, H, D). k, v: (B, T_k, H_kv, D), ``H % H_kv == 0``.
        dropout_p: must be 0.0 (no dropout; kept for signature compatibility).
        softmax_scale: ``None`` means ``1 / sqrt(D)``.
        causal: aligned to the bottom-right corner as in flash-attn ≥ 2.1: when T_q > T_k the
            first T_q − T_k query rows see no key and output zeros.
        window_size: (left, right), -1 = unbounded; with ``causal`` right is 0.
        softcap: ``> 0`` caps the scaled scores s to ``softcap · tanh(s / softcap)`` (Gemma-2, Grok);
            0.0 = off.
        alibi_slopes: (H,) or (B, H), float32 (or float64), on q's device: adds
            ``-slope · |i + T_k - T_q - j|`` to the (capped) score of query i and key j (BLOOM, MPT,
            Falcon); constants, never differentiated (as in flash-attn).
        return_lse: also return the log-sum-exp (B, H, T_q) of the modified scores, differentiable.
    Returns:
        out (B, T_q, H, D), or (out, lse) with ``return_lse``.
    """
    validate_dropout(dropout_p)
    out, lse = _attention(q, k, v, backend=backend, layout="(B, T, H, D)", causal=causal,
                          scale=softmax_scale, window_size=window_size, bottom_right=True,
                          scale_name="softmax_scale", softcap=softcap, alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


# cu_seqlens tensors whose values passed ``validate_cu_seqlens_values``, with the versions and
# arguments they passed with; weak keys by identity, so the cache never keeps a tensor alive.
_CHECKED_CU_SEQLENS = WeakIdKeyDictionary()


def _check_cu_seqlens_values(cu_q, cu_k, total_q, total_k, max_seqlen_q, max_seqlen_k) -> None:
    """The varlen value checks with their one host read, skipped for a tensor pair already checked
    at its current versions (``_version`` counts in-place changes) and during CUDA-graph capture."""
    state = (cu_q._version, cu_k, cu_k._version, total_q, total_k, max_seqlen_q, max_seqlen_k)
    cached = _CHECKED_CU_SEQLENS.get(cu_q)
    if cached is not None and cached[0] == state[0] and cached[1] is cu_k and cached[2:] == state[2:]:
        return
    if cu_q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    starts_q, starts_k = torch.stack([cu_q, cu_k]).tolist()  # the one host read
    validate_cu_seqlens_values(starts_q, starts_k, total_q, total_k, max_seqlen_q, max_seqlen_k)
    _CHECKED_CU_SEQLENS[cu_q] = state


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, return_lse: bool = False, *,
                           backend: str = "triton_full_fused"):
    """flash-attn's variable-length interface: a batch of sequences of different lengths packed
    along the token dimension, with every derivative order of :func:`flash_attn_func`.

    Arguments:
        q: (total_q, H, D), the batch's query sequences concatenated. k, v: (total_k, H_kv, D),
            ``H % H_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) on q's device, the cumulative lengths:
            sequence b is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` against
            ``k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]`` (and v's rows); they start at 0, never
            decrease (empty sequences are fine) and end at total_q / total_k. Not differentiated.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest query / key sequence
            (they size the kernel grid).
        dropout_p, softmax_scale: as in :func:`flash_attn_func`.
        causal, window_size: per sequence, aligned to its bottom-right corner (flash-attn ≥ 2.1).
        softcap: as in :func:`flash_attn_func`.
        alibi_slopes: (H,) or (batch, H): sequence b's slopes, the distance ``|i + T_k - T_q - j|``
            taken within the sequence (its own lengths); constants, as in :func:`flash_attn_func`.
        return_lse: also return the log-sum-exp (H, total_q), float32 (float64 for float64
            inputs), like flash-attn's varlen; differentiable; +inf on rows that see no key.
    Returns:
        out (total_q, H, D), or (out, lse) with ``return_lse``.

    Unlike flash-attn, the call checks the cu_seqlens values (start, order, end, the max lengths).
    That costs a small device-to-host read, which synchronises with the GPU, once per pair of
    cu_seqlens tensors and their versions: the layers of a model that share cu_seqlens pay it once,
    and an in-place change of the values is checked again. During a CUDA-graph capture the check
    is skipped (a capture cannot read the device), so the varlen call can be captured and replayed.
    ``torch.func.vmap`` works when every instance shares the cu_seqlens.
    """
    validate_dropout(dropout_p)
    _check_tensors(q=q, k=k, v=v)
    window_size = _check_options(causal, softmax_scale, window_size, "softmax_scale")
    softcap = _contracts.validate_softcap(softcap)
    validate_attention_args(q.shape, k.shape, v.shape, tuple(dtype_name(t.dtype) for t in (q, k, v)),
                            layout="(total, H, D)", backend=backend, window_size=window_size)
    _check_devices(q, k, v, backend)
    varlen = varlen_keywords(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    slopes = _check_slopes(alibi_slopes, q, cu_seqlens_q.shape[0] - 1, q.shape[1], "batch (len(cu_seqlens_q) - 1)")
    if torch._C._functorch.is_batchedtensor(cu_seqlens_q) or torch._C._functorch.is_batchedtensor(cu_seqlens_k):
        raise NotImplementedError(VMAP_CU_SEQLENS_ERROR)
    _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                              window_size=window_size, return_lse=True, softcap=softcap,
                                              alibi_slopes=slopes)
    else:
        params = AttentionParams(scale=scale, causal=bool(causal), window_size=window_size, bottom_right=True,
                                 softcap=softcap, alibi=slopes is not None)
        compute_dtype = _compute_dtype(q, backend)
        # The kernels see one packed batch entry: (total, H, D) as a (1, H, total, D) view, no copy.
        packed = [t.to(compute_dtype).transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        row_slopes = None if slopes is None else _row_slopes(slopes, q.shape[0], compute_dtype, varlen["cu_seqlens_q"])
        out, lse = _Attention.apply(*packed, _ops.Static(params, **varlen, row_slopes=row_slopes))
        # squeeze, not [0]: the backward of a squeeze is a view, that of an index a zero-filled
        # copy (plus a second copy of the cotangent into q's layout: +15 % on fwd + bwd).
        out, lse = out.squeeze(0).transpose(0, 1).to(q.dtype), lse.squeeze(0)
    return (out, lse) if return_lse else out
