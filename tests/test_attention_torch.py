"""theria_torch's attention API: autograd at every order, torch.func transforms, layouts, errors.

Float64 throughout (on the CPU through Triton's interpreter, on a GPU machine compiled for CUDA),
where gradcheck-style tests are exact enough to catch any wrong term; gradcheck uses fast_mode
(a random projection of the Jacobian) except where the full Jacobian is the point.
"""

from __future__ import annotations

import sys

import pytest
import torch

from _attention_cases import SOFTCAP, cu_seqlens, one_sweep_rows_reading_dq, random_inputs, random_slopes
from _device import DEVICE
from _numerics import assert_accurate
from theria_torch import flash_attn_func, flash_attn_varlen_func, sdpa_custom
from theria_torch.reference import attention_reference

F64 = torch.float64
MASKS = [dict(causal=False), dict(causal=True), dict(causal=True, window_size=(3, -1))]


def _leaves(batch=1, heads=2, heads_kv=1, t_q=7, t_k=9, head_dim=8, seed=0):
    return [t.requires_grad_() for t in random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, F64, seed=seed)]


@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal", "causal_window"])
def test_gradcheck_with_lse(mask):
    q, k, v = _leaves()
    fn = lambda q, k, v: sdpa_custom(q, k, v, return_lse=True, **mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


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
                                    fast_mode=True, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False)


def _launched(monkeypatch) -> list:
    """Record every attention launch as (kernel name, its HAS_TANGENT and GIVEN_PRIMAL flags,
    whether it writes a cotangent of d_out: False only for a double backward that forms none) and
    run it."""
    import theria_kernels._launch_torch as launch_torch

    launched, launch_one = [], launch_torch.launch_one

    def record(launch, tensors):
        flags = {name: launch.arguments[name] for name in ("HAS_TANGENT", "GIVEN_PRIMAL") if name in launch.arguments}
        wants = launch.arguments.get("Cot_d_out", False) is not None
        launched.append((getattr(launch.kernel, "__name__", None) or launch.kernel.fn.__name__, flags, wants))
        launch_one(launch, tensors)

    monkeypatch.setattr(launch_torch, "launch_one", record)
    return launched


