"""Public JAX attention API (placeholder: reference backend only until the bridge lands)."""

from __future__ import annotations

from theria_jax.reference import attention_reference


def attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), return_lse=False,
              backend="triton_full_fused"):
    if backend != "reference":
        raise NotImplementedError("theria_jax.attention: only backend='reference' exists yet")
    return attention_reference(q, k, v, causal=causal, scale=scale, window_size=window_size,
                               return_lse=return_lse)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    return_lse=False, *, backend="triton_full_fused"):
    if backend != "reference":
        raise NotImplementedError("theria_jax.flash_attn_func: only backend='reference' exists yet")
    return attention_reference(q, k, v, causal=causal, scale=softmax_scale, window_size=window_size,
                               bottom_right=True, return_lse=return_lse)
