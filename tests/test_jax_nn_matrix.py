"""jax.nn.dot_product_attention's own test matrix, run against theria_jax.dot_product_attention.

JAX tests its attention (tests/nn_test.py, ``testDotProductAttention`` and
``testDotProductAttentionMask``) by comparing each implementation's output and vjp with the XLA
one: bf16 and fp16, grouped-query attention with 1, 2 and 4 query heads per key/value head, with
and without ``vmap`` over the batch (the vmapped function then sees unbatched (T, N, H) inputs),
and the masks causal, padding (sequence lengths), causal + padding and causal + sliding window, at
B2 T128 N4 H32 with tolerances 0.01 (0.02 for the masked dQ and dK). The same matrix runs here with
theria_jax's drop-in in the place of the cuDNN implementation, against jax.nn's XLA
implementation, at jax.nn's tolerances. Dense bias and custom boolean masks are not in it: the
fused backend refuses them (they are O(T²); tests/test_drop_in.py checks the error).

On a GPU machine the whole matrix runs; on CPU (Triton's interpreter) one small float32 case per
test keeps the comparison in CI.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import theria_jax

ON_GPU = any(d.platform == "gpu" for d in jax.devices())


def _xla(*args, **kwargs):
    return jax.nn.dot_product_attention(*args, implementation="xla", **kwargs)


def _close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def _shapes():
    # jax's sizes on the GPU; on CPU an odd length and fewer heads keep the interpreter quick.
    return (2, 128, 128, 4, 32) if ON_GPU else (1, 33, 33, 4, 16)


GPU_DTYPES = [jnp.bfloat16, jnp.float16]


def _dtypes():
    return GPU_DTYPES if ON_GPU else [jnp.float32]


@pytest.mark.parametrize("use_vmap", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", GPU_DTYPES + [jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_dot_product_attention(dtype, group, use_vmap):
    """nn_test.testDotProductAttention: GQA, vmap over the batch, output and vjp."""
    if dtype not in _dtypes() or (not ON_GPU and group == 2):
        pytest.skip("the GPU runs jax's dtypes; the interpreter one float32 case per layout")
    batch, t_k, t_q, heads, head_dim = _shapes()
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (batch, t_q, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, t_k, heads // group, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, t_k, heads // group, head_dim), dtype)
    cotangent = jax.random.normal(keys[3], (batch, t_q, heads, head_dim), dtype)

    answer = theria_jax.dot_product_attention
    if use_vmap:
        answer = jax.vmap(answer, in_axes=(0, 0, 0, None, None), out_axes=0)
    # The reference without GQA and without vmap, as jax's test does.
    k_ref, v_ref = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out_ref, vjp_ref = jax.vjp(_xla, q, k_ref, v_ref, None, None)
    out, vjp = jax.vjp(answer, q, k, v, None, None)
    dq_ref, dk_ref, dv_ref = vjp_ref(cotangent)[:3]
    dq, dk, dv = vjp(cotangent)[:3]
    dk_ref = dk_ref.reshape(batch, t_k, heads // group, group, head_dim).sum(axis=3)
    dv_ref = dv_ref.reshape(batch, t_k, heads // group, group, head_dim).sum(axis=3)
    for name, actual, expected in (("out", out, out_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref),
                                   ("dv", dv, dv_ref)):
        assert actual.dtype == expected.dtype, name
        _close(actual, expected, 0.01, name)


MASK_MODES = ["causal", "padding", ("causal", "padding"), ("causal", "sliding_window")]


@pytest.mark.parametrize("mask_mode", MASK_MODES, ids=lambda m: "+".join(m) if isinstance(m, tuple) else m)
def test_dot_product_attention_mask(mask_mode):
    """nn_test.testDotProductAttentionMask, the modes that stay O(T) (the fused backend refuses
    dense bias and custom masks): output and vjp in bf16 (float32 on CPU)."""
    mask_mode = (mask_mode,) if isinstance(mask_mode, str) else mask_mode
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32
    batch, t_k, t_q, heads, head_dim = _shapes()
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (batch, t_q, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, t_k, heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, t_k, heads, head_dim), dtype)
    cotangent = jax.random.normal(keys[3], (batch, t_q, heads, head_dim), dtype)
    is_causal = "causal" in mask_mode
    q_lengths = kv_lengths = window = None
    if "padding" in mask_mode:
        q_lengths = jnp.array([t_q // 2, t_q // 4][:batch], jnp.int32)
        kv_lengths = jnp.array([t_k // 4, t_k // 2][:batch], jnp.int32)
    if "sliding_window" in mask_mode:
        window = (3, 2) if is_causal else (3, 0)

    def call(attention, q, k, v):
        return attention(q, k, v, is_causal=is_causal, query_seq_lengths=q_lengths,
                         key_value_seq_lengths=kv_lengths, local_window_size=window)

    out_ref, vjp_ref = jax.vjp(functools.partial(call, _xla), q, k, v)
    out, vjp = jax.vjp(functools.partial(call, theria_jax.dot_product_attention), q, k, v)
    grads_ref, grads = vjp_ref(cotangent), vjp(cotangent)
    # jax's test compares every row, the padded query rows included (both give 0 there).
    _close(out, out_ref, 0.01, "out")
    for name, actual, expected, tol in zip(("dq", "dk", "dv"), grads, grads_ref, (0.02, 0.02, 0.01)):
        _close(actual, expected, tol, name)
