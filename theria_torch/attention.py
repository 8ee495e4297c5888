"""Public PyTorch attention API (placeholder: reference backend only until the kernels land)."""

from __future__ import annotations

from theria_torch.reference import attention_reference


def sdpa_custom(q, k, v, *, backend="triton_full_fused", causal=False, scale=None,
                window_size=(-1, -1), return_lse=False):
    if backend != "reference":
        raise NotImplementedError("only backend='reference' exists yet")
    return attention_reference(q, k, v, causal=causal, scale=scale, window_size=window_size,
                               return_lse=return_lse)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, *, backend="triton_full_fused"):
    if backend != "reference":
        raise NotImplementedError("only backend='reference' exists yet")
    out = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                              scale=softmax_scale, window_size=window_size, bottom_right=True,
                              return_lse=return_lse)
    if return_lse:
        return out[0].transpose(1, 2), out[1]
    return out.transpose(1, 2)
