"""The registered operators (``torch.ops.theria.*``) as torch.compile and torch.export see them.

The fakes' outputs have the shapes, strides and dtypes of the real outputs for inputs laid out
as callers hand them over: contiguous, (B, T, H, D) buffers seen as (B, H, T, D), every third
element of a wider head dim (last stride 3), a slice of a wider tensor (last stride 1 with gaps)
and broadcasts (stride 0). Every operator passes ``torch.library.opcheck`` (schema, fake
implementation, dispatch, autograd registration) on strided inputs (opcheck copies its inputs, so
the broadcasts are checked by the fake comparison alone), and the public functions run under
``FakeTensorMode`` on the fakes alone.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from _attention_cases import random_inputs
from _device import DEVICE
from theria_torch import flash_attn_func, rmsnorm, sdpa_custom

F64 = torch.float64
# Trailing arguments of a fixed-length call: scale, causal, window, bottom_right, softcap (off), no
# varlen, no ALiBi row slopes.
SCALARS = (8**-0.5, True, -1, -1, False, 0.0, None, None, 0, 0, None)
ATTENTION_OPERATORS = ("forward", "jvp", "tangent", "forward_second", "backward", "backward_backward")


def _wider(t: torch.Tensor, factor: int) -> torch.Tensor:
    """A tensor whose last dimension is ``factor`` times ``t``'s, holding ``t``'s values at every
    ``factor``-th position."""
    wide = torch.randn(*t.shape[:-1], factor * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::factor] = t
    return wide


def _attention_layout(layout: str):
    """q (2, 2, 7, 8) and k, v (2, 1, 9, 8), float64, in ``layout``."""
    q, k, v = random_inputs(2, 2, 1, 7, 9, 8, F64, seed=12)
    if layout == "contiguous":
        return q, k, v
    if layout == "bthd_view":
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if layout == "every_third":
        return tuple(_wider(t, 3)[..., ::3] for t in (q, k, v))
    if layout == "gapped":
        return tuple(_wider(t, 2)[..., :8] for t in (q, k, v))
    if layout == "broadcast_kv":  # one key/value batch entry for both query entries
        return q, k[:1].expand_as(k), v[:1].expand_as(v)
    if layout == "broadcast_q":  # one query head for both heads
        return q[:, :1].expand_as(q), k, v
    raise ValueError(layout)


ATTENTION_LAYOUTS = ["contiguous", "bthd_view", "every_third", "gapped", "broadcast_kv", "broadcast_q"]


def _attention_arguments(name: str, q, k, v, scalars=SCALARS) -> tuple:
    """Arguments of ``torch.ops.theria.attention_<name>``; tangents and cotangents shaped like
    their primal but contiguous, some optional ones None."""
    out, lse = torch.ops.theria.attention_forward(q, k, v, *scalars)
    q_dot, d_out, k_dot, v_dot = (torch.randn(t.shape, dtype=F64, device=t.device) for t in (q, q, k, v))
    dq = torch.ops.theria.attention_backward(q, k, v, out, lse, d_out, None, *scalars)[0]
    return {"forward": (q, k, v),
            "jvp": (q, k, v, q_dot, k_dot, v_dot),
            "tangent": (q, k, v, out, lse, q_dot, k_dot, v_dot),
            "forward_second": (q, k, v, q_dot, k_dot, v_dot, d_out, v_dot, k_dot),
            "backward": (q, k, v, out, lse, d_out, None),
            # the second cotangent (d_out_dot, d_lse_dot) given: the fused tangent of the backward,
            # with the backward's dq
            "backward_backward": (q, k, v, out, lse, d_out, None, q_dot, None, v_dot, d_out, lse, dq, True),
            }[name] + tuple(scalars)


def _metadata(outputs) -> list[tuple]:
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [(tuple(o.shape), o.stride(), o.dtype) for o in outputs]


def _assert_fakes_match(operator, arguments):
    """The operator's outputs on fake copies of ``arguments`` (same strides, stride 0 included)
    have the shapes, strides and dtypes of its real outputs."""
    real = _metadata(operator(*arguments))
    with FakeTensorMode() as mode:
        fake_arguments = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in arguments]
        fake = _metadata(operator(*fake_arguments))
    assert fake == real, f"fake (shape, strides, dtype) {fake} != real {real}"


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_attention_fakes_have_the_real_strides(layout):
    q, k, v = _attention_layout(layout)
    for name in ATTENTION_OPERATORS:
        _assert_fakes_match(getattr(torch.ops.theria, f"attention_{name}").default, _attention_arguments(name, q, k, v))


@pytest.mark.parametrize("name", ATTENTION_OPERATORS)
def test_attention_operator_opcheck_strided(name):
    """q with last stride 3 (the launchers copy it), k and v (B, T, H, D) buffers (used as they are)."""
    (q, _, _), (_, k, v) = _attention_layout("every_third"), _attention_layout("bthd_view")
    torch.library.opcheck(getattr(torch.ops.theria, f"attention_{name}").default, _attention_arguments(name, q, k, v))


@pytest.mark.parametrize("name", ATTENTION_OPERATORS)
def test_attention_operator_opcheck_softcap_alibi(name):
    """The score modifiers in the schema: a cap, and ALiBi's row slopes (B, H, T_q) as a tensor
    argument (bottom-right, so the ALiBi diagonal moves)."""
    q, k, v = _attention_layout("contiguous")
    row_slopes = torch.rand(*q.shape[:3], dtype=torch.float32, device=q.device)
    scalars = (8**-0.5, True, -1, -1, True, 1.5, None, None, 0, 0, row_slopes)
    torch.library.opcheck(getattr(torch.ops.theria, f"attention_{name}").default,
                          _attention_arguments(name, q, k, v, scalars))


def _rmsnorm_layout(layout: str):
    """x (2, 3, 16) and weight (16,), float64, in ``layout``."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, generator=gen, dtype=F64).to(DEVICE)
    weight = (1 + 0.5 * torch.randn(16, generator=gen, dtype=F64)).to(DEVICE)
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "every_other":
        x = _wider(x, 2)[..., ::2]
        weight = _wider(weight, 2)[::2]
    elif layout == "broadcast_rows":
        x = x[:, :1].expand_as(x)
    return x, weight


