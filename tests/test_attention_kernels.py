"""The Triton launchers against the float64 torch reference (CPU: Triton interpreter).

Every derivative the kernels provide is checked directly: forward (out, lse), the JVP kernel
(out_dot, lse_dot), the second-order forward (out'', lse''), the backward (with an lse
cotangent), and the double backward (all five cotangents), over dtype × causal alignment × odd and even lengths × head dims (padded ones too).
Outputs are preallocated full of NaN, so an element a kernel does not write fails the test.
Triton 3.6's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16), so on the CPU the
half-precision cases use float16; bfloat16 is covered on the GPU (tests/test_attention_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from _attention_cases import assert_close, params_for, poisoned, random_inputs, reference_fn
from theria_kernels.attention import (
    attention_backward,
    attention_backward_backward,
    attention_forward,
    attention_forward_second,
    attention_jvp,
)

# (batch, heads, heads_kv, t_q, t_k): odd lengths, T_q ≠ T_k both ways, grouped-query heads.
SHAPES = [(1, 2, 2, 17, 17), (2, 2, 1, 19, 33), (1, 2, 1, 33, 9)]
MASKS = [
    dict(causal=False),
    dict(causal=True),  # top-left (torch SDPA)
    dict(causal=True, bottom_right=True),  # flash-attn; with T_q > T_k some rows see no key
    dict(window_size=(5, 3), bottom_right=True),
]
HEAD_DIMS = [16, 40]


def _case(shape, head_dim, dtype, mask, seed=0):
    batch, heads, heads_kv, t_q, t_k = shape
    q, k, v = random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, dtype, seed=seed)
    return q, k, v, params_for(head_dim, **mask)


def _reference_outputs(q, k, v, params):
    """float64 (out, lse) and the reference as a function of float64 leaves."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    fn = reference_fn(params)
    return leaves, fn, fn(*leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal", "causal_br", "window_br"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward(shape, mask, dtype):
    head_dim = HEAD_DIMS[hash((shape, tuple(mask.items()))) % 2]
    q, k, v, params = _case(shape, head_dim, dtype, mask)
    leaves, _, (ref_out, ref_lse) = _reference_outputs(q, k, v, params)
    out, lse = attention_forward(q, k, v, params, out=poisoned(q),
                                 lse=poisoned(q, q.shape[:3], torch.float64 if dtype == torch.float64 else torch.float32))
    assert_close("out", out, ref_out, dtype)
    empty = torch.isinf(lse)
    assert torch.all(lse[empty] > 0) and torch.all(out[empty.unsqueeze(-1).expand_as(out)] == 0)
    assert_close("lse", torch.where(empty, 0.0, lse), ref_lse, dtype)

    d_out = torch.randn_like(q)
    d_lse = torch.randn(q.shape[:3], dtype=lse.dtype)
    ref_grads = torch.autograd.grad((ref_out * d_out.double()).sum() + (ref_lse * d_lse.double()).sum(), leaves)
    grads = attention_backward(q, k, v, out, lse, d_out, d_lse, params,
                               dq=poisoned(q), dk=poisoned(k), dv=poisoned(v))
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal", "causal_br", "window_br"])
def test_jvp(mask, dtype):
    shape, head_dim = SHAPES[2], 24
    q, k, v, params = _case(shape, head_dim, dtype, mask, seed=1)
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    out, lse, out_dot, lse_dot = attention_jvp(
        q, k, v, *tangents, params, out_dot=poisoned(q),
        lse_dot=poisoned(q, q.shape[:3], torch.float64 if dtype == torch.float64 else torch.float32))
    (ref_out, ref_lse), (ref_out_dot, ref_lse_dot) = torch.func.jvp(
        reference_fn(params), tuple(t.double() for t in (q, k, v)), tuple(t.double() for t in tangents))
    assert_close("out", out, ref_out, dtype)
    assert_close("out_dot", out_dot, ref_out_dot, dtype)
    assert_close("lse_dot", lse_dot, ref_lse_dot, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal", "causal_br", "window_br"])
def test_forward_second(mask, dtype):
    """f''(x)[ẋ, y] against the reference's jvp of jvp, on grouped heads with rows that see no key."""
    shape, head_dim = SHAPES[2], 40
    q, k, v, params = _case(shape, head_dim, dtype, mask, seed=3)
    x_dot = [torch.randn_like(t) for t in (q, k, v)]
    y = [torch.randn_like(t) for t in (q, k, v)]
    row_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out_second, lse_second = attention_forward_second(
        q, k, v, *x_dot, *y, params, out_second=poisoned(q), lse_second=poisoned(q, q.shape[:3], row_dtype))
    fn = reference_fn(params)
    x_dot64 = tuple(t.double() for t in x_dot)
    tangent = lambda *x: torch.func.jvp(fn, x, x_dot64)[1]  # noqa: E731
    _, (ref_out, ref_lse) = torch.func.jvp(tangent, tuple(t.double() for t in (q, k, v)),
                                           tuple(t.double() for t in y))
    assert_close("out_second", out_second, ref_out, dtype)
    assert_close("lse_second", lse_second, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal", "causal_br", "window_br"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_backward_backward(shape, mask, dtype):
    head_dim = 16 if dtype == torch.float64 else 40
    q, k, v, params = _case(shape, head_dim, dtype, mask, seed=2)
    out, lse = attention_forward(q, k, v, params)
    d_out = torch.randn_like(q)
    d_lse = torch.randn(q.shape[:3], dtype=lse.dtype)
    cotangents = [torch.randn_like(t) for t in (q, k, v)]

    leaves, fn, (ref_out, ref_lse) = _reference_outputs(q, k, v, params)
    d_out64 = d_out.double().requires_grad_()
    d_lse64 = d_lse.double().requires_grad_()
    grads = torch.autograd.grad((ref_out * d_out64).sum() + (ref_lse * d_lse64).sum(), leaves, create_graph=True)
    ref = torch.autograd.grad(sum((g * c.double()).sum() for g, c in zip(grads, cotangents)),
                              [*leaves, d_out64, d_lse64])
    got = attention_backward_backward(
        q, k, v, out, lse, d_out, d_lse, *cotangents, params,
        cot_q=poisoned(q), cot_k=poisoned(k), cot_v=poisoned(v), cot_d_out=poisoned(q),
        cot_d_lse=poisoned(lse))
    for name, g, r in zip(("cot_q", "cot_k", "cot_v", "cot_d_out", "cot_d_lse"), got, ref):
        assert_close(name, g, r, dtype)


def test_head_dim_padding_and_limits():
    """Head dims that are not powers of two (padded block, masked loads) at both ends of the range."""
    for head_dim in (8, 59, 96):
        q, k, v, params = _case((1, 1, 1, 9, 11), head_dim, torch.float64, dict(causal=True))
        (ref_out, _) = reference_fn(params)(q, k, v)
        out, _ = attention_forward(q, k, v, params, out=poisoned(q))
        assert_close(f"out (head dim {head_dim})", out, ref_out, torch.float64)


def test_strided_inputs_match_contiguous():
    """(B, T, H, D) buffers seen through a transpose, and a v that is a slice of a wider tensor."""
    q, k, v, params = _case((2, 2, 2, 13, 13), 16, torch.float64, dict(causal=True))
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    v_wide = torch.cat([v, torch.randn_like(v)], dim=-1)[..., :16]
    out, lse = attention_forward(q_t, k, v_wide, params)
    ref_out, ref_lse = attention_forward(q, k, v, params)
    assert out.stride() == q_t.stride()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    dq, dk, dv = attention_backward(q_t, k, v_wide, out, lse, torch.ones_like(q_t), None, params)
    ref = attention_backward(q, k, v, ref_out, ref_lse, torch.ones_like(q), None, params)
    for a, b in zip((dq, dk, dv), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
