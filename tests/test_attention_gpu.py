"""GPU correctness of the fused attention at every derivative order. ``python -m pytest -q`` runs
these on a GPU machine (skipped elsewhere) without the cases marked ``slow``; ``pytest -m gpu``
runs the whole matrix, about 900 kernel variants at 1–2 s of compilation each, so add `-n 8`
(pytest-xdist).

Each case runs forward, backward (with create_graph), the reverse-over-reverse HVP, the JVP and
the JVP of the JVP (the second-order forward kernel) through ``sdpa_custom`` / ``flash_attn_func``
in a low dtype and compares them with the float64 reference on the same device and the same
(rounded) inputs, directions and cotangents by tests/_numerics.py's criterion: the dtype's
tolerance, and at most twice the error of plain attention computed in the same low dtype.

``flash_attn_varlen_func`` goes through the same checks on a packed batch, and is also compared
with ``flash_attn_func`` called on each of its sequences alone.

Compilation, not running, is what costs time here: Triton compiles each kernel once per head dim,
dtype and set of constexpr flags (masked/banded, even key length) and also per specialisation of
its integer arguments (== 1, e.g. the query-head group of MHA; divisible by 16, e.g. lengths and
strides). The matrix below therefore draws its lengths from one class ((97, 203) and (203, 97) share
every specialisation) and its windows from one band class, so each new case mostly reuses kernels.
"""

from __future__ import annotations

import pytest
import torch

from _attention_cases import SOFTCAP, cu_seqlens, random_slopes
from _numerics import assert_accurate, tolerance
from theria_torch import flash_attn_func, flash_attn_varlen_func, sdpa_custom
from theria_torch.reference import attention_reference, varlen_attention_reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _derivatives(attend, q, k, v, d_out, cots, tangents):
    """out, (dq, dk, dv), HVP (q, k, v), out_dot and out_dot_dot of ``attend`` at (q, k, v).

    The HVP takes the cotangents ``cots`` of (dq, dk, dv); out_dot is the JVP along ``tangents``,
    out_dot_dot its JVP along ``cots`` (forward over forward)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    grads = torch.autograd.grad(out, leaves, d_out, create_graph=True)
    hvp = torch.autograd.grad(grads, leaves, cots)
    primals, tangents, cots = (tuple(t.detach() for t in ts) for ts in ((q, k, v), tangents, cots))
    _, out_dot = torch.func.jvp(attend, primals, tangents)
    _, out_dot_dot = torch.func.jvp(lambda *x: torch.func.jvp(attend, x, tangents)[1], primals, cots)
    return {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2], "hvp_q": hvp[0], "hvp_k": hvp[1],
            "hvp_v": hvp[2], "out_dot": out_dot, "out_dot_dot": out_dot_dot}


def _random(shape, dtype, gen):
    """Standard normal draws rounded to ``dtype``; the float64 reference gets these rounded values too."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _check(attend, reference, shape, dtype, seed=0, packed=False):
    """Returns what ``attend`` gave and its inputs. ``packed``: q, k, v are packed variable-length
    batches, (t_q, heads, head_dim) and (t_k, heads_kv, head_dim) (``batch`` is ignored)."""
    batch, heads, heads_kv, t_q, t_k, head_dim = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q_shape, kv_shape = (batch, heads, t_q, head_dim), (batch, heads_kv, t_k, head_dim)
    if packed:
        q_shape, kv_shape = (t_q, heads, head_dim), (t_k, heads_kv, head_dim)
    shapes = (q_shape, kv_shape, kv_shape)
    # q, k, v, d_out, the HVP's cotangents of (dq, dk, dv) and the JVP's tangents of (q, k, v).
    low = [_random(s, dtype, gen) for s in (*shapes, q_shape, *shapes, *shapes)]
    exact_inputs = [t.double() for t in low]

    def derivatives(function, tensors):
        return _derivatives(function, *tensors[:4], tensors[4:7], tensors[7:])

    got = derivatives(attend, low)
    exact = derivatives(reference, exact_inputs)
    plain = derivatives(reference, low)
    for name, value in got.items():
        assert_accurate(f"{name} ({shape} {dtype})", value, exact[name], dtype, plain=plain[name])
    return got, low


