"""``theria_jax.dot_product_attention``: jax.nn's signature and semantics on theria's kernels.

A one-line swap for ``jax.nn.dot_product_attention``, with every derivative order (the fused backend
calls :func:`theria_jax.attention` and :func:`theria_jax.flash_attn_varlen_func`, whose primitives
carry the backward, double backward and JVP kernels).

What runs fused, exactly, with O(T) extra memory at every order:

* no sequence lengths: ``is_causal`` and ``local_window_size`` (top-left, as jax.nn aligns them);
* ``query_seq_lengths`` / ``key_value_seq_lengths`` (padding as a suffix of each batch entry), traced
  or concrete, through the varlen kernels on zero-copy packed views: each entry's valid queries and
  keys form one sequence, and the padded queries and keys sequences of their own that see nothing.
  With ``is_causal`` the valid part is split in two calls so that a causal mask keeps jax.nn's
  top-left alignment whatever the two lengths are. A ``local_window_size`` together with sequence
  lengths needs both lengths equal per entry (checked on concrete lengths; traced ones raise).

``bias`` and ``mask`` are T_q × T_k arrays, which the fused kernels never build: the fused backend
raises and names the alternatives (sequence lengths, ``is_causal``, ``local_window_size``,
:func:`theria_jax.flash_attn_varlen_func`, or ``backend="reference"``, which computes every mask and
bias exactly in jax.numpy).

One difference from jax.nn's XLA path: a query row that sees no key (a padded query, or a window
that excludes every valid key) outputs zeros here, and its residual is +inf. jax.nn outputs zeros
for padded queries too, but averages all values on a fully masked unpadded row, and its residual
there is a large finite number.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from theria_jax.attention import attention, flash_attn_varlen_func
from theria_kernels import _contracts
from theria_kernels.attention import BACKENDS

DENSE_MASK_ERROR = (
    "backend='triton_full_fused' runs masks only when they stay O(T): is_causal, local_window_size "
    "and query_seq_lengths / key_value_seq_lengths; got {what}. Give padding as sequence lengths, "
    "pack the batch for theria_jax.flash_attn_varlen_func, or use backend='reference', which computes "
    "any bias and mask exactly (O(T^2) memory)"
)


def _math_attention(q, k, v, bias, mask, is_causal, scale, q_lengths, kv_lengths, window):
    """jax.nn's semantics in jax.numpy on (B, T, N, H), computed in the inputs' dtype; rows that see
    no key output zeros and have lse +inf. Returns (out, lse (B, N, T))."""
    heads, heads_kv = q.shape[2], k.shape[2]
    if heads != heads_kv:
        k, v = (jnp.repeat(t, heads // heads_kv, axis=2) for t in (k, v))
    scores = scale * jnp.einsum("btnh,bsnh->bnts", q, k)
    if bias is not None:
        scores = scores + bias
    rows, cols = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None, :]
    visible = jnp.ones(scores.shape, dtype=bool)
    if mask is not None:
        visible &= mask
    if is_causal:
        visible &= cols <= rows
    if window is not None:
        visible &= (cols >= rows - window[0]) & (cols <= rows + window[1])
    if q_lengths is not None:
        visible &= (jnp.arange(q.shape[1]) < q_lengths[:, None])[:, None, :, None]
    if kv_lengths is not None:
        visible &= (jnp.arange(k.shape[1]) < kv_lengths[:, None])[:, None, None, :]
    row_has_key = visible.any(-1, keepdims=True)
    # Finite scores on rows that see no key keep every derivative order NaN-free.
    scores = jnp.where(row_has_key, jnp.where(visible, scores, -jnp.inf), 0.0)
    probs = jax.nn.softmax(scores, axis=-1) * row_has_key
    out = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
    lse = jnp.where(row_has_key[..., 0], jax.nn.logsumexp(scores, axis=-1), jnp.inf)
    return out, lse


def _live_segments(live, total_q, total_k):
    """cu_seqlens that make rows ``[q0, q1)`` of batch entry b see keys ``[k0, k1)`` and every other
    query and key of the entry nothing: per entry, five sequences (queries before, keys before, the
    live pair, queries after, keys after), the dead ones paired with empty partners. ``live`` holds
    four (B,) int32 arrays; the result indexes the (B·T_q) and (B·T_k) packed rows."""
    q0, q1, k0, k1 = live
    batch = q0.shape[0]
    zeros, ones = jnp.zeros_like(q0), jnp.ones_like(q0)
    offsets_q = (jnp.arange(batch, dtype=jnp.int32) * total_q)[:, None]
    offsets_k = (jnp.arange(batch, dtype=jnp.int32) * total_k)[:, None]
    cu_q = offsets_q + jnp.stack([q0, q0, q1, total_q * ones, total_q * ones], axis=1)
    cu_k = offsets_k + jnp.stack([zeros, k0, k1, k1, total_k * ones], axis=1)
    start = jnp.zeros((1,), jnp.int32)
    return jnp.concatenate([start, cu_q.reshape(-1)]), jnp.concatenate([start, cu_k.reshape(-1)])


def _varlen_call(q, k, v, live, *, causal, window, scale, backend):
    """(out (B, T, N, H), lse (B, N, T)) of the packed views with the ``live`` segments of
    :func:`_live_segments`; rows outside them are zeros with lse +inf."""
    (batch, t_q, heads, head_dim), t_k = q.shape, k.shape[1]
    cu_q, cu_k = _live_segments(live, t_q, t_k)
    packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    out, lse = flash_attn_varlen_func(*packed, cu_q, cu_k, t_q, t_k, softmax_scale=scale, causal=causal,
                                      window_size=window, return_lse=True, backend=backend)
    return out.reshape(batch, t_q, heads, -1), lse.reshape(heads, batch, t_q).transpose(1, 0, 2)


def _lengths(lengths, batch, total, name):
    if lengths is None:
        return jnp.full((batch,), total, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers shaped (B,) = ({batch},), got {lengths.dtype} {lengths.shape}")
    # Lengths beyond the array mean no padding, as in jax.nn's masks.
    return jnp.clip(lengths.astype(jnp.int32), 0, total)


def _fused_with_lengths(q, k, v, is_causal, scale, q_lengths, kv_lengths, window, backend):
    batch, t_q, t_k = q.shape[0], q.shape[1], k.shape[1]
    lengths_q = _lengths(q_lengths, batch, t_q, "query_seq_lengths")
    lengths_k = _lengths(kv_lengths, batch, t_k, "key_value_seq_lengths")
    zeros = jnp.zeros_like(lengths_q)
    call = dict(scale=scale, backend=backend)
    if window is not None:
        concrete = not any(isinstance(t, jax.core.Tracer) for t in (lengths_q, lengths_k))
        if not concrete or bool(jnp.any(lengths_q != lengths_k)):
            raise ValueError(
                "local_window_size with sequence lengths runs fused only when query_seq_lengths and "
                "key_value_seq_lengths are concrete and equal per batch entry (the varlen kernels align "
                "windows to each sequence's end); use backend='reference' otherwise")
        window = (window[0], 0) if is_causal else window
        return _varlen_call(q, k, v, (zeros, lengths_q, zeros, lengths_k), causal=False, window=window, **call)
    if not is_causal:
        return _varlen_call(q, k, v, (zeros, lengths_q, zeros, lengths_k), causal=False, window=(-1, -1), **call)
    # Top-left causal on valid lengths (L_q, L_k): rows below m = min(L_q, L_k) are causal attention
    # over keys [0, m), where both corners agree; rows [m, L_q) exist only when L_k < L_q and see
    # every valid key, which is attention without a mask. Each call leaves the other's rows at zero.
    shortest = jnp.minimum(lengths_q, lengths_k)
    out_a, lse_a = _varlen_call(q, k, v, (zeros, shortest, zeros, shortest), causal=True, window=(-1, -1), **call)
    out_b, lse_b = _varlen_call(q, k, v, (shortest, lengths_q, zeros, lengths_k), causal=False, window=(-1, -1),
                                **call)
    in_b = (jnp.arange(t_q) >= shortest[:, None]) & (jnp.arange(t_q) < lengths_q[:, None])   # (B, T)
    return out_a + out_b, jnp.where(in_b[:, None, :], lse_b, lse_a)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False, backend: str = "triton_full_fused"):
    """``jax.nn.dot_product_attention`` with every derivative order, under every JAX transformation.

    Arguments:
        query: (B, T, N, H) or unbatched (T, N, H).
        key, value: (B, S, K, H) or (S, K, H), ``N % K == 0`` (grouped-query when K < N).
        bias: additive, broadcastable to (B, N, T, S); reference backend only.
        mask: boolean (True = attend), broadcastable to (B, N, T, S); reference backend only.
        scale: multiplies q kᵀ; ``None`` means ``1 / sqrt(H)``.
        is_causal: query i sees keys j <= i (top-left, like jax.nn).
        query_seq_lengths, key_value_seq_lengths: integer (B,) arrays, traced or concrete: rows at or
            beyond the length are padding; padded queries output zeros. ``None`` = no padding.
        local_window_size: ``(left, right)`` or one int for both: query i sees keys
            ``i - left … i + right``; ``None`` = unbounded.
        implementation: must be ``None``: jax.nn's ``'xla'`` / ``'cudnn'`` name jax's own kernels; theria's
            are chosen by ``backend``.
        return_residual: also return the log-sum-exp residual shaped (B, T, N) or (T, N), in key's
            dtype, not differentiated (``lax.stop_gradient``, as jax.nn returns it; for a
            differentiable one use ``theria_jax.attention(return_lse=True)``).
        backend: ``"triton_full_fused"`` (Triton kernels, O(T) extra memory at every derivative
            order) or ``"reference"`` (jax.numpy, O(T·S) memory, any bias and mask).
    Returns:
        out shaped like query, or (out, residual) with ``return_residual``.
    """
    if implementation is not None:
        raise ValueError(f"implementation={implementation!r} selects jax.nn's own kernels; theria_jax runs its "
                         "own: pass implementation=None and choose with backend='triton_full_fused' or 'reference'")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    query, key, value = (jnp.asarray(t) for t in (query, key, value))
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"query, key, value must be (B, T, N, H) or unbatched (T, N, H), got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    unbatched = query.ndim == 3
    q, k, v = (t[None] if unbatched else t for t in (query, key, value))
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    if local_window_size is not None:
        local_window_size = tuple(int(w) for w in local_window_size)
        if len(local_window_size) != 2 or min(local_window_size) < 0:
            raise ValueError(f"local_window_size must be an int or (left, right) of ints >= 0, got {local_window_size}")
    _contracts.validate_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    if backend == "reference":
        dense = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])

        def _4d(t):
            return None if t is None else jnp.broadcast_to(jnp.asarray(t).reshape((1,) * (4 - jnp.ndim(t)) + jnp.shape(t)), dense)

        lengths = [None if n is None else jnp.asarray(n) for n in (query_seq_lengths, key_value_seq_lengths)]
        out, lse = _math_attention(q, k, v, _4d(bias), _4d(mask), is_causal, scale, *lengths, local_window_size)
    elif bias is not None or mask is not None:
        raise ValueError(DENSE_MASK_ERROR.format(what="a bias array" if bias is not None else "a mask array"))
    elif query_seq_lengths is None and key_value_seq_lengths is None:
        out, lse = attention(q, k, v, causal=bool(is_causal), scale=scale, return_lse=True, backend=backend,
                             window_size=(-1, -1) if local_window_size is None else local_window_size)
    else:
        out, lse = _fused_with_lengths(q, k, v, bool(is_causal), scale, query_seq_lengths, key_value_seq_lengths,
                                       local_window_size, backend)
    if unbatched:
        out, lse = out[0], lse[0]
    if not return_residual:
        return out
    residual = jax.lax.stop_gradient(jnp.swapaxes(lse, -1, -2).astype(key.dtype))
    return out, residual