def test_forward_mode_runs_the_forward_once(monkeypatch):
    """``torch.func.jvp`` runs the forward kernel, then the tangent kernel on its out and lse: the
    primal is not computed a second time (no JVP kernel with its own online softmax)."""
    q, k, v = (t.detach() for t in _leaves(t_q=13, t_k=13, seed=3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    launched = _launched(monkeypatch)
    torch.func.jvp(lambda *a: sdpa_custom(*a, causal=True), (q, k, v), tangents)
    assert [flags for _, flags, _ in launched] == [dict(HAS_TANGENT=False, GIVEN_PRIMAL=False),
                                                  dict(HAS_TANGENT=True, GIVEN_PRIMAL=True)]


def test_double_backward_forms_the_d_out_cotangent_only_when_wanted(monkeypatch):
    """An HVP of <out, W> with a fixed W gives d_out = W, which nothing differentiates: the double
    backward's row sweep then forms no cotangent for it. A non-linear loss makes d_out depend on
    the output, and the row sweep forms it."""
    q, k, v = _leaves(t_q=11, t_k=11, seed=5)
    weight = torch.randn_like(q)
    launched = _launched(monkeypatch)
    for loss, wants_cot_d_out in ((lambda out: (out * weight).sum(), False), (lambda out: (out ** 2).sum(), True)):
        launched.clear()
        grads = torch.autograd.grad(loss(sdpa_custom(q, k, v)), (q, k, v), create_graph=True)
        hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), (q, k, v))
        assert [wants for name, _, wants in launched if name == "_attn_bwd_bwd_rows_kernel"] == [wants_cot_d_out]
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(loss(attention_reference(*leaves)), leaves, create_graph=True)
        for got, want in zip(hvp, torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


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


@pytest.mark.parametrize("order", ["reverse_over_reverse", "forward_over_reverse", "reverse_over_forward"])
def test_the_one_row_sweep_reads_the_backwards_dq(order, monkeypatch):
    """Each second-order path hands the double backward the backward's dq, from which its row kernel
    in one sweep (forced here: the interpreter's table sweeps twice) reads dS K instead of summing
    it (theory §4.7): the row launches get it, and the numbers are the reference's. Reverse over
    forward (the gradient of a JVP) runs the backward for its cotangent first to have one."""
    from theria_kernels.attention.torch_launchers import clear_plans

    rows = one_sweep_rows_reading_dq(monkeypatch)
    q, k, v = (t.detach() for t in _leaves(t_q=11, t_k=11, seed=9))
    direction, weight = tuple(torch.randn_like(t) for t in (q, k, v)), torch.randn_like(q)

    def second_order(backend):
        attend = lambda q, k, v: sdpa_custom(q, k, v, causal=True, backend=backend)  # noqa: E731
        loss = lambda q, k, v: (attend(q, k, v) * weight).sum().sin()  # noqa: E731
        if order == "forward_over_reverse":
            return torch.func.jvp(torch.func.grad(loss, argnums=(0, 1, 2)), (q, k, v), direction)[1]
        if order == "reverse_over_forward":
            along = lambda q, k, v: (torch.func.jvp(attend, (q, k, v), direction)[1] * weight).sum()  # noqa: E731
            return torch.func.grad(along, argnums=(0, 1, 2))(q, k, v)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
        return torch.autograd.grad(grads, leaves, direction)

    clear_plans()  # plans are cached with the schedule they were built with
    try:
        got = second_order("triton_full_fused")
    finally:
        clear_plans()
    assert rows and all(rows)
    for a, r in zip(got, second_order("reference")):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_vmap_of_grad_and_of_jvp():
    q, k, v = (t.detach() for t in _leaves(seed=6))
    qs = torch.randn(3, *q.shape, dtype=F64, device=DEVICE)

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


# flash-attn's softcap and alibi_slopes (docs/theory/attention_derivatives.md §8): (B, H) slopes,
# grouped heads, bottom-right causal.
# The slopes of the batch entries (or sequences) and heads of the tests below, drawn outside any vmap.
SLOPES = random_slopes(4, 2).to(DEVICE)


def _capped(q, k, v, backend="triton_full_fused", cu=None, **options):
    """flash_attn_func (or, given ``cu`` = (cu_seqlens, max_seqlen), flash_attn_varlen_func) with the
    cap and per-sequence slopes."""
    heads = q.shape[-2]
    if cu is None:
        slopes = SLOPES[:q.shape[0], :heads]
        return flash_attn_func(q, k, v, causal=True, softcap=SOFTCAP, alibi_slopes=slopes, backend=backend, **options)
    slopes = SLOPES[:cu[0].numel() - 1, :heads]
    return flash_attn_varlen_func(q, k, v, cu[0], cu[0], cu[1], cu[1], causal=True, softcap=SOFTCAP,
                                  alibi_slopes=slopes, backend=backend, **options)


def test_softcap_and_alibi_every_order():
    """gradgradcheck (reverse over reverse) of out and lse, forward AD, and the HVP and jvp of jvp
    against the reference backend."""
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in _leaves(batch=2, t_q=7, t_k=9, seed=10))
    assert torch.autograd.gradgradcheck(lambda *x: _capped(*x, return_lse=True), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *x: _capped(*x, return_lse=True), (q, k, v), fast_mode=True,
                                    check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)
    x = tuple(t.detach() for t in (q, k, v))
    tangents = tuple(torch.randn_like(t) for t in x)

    def hvp_and_jvp_of_jvp(backend):
        loss = lambda *x: _capped(*x, backend=backend).sin().sum()  # noqa: E731
        hvp = torch.func.jvp(torch.func.grad(loss, argnums=(0, 1, 2)), x, tangents)[1]
        tangent = lambda *x: torch.func.jvp(lambda *y: _capped(*y, backend=backend), x, tangents)[1]  # noqa: E731
        return (*hvp, torch.func.jvp(tangent, x, tuple(0.5 * t.flip(1) for t in tangents))[1])

    for got, want in zip(hvp_and_jvp_of_jvp("triton_full_fused"), hvp_and_jvp_of_jvp("reference")):
        assert_accurate("softcap and ALiBi, second order", got, want, F64)