def _sdpa(**mask):
    return (lambda q, k, v: sdpa_custom(q, k, v, **mask),
            lambda q, k, v: attention_reference(q, k, v, **mask))


def _flash(**mask):
    """flash_attn_func on transposed views, compared with the bottom-right reference."""
    def attend(q, k, v):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **mask).transpose(1, 2)
    return attend, lambda q, k, v: attention_reference(q, k, v, bottom_right=True, **mask)


def _lengths_id(lengths):
    return f"T{lengths[0]}x{lengths[1]}"


def _heads_id(heads):
    return f"H{heads[0]}/{heads[1]}"


DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# flash-attn's head dims (issue #9), and 16, the smallest tile tl.dot takes.
HEAD_DIMS = [16, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]


def _quick(values, quick, ids):
    """``values`` as parameters, those outside ``quick`` marked ``slow`` (left to ``pytest -m gpu``):
    the default run keeps one case of each code path and skips most of the compilation."""
    return [pytest.param(x, id=ids(x), marks=() if x in quick else pytest.mark.slow) for x in values]


# T_q ≠ T_k both ways, odd and not block multiples: with bottom-right alignment (203, 97) has
# 106 query rows that see no key when causal or windowed.
ODD_LENGTHS = [(97, 203), (203, 97)]
HEADS = [(4, 4), (4, 1)]  # MHA and grouped-query (4 query heads share one key/value head)
LOW_DTYPES = [torch.float16, torch.bfloat16]

# In the matrices below the lengths vary fastest: consecutive tests then share compiled kernels,
# and pytest-xdist (which hands each worker runs of consecutive tests) compiles each set once.


@pytest.mark.parametrize("lengths", ODD_LENGTHS, ids=_lengths_id)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("heads", HEADS, ids=_heads_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", _quick(HEAD_DIMS, (80, 128), lambda d: f"D{d}"))  # split, padded 128
def test_flash_attn_accuracy_rule(head_dim, causal, heads, dtype, lengths):
    attend, reference = _flash(causal=causal)
    _check(attend, reference, (1, *heads, *lengths, head_dim), dtype, seed=head_dim)


# (window, causal): causal sets right to 0. All three keep the band's ends off multiples of 16
# for both length pairs, so every window case shares one set of compiled kernels per head dim.
WINDOWS = [((48, 16), False), ((16, 48), False), ((48, 16), True)]


@pytest.mark.parametrize("lengths", ODD_LENGTHS, ids=_lengths_id)
@pytest.mark.parametrize("window, causal", WINDOWS, ids=["w48,16", "w16,48", "w48,0-causal"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", _quick([59, 128], (59,), lambda d: f"D{d}"))
def test_sliding_window_grouped_query(head_dim, dtype, window, causal, lengths):
    attend, reference = _flash(window_size=window, causal=causal)
    _check(attend, reference, (1, 4, 1, *lengths, head_dim), dtype, seed=head_dim + 1)


# Logit soft-capping and ALiBi (flash-attn's softcap and alibi_slopes, §8 of the theory): each
# alone and together; slopes per head (H,) or per batch entry and head (B, H).
MODIFIERS = {"softcap": (SOFTCAP, None), "alibi": (0.0, "heads"), "softcap-alibi": (SOFTCAP, "batch")}


def _modifiers(name, batch, heads):
    softcap, slopes = MODIFIERS[name]
    if slopes is not None:
        slopes = random_slopes(batch, heads).to(DEVICE)
        slopes = slopes[0] if MODIFIERS[name][1] == "heads" else slopes
    return dict(softcap=softcap, alibi_slopes=slopes)


@pytest.mark.parametrize("lengths", ODD_LENGTHS, ids=_lengths_id)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("modifiers", _quick(list(MODIFIERS), ("softcap-alibi",), str))
def test_softcap_and_alibi(modifiers, causal, dtype, lengths):
    attend, reference = _flash(causal=causal, **_modifiers(modifiers, 2, 4))
    _check(attend, reference, (2, 4, 2, *lengths, 64), dtype, seed=11)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=DTYPE_IDS.get)
def test_varlen_softcap_and_alibi(dtype):
    """Per-sequence slopes and ALiBi distances (each sequence's own T_k − T_q) in a packed batch."""
    lengths_q, lengths_k = zip(*VARLEN_LENGTHS)
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    modifiers = _modifiers("softcap-alibi", len(lengths_q), 8)
    _check(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                                  **modifiers),
           lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True, **modifiers),
           (1, 8, 2, sum(lengths_q), sum(lengths_k), 128), dtype, seed=8, packed=True)


