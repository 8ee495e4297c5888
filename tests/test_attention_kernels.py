"""The Triton launchers against the float64 torch reference, on tests/_device.py's DEVICE (the CPU
through Triton's interpreter, or compiled for the GPU on a GPU machine), by tests/_numerics.py's
criterion.

Every derivative the kernels provide is checked directly: forward (out, lse), the JVP kernel
(out_dot, lse_dot), the second-order forward (out'', lse''), the backward (with an lse
cotangent), and the double backward (all five cotangents), over dtype × causal alignment × odd
and even lengths × head dims (padded ones too), and each also on packed variable-length batches
(the kernels' VARLEN mode).
Outputs are preallocated full of NaN, so an element a kernel does not write fails the test.
Triton 3.6's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16), so on the CPU the
half-precision cases use float16; bfloat16 is covered on the GPU (tests/test_attention_gpu.py).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import triton

from _attention_cases import (
    SOFTCAP,
    cu_seqlens,
    params_for,
    poisoned,
    random_inputs,
    random_slopes,
    reference_fn,
    row_slopes,
    varlen_reference_fn,
)
from _numerics import assert_accurate
from _device import INTERPRETER
import theria_kernels.attention._launch as launch
import theria_kernels.attention._tuning as tuning
import theria_kernels.attention.torch_launchers as torch_launchers
from theria_kernels.attention._launch import cdiv, next_power_of_2
from theria_kernels.attention.torch_launchers import (
    _device,
    attention_backward,
    attention_backward_backward,
    attention_forward,
    attention_forward_second,
    attention_jvp,
    attention_tangent,
    clear_plans,
    row_stat_dtype,
)

# (batch, heads, heads_kv, t_q, t_k): odd lengths, T_q ≠ T_k both ways, grouped-query heads. The
# interpreter's blocks are 16 (so 17 and 23 cross one block boundary, 33 two); with T_k - T_q = 6
# the window's last row block skips the first key block and top-left causal's first row block
# skips the last one, and the interpreter's time grows with batch × heads × row blocks × key blocks.
SHAPES = [(1, 2, 2, 17, 17), (2, 2, 1, 17, 23), (1, 2, 1, 33, 9)]
MASKS = [
    dict(causal=False),
    dict(causal=True),  # top-left (torch SDPA)
    dict(causal=True, bottom_right=True),  # flash-attn; with T_q > T_k some rows see no key
    dict(window_size=(5, 3), bottom_right=True),
]
MASK_IDS = ["full", "causal", "causal_br", "window_br"]
HEAD_DIMS = [16, 40]


@pytest.fixture(autouse=True)
def _seeded_cotangents(request):
    """Tangents and cotangents come from torch's global generator: seed it per test, so each test
    draws the same numbers in every run and order (the accuracy bound is relative to plain
    same-dtype attention on those numbers, so an unseeded draw made the outcome vary)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _case(shape, head_dim, dtype, mask, seed=0):
    batch, heads, heads_kv, t_q, t_k = shape
    q, k, v = random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, dtype, seed=seed)
    return q, k, v, params_for(head_dim, **mask)


def _row_stats(q):
    """A NaN-filled row-statistics buffer for q."""
    return poisoned(q, q.shape[:3], row_stat_dtype(q.dtype))


# Each check runs one launcher on preallocated NaN outputs and compares every output with the float64
# reference ``fn`` (q, k, v) ↦ (out, lse) by the criterion of tests/_numerics.py, plain attention in
# the inputs' dtype giving the 2× bound; ``varlen`` holds the launchers' variable-length keywords.


def _assert_accurate(got: dict, reference, inputs, dtype):
    """Each of ``got`` against ``reference(*inputs)`` computed in float64 and, as plain attention,
    in ``dtype`` from the same rounded inputs."""
    exact = reference(*(t.double() for t in inputs))
    plain = None if dtype == torch.float64 else reference(*inputs)
    for name, value in got.items():
        assert_accurate(name, value, exact[name], dtype, plain=None if plain is None else plain[name])


def _forward_and_backward_reference(fn):
    def reference(q, k, v, d_out, d_lse):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse.to(lse.dtype)).sum(), leaves)
        return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])

    return reference


def _check_forward_and_backward(q, k, v, params, fn, dtype, **varlen):
    out, lse = attention_forward(q, k, v, params, out=poisoned(q), lse=_row_stats(q), **varlen)
    empty = torch.isinf(lse)
    assert torch.all(lse[empty] > 0) and torch.all(out[empty.unsqueeze(-1).expand_as(out)] == 0)
    d_out = torch.randn_like(q)
    d_lse = torch.randn(q.shape[:3], dtype=lse.dtype, device=q.device)
    dq, dk, dv = attention_backward(q, k, v, out, lse, d_out, d_lse, params,
                                    dq=poisoned(q), dk=poisoned(k), dv=poisoned(v), **varlen)
    got = dict(out=out, lse=torch.where(empty, 0.0, lse), dq=dq, dk=dk, dv=dv)
    _assert_accurate(got, _forward_and_backward_reference(fn), (q, k, v, d_out, d_lse), dtype)


def _check_jvp(q, k, v, params, fn, dtype, **varlen):
    """The JVP kernel (primal and tangent in one sweep), and the tangent kernel on the primal the
    JVP kernel returned (in the inputs' dtype, as a forward stores it)."""
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    out, lse, out_dot, lse_dot = attention_jvp(q, k, v, *tangents, params, out_dot=poisoned(q),
                                               lse_dot=_row_stats(q), **varlen)
    given_out_dot, given_lse_dot = attention_tangent(q, k, v, out, lse, *tangents, params, out_dot=poisoned(q),
                                                     lse_dot=_row_stats(q), **varlen)

    def reference(*x):
        (out, _), (out_dot, lse_dot) = torch.func.jvp(fn, x[:3], x[3:])
        return dict(out=out, out_dot=out_dot, lse_dot=lse_dot, given_out_dot=out_dot, given_lse_dot=lse_dot)

    got = dict(out=out, out_dot=out_dot, lse_dot=lse_dot, given_out_dot=given_out_dot, given_lse_dot=given_lse_dot)
    _assert_accurate(got, reference, (q, k, v, *tangents), dtype)