def test_varlen_softcap_and_alibi_and_vmap():
    """Packed sequences with their own slopes: gradient of a gradient penalty against the reference;
    vmap over q folds the row slopes with the batch."""
    lengths = [5, 0, 9, 3]
    cu = (cu_seqlens(lengths), max(lengths))
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=F64, device=DEVICE, requires_grad=True) for _ in range(3))

    def penalty(backend):
        grads = torch.autograd.grad(_capped(q, k, v, backend, cu).sin().sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))

    for got, want in zip(penalty("triton_full_fused"), penalty("reference")):
        assert_accurate("varlen softcap and ALiBi, gradient of a gradient", got, want, F64)
    queries = torch.randn(3, 2, 5, 2, 8, dtype=F64, device=DEVICE)  # 3 instances of (B, T, H, D)
    keys, values = (torch.randn(2, 6, 1, 8, dtype=F64, device=DEVICE) for _ in range(2))
    fused, reference = (torch.func.vmap(lambda q: _capped(q, keys, values, backend))(queries)
                        for backend in ("triton_full_fused", "reference"))
    assert_accurate("vmap", fused, reference, F64)


def test_softcap_and_alibi_bad_arguments():
    q, k, v = (t.transpose(1, 2) for t in random_inputs(2, 4, 2, 8, 8, 16, F64))
    slopes = random_slopes(2, 4).to(DEVICE)
    for options, error, message in (
            (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
            (dict(softcap="50"), TypeError, "softcap must be a Python float"),
            (dict(alibi_slopes=slopes[:, :3]), ValueError, r"alibi_slopes must have shape \(nheads,\) = \(4,\)"),
            (dict(alibi_slopes=slopes.to(torch.int32)), TypeError, "alibi_slopes must be float32"),
            (dict(alibi_slopes=slopes.numpy() if DEVICE == "cpu" else slopes.cpu()),
             (TypeError, ValueError), "alibi_slopes")):
        with pytest.raises(error, match=message):
            flash_attn_func(q, k, v, **options)


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
    wide = torch.randn(*v.shape[:-1], 3 * v.shape[-1], dtype=F64, device=DEVICE)
    sliced = wide[..., ::3]
    torch.testing.assert_close(sdpa_custom(q, k, sliced), attention_reference(q, k, sliced), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_matches_reference(dtype):
    q, k, v = random_inputs(1, 2, 2, 21, 21, 32, dtype, seed=8)
    out = sdpa_custom(q, k, v, causal=True)
    assert out.dtype == dtype
    assert_accurate("out", out, attention_reference(q.double(), k.double(), v.double(), causal=True), dtype,
                    plain=attention_reference(q, k, v, causal=True))


def _on_device(overrides: dict) -> dict:
    """The tensors of a bad-argument case moved to DEVICE (a meta tensor stays: it is the error)."""
    return {name: value.to(DEVICE) if isinstance(value, torch.Tensor) and not value.is_meta else value
            for name, value in overrides.items()}


def _bad(**overrides):
    q, k, v = random_inputs(1, 4, 2, 8, 8, 16, F64)
    args = dict(q=q, k=k, v=v)
    args.update(_on_device(overrides))
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
    """CPU tensors on purpose, on any machine: outside the interpreter the kernels refuse them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = random_inputs(1, 2, 2, 8, 8, 16, F64, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sdpa_custom(q, k, v)
    sdpa_custom(q, k, v, backend="reference")  # the reference needs no GPU


# ----------------------------------------------------------------------------------------------
# flash_attn_varlen_func: packed variable-length batches
# ----------------------------------------------------------------------------------------------

# Per sequence (T_q, T_k): queries shorter than keys, an empty query sequence, queries longer than
# keys (bottom-right causal leaves its first rows without keys), an empty key sequence.
VARLEN_LENGTHS = [(3, 5), (0, 2), (9, 4), (2, 0)]


def _packed(heads=2, heads_kv=1, head_dim=8, seed=0, lengths=VARLEN_LENGTHS):
    """Packed float64 (q, k, v) leaves, (total, H, D), and the varlen arguments."""
    lengths_q, lengths_k = zip(*lengths)
    q, k, v = random_inputs(1, heads, heads_kv, sum(lengths_q), sum(lengths_k), head_dim, F64, seed=seed)
    leaves = [t[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
    return leaves, (cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q), max(lengths_k))


def _varlen(sequences, backend="triton_full_fused", **mask):
    """(q, k, v) ↦ (out, lse) of flash_attn_varlen_func, lse's +inf rows (no key) replaced by 0."""

    def fn(q, k, v):
        out, lse = flash_attn_varlen_func(q, k, v, *sequences, return_lse=True, backend=backend, **mask)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    return fn


def test_varlen_gradcheck_and_gradgradcheck(one_torch_thread):
    leaves, sequences = _packed()
    assert torch.autograd.gradcheck(_varlen(sequences, window_size=(2, 1)), leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(_varlen(sequences, causal=True), leaves, fast_mode=True)


def test_varlen_forward_mode_and_hvps_match_reference(one_torch_thread):
    """gradcheck of forward AD, then jvp, forward-over-reverse HVP, grad of jvp and jvp of jvp
    (a tangent of the tangent included) against the reference run per sequence."""
    leaves, sequences = _packed(seed=1)
    assert torch.autograd.gradcheck(_varlen(sequences, causal=True), leaves, fast_mode=True, check_forward_ad=True,
                                    check_backward_ad=False, check_undefined_grad=False)
    q, k, v = (t.detach() for t in leaves)
    x_dot, y, x_dot_dot = ((torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)) for _ in range(3))

    def derivatives(backend):
        attend = _varlen(sequences, backend, causal=True)
        loss = lambda *x: sum(t.sin().sum() for t in attend(*x))  # noqa: E731
        tangent = lambda *x: torch.func.jvp(attend, x, x_dot)[1]  # noqa: E731
        return {
            "jvp": torch.func.jvp(attend, (q, k, v), x_dot)[1],
            "hvp": torch.func.jvp(torch.func.grad(loss, argnums=(0, 1, 2)), (q, k, v), x_dot)[1],
            "grad_of_jvp": torch.func.grad(lambda *x: sum(t.sin().sum() for t in tangent(*x)), argnums=(0, 1, 2))(
                q, k, v),
            "jvp_of_jvp": torch.func.jvp(lambda *x: torch.func.jvp(attend, x[:3], x[3:])[1],
                                         (q, k, v, *x_dot), (*y, *x_dot_dot))[1],
        }

    fused, reference = derivatives("triton_full_fused"), derivatives("reference")
    for name in fused:
        for got, want in zip(fused[name], reference[name]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_varlen_vmap_of_grad_shares_cu_seqlens(one_torch_thread):
    """vmap folds the instances into the batch dimension; every entry is packed alike."""
    (q, k, v), sequences = _packed(seed=2)
    qs = torch.randn(3, *q.shape, dtype=F64, device=DEVICE)
    k, v = k.detach(), v.detach()

    def loss(backend):
        return lambda q: (_varlen(sequences, backend, causal=True)(q, k, v)[0] ** 2).sum()

    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss("triton_full_fused")))(qs),
                               torch.func.vmap(torch.func.grad(loss("reference")))(qs), rtol=1e-12, atol=1e-12)
    batched_cu = sequences[0].expand(3, -1)
    with pytest.raises(NotImplementedError, match="vmap over cu_seqlens"):
        torch.func.vmap(lambda q, cu: flash_attn_varlen_func(q, k, v, cu, *sequences[1:]))(qs, batched_cu)