LENGTHS = [(2, 3), (113, 113), (1023, 1023), (257, 1000), (1000, 257)]


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda p: f"{p[0]}x{p[1]}")
def test_dtype_causal_length_matrix(dtype, causal, lengths):
    torch.backends.cuda.matmul.allow_tf32 = False
    attend, reference = _flash(causal=causal) if lengths[0] != lengths[1] else _sdpa(causal=causal)
    _check(attend, reference, (2, 4, 2, *lengths, 64), dtype)


@pytest.mark.parametrize("dtype", _quick(LOW_DTYPES, (torch.bfloat16,), DTYPE_IDS.get))
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_8192(dtype, causal):
    attend, reference = _sdpa(causal=causal)
    _check(attend, reference, (1, 2, 1, 8192, 8192, 64), dtype)


def test_decode_shape():
    """One query row against a long key/value cache."""
    attend, reference = _flash(causal=True)
    _check(attend, reference, (2, 4, 4, 1, 8192, 128), torch.bfloat16)


# Variable-length batches: (T_q, T_k) per sequence, with empty ones, one-token ones, lengths off
# the block sizes and queries both longer and shorter than keys.
VARLEN_LENGTHS = [(1, 1), (0, 77), (300, 300), (513, 129), (129, 513), (1000, 1000), (64, 0), (17, 33)]


