"""theria_jax.rmsnorm against the jax.numpy reference, and against theria_torch on the same data.

On CPU the kernels run in Triton's interpreter (tests/conftest.py turns it on and enables x64),
so shapes stay tiny; the ``gpu`` tests repeat the comparison at model sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from _device import DEVICE
from _numerics import assert_accurate, assert_tree_accurate
from theria_torch import rmsnorm as torch_rmsnorm
from theria_jax.rmsnorm import rmsnorm, rmsnorm_reference

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")

EPS = 0.1
DTYPES = [jnp.float64, jnp.float32, jnp.float16, jnp.bfloat16]  # tolerances: tests/_numerics.py


def make_inputs(leading, n_cols, dtype=jnp.float64, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (*leading, n_cols), jnp.float64)
    weight = 1.0 + 0.5 * jax.random.normal(kw, (n_cols,), jnp.float64)
    return x.astype(dtype), weight.astype(dtype)


def randn_like(array, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), array.shape, array.dtype)


def fused(x, weight):
    return rmsnorm(x, weight, EPS)


def reference(x, weight):
    return rmsnorm_reference(x, weight, EPS)


def scalar_loss(norm):
    return lambda x, weight: jnp.sum(jnp.sin(norm(x, weight)))


def assert_trees_close(name, out, ref, tol=1e-11):
    assert_tree_accurate(name, out, ref, jnp.float64, tol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("n_cols", [7, 32])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_forward_and_vjp_match_float64_reference(dtype, n_cols, jit):
    x, weight = make_inputs((2, 3), n_cols, dtype)
    dy = randn_like(x, seed=1)
    y, vjp = jax.vjp(jax.jit(fused) if jit else fused, x, weight)
    dx, dweight = vjp(dy)
    x64, weight64 = x.astype(jnp.float64), weight.astype(jnp.float64)
    y_ref, vjp_ref = jax.vjp(reference, x64, weight64)
    dx_ref, dweight_ref = vjp_ref(dy.astype(jnp.float64))
    assert y.dtype == dx.dtype == dweight.dtype == dtype
    for name, out, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", dweight, dweight_ref)):
        assert_accurate(name, out, ref, dtype)


def test_check_grads_second_order_forward_and_reverse():
    x, weight = make_inputs((3,), 4)
    check_grads(fused, (x, weight), order=2, modes=("fwd", "rev"))


def test_second_order_compositions_match_reference():
    """grad∘grad, jvp∘grad, grad∘jvp and jvp∘jvp, each under jit."""
    x, weight = make_inputs((2, 3), 5, seed=2)
    v = (randn_like(x, 3), randn_like(weight, 4))
    v2 = (randn_like(x, 10), randn_like(weight, 11))

    def compositions(norm):
        grad = jax.grad(scalar_loss(norm), argnums=(0, 1))
        tangent = lambda x, weight: jax.jvp(norm, (x, weight), v)[1]
        grad_loss = lambda x, weight: sum(jnp.sum(jnp.sin(g)) for g in grad(x, weight))
        return {
            "grad": grad(x, weight),
            "jvp": tangent(x, weight),
            "grad∘grad": jax.grad(grad_loss, argnums=(0, 1))(x, weight),
            "jvp∘grad": jax.jvp(grad, (x, weight), v)[1],
            "grad∘jvp": jax.grad(lambda x, w: jnp.sum(jnp.sin(tangent(x, w))), argnums=(0, 1))(x, weight),
            "jvp∘jvp": jax.jvp(tangent, (x, weight), v2)[1],
        }

    out, ref = jax.jit(lambda: compositions(fused))(), compositions(reference)
    for name in ref:
        assert_trees_close(name, out[name], ref[name])


def test_hessian_matches_reference():
    x, weight = make_inputs((2,), 4, seed=5)
    out = jax.hessian(scalar_loss(fused), argnums=(0, 1))(x, weight)
    ref = jax.hessian(scalar_loss(reference), argnums=(0, 1))(x, weight)
    assert_trees_close("hessian", out, ref)


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (1, None)], ids=str)
def test_vmap_forward_and_grad(in_axes):
    x = jax.random.normal(jax.random.PRNGKey(6), (3, 2, 5), jnp.float64)
    weight = jax.random.normal(jax.random.PRNGKey(7), (3, 5), jnp.float64)
    x = x if in_axes[0] is not None else x[0]
    weight = weight if in_axes[1] is not None else weight[0]
    for name, transform in (("forward", lambda norm: norm),
                            ("grad", lambda norm: jax.grad(scalar_loss(norm), argnums=(0, 1)))):
        out = jax.vmap(transform(fused), in_axes=in_axes)(x, weight)
        ref = jax.vmap(transform(reference), in_axes=in_axes)(x, weight)
        assert_trees_close(f"vmap {name}", out, ref, 1e-12)


def test_same_numbers_as_torch():
    """One set of kernels: the torch and JAX adapters agree bit for bit on the same inputs."""
    x, weight = make_inputs((2, 3), 9, jnp.float32, seed=8)
    dy = randn_like(x, 9)
    y, vjp = jax.vjp(fused, x, weight)
    dx, dweight = vjp(dy)
    x_t, weight_t, dy_t = (torch.from_numpy(np.array(a)).to(DEVICE) for a in (x, weight, dy))
    x_t.requires_grad_(), weight_t.requires_grad_()
    y_t = torch_rmsnorm(x_t, weight_t, EPS)
    dx_t, dweight_t = torch.autograd.grad(y_t, (x_t, weight_t), dy_t)
    for name, a, b in (("y", y, y_t), ("dx", dx, dx_t), ("dweight", dweight, dweight_t)):
        np.testing.assert_array_equal(np.asarray(a), b.detach().cpu().numpy(), err_msg=name)


def test_third_order_raises_clearly():
    x, weight = make_inputs((3,), 4)
    grad_x = lambda x: jax.grad(scalar_loss(fused))(x, weight)
    hvp = lambda x: jax.grad(lambda x: jnp.sum(grad_x(x) ** 2))(x)
    with pytest.raises(NotImplementedError, match="third derivatives.*backend='reference'"):
        jax.grad(lambda x: jnp.sum(hvp(x)))(x)


@pytest.mark.parametrize("case, error, match", [
    ("weight_shape", ValueError, r"weight must have shape \(N,\) = \(6,\)"),
    ("mixed_dtypes", TypeError, "weight has dtype float32 but x has dtype float64"),
    ("int_dtype", TypeError, "x has dtype int32"),
    ("backend", ValueError, "unknown backend"),
    ("not_array", TypeError, "weight must be a jax.Array"),
])
def test_bad_input_raises_the_same_message_as_torch(case, error, match):
    x, weight = make_inputs((2,), 6)
    args = {"weight_shape": (x, weight[:5]), "mixed_dtypes": (x, weight.astype(jnp.float32)),
            "int_dtype": (x.astype(jnp.int32), weight), "backend": (x, weight),
            "not_array": (x, weight.tolist())}[case]
    kwargs = {"backend": "cuda"} if case == "backend" else {}
    with pytest.raises(error, match=match):
        rmsnorm(*args, **kwargs)
    if case != "not_array":
        torch_args = [torch.from_numpy(np.array(a)).to(DEVICE) for a in args]
        with pytest.raises(error, match=match):
            torch_rmsnorm(*torch_args, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the message is about running without a GPU")
def test_cpu_without_interpreter_points_to_the_alternatives(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight = make_inputs((2,), 4)
    with pytest.raises(ValueError, match='backend="reference", or set TRITON_INTERPRET=1'):
        rmsnorm(x, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gpu_jit_grad_and_hvp_at_model_size(dtype):
    x, weight = make_inputs((2, 1024), 4096, dtype, seed=10)
    v = randn_like(x, 11)
    grad = lambda norm: jax.grad(lambda x, w: jnp.sum(norm(x, w) * v.astype(x.dtype)), argnums=(0, 1))
    hvp = lambda norm: jax.jvp(grad(norm), (x, weight), (v, weight))[1]
    out = jax.jit(lambda: (fused(x, weight), grad(fused)(x, weight), hvp(fused)))()
    x64, w64, v64 = (a.astype(jnp.float64) for a in (x, weight, v))
    ref_grad = jax.grad(lambda x, w: jnp.sum(reference(x, w) * v64), argnums=(0, 1))
    ref = (reference(x64, w64), ref_grad(x64, w64), jax.jvp(ref_grad, (x64, w64), (v64, w64))[1])
    for i, (o, r) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(ref))):
        assert_accurate(f"leaf {i}", o, r, dtype)