def test_varlen_equals_flash_attn_func_per_sequence(one_torch_thread):
    """Outputs, lse and gradients equal flash_attn_func called on each sequence alone."""
    (q, k, v), sequences = _packed(heads=4, heads_kv=2, seed=3, lengths=[(7, 11), (5, 5), (12, 3)])
    out, lse = flash_attn_varlen_func(q, k, v, *sequences, causal=True, return_lse=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    cu_q, cu_k = (c.tolist() for c in sequences[:2])
    for b in range(len(cu_q) - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        parts = [t[None, rows].detach().requires_grad_() for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k))]
        out_b, lse_b = flash_attn_func(*parts, causal=True, return_lse=True)
        torch.testing.assert_close(out[rows_q], out_b[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[:, rows_q], lse_b[0], rtol=1e-12, atol=1e-12)
        for grad, part, rows in zip(grads, torch.autograd.grad(out_b.square().sum(), parts), (rows_q, rows_k, rows_k)):
            torch.testing.assert_close(grad[rows], part[0], rtol=1e-12, atol=1e-12)


def _bad_varlen(**overrides):
    (q, k, v), (cu_q, cu_k, max_q, max_k) = _packed(heads=4, heads_kv=2, head_dim=16)
    args = dict(q=q.detach(), k=k.detach(), v=v.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                max_seqlen_k=max_k)
    args.update(_on_device(overrides))
    return args


I32 = torch.int32
VARLEN_ERRORS = [  # (arguments, error, message); totals: 14 queries, 11 keys; max lengths 9 and 5
    (_bad_varlen(q=torch.randn(1, 14, 4, 16, dtype=F64)), ValueError, r"q must have 3 dimensions \(total, H, D\)"),
    (_bad_varlen(q=torch.randn(14, 3, 16, dtype=F64)), ValueError, "q has 3 heads and k, v have 2"),
    (_bad_varlen(v=torch.randn(11, 2, 16, dtype=torch.float32)), TypeError, "q, k, v must share one dtype"),
    (_bad_varlen(k=torch.randn(11, 2, 8, dtype=F64), v=torch.randn(11, 2, 8, dtype=F64)), ValueError,
     "q has head dim 16 but k and v have 8"),
    (_bad_varlen(cu_seqlens_q=torch.tensor([0, 3, 3, 12, 14])), TypeError, "cu_seqlens_q must be int32"),
    (_bad_varlen(cu_seqlens_k=torch.tensor([[0, 5, 7, 11, 11]], dtype=I32)), ValueError,
     r"cu_seqlens_k must be 1-D with batch \+ 1 entries, got shape \(1, 5\)"),
    (_bad_varlen(cu_seqlens_k=torch.tensor([0, 5, 11], dtype=I32)), ValueError,
     "cu_seqlens_q has 5 entries and cu_seqlens_k has 3"),
    (_bad_varlen(cu_seqlens_q=torch.tensor([1, 3, 3, 12, 14], dtype=I32)), ValueError, "cu_seqlens_q must start at 0"),
    (_bad_varlen(cu_seqlens_q=torch.tensor([0, 3, 2, 12, 14], dtype=I32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, but entry 2 \(2\) is less than entry 1 \(3\)"),
    (_bad_varlen(cu_seqlens_k=torch.tensor([0, 5, 7, 11, 12], dtype=I32)), ValueError,
     "cu_seqlens_k ends at 12 but k and v have 11 tokens"),
    (_bad_varlen(cu_seqlens_q=torch.tensor([0, 3, 3, 12, 13], dtype=I32)), ValueError,
     "cu_seqlens_q ends at 13 but q has 14 tokens"),
    (_bad_varlen(max_seqlen_q=8), ValueError, "max_seqlen_q=8 but sequence 2 of cu_seqlens_q has 9 tokens"),
    (_bad_varlen(max_seqlen_k=torch.tensor(5)), ValueError, "max_seqlen_k must be a Python int"),
    (_bad_varlen(cu_seqlens_q=[0, 3, 3, 12, 14]), TypeError, "cu_seqlens_q must be a tensor"),
    # An id without the device, so the case has one node id on every machine.
    pytest.param(_bad_varlen(cu_seqlens_k=torch.tensor([0, 5, 7, 11, 11], dtype=I32, device="meta")), ValueError,
                 rf"cu_seqlens_k must be on q's device {DEVICE}(:0)?, got meta", id="cu_seqlens_k-on-meta"),
]


@pytest.mark.parametrize("args, error, message", VARLEN_ERRORS)
def test_varlen_bad_inputs_raise_named_errors(args, error, message):
    for backend in ("triton_full_fused", "reference"):
        with pytest.raises(error, match=message):
            flash_attn_varlen_func(**args, backend=backend)


def test_varlen_checks_cu_seqlens_once_per_version(monkeypatch):
    """The value check (a host read, a GPU sync) runs once for cu_seqlens reused unchanged, as a
    model's layers reuse them, and again once the values change in place."""
    adapter = sys.modules["theria_torch.attention"]
    checks = []
    check = adapter.validate_cu_seqlens_values
    monkeypatch.setattr(adapter, "validate_cu_seqlens_values", lambda *args: checks.append(args) or check(*args))
    args = _bad_varlen()
    for _ in range(3):
        flash_attn_varlen_func(**args, backend="reference")
    assert len(checks) == 1
    args["cu_seqlens_q"][2] = 2  # in place: no longer non-decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        flash_attn_varlen_func(**args, backend="reference")