def _check_forward_second(q, k, v, params, fn, dtype, **varlen):
    x_dot = [torch.randn_like(t) for t in (q, k, v)]
    y = [torch.randn_like(t) for t in (q, k, v)]
    out_second, lse_second = attention_forward_second(
        q, k, v, *x_dot, *y, params, out_second=poisoned(q), lse_second=_row_stats(q), **varlen)

    def reference(*x):
        tangent = lambda *primals: torch.func.jvp(fn, primals, x[3:6])[1]  # noqa: E731
        _, (out_second, lse_second) = torch.func.jvp(tangent, x[:3], x[6:])
        return dict(out_second=out_second, lse_second=lse_second)

    _assert_accurate(dict(out_second=out_second, lse_second=lse_second), reference, (q, k, v, *x_dot, *y), dtype)


def _check_backward_backward(q, k, v, params, fn, dtype, **varlen):
    out, lse = attention_forward(q, k, v, params, **varlen)
    d_out = torch.randn_like(q)
    d_lse = torch.randn(q.shape[:3], dtype=lse.dtype, device=q.device)
    cotangents = [torch.randn_like(t) for t in (q, k, v)]
    names = ("cot_q", "cot_k", "cot_v", "cot_d_out", "cot_d_lse")
    got = attention_backward_backward(
        q, k, v, out, lse, d_out, d_lse, *cotangents, params,
        cot_q=poisoned(q), cot_k=poisoned(k), cot_v=poisoned(v), cot_d_out=poisoned(q),
        cot_d_lse=poisoned(lse), **varlen)

    def reference(q, k, v, d_out, d_lse, *cotangents):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, d_out)]
        out, lse = fn(*leaves[:3])
        d_lse = d_lse.to(lse.dtype).requires_grad_()
        grads = torch.autograd.grad((out * leaves[3]).sum() + (lse * d_lse).sum(), leaves[:3], create_graph=True)
        return dict(zip(names, torch.autograd.grad(sum((g * c).sum() for g, c in zip(grads, cotangents)),
                                                   [*leaves, d_lse])))

    _assert_accurate(dict(zip(names, got)), reference, (q, k, v, d_out, d_lse, *cotangents), dtype)
    # With d_out a constant of the caller's: no cot_d_out, the others as accurate (in the
    # interpreter the same numbers bit for bit).
    without = attention_backward_backward(q, k, v, out, lse, d_out, d_lse, *cotangents, params, cot_q=poisoned(q),
                                          wants_cot_d_out=False, **varlen)
    assert without[3] is None
    kept = {name: value for name, value in zip(names, without) if name != "cot_d_out"}
    _assert_accurate(kept, reference, (q, k, v, d_out, d_lse, *cotangents), dtype)
    if INTERPRETER:
        for name, value in kept.items():
            torch.testing.assert_close(value, got[names.index(name)], rtol=0, atol=0, msg=name)
    # With the backward's dq at hand (where one row sweep runs, it reads dS K from it): as accurate.
    dq = attention_backward(q, k, v, out, lse, d_out, d_lse, params, **varlen)[0]
    with_dq = attention_backward_backward(q, k, v, out, lse, d_out, d_lse, *cotangents, params, dq=dq,
                                          cot_q=poisoned(q), **varlen)
    _assert_accurate(dict(zip(names, with_dq)), reference, (q, k, v, d_out, d_lse, *cotangents), dtype)