RMSNORM_OPERATORS = ["rmsnorm_forward", "rmsnorm_jvp", "rmsnorm_backward", "rmsnorm_backward_backward",
                     "rmsnorm_forward_second"]


def _rmsnorm_arguments(name: str, x, weight) -> tuple:
    """Arguments of ``torch.ops.theria.<name>``, some optional tangents and cotangents None (the
    kernels specialise on them)."""
    rstd = torch.ops.theria.rmsnorm_forward(x, weight, 0.1)[1]
    dy, x_dot, x_dot2 = (torch.randn(x.shape, dtype=F64, device=x.device) for _ in range(3))
    w_dot = torch.randn_like(weight)
    return {"rmsnorm_forward": (x, weight, 0.1), "rmsnorm_jvp": (x, weight, x_dot, None, 0.1),
            "rmsnorm_backward": (x, weight, rstd, dy),
            "rmsnorm_backward_backward": (x, weight, rstd, dy, x_dot, None),
            "rmsnorm_forward_second": (x, weight, rstd, x_dot, w_dot, x_dot2, None)}[name]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every_other", "broadcast_rows"])
def test_rmsnorm_fakes_have_the_real_strides(layout):
    x, weight = _rmsnorm_layout(layout)
    for name in RMSNORM_OPERATORS:
        _assert_fakes_match(getattr(torch.ops.theria, name).default, _rmsnorm_arguments(name, x, weight))


@pytest.mark.parametrize("name", RMSNORM_OPERATORS)
def test_rmsnorm_operator_opcheck_strided(name):
    torch.library.opcheck(getattr(torch.ops.theria, name).default, _rmsnorm_arguments(name, *_rmsnorm_layout("every_other")))


def test_public_functions_run_under_fake_tensor_mode():
    """sdpa_custom, flash_attn_func and rmsnorm, with a double backward, on fake tensors: every
    call goes to the operators' fakes (a launch would fail on a fake tensor)."""
    q, k, v = random_inputs(2, 4, 2, 9, 11, 16, F64)
    x = torch.randn(3, 5, 16, dtype=F64, device=DEVICE)
    weight = torch.ones(16, dtype=F64, device=DEVICE)
    with FakeTensorMode() as mode:
        q, k, v, x, weight = (mode.from_tensor(t).requires_grad_() for t in (q, k, v, x, weight))
        out = sdpa_custom(q, k, v, causal=True)
        out_bthd = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        y = rmsnorm(x, weight)
        loss = out.square().sum() + out_bthd.square().sum() + y.square().sum()
        grads = torch.autograd.grad(loss, (q, k, v, x, weight), create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v, x, weight))
    for t in (out, out_bthd, y, *grads, *second):
        assert isinstance(t, FakeTensor)
    assert out.shape == q.shape and out_bthd.shape == (2, 9, 4, 16) and y.shape == x.shape
    assert [g.shape for g in second] == [t.shape for t in (q, k, v, x, weight)]
