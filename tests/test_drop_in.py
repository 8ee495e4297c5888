"""The drop-ins against the functions they replace: theria_torch.scaled_dot_product_attention vs
torch.nn.functional.scaled_dot_product_attention, theria_jax.dot_product_attention vs
jax.nn.dot_product_attention: same signature, and in float64 the same outputs and first and
second derivatives for the same inputs and masks (jax.nn takes its softmax in float32, so against
it the bound is 1e-6; the fused backend against the reference backend is held to 1e-10). torch
tensors live on tests/_device.py's DEVICE; JAX picks the GPU by itself when there is one."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import theria_jax
import theria_torch
from _device import DEVICE

FUSED = "triton_full_fused"


def _host(x) -> np.ndarray:
    """A torch tensor (on any device) or a JAX array as a NumPy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _max_diff(a, b):
    return max(float(np.abs(_host(x) - _host(y)).max()) for x, y in zip(a, b))


def test_signatures_match_the_originals():
    """Every parameter of the originals, with the same name, kind and default; theria adds only a
    keyword-only ``backend``. torch's function is a builtin without a signature object, so its
    parameters are read from the documented signature line of its docstring."""
    documented = " ".join(F.scaled_dot_product_attention.__doc__.split("->")[0].split())
    torch_original = inspect.signature(eval(f"lambda {documented[documented.index('(') + 1:documented.rindex(')')]}: 0"))
    for original, drop_in in ((torch_original, theria_torch.scaled_dot_product_attention),
                              (inspect.signature(jax.nn.dot_product_attention), theria_jax.dot_product_attention)):
        ours = inspect.signature(drop_in).parameters
        assert list(ours)[:len(original.parameters)] == list(original.parameters)
        for name, parameter in original.parameters.items():
            assert (ours[name].kind, ours[name].default) == (parameter.kind, parameter.default), name
        assert [name for name in ours if name not in original.parameters] == ["backend"]
        assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY


# flash-attn's signatures (flash_attn/flash_attn_interface.py, v2.8), through the arguments theria
# shares with them; flash-attn itself is not installed where the tests run. theria's two
# implementations of each follow them to alibi_slopes (then return_lse and the keyword backend).
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": "q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                       "softcap=0.0, alibi_slopes=None",
    "flash_attn_varlen_func": "q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, "
                              "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None",
}


@pytest.mark.parametrize("framework", [theria_torch, theria_jax], ids=["torch", "jax"])
@pytest.mark.parametrize("name", FLASH_ATTN_SIGNATURES)
def test_flash_attn_signatures_match_flash_attn(framework, name):
    """flash-attn's positional order, names and defaults, softcap and alibi_slopes included."""
    original = inspect.signature(eval(f"lambda {FLASH_ATTN_SIGNATURES[name]}: 0")).parameters
    ours = inspect.signature(getattr(framework, name)).parameters
    assert list(ours)[:len(original)] == list(original)
    for parameter_name, parameter in original.items():
        assert (ours[parameter_name].kind, ours[parameter_name].default) == (parameter.kind, parameter.default), \
            parameter_name


def _torch_derivatives(attend, q, k, v, second_order):
    """Output, gradient and, with ``second_order``, the gradient of a gradient penalty (reverse over reverse)."""
    out = attend(q, k, v)
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v), create_graph=second_order)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v)) if second_order else ()
    return [t.detach() for t in (out, *grads, *second)]


# (keyword arguments, whether to check second order too): the no-mask path is sdpa_custom itself,
# whose every order tests/test_attention_torch.py checks; the key-padding path is the drop-in's own.
TORCH_CASES = {
    "causal": (dict(is_causal=True), False),
    "key padding, 5-D, scale": (dict(attn_mask="key_padding", scale=0.3), True),
}


@pytest.mark.parametrize("case", TORCH_CASES, ids=list(TORCH_CASES))
def test_torch_matches_sdpa(case, one_torch_thread):
    torch.manual_seed(0)
    kwargs, second_order = dict(TORCH_CASES[case][0]), TORCH_CASES[case][1]
    q = torch.randn(2, 1, 2, 5, 8, dtype=torch.float64).to(DEVICE).requires_grad_()  # (N, M, H_q, L, E)
    k, v = (torch.randn(2, 1, 1, 7, 8, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(2))
    if kwargs.get("attn_mask") == "key_padding":
        kwargs["attn_mask"] = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool,
                                           device=DEVICE)[:, None, None, None, :]  # (N, 1, 1, 1, S)
    expected = _torch_derivatives(lambda *x: F.scaled_dot_product_attention(*x, enable_gqa=True, **kwargs), q, k, v,
                                  second_order)
    for backend in (FUSED, "reference"):
        got = _torch_derivatives(
            lambda *x: theria_torch.scaled_dot_product_attention(*x, enable_gqa=True, backend=backend, **kwargs), q, k, v,
            second_order)
        assert _max_diff(got, expected) < 1e-10, (backend, _max_diff(got, expected))


