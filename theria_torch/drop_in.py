"""``theria_torch.scaled_dot_product_attention``: torch's signature and semantics on theria's kernels.

A one-line swap for ``torch.nn.functional.scaled_dot_product_attention``, with every derivative order
(the fused backend calls :func:`theria_torch.sdpa_custom` and :func:`theria_torch.flash_attn_varlen_func`,
whose autograd Functions carry the backward, double backward and JVP kernels).

What runs fused, exactly, with O(T) extra memory at every order:

* no mask, with or without ``is_causal`` (top-left, as torch aligns it);
* a boolean key-padding mask (without ``is_causal``): ``attn_mask`` broadcast over the query and head dimensions, shaped
  (..., 1, 1, S) (for example (B, 1, 1, S) or (S,)), any pattern of kept keys. Without a causal
  mask the order of the keys does not matter, so the kept keys of each batch entry are gathered into
  flash-attn's packed variable-length layout (an O(T) copy that is differentiated like any index)
  and run through the varlen kernels.

Any other mask (a float mask, a mask that varies over queries or heads) needs a T_q × T_k tensor inside the attention, which the fused kernels never build:
the fused backend raises and names the alternatives (``is_causal``, ``sdpa_custom``'s
``window_size``, ``flash_attn_varlen_func`` for packed batches, or ``backend="reference"``, which
computes every mask exactly in plain torch).
"""

from __future__ import annotations

import math

import torch

from theria_kernels import _contracts
from theria_kernels.attention import BACKENDS, validate_dropout
from theria_torch.attention import flash_attn_varlen_func, sdpa_custom

DENSE_MASK_ERROR = (
    "backend='triton_full_fused' runs a mask only when it stays O(T): no mask, is_causal=True, or a "
    "boolean key-padding mask broadcast over queries and heads, shaped (..., 1, 1, S); got {what}. "
    "For causal masks with sliding windows use theria_torch.sdpa_custom(window_size=...), for "
    "padded batches theria_torch.flash_attn_varlen_func, or backend='reference', which computes any "
    "mask exactly (O(T^2) memory)"
)


def _fold_leading(t: torch.Tensor, leading: torch.Size) -> torch.Tensor:
    """(..., H, T, D) → (B, H, T, D), the leading dims broadcast to ``leading`` and flattened."""
    t = t.expand(*leading, *t.shape[-3:])
    return t.reshape(-1, *t.shape[-3:])


def _math_attention(q, k, v, mask, is_causal, scale):
    """Attention with torch's full semantics in plain torch, on (B, H, L, E) with a mask broadcastable
    to (B, H, L, S): boolean (True = attend) or additive. Rows that see no key output zeros, as
    torch's own math backend gives them, with derivatives that stay finite."""
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = scale * (q @ k.transpose(-1, -2))
    visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible.tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask
            visible = visible & (mask > float("-inf"))
    row_has_key = visible.any(-1, keepdim=True)
    scores = torch.where(visible, scores, float("-inf"))
    scores = torch.where(row_has_key, scores, 0.0)
    return (torch.softmax(scores, dim=-1) * row_has_key).to(v.dtype) @ v


def _key_padding(mask: torch.Tensor, q_ndim: int) -> bool:
    """Whether a boolean mask is a key-padding mask: size 1 along the query dim and the head dim."""
    shape = (1,) * (q_ndim - mask.ndim) + tuple(mask.shape)
    return mask.dtype == torch.bool and shape[-2] == 1 and (len(shape) < 3 or shape[-3] == 1)


