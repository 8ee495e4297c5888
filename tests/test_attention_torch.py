"""theria_torch's attention API: autograd at every order, torch.func transforms, layouts, errors.

CPU runs go through Triton's interpreter in float64, where gradcheck-style tests are exact enough
to catch any wrong term.
"""

from __future__ import annotations

import pytest
import torch

from _attention_cases import random_inputs
from theria_torch import flash_attn_func, sdpa_custom
from theria_torch.reference import attention_reference

F64 = torch.float64
MASKS = [dict(causal=False), dict(causal=True), dict(causal=True, window_size=(3, -1))]


def _leaves(batch=1, heads=2, heads_kv=1, t_q=7, t_k=9, head_dim=8, seed=0):
    return [t.requires_grad_() for t in random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, F64, seed=seed)]


@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal", "causal_window"])
def test_gradcheck_with_lse(mask):
    q, k, v = _leaves()
    fn = lambda q, k, v: sdpa_custom(q, k, v, return_lse=True, **mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("mask", MASKS[::2], ids=["full", "causal_window"])
def test_gradgradcheck(mask):
    q, k, v = _leaves(t_q=9, t_k=7, seed=1)
    fn = lambda q, k, v: sdpa_custom(q, k, v, return_lse=True, **mask)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


def test_gradgradcheck_bottom_right_with_empty_rows():
    """flash_attn_func with T_q > T_k: the first rows see no key; derivatives there are 0."""
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in _leaves(t_q=11, t_k=5, seed=2))
    fn = lambda q, k, v: flash_attn_func(q, k, v, causal=True)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)
    out = fn(q, k, v)
    assert torch.all(out[:, :6] == 0)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.all(dq[:, :6] == 0) and torch.isfinite(dq).all()


def test_forward_mode_matches_reference():
    q, k, v = (t.detach() for t in _leaves(t_q=13, t_k=13, seed=3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    for mask in MASKS:
        out, out_dot = torch.func.jvp(lambda *a: sdpa_custom(*a, **mask), (q, k, v), tangents)
        ref, ref_dot = torch.func.jvp(lambda *a: attention_reference(*a, **mask), (q, k, v), tangents)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_dot, ref_dot, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: sdpa_custom(*a, causal=True, return_lse=True), _leaves(seed=4),
                                    check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("causal", [True])
def test_hessian_vector_products_agree(causal):
    """Forward-over-reverse, reverse-over-reverse, the reference and a central finite difference of
    the gradient give the same HVP of a non-linear loss (so dO depends on the output)."""
    q, k, v = (t.detach() for t in _leaves(t_q=11, t_k=11, seed=5))
    direction = tuple(torch.randn_like(t) for t in (q, k, v))

    def loss(backend):
        return lambda q, k, v: (sdpa_custom(q, k, v, causal=causal, backend=backend) ** 2).sum().sin()

    grad_fused = torch.func.grad(loss("triton_full_fused"), argnums=(0, 1, 2))
    fwd_over_rev = torch.func.jvp(grad_fused, (q, k, v), direction)[1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(loss("triton_full_fused")(*leaves), leaves, create_graph=True)
    rev_over_rev = torch.autograd.grad(grads, leaves, direction)
    reference = torch.func.jvp(torch.func.grad(loss("reference"), argnums=(0, 1, 2)), (q, k, v), direction)[1]
    eps = 1e-5
    plus = grad_fused(*(t + eps * d for t, d in zip((q, k, v), direction)))
    minus = grad_fused(*(t - eps * d for t, d in zip((q, k, v), direction)))
    for a, b, r, p, m in zip(fwd_over_rev, rev_over_rev, reference, plus, minus):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((p - m) / (2 * eps), r, rtol=1e-6, atol=1e-6)


def test_vmap_of_grad_and_of_jvp():
    q, k, v = (t.detach() for t in _leaves(seed=6))
    qs = torch.randn(3, *q.shape, dtype=F64)

    def loss(backend):
        return lambda q: (sdpa_custom(q, k, v, causal=True, backend=backend) ** 2).sum()

    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss("triton_full_fused")))(qs),
                               torch.func.vmap(torch.func.grad(loss("reference")))(qs), rtol=1e-12, atol=1e-12)
    tangent = torch.randn_like(q)
    hvp = lambda backend: lambda q: torch.func.jvp(torch.func.grad(loss(backend)), (q,), (tangent,))[1]  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(hvp("triton_full_fused"))(qs), torch.func.vmap(hvp("reference"))(qs),
                               rtol=1e-10, atol=1e-10)


