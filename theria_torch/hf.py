"""A transformers attention backend: ``register()`` adds ``attn_implementation="theria"``.

transformers picks attention by name through two registries: ``AttentionInterface`` (the attention
function each layer calls) and ``AttentionMaskInterface`` (what ``create_causal_mask`` /
``create_sliding_window_causal_mask`` hand the layers). theria registers both:

* The mask function evaluates transformers' own mask (``sdpa_mask``: causal, sliding window,
  padding from the 2D ``attention_mask``, cache offsets), a few query rows at a time, and keeps only
  per-row statistics (first and last visible key, count): O(B·T) memory. From them it derives one
  description the varlen kernels run exactly: per batch entry the valid queries and keys as one
  sequence (zero-copy views; padding tokens become sequences that see nothing), and one window
  (left, right) aligned to each sequence's end. It then checks that this description reproduces
  every valid row's visible keys, and raises if it does not (packed sequences, chunked or
  bidirectional-block masks), naming the backends that take any mask.
* The attention function runs :func:`theria_torch.flash_attn_varlen_func` (or
  :func:`theria_torch.flash_attn_func` when nothing is padded) on the heads as they come, so
  grouped-query attention never repeats k and v, and every derivative order is a fused kernel.

Padded query rows output zeros, as transformers' flash-attention backends give them (eager and
sdpa fill them with values that no valid token reads). Logit soft-capping (Gemma-2's
``attn_logit_softcapping``, which transformers hands the attention function as ``softcap``) runs
in the fused kernels at every order, as flash_attn_func's ``softcap``.

The mask is checked with one device-to-host read per mask (one per forward, shared by the layers),
so a forward through this backend cannot be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from theria_kernels.attention import BACKENDS, validate_dropout
from theria_torch.attention import flash_attn_func, flash_attn_varlen_func

# Query rows per evaluation of transformers' dense mask: bounds the transient boolean block to
# B × 1024 × T_k while the kept statistics stay O(B·T).
_ROWS_PER_CHUNK = 1024

class VarlenMask(NamedTuple):
    """What the theria mask function hands every layer: an exact O(B·T) description of the mask.

    ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32, 5B + 1) index the (B·T_q) and (B·T_k) packed rows;
    per batch entry the valid queries and keys form one sequence and the padding tokens sequences
    that see nothing. ``window`` is (left, right) aligned to each sequence's end, -1 = unbounded.
    ``padded`` is False when every token is valid (one dense call, no cu_seqlens needed).
    ``live``, ``first``, ``last`` (B, T_q) are each query row's validity and visible key range,
    which the reference backend expands into the dense mask.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    window: tuple[int, int]
    padded: bool
    live: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor


def _row_statistics(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device,
                    use_vmap):
    """(count, first, last) of visible keys per query row, each (B, T_q), from transformers' mask."""
    counts, firsts, lasts = [], [], []
    keys = torch.arange(kv_length, device=device)
    for start in range(0, q_length, _ROWS_PER_CHUNK):
        rows = min(_ROWS_PER_CHUNK, q_length - start)
        block = sdpa_mask(batch_size=batch_size, q_length=rows, kv_length=kv_length, q_offset=q_offset + start,
                          kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                          allow_is_causal_skip=False, use_vmap=use_vmap, device=device)[:, 0]
        counts.append(block.sum(-1))
        firsts.append(torch.where(block, keys, kv_length).amin(-1))
        lasts.append(torch.where(block, keys, -1).amax(-1))
    return torch.cat(counts, 1), torch.cat(firsts, 1), torch.cat(lasts, 1)


def _segment(valid: torch.Tensor):
    """First index, end and count of the True entries of each row of a (B, N) boolean."""
    index = torch.arange(valid.shape[1], device=valid.device)
    start = torch.where(valid, index, valid.shape[1]).amin(-1)
    end = torch.where(valid, index + 1, 0).amax(-1)
    return torch.minimum(start, end), end, valid.sum(-1)


