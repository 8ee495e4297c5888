"""Plain PyTorch attention: the float64 ground truth for tests and the ``reference`` backend.

Every derivative order comes from torch autograd. The mask semantics here are the contract the
fused kernels implement (docs/design/attention.md):

* key ``j`` is visible to query ``i`` when ``-left <= j - i - shift <= right`` where
  ``(left, right)`` is the window (``-1`` = unbounded; ``causal`` sets ``right = 0``) and
  ``shift = T_k - T_q`` for bottom-right alignment (flash-attn) or ``0`` for top-left (torch SDPA);
* a query row that sees no key outputs zeros, its log-sum-exp is ``+inf`` and its derivatives are 0;
* score modifiers, flash-attn's ``flash_attn_func``: with ``softcap`` > 0 the scaled scores
  ``s = scale · q·k`` become ``softcap · tanh(s / softcap)``; ``alibi_slopes`` (H,) or (B, H) then add
  ``-slope · |i + shift - j|`` (the same ``shift`` as the mask: flash-attn's ``T_k - T_q``). The
  slopes are constants: no derivative flows into them (docs/theory/attention_derivatives.md §8).
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


def alibi_bias(
    slopes: torch.Tensor,
    t_q: int,
    t_k: int,
    *,
    bottom_right: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """ALiBi's additive bias ``-slope · |i + shift - j|``, (B or 1, H, T_q, T_k), from slopes (H,) or
    (B, H); ``shift = T_k - T_q`` when ``bottom_right`` (flash-attn) else 0. The slopes are detached:
    theria treats them as constants at every derivative order, as flash-attn does."""
    slopes = slopes.detach().to(dtype or slopes.dtype)
    slopes = slopes[None] if slopes.dim() == 1 else slopes
    shift = t_k - t_q if bottom_right else 0
    rows = torch.arange(t_q, device=slopes.device)[:, None]
    cols = torch.arange(t_k, device=slopes.device)[None, :]
    distance = (rows + shift - cols).abs().to(slopes.dtype)
    return -slopes[:, :, None, None] * distance


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
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
):
    """Softmax attention on (B, H, T, D) tensors, computed in the inputs' dtype.

    Arguments:
        q: (B, H, T_q, D). k, v: (B, H_kv, T_k, D) with ``H % H_kv == 0`` (grouped-query).
        scale: multiplies ``q @ k^T``; ``None`` means ``1 / sqrt(D)``.
        softcap: ``> 0`` caps the scaled scores to ``softcap · tanh(scores / softcap)``; 0 = off.
        alibi_slopes: (H,) or (B, H): adds :func:`alibi_bias` (aligned like the mask) after the cap.
    Returns:
        out (B, H, T_q, D), and with ``return_lse`` also the row log-sum-exp (B, H, T_q).
    """
    heads, heads_kv = q.shape[1], k.shape[1]
    if heads != heads_kv:
        k = k.repeat_interleave(heads // heads_kv, dim=1)
        v = v.repeat_interleave(heads // heads_kv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * (q @ k.transpose(-1, -2))
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q.shape[-2], k.shape[-2], bottom_right=bottom_right,
                                     dtype=scores.dtype)
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
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
):
    """:func:`attention_reference` on each sequence of a packed batch, concatenated.

    Arguments:
        q: (total_q, H, D). k, v: (total_k, H_kv, D). cu_seqlens_q, cu_seqlens_k: (N + 1,)
            integers; sequence b is rows ``cu[b]:cu[b + 1]`` (flash-attn's varlen layout).
        bottom_right: align causal masks and windows to each sequence's bottom-right corner, as
            flash-attn's ``flash_attn_varlen_func`` does.
        softcap, alibi_slopes: as in :func:`attention_reference`; slopes (N, H) give sequence b
            the slopes of row b, slopes (H,) serve every sequence; distances are measured within
            each sequence.
    Returns:
        out (total_q, H, D), and with ``return_lse`` also the log-sum-exp (H, total_q).
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # Zero-length pieces first, so that a batch of no sequences concatenates too.
    outs, lses = [q[:0]], [q.new_empty(q.shape[1], 0)]
    for index, (q0, q1, k0, k1) in enumerate(zip(starts_q, starts_q[1:], starts_k, starts_k[1:])):
        slopes = None if alibi_slopes is None else alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[index]
        out, lse = attention_reference(
            *(t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))),
            causal=causal, scale=scale, window_size=window_size, bottom_right=bottom_right, return_lse=True,
            softcap=softcap, alibi_slopes=slopes)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if return_lse else out
