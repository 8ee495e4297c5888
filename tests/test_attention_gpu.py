"""GPU correctness of the fused attention at every derivative order (run with `pytest -m gpu`).

Each case runs forward, backward (with create_graph), the reverse-over-reverse HVP and the JVP
through ``sdpa_custom`` / ``flash_attn_func`` in a low dtype and compares them with the float64
reference on the same device, by ‖x − ref‖ / ‖ref‖ with the per-dtype tolerances of
docs/design/attention.md, and also by flash-attn's rule: the error is at most twice that of
plain attention computed in the same low dtype (plus a small floor for round-off).
"""

from __future__ import annotations

import pytest
import torch

from _attention_cases import TOLERANCE, cu_seqlens, random_inputs, relative_error
from theria_torch import flash_attn_func, flash_attn_varlen_func, sdpa_custom
from theria_torch.reference import attention_reference, varlen_attention_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _derivatives(attend, q, k, v, d_out, cots, tangents):
    """out, (dq, dk, dv), HVP (q, k, v) and out_dot of ``attend`` at (q, k, v)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    grads = torch.autograd.grad(out, leaves, d_out.to(q.dtype), create_graph=True)
    hvp = torch.autograd.grad(grads, leaves, [c.to(q.dtype) for c in cots])
    _, out_dot = torch.func.jvp(attend, tuple(t.detach() for t in (q, k, v)), tuple(t.to(q.dtype) for t in tangents))
    return {"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2], "hvp_q": hvp[0], "hvp_k": hvp[1],
            "hvp_v": hvp[2], "out_dot": out_dot}


def _check(attend, reference, shape, dtype, seed=0, inputs=None):
    """``inputs`` (float64 q, k, v) replaces the random ones drawn for ``shape``."""
    batch, heads, heads_kv, t_q, t_k, head_dim = shape
    q64, k64, v64 = inputs or random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, torch.float64, "cuda", seed)
    d_out = torch.randn_like(q64)
    cots = [torch.randn_like(t) for t in (q64, k64, v64)]
    tangents = [torch.randn_like(t) for t in (q64, k64, v64)]
    low = [t.to(dtype) for t in (q64, k64, v64)]
    got = _derivatives(attend, *low, d_out, cots, tangents)
    exact = _derivatives(reference, q64, k64, v64, d_out, cots, tangents)
    plain = _derivatives(reference, *low, d_out, cots, tangents)
    for name, value in got.items():
        err = relative_error(value, exact[name])
        plain_err = relative_error(plain[name], exact[name])
        assert err <= TOLERANCE[dtype], f"{name}: {err:.2e} > {TOLERANCE[dtype]:.0e} for {shape} {dtype}"
        assert err <= 2 * plain_err + 1e-6, f"{name}: {err:.2e} > 2 × plain {dtype} attention's {plain_err:.2e}"
    return got, (low, d_out, cots, tangents)


def _sdpa(**mask):
    return (lambda q, k, v: sdpa_custom(q, k, v, **mask),
            lambda q, k, v: attention_reference(q, k, v, **mask))


def _flash(**mask):
    """flash_attn_func on transposed views, compared with the bottom-right reference."""
    def attend(q, k, v):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **mask).transpose(1, 2)
    return attend, lambda q, k, v: attention_reference(q, k, v, bottom_right=True, **mask)


LENGTHS = [(2, 3), (113, 113), (1023, 1023), (257, 1000), (1000, 257)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda p: f"{p[0]}x{p[1]}")
def test_dtype_causal_length_matrix(dtype, causal, lengths):
    torch.backends.cuda.matmul.allow_tf32 = False
    attend, reference = _flash(causal=causal) if lengths[0] != lengths[1] else _sdpa(causal=causal)
    _check(attend, reference, (2, 4, 2, *lengths, 64), dtype)


@pytest.mark.parametrize("head_dim", [16, 32, 40, 59, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(head_dim, causal):
    attend, reference = _flash(causal=causal)
    _check(attend, reference, (1, 4, 1, 300, 517, head_dim), torch.bfloat16, seed=head_dim)


@pytest.mark.parametrize("window", [(256, 0), (64, 64)])
def test_sliding_window(window):
    attend, reference = _flash(window_size=window)
    _check(attend, reference, (1, 4, 4, 1000, 1000, 64), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("mask", [dict(causal=False), dict(causal=True), dict(window_size=(128, 16))],
                         ids=["full", "causal", "window"])
def test_varlen_matches_per_sequence_calls(mask, dtype):
    """flash_attn_varlen_func's out, gradients, HVP and JVP against the float64 reference run per
    sequence (the criteria of ``_check``) and against flash_attn_func on each sequence alone."""
    lengths_q, lengths_k = zip(*VARLEN_LENGTHS)
    cu_q, cu_k = cu_seqlens(lengths_q, "cuda"), cu_seqlens(lengths_k, "cuda")
    sequences = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    packed = [t[0].transpose(0, 1).contiguous() for t in random_inputs(
        1, 8, 2, sum(lengths_q), sum(lengths_k), 128, torch.float64, "cuda", seed=7)]
    got, (low, d_out, cots, tangents) = _check(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, *sequences, **mask),
        lambda q, k, v: varlen_attention_reference(q, k, v, cu_q, cu_k, **mask),
        (1, 8, 2, sum(lengths_q), sum(lengths_k), 128), dtype, inputs=packed)
    per_sequence = _derivatives(_per_sequence(lambda q, k, v: flash_attn_func(q, k, v, **mask), cu_q, cu_k),
                                *low, d_out, cots, tangents)
    for name, value in got.items():
        err = relative_error(value, per_sequence[name])
        assert err <= TOLERANCE[dtype] / 4, f"{name}: varlen vs per-sequence flash_attn_func {err:.2e} ({dtype})"