def test_reverse_over_forward_and_forward_over_forward():
    """grad of a JVP and jvp of a JVP (in two directions, with a tangent of the tangent) match
    the reference."""
    q, k, v = (t.detach() for t in _leaves(seed=9))
    direction, direction_y, tangent_of_tangent = (torch.randn_like(q) for _ in range(3))
    k_y = torch.randn_like(k)

    def jvp_out(backend):
        attend = lambda q, k: sdpa_custom(q, k, v, causal=True, return_lse=True, backend=backend)  # noqa: E731
        return lambda q, k, q_dot: torch.func.jvp(attend, (q, k), (q_dot, torch.zeros_like(k)))[1]

    def jvp_loss(backend):
        return lambda q: jvp_out(backend)(q, k, direction)[0].pow(2).sum()

    torch.testing.assert_close(torch.func.grad(jvp_loss("triton_full_fused"))(q),
                               torch.func.grad(jvp_loss("reference"))(q), rtol=1e-10, atol=1e-10)
    fused, ref = (torch.func.jvp(jvp_out(backend), (q, k, direction), (direction_y, k_y, tangent_of_tangent))[1]
                  for backend in ("triton_full_fused", "reference"))
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)


def test_third_order_raises_clearly():
    q, k, v = _leaves()
    (g,) = torch.autograd.grad(sdpa_custom(q, k, v).pow(2).sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="backend='reference'"):
        torch.autograd.grad(h.sum(), q)


def test_layouts_and_noncontiguous_inputs():
    """flash_attn_func on (B, T, H, D) equals sdpa_custom on the transposed views (bottom-right
    and top-left agree when T_q == T_k); strided inputs are accepted."""
    q, k, v = (t.detach() for t in _leaves(t_q=10, t_k=10, heads_kv=2, seed=7))
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    torch.testing.assert_close(out.transpose(1, 2), sdpa_custom(q, k, v, causal=True), rtol=0, atol=0)
    wide = torch.randn(*v.shape[:-1], 3 * v.shape[-1], dtype=F64)
    sliced = wide[..., ::3]
    torch.testing.assert_close(sdpa_custom(q, k, sliced), attention_reference(q, k, sliced), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_matches_reference(dtype):
    q, k, v = random_inputs(1, 2, 2, 21, 21, 32, dtype, seed=8)
    out = sdpa_custom(q, k, v, causal=True)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == dtype
    assert ((out.double() - ref).norm() / ref.norm()).item() < {torch.float32: 1e-4, torch.float16: 5e-3}[dtype]


def _bad(**overrides):
    q, k, v = random_inputs(1, 4, 2, 8, 8, 16, F64)
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    return args


@pytest.mark.parametrize("args, error, message", [
    (_bad(q=torch.randn(4, 8, 16, dtype=F64)), ValueError, r"q must have 4 dimensions \(B, H, T, D\)"),
    (_bad(v=torch.randn(1, 2, 9, 16, dtype=F64)), ValueError, "k and v must have the same shape"),
    (_bad(q=torch.randn(1, 3, 8, 16, dtype=F64)), ValueError, "multiple of the key/value heads"),
    (_bad(q=torch.randn(2, 4, 8, 16, dtype=F64)), ValueError, "batch size"),
    (_bad(q=torch.randn(1, 4, 8, 32, dtype=F64)), ValueError, "q has head dim 32 but k and v have 16"),
    (_bad(q=torch.randn(1, 4, 8, 16, dtype=torch.float32)), TypeError, "share one dtype"),
    (_bad(q=torch.randn(1, 4, 8, 300, dtype=F64), k=torch.randn(1, 2, 8, 300, dtype=F64),
          v=torch.randn(1, 2, 8, 300, dtype=F64)), ValueError, "head dim 300; triton_full_fused supports 8–256"),
    (_bad(q=torch.randn(1, 4, 8, 4, dtype=F64), k=torch.randn(1, 2, 8, 4, dtype=F64),
          v=torch.randn(1, 2, 8, 4, dtype=F64)), ValueError, "use backend='reference'"),
])
def test_bad_inputs_raise_named_errors(args, error, message):
    with pytest.raises(error, match=message):
        sdpa_custom(**args)


def test_bad_options_raise():
    q, k, v = random_inputs(1, 2, 2, 8, 8, 16, F64)
    with pytest.raises(ValueError, match="backend must be one of"):
        sdpa_custom(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="window_size"):
        sdpa_custom(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)


def test_cpu_outside_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = random_inputs(1, 2, 2, 8, 8, 16, F64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sdpa_custom(q, k, v)
    sdpa_custom(q, k, v, backend="reference")  # the reference needs no GPU