def test_torch_reference_takes_any_mask_and_fused_raises():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 6, 8, dtype=torch.float64).to(DEVICE) for _ in range(3))  # (H, L, E)
    dense = (torch.rand(6, 6) > 0.3).to(DEVICE)
    bias = torch.randn(3, 6, 6, dtype=torch.float64).to(DEVICE)
    for mask in (dense, bias):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = theria_torch.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
        assert (got - expected).abs().max() < 1e-12
        with pytest.raises(ValueError, match="backend='reference'"):
            theria_torch.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match="is_causal"):
        theria_torch.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=True, backend="reference")
    with pytest.raises(ValueError, match="dropout_p"):
        theria_torch.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        theria_torch.scaled_dot_product_attention(q, k[:1], v[:1])


def _jax_derivatives(attend, q, k, v, second_order):
    """Output and gradient of a scalar loss, with ``second_order`` also a Hessian-vector product
    (forward over reverse), under one jit."""
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))

    def derivatives(q, k, v):
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        hvp = jax.jvp(lambda q: jax.grad(loss)(q, k, v), (q,), (jnp.cos(q),))[1] if second_order else ()
        return attend(q, k, v), grads, hvp

    return jax.tree_util.tree_leaves(jax.jit(derivatives)(q, k, v))


LENGTHS = (jnp.array([4, 6], jnp.int32), jnp.array([3, 7], jnp.int32))
# (keyword arguments, whether to check second order too). The drop-in composes functions whose
# every order tests/test_jax_attention.py checks; one second-order case through the packed views
# keeps the interpreter's time down.
JAX_CASES = {
    "kv lengths": (dict(key_value_seq_lengths=LENGTHS[1]), True),
    "causal, both lengths": (dict(is_causal=True, query_seq_lengths=LENGTHS[0], key_value_seq_lengths=LENGTHS[1]), False),
}


@pytest.mark.parametrize("case", JAX_CASES, ids=list(JAX_CASES))
def test_jax_matches_jax_nn(case):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 6, 2, 8)))                               # (B, T, N, H)
    k, v = (jnp.asarray(rng.standard_normal((2, 7, 1, 8))) for _ in range(2))
    kwargs, second_order = JAX_CASES[case]
    results = {backend: _jax_derivatives(
        lambda *x: theria_jax.dot_product_attention(*x, backend=backend, **kwargs), q, k, v, second_order)
        for backend in (FUSED, "reference")}
    expected = _jax_derivatives(lambda *x: jax.nn.dot_product_attention(*x, **kwargs), q, k, v, False)
    assert _max_diff(results[FUSED], results["reference"]) < 1e-10
    assert _max_diff(results[FUSED][:4], expected) < 1e-6


def test_jax_unbatched_window_jit_residual_and_errors():
    """Each call under one jit: eagerly, every jax.numpy op of jax.nn's and the reference's compiles
    on its own (about a hundred compilations)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((6, 2, 8))) for _ in range(3))        # (T, N, H)
    kwargs = dict(is_causal=True, local_window_size=(2, 1), return_residual=True)
    out, residual = jax.jit(lambda q, k, v: theria_jax.dot_product_attention(q, k, v, **kwargs))(q, k, v)
    expected, expected_residual = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs))(q, k, v)
    assert out.shape == expected.shape and residual.shape == expected_residual.shape == (6, 2)
    assert residual.dtype == expected_residual.dtype
    assert jnp.abs(out - expected).max() < 1e-6 and jnp.abs(residual - expected_residual).max() < 1e-6
    # Every row keeps its diagonal: jax.nn averages all values on a fully masked row, theria gives zeros.
    mask = jnp.asarray(rng.standard_normal((1, 2, 6, 6)) > 0) | jnp.eye(6, dtype=bool)

    def masked(attend):
        return jax.jit(lambda q, k, v, mask: attend(q, k, v, mask=mask, bias=mask * 0.5))(q, k, v, mask)

    ours = masked(functools.partial(theria_jax.dot_product_attention, backend="reference"))
    assert jnp.abs(ours - masked(jax.nn.dot_product_attention)).max() < 1e-6
    for kwargs, message in ((dict(mask=mask), "backend='reference'"), (dict(implementation="xla"), "implementation"),
                            (dict(local_window_size=1, key_value_seq_lengths=jnp.array([3])), "local_window_size")):
        with pytest.raises(ValueError, match=message):
            theria_jax.dot_product_attention(q[None], k[None], v[None], **kwargs)


@pytest.mark.parametrize("scale", ["0.5", True, float("nan")], ids=["string", "bool", "nan"])
def test_drop_ins_check_scale(scale):
    """The drop-ins check ``scale`` as every entry point does, before converting it."""
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64, device=DEVICE)
    x = jnp.ones((1, 8, 2, 16), jnp.float64)
    error = ValueError if isinstance(scale, float) else TypeError
    with pytest.raises(error, match="scale must be"):
        theria_torch.scaled_dot_product_attention(q, q, q, scale=scale)
    with pytest.raises(error, match="scale must be"):
        theria_jax.dot_product_attention(x, x, x, scale=scale)