def _padded_keys_attention(q, k, v, keep, scale, backend):
    """Non-causal attention of (B, H, L, E) queries over the keys with ``keep`` (B, S) True, through
    the varlen kernels: the kept keys are gathered into (total_k, H_kv, E) with index_select (whose
    derivatives are index_add and index_select again, so every order stays O(T))."""
    batch, _, length, _ = q.shape
    kept = keep.reshape(-1).nonzero().squeeze(1)
    cu_seqlens_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu_seqlens_k[1:] = keep.sum(1).cumsum(0)
    cu_seqlens_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=q.device)
    packed_q = q.transpose(1, 2).reshape(batch * length, *q.shape[1::2])
    packed_k, packed_v = (t.transpose(1, 2).reshape(-1, *t.shape[1::2]).index_select(0, kept) for t in (k, v))
    out = flash_attn_varlen_func(packed_q, packed_k, packed_v, cu_seqlens_q, cu_seqlens_k, length, k.shape[2],
                                 softmax_scale=scale, backend=backend)
    return out.reshape(batch, length, *out.shape[1:]).transpose(1, 2)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend: str = "triton_full_fused"):
    """``torch.nn.functional.scaled_dot_product_attention`` with every derivative order.

    Arguments:
        query: (..., H_q, L, E); any number of leading batch dimensions (none too: (L, E) is one
            head), broadcast against key's and value's.
        key: (..., H_kv, S, E). value: (..., H_kv, S, E); the fused kernels need value's head dim
            equal to E (the reference backend takes any).
        attn_mask: ``None``; a boolean mask (True = attend) or an additive float mask broadcastable
            to (..., H_q, L, S). The fused backend runs ``None`` and boolean key-padding masks shaped
            (..., 1, 1, S) and raises on any other (see the module docstring);
            ``backend="reference"`` computes every mask.
        dropout_p: must be 0.0 (theria has no dropout; a ``ValueError`` otherwise).
        is_causal: query i sees keys j <= i (top-left corner, like torch). Not together with
            ``attn_mask`` (a ``ValueError``, as torch's documented contract asserts).
        scale: multiplies q kᵀ; ``None`` means ``1 / sqrt(E)``.
        enable_gqa: allow H_q to be a multiple of H_kv (query head h uses key/value head
            ``h // (H_q // H_kv)``, without copies on the fused backend); without it the head counts
            must be equal, as in torch.
        backend: ``"triton_full_fused"`` (Triton kernels, O(T) extra memory at every derivative
            order) or ``"reference"`` (plain torch, O(L·S) memory, any mask).
    Returns:
        (..., H_q, L, E_v) in query's dtype, the leading dims broadcast. Rows that see no key are
        zeros, as in torch.
    """
    validate_dropout(dropout_p)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if min(query.ndim, key.ndim, value.ndim) < 2:
        raise ValueError(f"query, key, value need at least 2 dimensions (L, E), got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    squeeze = query.ndim == 2
    query, key, value = (t[None] if t.ndim == 2 else t for t in (query, key, value))
    heads, heads_kv = query.shape[-3], key.shape[-3]
    if heads != heads_kv and not (enable_gqa and heads_kv and heads % heads_kv == 0):
        raise ValueError(
            f"query has {heads} heads and key, value have {heads_kv}: equal head counts are needed, or "
            "enable_gqa=True with the query heads a multiple of the key/value heads")
    leading = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    q, k, v = (_fold_leading(t, leading) for t in (query, key, value))
    _contracts.validate_scale(scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True together: give one of them (as torch requires); fold the "
                         "causal mask into attn_mask for backend='reference'")

    if backend == "reference":
        mask = attn_mask
        if mask is not None:
            dense = (*leading, heads, query.shape[-2], key.shape[-2])
            mask = mask.expand(dense).reshape(-1, *dense[-3:])
        out = _math_attention(q, k, v, mask, is_causal, scale)
    elif attn_mask is None:
        out = sdpa_custom(q, k, v, causal=bool(is_causal), scale=scale, backend=backend)
    elif not _key_padding(attn_mask, query.ndim):
        what = (f"a {attn_mask.dtype} attn_mask" if attn_mask.dtype != torch.bool
                else f"a boolean attn_mask of shape {tuple(attn_mask.shape)} that varies over queries or heads")
        raise ValueError(DENSE_MASK_ERROR.format(what=what))
    else:
        keep = attn_mask.expand(*leading, 1, 1, key.shape[-2]).reshape(-1, key.shape[-2])
        out = _padded_keys_attention(q, k, v, keep, scale, backend)
    out = out.reshape(*leading, *out.shape[1:])
    return out[0] if squeeze else out
