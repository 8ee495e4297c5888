"""Public JAX attention API: the fused Triton kernels under every JAX transformation.

``attention`` follows ``jax.nn.dot_product_attention`` (causal mask aligned to the top-left
corner), ``flash_attn_func`` follows flash-attn (bottom-right corner). Both take (B, T, H, D)
arrays; ``flash_attn_varlen_func`` takes flash-attn's packed (total, H, D) variable-length
batches. The fused backend's derivative rules live in ``theria_jax._primitives``; arguments are
checked by the same functions as ``theria_torch``'s, so both raise the same messages.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from theria_jax._primitives import attention_fused
from theria_jax.reference import attention_reference, varlen_attention_reference
from theria_kernels import _contracts
from theria_kernels._contracts import is_interpreter
from theria_kernels.attention import (
    AttentionParams,
    validate_attention_args,
    validate_cu_seqlens,
    validate_cu_seqlens_values,
    validate_dropout,
)


def _check_platform(backend: str) -> None:
    if backend == "triton_full_fused" and jax.default_backend() == "cpu":
        if not is_interpreter():
            raise ValueError(
                "backend='triton_full_fused' needs a GPU, but JAX runs on the CPU; use backend='reference' "
                "or set TRITON_INTERPRET=1 (before importing triton) to run the kernels in Triton's CPU interpreter")
        _contracts.check_interpreter_in_time()


def _check_arrays(**arrays) -> None:
    # A torch tensor has .shape and .dtype too, and would fail later with a message about its dtype.
    for name, value in arrays.items():
        if not isinstance(value, (jax.Array, np.ndarray)):
            raise _contracts.array_type_error(name, value, "jax")


def _check_options(causal, scale, window_size, scale_name: str, softcap=0.0) -> tuple[tuple[int, int], float]:
    """The non-array arguments, before anything reads them; returns window_size as two ints and
    softcap as a float."""
    _contracts.validate_causal(causal)
    _contracts.validate_scale(scale, scale_name)
    return _contracts.validate_window_size(window_size), _contracts.validate_softcap(softcap)


def _slopes(alibi_slopes, sequences: int, heads: int, batch_name: str):
    """flash-attn's ``alibi_slopes`` (H,) or (sequences, H), checked, as (sequences, H) constants
    (never differentiated). None stays None."""
    if alibi_slopes is None:
        return None
    _check_arrays(alibi_slopes=alibi_slopes)
    _contracts.validate_alibi_slopes(jnp.shape(alibi_slopes), str(alibi_slopes.dtype), sequences, heads,
                                     batch_name=batch_name)
    return jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(alibi_slopes), (sequences, heads)))


def _row_slopes(slopes, t_q: int, dtype, cu_seqlens_q=None):
    """The kernels' ALiBi operand: each query row's slope, (B, H, T_q) like lse (and in lse's dtype
    for kernel inputs of ``dtype``), from (B, H) slopes; for a packed batch, (1, H, total_q) from
    the (sequences, H) slopes and the rows' sequences."""
    slopes = slopes.astype(_contracts.row_stat_dtype_name(jnp.dtype(dtype).name))
    if cu_seqlens_q is None:
        return jnp.broadcast_to(slopes[:, :, None], (*slopes.shape, t_q))
    sequence = jnp.searchsorted(cu_seqlens_q, jnp.arange(t_q, dtype=cu_seqlens_q.dtype), side="right") - 1
    return slopes[jnp.clip(sequence, 0, slopes.shape[0] - 1)].T[None]


def _fused(q, k, v, params, cu_seqlens=(), lengths=None, row_slopes=None):
    """The fused kernels' (out, lse), bfloat16 running in float32 under Triton's interpreter
    (``_contracts.interpreter_compute_dtype``)."""
    dtype = q.dtype
    compute_dtype = _contracts.interpreter_compute_dtype(str(dtype), "triton_full_fused")
    if compute_dtype == str(dtype):
        return attention_fused(q, k, v, params, cu_seqlens, lengths, row_slopes)
    out, lse = attention_fused(*(t.astype(compute_dtype) for t in (q, k, v)), params, cu_seqlens, lengths,
                               row_slopes)
    return out.astype(dtype), lse