def theria_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                use_vmap: bool = False, device="cpu", **kwargs) -> VarlenMask:
    """transformers' mask interface for ``attn_implementation="theria"``: the arguments are those of
    ``transformers.masking_utils.sdpa_mask`` (``attention_mask`` is the 2D padding mask, (B, seen
    tokens + T_q), True = token); returns a :class:`VarlenMask`, or raises ``ValueError`` when the
    mask is not a causal/sliding/bidirectional window over one contiguous run of valid tokens per
    batch entry."""
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    count, first, last = _row_statistics(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                         attention_mask, device, use_vmap)
    if attention_mask is None:
        token = torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
    else:
        token = attention_mask.to(device=device, dtype=torch.bool)[:, q_offset:q_offset + q_length]
        if token.shape[1] < q_length:  # query positions beyond the 2D mask are tokens
            token = torch.nn.functional.pad(token, (0, q_length - token.shape[1]), value=True)
    # The sequence of batch entry b: its valid queries [q_start, q_end) and the keys they see.
    q_start, q_end, q_count = _segment(token)
    has_key = token & (count > 0)
    k_start = torch.where(has_key, first, kv_length).amin(-1)
    k_end = torch.where(has_key, last + 1, 0).amax(-1)
    k_start = torch.minimum(k_start, k_end)
    # Offsets from each sequence's bottom-right diagonal (flash-attn's alignment in the kernels).
    rows = torch.arange(q_length, device=device)
    diagonal = (rows - q_start[:, None]) + (k_end - k_start - (q_end - q_start))[:, None] + k_start[:, None]
    left = torch.where(has_key, diagonal - first, -kv_length - q_length).amax()
    right = torch.where(has_key, last - diagonal, -kv_length - q_length).amax()
    predicted_first = torch.maximum(diagonal - left, k_start[:, None])
    predicted_last = torch.minimum(diagonal + right, k_end[:, None] - 1)
    predicted_count = (predicted_last - predicted_first + 1).clamp(min=0)
    exact = ((q_count == q_end - q_start).all()
             & torch.where(token, count == predicted_count, True).all()
             & torch.where(has_key, (first == predicted_first) & (last == predicted_last), True).all())
    # A side is unbounded when its bound clips no row's range: -1 lets the kernels skip that mask.
    left_reach = torch.where(has_key, diagonal - k_start[:, None], 0).amax()
    right_reach = torch.where(has_key, k_end[:, None] - 1 - diagonal, 0).amax()
    padded = ((q_start != 0) | (q_end != q_length) | (k_start != 0) | (k_end != kv_length)).any()
    exact, left, right, left_reach, right_reach, padded = torch.stack(
        [exact.long(), left, right, left_reach, right_reach, padded.long()]).tolist()  # the one host read
    if not exact or min(left, right) < 0:
        raise ValueError(
            "attn_implementation='theria' runs masks that are causal, sliding-window or bidirectional over one "
            "contiguous run of valid tokens per batch entry (left or right padding); this model's mask is "
            "not (packed sequences, chunked attention, blocks of bidirectional tokens?). Use "
            "attn_implementation='sdpa' or 'eager' for it")
    window = (-1 if left >= left_reach else left, -1 if right >= right_reach else right)
    cu_seqlens_q, cu_seqlens_k = _live_segments(q_start, q_end, k_start, k_end, q_length, kv_length)
    live = token & (rows >= q_start[:, None]) & (rows < q_end[:, None])
    return VarlenMask(cu_seqlens_q, cu_seqlens_k, window, bool(padded), live, predicted_first, predicted_last)


def _live_segments(q0, q1, k0, k1, total_q, total_k):
    """cu_seqlens in which rows [q0, q1) of batch entry b see keys [k0, k1) and every other query and
    key of the entry nothing: five sequences per entry (queries before, keys before, the live pair,
    queries after, keys after), the dead ones paired with empty partners."""
    batch = q0.shape[0]
    full_q, full_k = torch.full_like(q0, total_q), torch.full_like(q0, total_k)
    offsets = torch.arange(batch, device=q0.device)[:, None]
    cu_q = offsets * total_q + torch.stack([q0, q0, q1, full_q, full_q], 1)
    cu_k = offsets * total_k + torch.stack([torch.zeros_like(q0), k0, k1, k1, full_k], 1)
    start = torch.zeros(1, dtype=torch.int32, device=q0.device)
    return (torch.cat([start, cu_q.reshape(-1).to(torch.int32)]), torch.cat([start, cu_k.reshape(-1).to(torch.int32)]))


