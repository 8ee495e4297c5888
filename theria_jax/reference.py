"""Plain jax.numpy attention: the ground truth for tests and the ``reference`` backend.

The layout is (B, T, H, D) like ``jax.nn.dot_product_attention``; the mask semantics and the
score modifiers (``softcap``, ``alibi_slopes``) are the same as ``theria_torch.reference``
(docs/design/attention.md, docs/theory/attention_derivatives.md §8).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def visible_keys(
    t_q: int,
    t_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
):
    """Boolean (T_q, T_k) mask, True where query ``i`` may attend to key ``j``."""
    left, right = window_size
    if causal:
        right = 0
    shift = t_k - t_q if bottom_right else 0
    offset = jnp.arange(t_k)[None, :] - jnp.arange(t_q)[:, None] - shift
    mask = jnp.ones((t_q, t_k), dtype=bool)
    if left >= 0:
        mask &= offset >= -left
    if right >= 0:
        mask &= offset <= right
    return mask


def alibi_bias(slopes, t_q: int, t_k: int, *, bottom_right: bool = False, dtype=None):
    """ALiBi's additive bias ``-slope · |i + shift - j|``, (B or 1, H, T_q, T_k), from slopes (H,) or
    (B, H); ``shift = T_k - T_q`` when ``bottom_right`` (flash-attn) else 0. The slopes are constants
    at every derivative order (``lax.stop_gradient``), as in flash-attn."""
    slopes = jax.lax.stop_gradient(jnp.asarray(slopes)).astype(dtype or jnp.asarray(slopes).dtype)
    slopes = slopes[None] if slopes.ndim == 1 else slopes
    shift = t_k - t_q if bottom_right else 0
    distance = jnp.abs(jnp.arange(t_q)[:, None] + shift - jnp.arange(t_k)[None, :]).astype(slopes.dtype)
    return -slopes[:, :, None, None] * distance


def attention_reference(
    q,
    k,
    v,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    return_lse: bool = False,
    softcap: float = 0.0,
    alibi_slopes=None,
):
    """Softmax attention on (B, T, H, D) arrays, computed in the inputs' dtype except the softmax
    (and log-sum-exp), which runs in float32 at least and is rounded back, as torch's does.

    Arguments:
        q: (B, T_q, H, D). k, v: (B, T_k, H_kv, D) with ``H % H_kv == 0``.
        scale: multiplies ``q @ k^T``; ``None`` means ``1 / sqrt(D)``.
        softcap: ``> 0`` caps the scaled scores to ``softcap · tanh(scores / softcap)``; 0 = off.
        alibi_slopes: (H,) or (B, H): adds :func:`alibi_bias` (aligned like the mask) after the cap.
    Returns:
        out (B, T_q, H, D), and with ``return_lse`` also the row log-sum-exp (B, H, T_q).
    """
    heads, heads_kv = q.shape[2], k.shape[2]
    if heads != heads_kv:
        k = jnp.repeat(k, heads // heads_kv, axis=2)
        v = jnp.repeat(v, heads // heads_kv, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q.shape[1], k.shape[1], bottom_right=bottom_right,
                                     dtype=scores.dtype)
    mask = visible_keys(
        q.shape[1], k.shape[1], causal=causal, window_size=window_size, bottom_right=bottom_right
    )
    row_has_key = mask.any(-1, keepdims=True)
    # Finite scores on rows that see no key keep every derivative order NaN-free.
    scores = jnp.where(mask, scores, -jnp.inf)
    scores = jnp.where(row_has_key, scores, 0.0)
    # torch's softmax (the twin's) and its derivatives accumulate in float32 for bf16/fp16 and round
    # once; jax.nn.softmax in bf16 rounds exp, the normaliser and its derivative rule's row term
    # rowsum(P ∘ dP) to 8 bits before subtracting it, which made bf16 dq 2-3x less accurate than
    # torch's (docs/results/maml_t1024.md). float64 stays float64.
    wide = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    probs = jax.nn.softmax(wide, axis=-1) * row_has_key
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    if not return_lse:
        return out
    lse = jnp.where(row_has_key[..., 0], jax.nn.logsumexp(wide, axis=-1).astype(scores.dtype), jnp.inf)
    return out, lse


def varlen_attention_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = True,
    return_lse: bool = False,
    softcap: float = 0.0,
    alibi_slopes=None,
):
    """:func:`attention_reference` on each sequence of a packed batch, concatenated.

    Arguments:
        q: (total_q, H, D). k, v: (total_k, H_kv, D). cu_seqlens_q, cu_seqlens_k: (N + 1,)
            integers, concrete (not traced: they cut the batch into Python slices); sequence b
            is rows ``cu[b]:cu[b + 1]`` (flash-attn's varlen layout).
        bottom_right: align causal masks and windows to each sequence's bottom-right corner, as
            flash-attn's ``flash_attn_varlen_func`` does.
        softcap, alibi_slopes: as in :func:`attention_reference`; slopes (N, H) give sequence b
            the slopes of row b, slopes (H,) serve every sequence; distances are measured within
            each sequence.
    Returns:
        out (total_q, H, D), and with ``return_lse`` also the log-sum-exp (H, total_q).
    """
    starts_q, starts_k = np.asarray(cu_seqlens_q).tolist(), np.asarray(cu_seqlens_k).tolist()
    # Zero-length pieces first, so that a batch of no sequences concatenates too.
    outs, lses = [q[:0]], [jnp.zeros((q.shape[1], 0), q.dtype)]
    for index, (q0, q1, k0, k1) in enumerate(zip(starts_q, starts_q[1:], starts_k, starts_k[1:])):
        slopes = None if alibi_slopes is None else alibi_slopes if jnp.ndim(alibi_slopes) == 1 else alibi_slopes[index]
        out, lse = attention_reference(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal, scale=scale,
            window_size=window_size, bottom_right=bottom_right, return_lse=True, softcap=softcap,
            alibi_slopes=slopes)
        outs.append(out[0])
        lses.append(lse[0])
    out = jnp.concatenate(outs)
    return (out, jnp.concatenate(lses, axis=1)) if return_lse else out