def _attention(q, k, v, *, backend, causal, scale, window_size, bottom_right, scale_name, softcap=0.0,
               alibi_slopes=None):
    """Validated (out, lse) of (B, T, H, D) arrays, dispatched to a backend."""
    _check_arrays(q=q, k=k, v=v)
    window_size, softcap = _check_options(causal, scale, window_size, scale_name, softcap)
    validate_attention_args(q.shape, k.shape, v.shape, tuple(str(t.dtype) for t in (q, k, v)),
                            layout="(B, T, H, D)", backend=backend, window_size=window_size)
    slopes = _slopes(alibi_slopes, q.shape[0], q.shape[2], "batch size")
    _check_platform(backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale, window_size=window_size,
                                   bottom_right=bottom_right, return_lse=True, softcap=softcap, alibi_slopes=slopes)
    params = AttentionParams(scale=scale, causal=bool(causal), window_size=window_size, bottom_right=bottom_right,
                             softcap=softcap, alibi=slopes is not None)
    return _fused(q, k, v, params, row_slopes=None if slopes is None else _row_slopes(slopes, q.shape[1], q.dtype))


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              window_size: tuple[int, int] = (-1, -1), return_lse: bool = False,
              backend: str = "triton_full_fused"):
    """Scaled dot-product attention laid out like ``jax.nn.dot_product_attention``.

    Works under ``jax.jit``, ``jax.vmap`` (any number of extra leading axes), ``jax.grad``,
    ``jax.jvp`` and all their second-order compositions (grad of grad, jvp of grad, grad of jvp,
    jvp of jvp, ``jax.hessian``); third order raises ``NotImplementedError`` on the fused
    backend (docs/design/jax_bridge.md).

    Arguments:
        q: (B, T_q, H, D). k, v: (B, T_k, H_kv, D) with ``H % H_kv == 0`` (grouped-query).
            fp16, bf16, fp32 or fp64; head dim 8–256 for the fused backend.
        causal: query i sees keys j <= i (top-left alignment, like JAX and torch SDPA).
        scale: a Python float multiplying q kᵀ; ``None`` means ``1 / sqrt(D)``.
        window_size: (left, right) sliding window, flash-attn's meaning, -1 = unbounded.
        return_lse: also return the row log-sum-exp (B, H, T_q) (float32; float64 for fp64
            inputs), differentiable; rows that see no key have lse = +inf and output 0.
        backend: ``"triton_full_fused"`` (Triton kernels, O(T) extra memory at every
            derivative order) or ``"reference"`` (jax.numpy, O(T²) memory).
    Returns:
        out (B, T_q, H, D) in q's dtype, or (out, lse) with ``return_lse``.
    """
    out, lse = _attention(q, k, v, backend=backend, causal=causal, scale=scale, window_size=window_size,
                          bottom_right=False, scale_name="scale")
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes=None, return_lse: bool = False, *, backend: str = "triton_full_fused"):
    """flash-attn's interface on (B, T, H, D) JAX arrays, with the transformations of :func:`attention`.

    Arguments:
        q: (B, T_q, H, D). k, v: (B, T_k, H_kv, D), ``H % H_kv == 0``.
        dropout_p: must be 0.0 (no dropout; kept for signature compatibility).
        softmax_scale: a Python float; ``None`` means ``1 / sqrt(D)``.
        causal: aligned to the bottom-right corner as in flash-attn ≥ 2.1: when T_q > T_k the
            first T_q − T_k query rows see no key and output zeros.
        window_size: (left, right), -1 = unbounded; with ``causal`` right is 0.
        softcap: ``> 0`` caps the scaled scores s to ``softcap · tanh(s / softcap)`` (Gemma-2, Grok);
            0.0 = off.
        alibi_slopes: (H,) or (B, H), float32 (or float64): adds ``-slope · |i + T_k - T_q - j|`` to
            the (capped) score of query i and key j (BLOOM, MPT, Falcon); constants, never
            differentiated (their gradient is zero, as flash-attn gives none).
        return_lse: also return the log-sum-exp (B, H, T_q) of the modified scores, differentiable.
        backend: ``"triton_full_fused"`` or ``"reference"``, as in :func:`attention`.
    Returns:
        out (B, T_q, H, D), or (out, lse) with ``return_lse``.
    """
    validate_dropout(dropout_p)
    out, lse = _attention(q, k, v, backend=backend, causal=causal, scale=softmax_scale, window_size=window_size,
                          bottom_right=True, scale_name="softmax_scale", softcap=softcap,
                          alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
                           return_lse: bool = False, *, backend: str = "triton_full_fused"):
    """flash-attn's variable-length interface on packed JAX arrays, with the transformations of
    :func:`attention` (vmap when every instance shares the cu_seqlens).

    Arguments:
        q: (total_q, H, D), the batch's query sequences concatenated. k, v: (total_k, H_kv, D),
            ``H % H_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative lengths: sequence b is
            ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` against ``k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``;
            they start at 0, never decrease (empty sequences are fine) and end at total_q / total_k.
            They may be traced (``jax.jit`` arguments); never differentiated.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest query / key sequence
            (static: they size the kernel grid).
        dropout_p, softmax_scale: as in :func:`flash_attn_func`.
        causal, window_size: per sequence, aligned to its bottom-right corner (flash-attn ≥ 2.1).
        softcap: as in :func:`flash_attn_func`.
        alibi_slopes: (H,) or (batch, H): sequence b's slopes, the distance ``|i + T_k - T_q - j|``
            taken within the sequence (its own lengths); constants, as in :func:`flash_attn_func`.
        return_lse: also return the log-sum-exp (H, total_q), differentiable.
        backend: ``"triton_full_fused"``, or ``"reference"``, which slices the batch per sequence
            and so needs concrete (not traced) cu_seqlens.
    Returns:
        out (total_q, H, D), or (out, lse) with ``return_lse``.

    Concrete cu_seqlens are checked (start, order, end, the max lengths) with one small
    device-to-host read; traced ones (under ``jax.jit``) cannot be read and are not checked.
    """
    validate_dropout(dropout_p)
    _check_arrays(q=q, k=k, v=v)
    window_size, softcap = _check_options(causal, softmax_scale, window_size, "softmax_scale", softcap)
    validate_attention_args(q.shape, k.shape, v.shape, tuple(str(t.dtype) for t in (q, k, v)),
                            layout="(total, H, D)", backend=backend, window_size=window_size)
    cu_seqlens_q, cu_seqlens_k = (cu if hasattr(cu, "dtype") else np.asarray(cu) for cu in (cu_seqlens_q, cu_seqlens_k))
    validate_cu_seqlens(jnp.shape(cu_seqlens_q), jnp.shape(cu_seqlens_k),
                        (str(cu_seqlens_q.dtype), str(cu_seqlens_k.dtype)), max_seqlen_q, max_seqlen_k)
    slopes = _slopes(alibi_slopes, jnp.shape(cu_seqlens_q)[0] - 1, q.shape[1], "batch (len(cu_seqlens_q) - 1)")
    _check_platform(backend)
    traced = any(isinstance(cu, jax.core.Tracer) for cu in (cu_seqlens_q, cu_seqlens_k))
    if not traced:
        # One host read (a no-op for NumPy arrays).
        starts_q, starts_k = np.asarray(cu_seqlens_q).tolist(), np.asarray(cu_seqlens_k).tolist()
        validate_cu_seqlens_values(starts_q, starts_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        if traced:
            raise ValueError("backend='reference' needs concrete cu_seqlens (it slices the batch per sequence); "
                             "call it outside jax.jit or close over the cu_seqlens")
        out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                              window_size=window_size, return_lse=True, softcap=softcap,
                                              alibi_slopes=slopes)
    else:
        params = AttentionParams(scale=scale, causal=bool(causal), window_size=window_size, bottom_right=True,
                                 softcap=softcap, alibi=slopes is not None)
        # The kernels see one packed batch entry, (1, total, H, D).
        cu_seqlens = (jnp.asarray(cu_seqlens_q), jnp.asarray(cu_seqlens_k))
        row_slopes = None if slopes is None else _row_slopes(slopes, q.shape[0], q.dtype, cu_seqlens[0])
        out, lse = _fused(q[None], k[None], v[None], params, cu_seqlens, (max_seqlen_q, max_seqlen_k), row_slopes)
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