def _reference(query, key, value, mask: VarlenMask, scaling, softcap):
    """Plain-torch attention on (B, H, T, D) with the mask's visible ranges, and soft-capping."""
    heads, heads_kv = query.shape[1], key.shape[1]
    if heads != heads_kv:
        key, value = (t.repeat_interleave(heads // heads_kv, dim=1) for t in (key, value))
    scores = scaling * (query @ key.transpose(-1, -2))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keys = torch.arange(key.shape[2], device=query.device)
    visible = (mask.live[..., None] & (keys >= mask.first[..., None]) & (keys <= mask.last[..., None]))[:, None]
    row_has_key = visible.any(-1, keepdim=True)
    scores = torch.where(row_has_key, torch.where(visible, scores, float("-inf")), 0.0)
    return ((torch.softmax(scores, dim=-1) * row_has_key).to(value.dtype) @ value).transpose(1, 2)


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                       softcap=None, is_causal=None, *, backend, **kwargs):
    """transformers' attention-function contract: query (B, H, T_q, D), key and value (B, H_kv, T_k, D),
    ``attention_mask`` from :func:`theria_mask`; returns ((B, T_q, H, D), None)."""
    validate_dropout(dropout)
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by attn_implementation='theria'")
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "attn_implementation='theria' builds its own masks from the 2D attention_mask (B, T) of padded tokens; "
            f"got a ready-made {attention_mask.dim()}-D mask tensor: pass the 2D mask, or use attn_implementation='sdpa'")
    if attention_mask is None:
        if sliding_window is not None:
            raise ValueError("attn_implementation='theria' got a sliding window but no mask; build the model's masks "
                             "with transformers' create_sliding_window_causal_mask")
        # transformers' sdpa contract without a mask: causal (top-left) unless the module is not.
        causal = (module.is_causal if is_causal is None else is_causal) and query.shape[2] > 1
        length = query.shape[2]
        rows = torch.arange(length, device=query.device).expand(query.shape[0], length)
        attention_mask = VarlenMask(None, None, (-1, 0 if causal else -1), False,
                                    torch.ones_like(rows, dtype=torch.bool), torch.zeros_like(rows),
                                    rows if causal else torch.full_like(rows, key.shape[2] - 1))
        if causal and key.shape[2] != length:
            raise ValueError("attn_implementation='theria' needs a mask when queries and keys differ in length")
    if backend == "reference":
        return _reference(query, key, value, attention_mask, scaling, softcap), None
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))   # (B, T, H, D) views
    window = {"causal": attention_mask.window[1] == 0, "window_size": attention_mask.window, "softmax_scale": scaling,
              "softcap": 0.0 if softcap is None else float(softcap)}
    if not attention_mask.padded:
        return flash_attn_func(q, k, v, **window), None
    batch, length = q.shape[:2]
    packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    out = flash_attn_varlen_func(*packed, attention_mask.cu_seqlens_q, attention_mask.cu_seqlens_k, length,
                                 k.shape[1], **window)
    return out.reshape(batch, length, *out.shape[1:]), None


def register(name: str = "theria", *, backend: str = "triton_full_fused") -> str:
    """Register theria in transformers' attention and mask interfaces under ``name``.

    Arguments:
        name: the ``attn_implementation`` string, e.g. ``AutoModelForCausalLM.from_config(config,
            attn_implementation="theria")`` or ``model.set_attn_implementation("theria")``.
        backend: ``"triton_full_fused"`` (the Triton kernels, every derivative order with O(T)
            extra memory) or ``"reference"`` (plain torch on the same masks, O(T²)).
    Returns:
        ``name``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def attention_forward(module, query, key, value, attention_mask, **kwargs):
        return _attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, theria_mask)
    return name