def _check_backward_tangent(q, k, v, params, fn, dtype, **varlen):
    """The tangent of the backward along (ẋ, u̇) = ((q̇, k̇, v̇), (dȮ, dl̇se)), H_u ẋ + Jᵀ u̇: the double
    backward's launches with the second cotangent u̇, against the reference's double backward plus
    its backward for u̇."""
    out, lse = attention_forward(q, k, v, params, **varlen)
    d_out, d_out_dot = torch.randn_like(q), torch.randn_like(q)
    d_lse, d_lse_dot = (torch.randn(q.shape[:3], dtype=lse.dtype, device=q.device) for _ in range(2))
    x_dot = [torch.randn_like(t) for t in (q, k, v)]
    names = ("q_tangent", "k_tangent", "v_tangent")
    got = attention_backward_backward(q, k, v, out, lse, d_out, d_lse, *x_dot, params, d_out_dot=d_out_dot,
                                      d_lse_dot=d_lse_dot, cot_q=poisoned(q), cot_k=poisoned(k), cot_v=poisoned(v),
                                      **varlen)[:3]
    dq = attention_backward(q, k, v, out, lse, d_out, d_lse, params, **varlen)[0]
    with_dq = attention_backward_backward(q, k, v, out, lse, d_out, d_lse, *x_dot, params, d_out_dot=d_out_dot,
                                          d_lse_dot=d_lse_dot, dq=dq, cot_q=poisoned(q), **varlen)[:3]

    def reference(q, k, v, d_out, d_lse, d_out_dot, d_lse_dot, *x_dot):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse.to(lse.dtype)).sum(), leaves,
                                    create_graph=True, retain_graph=True)
        hessian = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, x_dot)), leaves, retain_graph=True)
        linear = torch.autograd.grad((out * d_out_dot).sum() + (lse * d_lse_dot.to(lse.dtype)).sum(), leaves)
        return dict(zip(names, (a + b for a, b in zip(hessian, linear))))

    for found in (got, with_dq):
        _assert_accurate(dict(zip(names, found)), reference, (q, k, v, d_out, d_lse, d_out_dot, d_lse_dot, *x_dot),
                         dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward(shape, mask, dtype):
    head_dim = HEAD_DIMS[(SHAPES.index(shape) + MASKS.index(mask)) % 2]  # deterministic, both sizes used
    q, k, v, params = _case(shape, head_dim, dtype, mask)
    _check_forward_and_backward(q, k, v, params, reference_fn(params), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_jvp(mask, dtype):
    q, k, v, params = _case(SHAPES[2], 24, dtype, mask, seed=1)
    _check_jvp(q, k, v, params, reference_fn(params), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_forward_second(mask, dtype):
    """f''(x)[ẋ, y] against the reference's jvp of jvp, on grouped heads with rows that see no key."""
    q, k, v, params = _case(SHAPES[2], 40, dtype, mask, seed=3)
    _check_forward_second(q, k, v, params, reference_fn(params), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_backward_backward(shape, mask, dtype):
    head_dim = 16 if dtype == torch.float64 else 40
    q, k, v, params = _case(shape, head_dim, dtype, mask, seed=2)
    _check_backward_backward(q, k, v, params, reference_fn(params), dtype)


# Variable-length batches: per sequence (T_q, T_k), one longer than an interpreter block (16), an
# empty query sequence whose keys must still get (zero) gradients, an empty key sequence whose
# queries see nothing, queries both longer and shorter than keys (bottom-right causal empties
# rows of the third), and sequences shorter than a block.
VARLEN_LENGTHS = [(5, 9), (0, 4), (17, 6), (4, 0), (3, 3)]
VARLEN_CHECKS = {
    "forward_and_backward": _check_forward_and_backward,
    "jvp": _check_jvp,
    "forward_second": _check_forward_second,
    "backward_backward": _check_backward_backward,
    "backward_tangent": _check_backward_tangent,
}


def _varlen_case(head_dim, dtype, mask, seed=0):
    """Packed (1, H, total, D) views (2 query heads on 1 key/value head) and the varlen keywords."""
    lengths_q, lengths_k = zip(*VARLEN_LENGTHS)
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, k, v = random_inputs(1, 2, 1, sum(lengths_q), sum(lengths_k), head_dim, dtype, seed=seed)
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k))
    params = params_for(head_dim, **mask)
    return q, k, v, params, varlen_reference_fn(params, cu_q, cu_k), varlen


@pytest.mark.parametrize("check", list(VARLEN_CHECKS))
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_varlen(mask, check):
    """Every launcher in VARLEN mode against the reference run per sequence, in float64."""
    q, k, v, params, fn, varlen = _varlen_case(16, torch.float64, mask, seed=4)
    VARLEN_CHECKS[check](q, k, v, params, fn, torch.float64, **varlen)


# Logit soft-capping and ALiBi (§8), together: every launcher, on grouped heads with rows that see
# no key (bottom-right causal, T_q > T_k), and on packed sequences with per-sequence slopes.
MODIFIERS = dict(causal=True, bottom_right=True, softcap=SOFTCAP, alibi=True)


@pytest.mark.parametrize("check", list(VARLEN_CHECKS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_softcap_and_alibi(check, dtype):
    q, k, v, params = _case(SHAPES[2], 16, dtype, MODIFIERS, seed=7)
    slopes = random_slopes(q.shape[0], q.shape[1]).to(q.device)
    VARLEN_CHECKS[check](q, k, v, params, reference_fn(params, slopes), dtype,
                         row_slopes=row_slopes(slopes, q.shape[2]))


@pytest.mark.parametrize("check", list(VARLEN_CHECKS))
def test_varlen_softcap_and_alibi(check):
    q, k, v, params, _, varlen = _varlen_case(16, torch.float64, MODIFIERS, seed=8)
    slopes = random_slopes(len(VARLEN_LENGTHS), q.shape[1]).to(q.device)
    fn = varlen_reference_fn(params, varlen["cu_seqlens_q"], varlen["cu_seqlens_k"], slopes)
    VARLEN_CHECKS[check](q, k, v, params, fn, torch.float64, **varlen,
                         row_slopes=row_slopes(slopes, q.shape[2], varlen["cu_seqlens_q"]))


# The double backward's row kernel in one sweep (``_tuning.ROW_ONE_SWEEP``: on the GPU only where
# timing chose it, so the interpreter runs two sweeps unless told): every mask, the score
# modifiers, packed sequences and a split head dim, for the double backward and the tangent of the
# backward.
ONE_SWEEP_CASES = {
    **{f"{name}-float64": (SHAPES[2], 16, torch.float64, mask) for name, mask in zip(MASK_IDS, MASKS)},
    "causal-float16": (SHAPES[1], 40, torch.float16, MASKS[1]),
    "softcap-alibi-float64": (SHAPES[2], 16, torch.float64, MODIFIERS),
    # Long enough that a band has key blocks every row of a block sees whole (``_inner_keys``: at
    # the interpreter's 32 × 16 tile, the causal rows from 64 on, and between the window's edges).
    "causal-T100-float64": ((1, 2, 1, 100, 100), 16, torch.float64, MASKS[1]),
    # Without a mask at a length the key block does not divide: the whole key blocks, then the
    # partial one (``_forward_halves``).
    "full-T100-float64": ((1, 2, 1, 100, 100), 16, torch.float64, MASKS[0]),
    "window-T90x100-float64": ((1, 2, 1, 90, 100), 16, torch.float64, dict(window_size=(60, 5), bottom_right=True)),
}


def _check_double_backward_case(case, checker, seed: int) -> None:
    """``checker`` (a ``VARLEN_CHECKS`` entry) on one ``ONE_SWEEP_CASES`` case (shape, head dim,
    dtype, mask), with per-head ALiBi slopes where the mask asks for them."""
    shape, head_dim, dtype, mask = case
    q, k, v, params = _case(shape, head_dim, dtype, mask, seed=seed)
    if params.alibi:
        slopes = random_slopes(q.shape[0], q.shape[1]).to(q.device)
        checker(q, k, v, params, reference_fn(params, slopes), dtype, row_slopes=row_slopes(slopes, q.shape[2]))
    else:
        checker(q, k, v, params, reference_fn(params), dtype)


@pytest.mark.parametrize("check", ["backward_backward", "backward_tangent"])
@pytest.mark.parametrize("case", list(ONE_SWEEP_CASES) + ["varlen", "split-D48-float16"])
def test_double_backward_one_sweep(case, check, monkeypatch):
    """Forced one sweep against the reference, without and with the backward's dq (which it then
    reads for dS K); every double-backward plan built took it, and some read dq."""
    monkeypatch.setattr(tuning, "ONE_SWEEP_OVERRIDE", True)
    checker = VARLEN_CHECKS[check]
    clear_plans()  # plans are cached with the schedule they were built with
    try:
        if case == "varlen":
            q, k, v, params, fn, varlen = _varlen_case(16, torch.float64, MASKS[2], seed=4)
            checker(q, k, v, params, fn, torch.float64, **varlen)
        elif case.startswith("split"):
            for kind in ("backward_backward_rows", "backward_backward_rows_no_cot_d_out"):
                monkeypatch.setitem(launch.SPLIT_HEAD_DIM, kind, True)
            q, k, v, params = _case(SHAPES[2], 48, torch.float16, MASKS[2], seed=6)
            checker(q, k, v, params, reference_fn(params), torch.float16)
        else:
            _check_double_backward_case(ONE_SWEEP_CASES[case], checker, seed=2)
        plans = [plan for plan in torch_launchers._PLANS.values()
                 if any("ONE_SWEEP" in launch_.arguments for launch_ in plan.launches)]
        assert plans and all(launch_.arguments["ONE_SWEEP"] for plan in plans for launch_ in plan.launches
                             if "ONE_SWEEP" in launch_.arguments)
        assert any(launch_.arguments.get("Dq") is not None for plan in plans for launch_ in plan.launches)
    finally:
        clear_plans()


@pytest.mark.parametrize("check", ["backward_backward", "backward_tangent"])
@pytest.mark.parametrize("case", [*(f"{name}-float64" for name in MASK_IDS), "causal-float16", "softcap-alibi-float64"])
def test_double_backward_late_bar(case, check, monkeypatch):
    """The double backward's column tiles forming dS̄ after dS's product (``_tuning.COLUMNS_LATE_BAR``:
    on the GPU only where timing chose it), forced, against the reference: every mask, the score
    modifiers, the double backward and the tangent of the backward."""
    monkeypatch.setattr(tuning, "LATE_BAR_OVERRIDE", True)  # as THERIA_ATTENTION_LATE_BAR=1 does
    checker = VARLEN_CHECKS[check]
    clear_plans()  # plans are cached with the schedule they were built with
    try:
        _check_double_backward_case(ONE_SWEEP_CASES[case], checker, seed=3)
        columns = [launch_.arguments["LATE_BAR"] for plan in torch_launchers._PLANS.values()
                   for launch_ in plan.launches if launch_.kernel.__name__ == "_attn_bwd_bwd_cols_kernel"]
        assert columns and all(columns)
    finally:
        clear_plans()


# The forward and the backward's dK/dV sweep as two halves of each block (``_tuning.HALVES``: on
# the GPU only where timing chose them, so the interpreter runs one tile unless told): every mask,
# odd lengths that end inside the second half, grouped heads, a split head dim, half precision, the
# score modifiers and packed sequences; the backward runs on the halves' out and lse. In the
# interpreter only: compiled, halves need tiles of 32 rows and more, which float64 on sm_90 does not
# get; tests/test_attention_gpu.py::test_halves_at_every_order holds the compiled halves to the
# accuracy criterion.
HALVES_CASES = {
    **{f"{name}-float64": (SHAPES[1], 16, torch.float64, mask) for name, mask in zip(MASK_IDS, MASKS)},
    "causal_br-D40-float64": (SHAPES[2], 40, torch.float64, MASKS[2]),
    "window-float16": (SHAPES[0], 16, torch.float16, MASKS[3]),
    "softcap-alibi-float64": (SHAPES[2], 16, torch.float64, MODIFIERS),
    # Long enough that a band has key blocks every row of a block sees whole (``_inner_keys``: at
    # the interpreter's 32 × 16 tile, the causal rows from 64 on, and between the window's edges).
    "causal-T100-float64": ((1, 2, 1, 100, 100), 16, torch.float64, MASKS[1]),
    # Without a mask at a length the key block does not divide: the whole key blocks, then the
    # partial one (``_forward_halves``).
    "full-T100-float64": ((1, 2, 1, 100, 100), 16, torch.float64, MASKS[0]),
    "window-T90x100-float64": ((1, 2, 1, 90, 100), 16, torch.float64, dict(window_size=(60, 5), bottom_right=True)),
}
interpreted_halves = pytest.mark.skipif(not INTERPRETER, reason="compiled halves need tiles the float64 tables do not "
                                        "give: tests/test_attention_gpu.py::test_halves_at_every_order")


def _halves_case(case: str, seed: int):
    """(q, k, v, params, float64 reference fn, dtype, launcher keywords) of a ``HALVES_CASES`` entry
    or of "varlen", a packed batch."""
    if case == "varlen":
        q, k, v, params, fn, varlen = _varlen_case(16, torch.float64, MASKS[2], seed=seed)
        return q, k, v, params, fn, torch.float64, varlen
    shape, head_dim, dtype, mask = HALVES_CASES[case]
    q, k, v, params = _case(shape, head_dim, dtype, mask, seed=seed)
    extra, slopes = {}, None
    if params.alibi:
        slopes = random_slopes(q.shape[0], q.shape[1]).to(q.device)
        extra = dict(row_slopes=row_slopes(slopes, q.shape[2]))
    return q, k, v, params, reference_fn(params, slopes), dtype, extra


@interpreted_halves
@pytest.mark.parametrize("case", list(HALVES_CASES) + ["varlen"])
def test_halves(case, monkeypatch):
    """Forced halves against the reference, forward and backward; the forward and the dK/dV sweep
    took them, and in float64 the forward's give the one-tile sweep's numbers exactly (each row's
    arithmetic is the same; the backward's dK and dV sum each block's queries in two products
    instead of one)."""
    monkeypatch.setattr(tuning, "HALVES_OVERRIDE", True)
    clear_plans()  # plans are cached with the schedule they were built with
    try:
        q, k, v, params, fn, dtype, extra = _halves_case(case, seed=4 if case == "varlen" else 3)
        _check_forward_and_backward(q, k, v, params, fn, dtype, **extra)
        flags = {(launch_.kernel.__name__, launch_.arguments["HALVES"]) for plan in torch_launchers._PLANS.values()
                 for launch_ in plan.launches if "HALVES" in launch_.arguments}
        assert flags == {("_attn_fwd_kernel", True), ("_attn_bwd_dkdv_kernel", True)}
        if case != "varlen" and dtype == torch.float64:
            halves = attention_forward(q, k, v, params, **extra)
            monkeypatch.setattr(tuning, "HALVES_OVERRIDE", False)
            clear_plans()
            one_tile = attention_forward(q, k, v, params, **extra)
            assert all(torch.equal(a, b) for a, b in zip(halves, one_tile))
    finally:
        clear_plans()


@interpreted_halves
@pytest.mark.parametrize("mask", [0, 2], ids=[MASK_IDS[0], MASK_IDS[2]])
def test_backward_halves_with_tma(mask, monkeypatch):
    """The dK/dV sweep as halves through tensor descriptors of half-block boxes, with grouped heads,
    a last key block past T_k and a last partial query block (one tile on the block-sized boxes)."""
    monkeypatch.setattr(tuning, "HALVES_OVERRIDE", True)
    monkeypatch.setattr(tuning, "TMA_OVERRIDE", True)
    clear_plans()
    try:
        q, k, v, params = _case(SHAPES[2], 16, torch.float64, MASKS[mask], seed=8)
        _check_forward_and_backward(q, k, v, params, reference_fn(params), torch.float64)
        columns = [launch_.arguments for plan in torch_launchers._PLANS.values() for launch_ in plan.launches
                   if launch_.kernel.__name__ == "_attn_bwd_dkdv_kernel"]
        assert len(columns) == 1 and columns[0]["HALVES"] and columns[0]["TMA"]
    finally:
        clear_plans()


@pytest.mark.parametrize("check", ["forward_and_backward", "backward_backward"])
def test_varlen_half_precision_padded_head_dim(check):
    q, k, v, params, fn, varlen = _varlen_case(40, torch.float16, MASKS[2], seed=5)
    VARLEN_CHECKS[check](q, k, v, params, fn, torch.float16, **varlen)


def test_head_dim_padding_and_limits():
    """Head dims that are not powers of two (padded block, masked loads) at both ends of the range."""
    for head_dim in (8, 59, 96):
        q, k, v, params = _case((1, 1, 1, 9, 11), head_dim, torch.float64, dict(causal=True))
        (ref_out, _) = reference_fn(params)(q, k, v)
        out, _ = attention_forward(q, k, v, params, out=poisoned(q))
        assert_accurate(f"out (head dim {head_dim})", out, ref_out, torch.float64)


def test_head_dim_split_rule():
    """A head dim is split into two power-of-two tiles only where they are narrower than the
    padded tile, and only the forward, JVP and backward sweeps are launched split
    (``launch.SPLIT_HEAD_DIM``), but in float64, where every sweep takes float64's own parts (at head
    dim 80 split, at 40 one tile: ``launch.float64_head_dim_parts``)."""
    parts = {8: (16, 0), 24: (32, 0), 40: (32, 16), 48: (32, 16), 59: (64, 0), 64: (64, 0), 80: (64, 16),
             96: (64, 32), 111: (128, 0), 160: (128, 32), 192: (128, 64), 200: (256, 0), 256: (256, 0)}
    assert {d: launch.head_dim_parts(d) for d in parts} == parts
    q, k, _, params = _case((1, 1, 1, 9, 9), 80, torch.float64, {})
    split, padded = dict(BLOCK_D0=64, BLOCK_D1=16), dict(BLOCK_D0=128, BLOCK_D1=0)
    expected = {"forward": split, "jvp": split, "forward_second": padded, "backward": split,
                "backward_backward": padded, "backward_backward_rows": padded,
                "backward_backward_rows_no_cot_d_out": padded}
    for dtype in ("bfloat16", "float64"):
        call = launch.AttentionCall(tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), dtype, params, _device(q))
        for kind, tiles in expected.items():
            got = {key: value for key, value in call.meta(kind)[0].items() if key.startswith("BLOCK_D")}
            assert got == (split if dtype == "float64" else tiles), (dtype, kind)
    # float64 takes one tile up to head dim 64 and never a 128-wide part up to 128
    # (``launch.float64_head_dim_parts``).
    float64_parts = {40: (64, 0), 16: (16, 0), 64: (64, 0), 80: (64, 16), 100: (64, 64), 128: (64, 64),
                     160: (128, 32)}
    assert {d: launch.float64_head_dim_parts(d) for d in float64_parts} == float64_parts


def test_launch_arithmetic_matches_triton():
    """The launchers' plain-int next_power_of_2 and cdiv agree with Triton's (which they replace
    on the host for speed), over the sizes that occur: head dims, lengths, grid counts."""
    for n in range(0, 70000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for x in range(0, 300):
        for y in (1, 2, 3, 16, 64, 128, 257):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)


# Split head dims: 48 = 32 + 16 fills both parts, 40 = 32 + 16 pads the second, 80 = 64 + 16.
SPLIT_CHECKS = {"forward_and_backward": _check_forward_and_backward, "jvp": _check_jvp,
                "forward_second": _check_forward_second, "backward_backward": _check_backward_backward,
                "backward_tangent": _check_backward_tangent}


@pytest.mark.parametrize("check", list(SPLIT_CHECKS))
@pytest.mark.parametrize("head_dim, dtype", [(40, torch.float64), (80, torch.float64), (48, torch.float16)],
                         ids=["D40-float64", "D80-float64", "D48-float16"])
def test_split_head_dim(head_dim, dtype, check, monkeypatch):
    """Every kernel on a split head dim: each specialisation of the forward, the backward and the
    double backward (the second-order forward's and the double backward's launchers keep the padded
    tile by default, so the split is switched on here), with grouped heads and rows that see no key."""
    padded = ("forward_second", "backward_backward", "backward_backward_rows", "backward_backward_rows_no_cot_d_out")
    for kind in padded:  # launchers that keep it padded
        monkeypatch.setitem(launch.SPLIT_HEAD_DIM, kind, True)
    # float64 keeps head dim 40 on one tile (``launch.float64_head_dim_parts``); split it here too
    monkeypatch.setattr(launch, "float64_head_dim_parts", launch.head_dim_parts)
    clear_plans()  # plans are cached with the tile choice they were built with
    q, k, v, params = _case(SHAPES[2], head_dim, dtype, MASKS[2], seed=6)
    try:
        SPLIT_CHECKS[check](q, k, v, params, reference_fn(params), dtype)
    finally:
        clear_plans()


# float64 on the launchers' own tiles (``launch.float64_head_dim_parts``, and two warps at head dim
# 256 in sm_90's table) where the compiled kernels went wrong on the H200 on other tiles: the calls
# of theria_jax's check_grads cases at 40, 80 and 96 (test_jax_attention.py's PADDED_HEAD_DIM_CASES;
# at 40 grouped heads and rows that see no key), the same mask at 128 and 256 (docs/perf-notes.md,
# "GPU accuracy runs", sessions 21 and 22), then every other head-dim class and kind of parts. At
# 256 the double backward's kernels need more shared memory than sm_90 has in float64
# (tests/test_tile_fit.py's KNOWN_SHARED_MEMORY).
ALL_ORDERS = ("forward_and_backward", "forward_second", "backward_backward", "backward_tangent")
FLOAT64_HEAD_DIMS = {
    "D40-causal_br-T9x5-H2/1": ((1, 2, 1, 9, 5), 40, dict(causal=True, bottom_right=True), ALL_ORDERS),
    "D80-causal_br-T5x9": ((1, 1, 1, 5, 9), 80, dict(causal=True, bottom_right=True), ALL_ORDERS),
    "D96-window_br-T7x7": ((1, 1, 1, 7, 7), 96, dict(window_size=(2, 1), bottom_right=True), ALL_ORDERS),
    "D128-causal_br-T5x9": ((1, 1, 1, 5, 9), 128, dict(causal=True, bottom_right=True), ALL_ORDERS),
    "D256-causal_br-T5x9": ((1, 1, 1, 5, 9), 256, dict(causal=True, bottom_right=True),
                            ("forward_and_backward", "forward_second")),
    # the other head-dim classes and parts: 16, 24 (the 32 class), 59 (one 64 tile), 111 (64 + 64),
    # 160 and 192 (a 128-wide first part), 224 (one 256 tile)
    "D16-full-T17x23-H2/1": ((1, 2, 1, 17, 23), 16, {}, ALL_ORDERS),
    "D24-causal-T17x17": ((1, 1, 1, 17, 17), 24, dict(causal=True), ALL_ORDERS),
    "D59-window_br-T9x5-H2/1": ((1, 2, 1, 9, 5), 59, dict(window_size=(2, 1), bottom_right=True), ALL_ORDERS),
    "D111-causal_br-T5x9": ((1, 1, 1, 5, 9), 111, dict(causal=True, bottom_right=True), ALL_ORDERS),
    "D160-causal_br-T5x9": ((1, 1, 1, 5, 9), 160, dict(causal=True, bottom_right=True), ALL_ORDERS),
    "D192-full-T17x9-H2/1": ((1, 2, 1, 17, 9), 192, {}, ALL_ORDERS),
    "D224-causal-T9x9": ((1, 1, 1, 9, 9), 224, dict(causal=True), ("forward_and_backward", "forward_second")),
}


@pytest.mark.parametrize("case, check", [(case, check) for case, (*_, checks) in FLOAT64_HEAD_DIMS.items()
                                         for check in checks])
def test_float64_head_dims(case, check):
    """The backward, the second-order forward, the double backward and the tangent of the backward
    in float64 on the launchers' own tiles at every head-dim class and kind of parts against the
    float64 reference."""
    shape, head_dim, mask, _ = FLOAT64_HEAD_DIMS[case]
    q, k, v, params = _case(shape, head_dim, torch.float64, mask, seed=4)
    SPLIT_CHECKS[check](q, k, v, params, reference_fn(params), torch.float64)


TMA_CHECKS = {"forward_and_backward": _check_forward_and_backward, "jvp": _check_jvp,
              "forward_second": _check_forward_second, "backward_backward": _check_backward_backward,
              "backward_tangent": _check_backward_tangent}


def _tma_flags() -> set:
    """The TMA flag of every launch of the cached plans that have one (every attention plan)."""
    return {launch.arguments["TMA"] for plan in torch_launchers._PLANS.values() for launch in plan.launches
            if "TMA" in launch.arguments}


@pytest.fixture
def tma_on(monkeypatch):
    """Every sweep that can (``_tuning.TMA_CAPABLE``) loads through tensor descriptors where a call
    allows it, in every dtype and on every device, the interpreter included (the tables
    turn TMA on only for some sm_90 entries, so the tests force it as THERIA_ATTENTION_TMA=1 does)."""
    monkeypatch.setattr(tuning, "TMA_OVERRIDE", True)
    clear_plans()  # plans are cached with the choice they were built with
    yield
    clear_plans()


@pytest.mark.parametrize("check", list(TMA_CHECKS))
@pytest.mark.parametrize("mask", MASKS[2:], ids=MASK_IDS[2:])
@pytest.mark.parametrize("packed", [False, True], ids=["fixed", "varlen"])
def test_tma_loads(packed, mask, check, tma_on):
    """Every sweep with TMA loads (the forward kinds, the backward, the double backward with and
    without its second cotangent): grouped heads, odd lengths whose last key or query block is
    partly past the sequence (the descriptor's box reads zeros there), rows that see no key, and
    packed sequences (each descriptor spans one sequence's rows, so no box reads the next
    sequence's)."""
    if packed:
        q, k, v, params, fn, varlen = _varlen_case(16, torch.float64, mask, seed=8)
        TMA_CHECKS[check](q, k, v, params, fn, torch.float64, **varlen)
    else:
        q, k, v, params = _case(SHAPES[1], 16, torch.float32, mask, seed=8)
        TMA_CHECKS[check](q, k, v, params, reference_fn(params), torch.float32)
    assert _tma_flags() == {True}


def test_tma_loads_give_the_masked_loads_numbers(tma_on):
    """In the interpreter the descriptors' loads are the masked loads' numbers, bit for bit, in the
    forward, the backward and the double backward; a k or v whose data starts off a 16-byte
    boundary (a view one element into its buffer) takes the masked loads."""
    if not INTERPRETER:
        pytest.skip("compiled kernels may schedule the two loads' arithmetic differently: "
                    "test_tma_loads holds them to the accuracy criterion")
    q, k, v, params = _case(SHAPES[2], 32, torch.float32, MASKS[2], seed=9)
    buffer = torch.empty(1 + k.numel(), dtype=k.dtype, device=k.device)
    k_off = buffer[1:].view_as(k).copy_(k)
    d_out, cot_dq, cot_dk, cot_dv = (torch.randn_like(t) for t in (q, q, k, k))

    def every_sweep(k, tma: bool, uses_tma: bool):
        tuning.TMA_OVERRIDE = tma
        clear_plans()
        out, lse = attention_forward(q, k, v, params)
        grads = attention_backward(q, k, v, out, lse, d_out, None, params)
        cotangents = attention_backward_backward(q, k, v, out, lse, d_out, None, cot_dq, cot_dk, cot_dv, params)
        assert _tma_flags() == {uses_tma}
        return (out, lse, *grads, *cotangents)

    without = every_sweep(k, tma=False, uses_tma=False)
    for got in (every_sweep(k, tma=True, uses_tma=True), every_sweep(k_off, tma=True, uses_tma=False)):
        for a, b in zip(got, without):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zeroed_buffers_follow_a_gapped_q():
    """A q that is a slice of a wider tensor keeps its strides, gaps included (``kernel_layout``),
    and so does every buffer allocated like it: the zeroed cotangent the double backward reads
    where cot_dq is absent as well as its outputs. The numbers are a contiguous q's bit for bit."""
    q, k, v, params = _case(SHAPES[1], 16, torch.float64, MASKS[1], seed=14)
    q_gaps = torch.cat([q, torch.randn_like(q)], dim=-1)[..., :16]
    out, lse = attention_forward(q, k, v, params)
    d_out, cot_dk, cot_dv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    got = attention_backward_backward(q_gaps, k, v, out, lse, d_out, None, None, cot_dk, cot_dv, params)
    want = attention_backward_backward(q, k, v, out, lse, d_out, None, None, cot_dk, cot_dv, params)
    assert got[0].stride() == q_gaps.stride()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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


def test_calls_taken_as_given_are_remembered_by_layout():
    """A call whose tensors the kernels take as they are is remembered by its tensors' metadata
    (``torch_launchers._AS_GIVEN``), so that its next calls skip the layout checks; one that needs a
    copy or a dtype change is not, and a call that differs from a remembered one in any tensor's
    strides or dtype meets the checks again and gets the same numbers as a fresh launch."""
    q, k, v, params = _case((1, 2, 2, 9, 9), 16, torch.float64, dict(causal=True))
    clear_plans()
    out, lse = attention_forward(q, k, v, params)
    assert len(torch_launchers._AS_GIVEN) == 1
    v_wide = torch.cat([v, torch.randn_like(v)], dim=-1)[..., :16]  # same shape, other strides: copied
    again, _ = attention_forward(q, k, v_wide, params)
    assert len(torch_launchers._AS_GIVEN) == 1
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    d_out = torch.randn_like(q)
    grads = attention_backward(q, k, v, out, lse, d_out, None, params)
    assert len(torch_launchers._AS_GIVEN) == 2
    d_out_t = d_out.transpose(1, 2).contiguous().transpose(1, 2)  # q's layout differs: copied into it
    for a, b in zip(attention_backward(q, k, v, out, lse, d_out_t, None, params), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="preallocated out"):  # a remembered call still checks its outputs
        attention_forward(q, k, v, params, out=torch.empty_like(q, dtype=torch.float32))
    clear_plans()


@pytest.mark.parametrize("mask", [dict(causal=True, bottom_right=True), {}], ids=["causal", "no_mask"])
@pytest.mark.parametrize("programs_per_sm", [0, 2], ids=["whole_group", "two_shares"])
def test_grouped_query_split_does_not_change_gradients(programs_per_sm, mask, monkeypatch):
    """The column kernels split a grouped-query group over several programs when there would be
    too few (``AttentionCall.group_split``): the whole group of 4 in one program, or shares of 2 (4
    key blocks × 2 shares reach 2 programs per multiprocessor of the interpreter's 4); the summed
    partials of the shares must give the gradients and the double backward. One query head per
    program is the default split on the CPU (COLUMN_PROGRAMS_PER_SM × 4 interpreter
    multiprocessors is more programs than any test's grid), so every other grouped-query test
    here runs it."""
    monkeypatch.setattr(launch, "COLUMN_PROGRAMS_PER_SM", programs_per_sm)
    clear_plans()  # plans are cached with the split they were built with
    q, k, v, params = _case((1, 4, 1, 19, 61), 16, torch.float64, mask, seed=3)
    fn = reference_fn(params)
    try:
        _check_forward_and_backward(q, k, v, params, fn, torch.float64)
        _check_backward_backward(q, k, v, params, fn, torch.float64)
    finally:
        clear_plans()


ORDER_MASKS = {"causal": dict(causal=True), "bounded_below": dict(window_size=(5, -1)),
               "window_br": dict(window_size=(5, 3), bottom_right=True)}


@pytest.mark.parametrize("section", [1, 4, 64])
@pytest.mark.parametrize("mask", list(ORDER_MASKS.values()), ids=list(ORDER_MASKS))
def test_longest_first_order(section, mask, monkeypatch):
    """Launches under a band bounded on one side hand their programs out longest first, in sections
    of grid rows (``_tiles._program``): one row a section, three (the most up to four that divides
    the six rows) or all six. Every program still runs exactly once (the outputs start as NaN), in
    the row and the column kernels of the forward, backward and double backward, and the plans
    carry that grid and the heavy end the band gives each sweep; a window bounded on both sides
    keeps grid order."""
    streamed = 2 * 33 * 16 * 8  # K and V (or Q and dO) of one head of the case below, float64
    monkeypatch.setattr(tuning, "LPT_SECTION_BYTES", section * streamed)
    clear_plans()  # plans are cached with the order they were built with
    try:
        q, k, v, params = _case((2, 3, 3, 33, 33), 16, torch.float64, mask, seed=6)
        fn = reference_fn(params)
        _check_forward_and_backward(q, k, v, params, fn, torch.float64)
        _check_backward_backward(q, k, v, params, fn, torch.float64)
        launches = [launch_ for plan in torch_launchers._PLANS.values() for launch_ in plan.launches]
        orders = {(launch_.kernel.__name__, launch_.grid, launch_.arguments["LPT"], launch_.arguments["HEAVY_LAST"])
                  for launch_ in launches}
        one_sided = "causal" in mask or mask["window_size"][1] < 0
        columns = ("_attn_bwd_dkdv_kernel", "_attn_bwd_bwd_cols_kernel")
        rows = {1: 1, 4: 3, 64: 6}[section]
        # a kernel's blocks along its sweep: of 33 queries (rows) or keys (columns), on the device's tile
        blocks = {launch_.kernel.__name__: cdiv(33, launch_.arguments["BLOCK_N" if launch_.kernel.__name__ in columns
                                                                     else "BLOCK_M"]) for launch_ in launches}
        expected = {(name, (rows, blocks[name], 6 // rows) if one_sided else (blocks[name], 6, 1), one_sided,
                     one_sided and ("causal" in mask) != (name in columns))
                    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_bwd_rows_kernel", *columns)}
        assert orders == expected
    finally:
        clear_plans()


def test_longest_first_order_only_where_lengths_differ():
    """The order's plan side (``AttentionCall.ordered``): grid order without a band, for a window
    bounded on both sides, for packed sequences and past 65535 blocks; otherwise sections of at most
    LPT_SECTION_BYTES of streamed tensors that divide the grid rows, at least one row, also where
    a sequence is empty and streams nothing."""
    def ordered(mask, t_q=4096, t_k=4096, columns=False, varlen=None, rows=64, blocks=32):
        q_shape, k_shape = (4, 16, t_q, 128), (4, 16, t_k, 128)
        strides = lambda shape: (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)  # noqa: E731
        call = launch.AttentionCall(q_shape, strides(q_shape), k_shape, strides(k_shape), "bfloat16",
                                    params_for(128, **mask), launch.Device(132, capability=90), varlen)
        return call.ordered((blocks, rows), columns)

    section = tuning.LPT_SECTION_BYTES // (2 * 4096 * 128 * 2)
    assert ordered(dict(causal=True)) == ((section, 32, 64 // section), dict(LPT=True, HEAVY_LAST=True))
    assert ordered(dict(causal=True), columns=True) == ((section, 32, 64 // section), dict(LPT=True, HEAVY_LAST=False))
    assert ordered(dict(window_size=(256, -1)), columns=True)[1] == dict(LPT=True, HEAVY_LAST=True)
    assert ordered(dict(causal=True), rows=63)[0] == (7, 32, 9)  # 7 divides 63, 8 does not
    for mask in ({}, dict(window_size=(256, 0)), dict(causal=True, window_size=(256, -1))):
        assert ordered(mask) == ((32, 64), dict(LPT=False, HEAVY_LAST=False))
    assert ordered(dict(causal=True), varlen=(4096, 4096, 3)) == ((32, 64), dict(LPT=False, HEAVY_LAST=False))
    # more blocks than the grid's second dimension holds (65535)
    assert ordered(dict(causal=True), blocks=65536) == ((65536, 64), dict(LPT=False, HEAVY_LAST=False))
    assert ordered(dict(causal=True), blocks=65535)[0] == (section, 65535, 64 // section)
    assert ordered(dict(causal=True), t_q=0, t_k=0)[0] == (64, 32, 1)


@pytest.mark.parametrize("shares", [1, 2], ids=["whole_group", "two_shares"])
def test_longest_first_order_with_grouped_query_shares(shares, monkeypatch):
    """The longest-first order in one-row sections with the group of 4 query heads whole or split
    into shares of 2 (``test_grouped_query_split_does_not_change_gradients``): the shares of a tile
    still find each other's partials. The split is forced (``AttentionCall.group_split``'s rule
    depends on the device's tile and multiprocessors), so that it is the same on every device."""
    monkeypatch.setattr(launch.AttentionCall, "group_split", lambda call, block_n: shares)
    monkeypatch.setattr(tuning, "LPT_SECTION_BYTES", 1)
    clear_plans()
    q, k, v, params = _case((2, 4, 1, 19, 61), 16, torch.float64, dict(causal=True, bottom_right=True), seed=3)
    fn = reference_fn(params)
    try:
        _check_forward_and_backward(q, k, v, params, fn, torch.float64)
        _check_backward_backward(q, k, v, params, fn, torch.float64)
        columns = [launch_.arguments for plan in torch_launchers._PLANS.values() for launch_ in plan.launches
                   if launch_.kernel.__name__ == "_attn_bwd_dkdv_kernel"]
        assert [(a["LPT"], a["members"]) for a in columns] == [(True, 4 // shares)]
    finally:
        clear_plans()
