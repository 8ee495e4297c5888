"""A newcomer's mistakes, in both frameworks: each bad input raises an error of the right type that
names the argument and what to do, and no input gives silently wrong numbers (bfloat16 in Triton's
interpreter is computed correctly, see ``theria_kernels._contracts.interpreter_compute_dtype``).

Checks run before any kernel, so these tests are fast; the bfloat16 ones launch tiny kernels.
torch tensors are built on tests/_device.py's DEVICE, so every wrong input is wrong in the same one way
on a GPU machine and on a CPU one; JAX picks the GPU by itself when there is one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import theria_jax
import theria_torch
from _device import DEVICE
from theria_kernels import _contracts

B, T, H, D = 1, 8, 2, 16


def _numpy(dtype=np.float32, shape=(B, T, H, D), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _torch(dtype=torch.float32, shape=(B, T, H, D), seed=0):
    return torch.from_numpy(_numpy(np.float64, shape, seed)).to(DEVICE, dtype)


def _jax(dtype=jnp.float32, shape=(B, T, H, D), seed=0):
    return jnp.asarray(_numpy(np.float64, shape, seed)).astype(dtype)


TORCH_ATTENTION = {"sdpa_custom": theria_torch.sdpa_custom, "flash_attn_func": theria_torch.flash_attn_func}
JAX_ATTENTION = {"attention": theria_jax.attention, "flash_attn_func": theria_jax.flash_attn_func}
SCALE_NAME = {"sdpa_custom": "scale", "attention": "scale", "flash_attn_func": "softmax_scale"}


def _message(error_type, function, *args, **kwargs) -> str:
    with pytest.raises(error_type) as info:
        function(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Arrays of the wrong kind
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_ATTENTION)
@pytest.mark.parametrize("kind, make, words", [
    ("numpy", _numpy, ["q must be a torch.Tensor", "numpy.ndarray", "torch.from_numpy(q)"]),
    ("jax", _jax, ["q must be a torch.Tensor", "torch.from_dlpack(q)"]),
    ("list", lambda: _numpy().tolist(), ["q must be a torch.Tensor", "got list", "torch.as_tensor(q)"]),
])
def test_torch_attention_rejects_other_arrays(name, kind, make, words):
    message = _message(TypeError, TORCH_ATTENTION[name], make(), _torch(), _torch())
    assert all(word in message for word in words), message


def test_torch_varlen_rejects_other_arrays():
    q = _numpy(shape=(T, H, D))
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    message = _message(TypeError, theria_torch.flash_attn_varlen_func, q, q, q, cu, cu, T, T)
    assert "q must be a torch.Tensor" in message and "torch.from_numpy(q)" in message


@pytest.mark.parametrize("name", JAX_ATTENTION)
@pytest.mark.parametrize("kind, make, words", [
    ("torch", _torch, ["q must be a jax.Array", "torch.Tensor", "jax.dlpack.from_dlpack(q)"]),
    ("list", lambda: _numpy().tolist(), ["q must be a jax.Array", "got list", "jnp.asarray(q)"]),
])
def test_jax_attention_rejects_other_arrays(name, kind, make, words):
    message = _message(TypeError, JAX_ATTENTION[name], make(), _jax(), _jax())
    assert all(word in message for word in words), message


def test_jax_varlen_rejects_other_arrays():
    q = _torch(shape=(T, H, D))
    cu = np.array([0, T], np.int32)
    message = _message(TypeError, theria_jax.flash_attn_varlen_func, q, q, q, cu, cu, T, T)
    assert "q must be a jax.Array" in message and "jax.dlpack.from_dlpack(q)" in message


def test_jax_attention_takes_numpy_arrays():
    q = _numpy()
    out = theria_jax.attention(q, q, q, backend="reference")
    assert isinstance(out, jax.Array) and out.shape == q.shape


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_rmsnorm_rejects_other_arrays(framework):
    if framework == "torch":
        message = _message(TypeError, theria_torch.rmsnorm, _numpy(shape=(4, D)), torch.ones(D, device=DEVICE))
        assert "rmsnorm: x must be a torch.Tensor" in message and "torch.from_numpy(x)" in message
    else:
        message = _message(TypeError, theria_jax.rmsnorm, _torch(shape=(4, D)), jnp.ones(D))
        assert "rmsnorm: x must be a jax.Array" in message and "jax.dlpack.from_dlpack(x)" in message


# ---------------------------------------------------------------------------------------------
# Integer dtypes, on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _contracts.BACKENDS)
def test_integer_inputs_are_refused_on_every_backend(backend):
    """The same words in both frameworks, naming the fix; the reference backend used to fail deep
    inside a matmul ("expected m1 and m2 to have the same dtype")."""
    messages = []
    for name, function in TORCH_ATTENTION.items():
        q = _torch(torch.int64)
        messages.append(_message(TypeError, function, q, q, q, backend=backend))
    for name, function in JAX_ATTENTION.items():
        q = _jax(jnp.int64)
        messages.append(_message(TypeError, function, q, q, q, backend=backend))
    assert len(set(messages)) == 1, messages
    assert f"q has dtype int64; {backend} supports float16, bfloat16, float32, float64" in messages[0]
    assert "cast q, k and v" in messages[0]


@pytest.mark.parametrize("backend", _contracts.BACKENDS)
def test_rmsnorm_integer_inputs_are_refused_on_every_backend(backend):
    for function, x, weight in ((theria_torch.rmsnorm, _torch(torch.int64, (4, D)),
                                 torch.ones(D, dtype=torch.int64, device=DEVICE)),
                                (theria_jax.rmsnorm, _jax(jnp.int64, (4, D)), jnp.ones(D, jnp.int64))):
        message = _message(TypeError, function, x, weight, backend=backend)
        assert "x has dtype int64" in message and "float32" in message, message


# ---------------------------------------------------------------------------------------------
# window_size, scale and causal
# ---------------------------------------------------------------------------------------------


BAD_OPTIONS = [
    ("window_size", (True, -1), TypeError, "window_size must be a pair of ints >= -1"),
    ("window_size", (1.5, 0), TypeError, "window_size must be a pair of ints >= -1"),
    ("window_size", 4, TypeError, "window_size must be a pair of ints >= -1"),
    ("window_size", (2, -3), ValueError, "window_size must be a pair of ints >= -1"),
    ("scale", "0.5", TypeError, "{scale} must be a Python float or None"),
    ("scale", np.array(0.5), TypeError, "{scale} must be a Python float or None"),
    ("scale", True, TypeError, "{scale} must be a Python float or None"),
    ("scale", float("nan"), ValueError, "{scale} must be finite"),
    ("causal", "yes", TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("option, value, error, words", BAD_OPTIONS,
                         ids=[f"{o}={v!r}" for o, v, _, _ in BAD_OPTIONS])
def test_bad_options_same_words_in_both_frameworks(option, value, error, words):
    messages = {}
    for framework, functions, make in (("torch", TORCH_ATTENTION, _torch), ("jax", JAX_ATTENTION, _jax)):
        for name, function in functions.items():
            keyword = SCALE_NAME[name] if option == "scale" else option
            q = make()
            message = _message(error, function, q, q, q, **{keyword: value})
            assert words.format(scale=keyword) in message, message
            messages[framework, SCALE_NAME[name]] = message
    for scale_name in ("scale", "softmax_scale"):
        assert messages["torch", scale_name] == messages["jax", scale_name]


# flash-attn's score modifiers: (option, value, error, words); slopes given as (shape, dtype name).
BAD_MODIFIERS = [
    ("softcap", -1.0, ValueError, "softcap must be a finite number >= 0 (0.0 = off), got -1.0"),
    ("softcap", float("inf"), ValueError, "softcap must be a finite number >= 0"),
    ("softcap", "50", TypeError, "softcap must be a Python float (0.0 = off), got str '50'"),
    ("alibi_slopes", ((H + 1,), "float32"), ValueError,
     f"alibi_slopes must have shape (nheads,) = ({H},) or (batch size, nheads) = ({B}, {H}), got ({H + 1},)"),
    ("alibi_slopes", ((B, H), "int32"), TypeError, "alibi_slopes must be float32 (flash-attn's ALiBi slopes) or float64"),
]


@pytest.mark.parametrize("option, value, error, words", BAD_MODIFIERS,
                         ids=[f"{o}={v!r}" for o, v, _, _ in BAD_MODIFIERS])
def test_bad_score_modifiers_same_words_in_both_frameworks(option, value, error, words):
    messages = []
    for function, make, array in ((theria_torch.flash_attn_func, _torch, lambda s, d: torch.zeros(s, device=DEVICE,
                                                                                                  dtype=getattr(torch, d))),
                                  (theria_jax.flash_attn_func, _jax, lambda s, d: jnp.zeros(s, d))):
        q = make()
        given = array(*value) if option == "alibi_slopes" else value
        messages.append(_message(error, function, q, q, q, **{option: given}))
        assert words in messages[-1], messages[-1]
    assert messages[0] == messages[1]


@pytest.mark.parametrize("option, good, bad", [
    ("window_size", (1, -1), (True, -1)),  # equal and hashed alike, but a bool is no window side
    ("scale", 1.0, True),
    ("causal", True, 1.0),
])
def test_checks_are_not_skipped_for_a_call_seen_before(option, good, bad):
    """theria_torch remembers the calls whose checks passed; a value that compares and hashes equal
    to a remembered one, or the same call with one tensor changed, still meets every check."""
    q = _torch()
    theria_torch.sdpa_custom(q, q, q, **{option: good})
    with pytest.raises(TypeError, match=option):
        theria_torch.sdpa_custom(q, q, q, **{option: bad})
    with pytest.raises(TypeError, match="share one dtype"):
        theria_torch.sdpa_custom(q, q, q.double(), **{option: good})


def test_numpy_scalars_are_accepted():
    q = _torch(torch.float64)
    out = theria_torch.sdpa_custom(q, q, q, scale=np.float64(0.25), window_size=(np.int64(2), -1), causal=np.True_)
    ref = theria_torch.sdpa_custom(q, q, q, scale=0.25, window_size=(2, -1), causal=True, backend="reference")
    assert (out - ref).abs().max() < 1e-10


def test_varlen_options_are_checked():
    q = _torch(shape=(T, H, D))
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEVICE)
    message = _message(TypeError, theria_torch.flash_attn_varlen_func, q, q, q, cu, cu, T, T, softmax_scale="0.5")
    assert "softmax_scale must be a Python float or None" in message
    q = _jax(shape=(T, H, D))
    message = _message(TypeError, theria_jax.flash_attn_varlen_func, q, q, q, np.array([0, T], np.int32),
                       np.array([0, T], np.int32), T, T, window_size=(True, -1))
    assert "window_size must be a pair of ints >= -1" in message


# ---------------------------------------------------------------------------------------------
# TRITON_INTERPRET switched on after triton was imported
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def triton_imported_without_interpreter(monkeypatch):
    """The state of a process that imported triton and then set TRITON_INTERPRET=1: triton's own
    library functions were built for the compiler (``_contracts.check_interpreter_in_time`` looks at
    them). Reproducing it for real needs a fresh process (about 20 s here); this fakes the one fact."""
    import triton.language.standard as standard

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(standard, "sigmoid", object())


# Skipped wherever CUDA is present, also under TRITON_INTERPRET=1 set by hand: JAX then runs on the
# GPU, where theria_jax never looks at the interpreter, so the JAX half cannot raise there.
@pytest.mark.skipif(torch.cuda.is_available(), reason="the check guards the CPU path (JAX picks the GPU when present)")
def test_interpreter_switched_on_too_late(triton_imported_without_interpreter):
    q_torch, q_jax, x_torch, x_jax = _torch(), _jax(), _torch(shape=(4, D)), _jax(shape=(4, D))
    calls = [
        lambda: theria_torch.sdpa_custom(q_torch, q_torch, q_torch),
        lambda: theria_torch.flash_attn_func(q_torch, q_torch, q_torch),
        lambda: theria_jax.attention(q_jax, q_jax, q_jax),
        lambda: theria_jax.flash_attn_func(q_jax, q_jax, q_jax),
        lambda: theria_torch.rmsnorm(x_torch, torch.ones(D)),
        lambda: theria_jax.rmsnorm(x_jax, jnp.ones(D, jnp.float32)),
    ]
    for call in calls:
        message = _message(RuntimeError, call)
        assert "TRITON_INTERPRET=1 was set after triton was imported" in message
        assert "before importing theria or triton" in message and "backend='reference'" in message
    # The reference backend needs no kernels, so it still runs.
    assert theria_torch.sdpa_custom(q_torch, q_torch, q_torch, backend="reference").shape == q_torch.shape


# ---------------------------------------------------------------------------------------------
# bfloat16 in Triton's interpreter: correct numbers, not ~1e9
# ---------------------------------------------------------------------------------------------


BF16_BOUND = 2e-2  # the contract's bound for bfloat16 against float64 (docs/design/attention.md § 11)


def _host(x) -> np.ndarray:
    """A torch tensor (on any device) or a JAX array as a NumPy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _relative(a, b) -> float:
    a, b = np.asarray(_host(a), np.float64), np.asarray(_host(b), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_torch_bfloat16_matches_float64():
    # Three independent draws: with q = k = v under a causal mask at T = 8, plain bfloat16 attention
    # itself is 3-7e-2 from float64 in dq and dk, past any bound a kernel could be held to.
    q, k, v = (_torch(torch.bfloat16, seed=seed).transpose(1, 2).requires_grad_() for seed in range(3))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for name, function in TORCH_ATTENTION.items():
        out = function(q, k, v, causal=True)
        ref = function(*exact, causal=True, backend="reference")
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), exact)
        for what, got, want in (("out", out, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)):
            assert got.dtype == torch.bfloat16, (name, what)
            error = _relative(got.detach().float(), want.detach())
            assert error < BF16_BOUND, f"{name} {what}: relative error {error:.1e} > {BF16_BOUND}"


