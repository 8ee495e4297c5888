"""Plain PyTorch attention: the float64 ground truth for tests and the ``reference`` backend.

Every derivative order comes from torch autograd. The mask semantics here are the contract the
fused kernels implement (docs/design/attention.md):

* key ``j`` is visible to query ``i`` when ``-left <= j - i - shift <= right`` where
  ``(left, right)`` is the window (``-1`` = unbounded; ``causal`` sets ``right = 0``) and
  ``shift = T_k - T_q`` for bottom-right alignment (flash-attn) or ``0`` for top-left (torch SDPA);
* a query row that sees no key outputs zeros, its log-sum-exp is ``+inf`` and its derivatives are 0.
"""

from __future__ import annotations

import math

import torch


def visible_keys(
    t_q: int,
    t_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean (T_q, T_k) mask, True where query ``i`` may attend to key ``j``."""
    left, right = window_size
    if causal:
        right = 0
    shift = t_k - t_q if bottom_right else 0
    rows = torch.arange(t_q, device=device)[:, None]
    cols = torch.arange(t_k, device=device)[None, :]
    offset = cols - rows - shift
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= offset >= -left
    if right >= 0:
        mask &= offset <= right
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    return_lse: bool = False,
):
    """Softmax attention on (B, H, T, D) tensors, computed in the inputs' dtype.

    Arguments:
        q: (B, H, T_q, D). k, v: (B, H_kv, T_k, D) with ``H % H_kv == 0`` (grouped-query).
        scale: multiplies ``q @ k^T``; ``None`` means ``1 / sqrt(D)``.
    Returns:
        out (B, H, T_q, D), and with ``return_lse`` also the row log-sum-exp (B, H, T_q).
    """
    heads, heads_kv = q.shape[1], k.shape[1]
    if heads != heads_kv:
        k = k.repeat_interleave(heads // heads_kv, dim=1)
        v = v.repeat_interleave(heads // heads_kv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * (q @ k.transpose(-1, -2))
    mask = visible_keys(
        q.shape[-2], k.shape[-2], causal=causal, window_size=window_size,
        bottom_right=bottom_right, device=q.device,
    )
    row_has_key = mask.any(-1, keepdim=True)
    # Rows that see no key get finite scores (all zero) so nothing becomes NaN at any
    # derivative order; their probabilities are then zeroed.
    scores = torch.where(mask, scores, float("-inf"))
    scores = torch.where(row_has_key, scores, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_has_key
    out = probs @ v
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(row_has_key.squeeze(-1), lse, float("inf"))
    return out, lse


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = True,
    return_lse: bool = False,
):
    """:func:`attention_reference` on each sequence of a packed batch, concatenated.

    Arguments:
        q: (total_q, H, D). k, v: (total_k, H_kv, D). cu_seqlens_q, cu_seqlens_k: (N + 1,)
            integers; sequence b is rows ``cu[b]:cu[b + 1]`` (flash-attn's varlen layout).
        bottom_right: align causal masks and windows to each sequence's bottom-right corner, as
            flash-attn's ``flash_attn_varlen_func`` does.
    Returns:
        out (total_q, H, D), and with ``return_lse`` also the log-sum-exp (H, total_q).
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # Zero-length pieces first, so that a batch of no sequences concatenates too.
    outs, lses = [q[:0]], [q.new_empty(q.shape[1], 0)]
    for q0, q1, k0, k1 in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        out, lse = attention_reference(
            *(t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))),
            causal=causal, scale=scale, window_size=window_size, bottom_right=bottom_right, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if return_lse else out
