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

from _attention_cases import TOLERANCE, random_inputs, relative_error
from theria_torch import flash_attn_func, sdpa_custom
from theria_torch.reference import attention_reference

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


def _check(attend, reference, shape, dtype, seed=0):
    batch, heads, heads_kv, t_q, t_k, head_dim = shape
    q64, k64, v64 = random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, torch.float64, "cuda", seed)
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