def test_jax_bfloat16_matches_float64():
    """Gradients through ``attention`` only: ``flash_attn_func`` takes the same path to the kernels."""
    q, k, v = (_jax(jnp.bfloat16, seed=seed) for seed in range(3))  # independent, as in the torch test
    exact = [t.astype(jnp.float64) for t in (q, k, v)]
    for name, function in JAX_ATTENTION.items():
        out = function(q, k, v, causal=True)
        ref = function(*exact, causal=True, backend="reference")
        assert out.dtype == jnp.bfloat16
        error = _relative(out.astype(jnp.float32), ref)
        assert error < BF16_BOUND, f"{name} out: relative error {error:.1e} > {BF16_BOUND}"

    def loss(q, k, v, backend="triton_full_fused"):
        return jnp.sum(theria_jax.attention(q, k, v, causal=True, backend=backend).astype(jnp.float64) ** 2)

    grads = jax.grad(loss, (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss, (0, 1, 2))(*exact, "reference")
    for what, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == jnp.bfloat16, what
        error = _relative(got.astype(jnp.float32), want)
        assert error < BF16_BOUND, f"attention {what}: relative error {error:.1e} > {BF16_BOUND}"


def test_rmsnorm_bfloat16_matches_float64():
    """rmsnorm's kernels load bfloat16 and compute in float32 already, so they are right as they are."""
    x, weight = _numpy(np.float64, (4, 32)), _numpy(np.float64, (32,))
    x_torch, w_torch = (torch.from_numpy(a).to(DEVICE, torch.bfloat16).requires_grad_() for a in (x, weight))
    exact = [t.detach().double().requires_grad_() for t in (x_torch, w_torch)]
    y = theria_torch.rmsnorm(x_torch, w_torch)
    ref = theria_torch.rmsnorm(*exact, backend="reference")
    grads = torch.autograd.grad(y.float().square().sum(), (x_torch, w_torch))
    ref_grads = torch.autograd.grad(ref.square().sum(), exact)
    for what, got, want in (("y", y, ref), *zip(("dx", "dweight"), grads, ref_grads)):
        error = _relative(got.detach().float(), want.detach())
        assert error < BF16_BOUND, f"torch rmsnorm {what}: relative error {error:.1e}"

    x_jax, w_jax = (jnp.asarray(a).astype(jnp.bfloat16) for a in (x, weight))
    y = theria_jax.rmsnorm(x_jax, w_jax)
    ref = theria_jax.rmsnorm(x_jax.astype(jnp.float64), w_jax.astype(jnp.float64), backend="reference")
    assert y.dtype == jnp.bfloat16 and _relative(y.astype(jnp.float32), ref) < BF16_BOUND


# ---------------------------------------------------------------------------------------------
# An exception inside a JAX kernel launch
# ---------------------------------------------------------------------------------------------


def test_exception_inside_a_jax_launch_reaches_the_user():
    """An exception in a bridge launch reaches the caller with its message (XLA wraps it in its
    own "Error when calling buffer callback" error but keeps the cause's text)."""
    from theria_jax._bridge import triton_call

    def failing_launch(x, out):
        raise ValueError("x has 3 rows but the launch needs 4: the words that matter")

    x = jnp.ones((3, 8), jnp.float32)
    try:
        with pytest.raises(Exception) as info:
            jax.block_until_ready(triton_call(failing_launch, x, out_shapes=[jax.ShapeDtypeStruct(x.shape, x.dtype)]))
    finally:
        # On a GPU the failed callback's error also stays in JAX's runtime token, which JAX's exit
        # handler waits on: without this the worker process reports the same error again at exit.
        jax._src.dispatch.runtime_tokens.clear()
    assert "the words that matter" in str(info.value)