def _per_sequence(attend_fixed, cu_q, cu_k):
    """A packed-batch function that calls the fixed-length ``attend_fixed`` on each sequence alone
    (as a batch of one, (1, T, H, D)) and concatenates the outputs."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()

    def attend(q, k, v):
        return torch.cat([attend_fixed(q[None, a:b], k[None, c:d], v[None, c:d])[0]
                          for a, b, c, d in zip(starts_q, starts_q[1:], starts_k, starts_k[1:])])

    return attend


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mask", [dict(causal=False), dict(causal=True), dict(window_size=(128, 16))],
                         ids=["full", "causal", "window"])
def test_varlen_matches_per_sequence_calls(mask, dtype):
    """flash_attn_varlen_func's out, gradients, HVP and JVP against the float64 reference run per
    sequence (the criteria of ``_check``) and against flash_attn_func on each sequence alone."""
    lengths_q, lengths_k = zip(*VARLEN_LENGTHS)
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    sequences = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    got, low = _check(lambda q, k, v: flash_attn_varlen_func(q, k, v, *sequences, **mask),
                      lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, **mask),
                      (1, 8, 2, sum(lengths_q), sum(lengths_k), 128), dtype, seed=7, packed=True)
    per_sequence = _derivatives(_per_sequence(lambda q, k, v: flash_attn_func(q, k, v, **mask), cu_q, cu_k),
                                *low[:4], low[4:7], low[7:])
    for name, value in got.items():
        assert_accurate(f"{name}: varlen vs per-sequence flash_attn_func", value, per_sequence[name], dtype,
                        tol=tolerance(dtype) / 4)


def test_varlen_under_cuda_graph_capture():
    """The cu_seqlens value check (a host read) is skipped while a CUDA graph is captured, so a
    varlen forward and backward can be captured; the replay must equal the eager call."""
    lengths = [300, 17, 0, 513]
    cu = cu_seqlens(lengths, DEVICE)
    q, k, v = (torch.randn(sum(lengths), 4, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    d_out = torch.randn_like(q)

    def step():
        out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), d_out))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        eager = [t.clone() for t in step()]  # the warm-up outside the capture (and the checked call)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, want, got in zip(("out", "dq", "dk", "dv"), eager, captured):
        assert torch.equal(want, got), f"{name}: CUDA-graph replay differs from the eager call"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", _quick([64, 128], (128,), lambda d: f"D{d}"))
def test_tma_loads_at_every_order(head_dim, causal, monkeypatch):
    """Every sweep loading through tensor descriptors (forced, as THERIA_ATTENTION_TMA=1 does: the
    tables turn TMA on for some sweeps and head dims only), bf16, grouped heads, odd lengths: the
    same criterion at every derivative order as the masked loads meet."""
    import theria_kernels.attention._tuning as tuning
    from theria_kernels.attention.torch_launchers import clear_plans

    monkeypatch.setattr(tuning, "TMA_OVERRIDE", True)
    clear_plans()  # plans are cached with the choice they were built with
    try:
        attend, reference = _flash(causal=causal)
        _check(attend, reference, (2, 4, 1, 203, 97, head_dim), torch.bfloat16, seed=11)
    finally:
        clear_plans()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"D{d}")
def test_halves_at_every_order(head_dim, causal, monkeypatch):
    """The backward's dK/dV sweep taking each whole query block as two halves, forced through the
    table for the head dim and both mask classes (the table itself takes them nowhere now), and at
    D64 the forward's halves too, forced under a band as well (its edge and inner key loops,
    ``forward._inner_keys``); bf16 and fp16, grouped heads, odd lengths (whole query blocks
    and a partial one): the same criterion at every derivative order."""
    import theria_kernels.attention._tuning as tuning
    from theria_kernels.attention.torch_launchers import _PLANS, clear_plans

    major, minor = torch.cuda.get_device_capability()
    capability = tuning.table_capability(10 * major + minor)
    entries = frozenset({(head_dim, 2, False), (head_dim, 2, True)})
    monkeypatch.setitem(tuning.BACKWARD_COLUMNS_HALVES, capability, entries)
    monkeypatch.setattr(tuning, "SHORT_SWEEP_KEYS", 0)  # these lengths' sweeps are short, which take no halves
    forced = {"_attn_bwd_dkdv_kernel"}
    if head_dim == 64:  # at 128 the forward's table tile is not one the halves were built for
        monkeypatch.setitem(tuning.FORWARD_HALVES, capability, entries)
        forced.add("_attn_fwd_kernel")
    clear_plans()  # plans are cached with the schedule they were built with
    try:
        attend, reference = _flash(causal=causal)
        for dtype in LOW_DTYPES:
            _check(attend, reference, (2, 4, 1, 203, 97, head_dim), dtype, seed=13)
        for name in forced:  # the forward kernel's tangent launches take no halves
            halves = [launch.arguments["HALVES"] for plan in _PLANS.values() for launch in plan.launches
                      if launch.kernel.__name__ == name and not launch.arguments.get("HAS_TANGENT")]
            assert halves and all(halves), name
    finally:
        clear_plans()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("one_sweep, head_dim", [(False, 128), (False, 64), (True, 40)],
                         ids=["two-sweeps-D128", "two-sweeps-D64", "one-sweep-D40"])
def test_double_backward_row_schedules(one_sweep, head_dim, causal, monkeypatch):
    """The double backward's row kernel in the schedule the tables do not choose at that head dim
    for this check's HVP, whose d_out is a constant (``_tuning.ROW_ONE_SWEEP``: on sm_90 one sweep at
    the 2-byte head-dim classes 64 and, without d_out's cotangent, 128; two elsewhere), forced, bf16
    and fp16, grouped heads, odd lengths: the same criterion at every derivative order."""
    import theria_kernels.attention._tuning as tuning
    from theria_kernels.attention.torch_launchers import clear_plans

    monkeypatch.setattr(tuning, "ONE_SWEEP_OVERRIDE", one_sweep)
    clear_plans()  # plans are cached with the schedule they were built with
    try:
        attend, reference = _flash(causal=causal)
        for dtype in LOW_DTYPES:
            _check(attend, reference, (2, 4, 1, 203, 97, head_dim), dtype, seed=12)
    finally:
        clear_plans()
