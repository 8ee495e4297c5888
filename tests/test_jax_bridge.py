"""theria_jax._bridge.triton_call with a tiny Triton kernel: values, zero copy, jit, vmap, GPU stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from theria_jax._bridge import triton_call

JAX_DEVICE = "cuda" if jax.default_backend() == "gpu" else "cpu"  # as torch names it

BLOCK = 16


@triton.jit
def _axpy_and_square_kernel(x_ptr, y_ptr, axpy_ptr, square_ptr, n, alpha, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(axpy_ptr + offsets, alpha * x + y, mask=mask)
    tl.store(square_ptr + offsets, x * x, mask=mask)


class _Recorder:
    """Static (hashable by identity) sink for what the launcher received."""

    def __init__(self):
        self.calls = []


def _launch(x, y, axpy, square, *, alpha, seen=None):
    """Writes alpha·x + y and x² in place; records what it received when ``seen`` is given."""
    if seen is not None:
        seen.calls.append({name: (t.data_ptr(), t.shape, t.dtype, t.device)
                           for name, t in zip(("x", "y", "axpy", "square"), (x, y, axpy, square))})
    n = x.numel()
    _axpy_and_square_kernel[(triton.cdiv(n, BLOCK),)](x, y, axpy, square, n, alpha, BLOCK=BLOCK)


def _axpy_and_square(x, y, alpha=2.0, **static):
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2
    return triton_call(_launch, x, y, out_shapes=shapes, alpha=alpha, **static)


def _inputs(shape, dtype, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, shape, dtype), jax.random.normal(ky, shape, dtype)


def _assert_axpy(got, x, y, alpha):
    """``got`` is alpha·x + y within one rounding of the product and one of the sum in ``got``'s
    dtype: a GPU contracts the kernel's multiply and add into one fused multiply-add, which JAX's
    own computation need not do, so the two may differ in the last bit (the interpreter rounds
    like JAX)."""
    eps = np.finfo(np.asarray(got).dtype).eps
    got, x, y = (np.asarray(a, np.float64) for a in (got, x, y))
    bound = eps * (np.abs(alpha * x) + np.abs(y))
    assert np.all(np.abs(got - (alpha * x + y)) <= bound), np.max(np.abs(got - (alpha * x + y)) - bound)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape", [(37,), (3, 5, 7)])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_values(dtype, shape, jit):
    x, y = _inputs(shape, dtype)
    call = jax.jit(_axpy_and_square, static_argnums=2) if jit else _axpy_and_square
    axpy, square = call(x, y, -1.5)
    for got in (axpy, square):
        assert got.shape == shape and got.dtype == dtype
    _assert_axpy(axpy, x, y, -1.5)
    np.testing.assert_array_equal(np.asarray(square), np.asarray(x * x))  # one rounding either way


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_launcher_sees_jax_buffers_without_copies(jit):
    """The launcher's tensors are JAX's own input and output buffers (same addresses), on the
    device JAX runs on."""
    x, y = _inputs((4, 9), jnp.float64)
    seen = _Recorder()
    call = jax.jit(lambda x, y: _axpy_and_square(x, y, seen=seen)) if jit else (
        lambda x, y: _axpy_and_square(x, y, seen=seen))
    axpy, square = call(x, y)
    views = seen.calls[-1]
    for name, array in (("x", x), ("y", y), ("axpy", axpy), ("square", square)):
        pointer, shape, dtype, device = views[name]
        assert shape == array.shape and dtype == torch.float64 and device.type == JAX_DEVICE, (name, views[name])
        assert pointer == array.unsafe_buffer_pointer(), f"{name}: the launcher got a copy"


def test_jit_without_host_transfers():
    x, y = _inputs((33,), jnp.float32)
    call = jax.jit(_axpy_and_square)
    call(x, y)  # compile outside the guard: staging constants is allowed to transfer
    with jax.transfer_guard("disallow"):
        axpy, _ = call(x, y)
    np.testing.assert_array_equal(np.asarray(axpy), np.asarray(2.0 * x + y))


def test_static_arguments_key_the_cache():
    """Different static values must not reuse one compiled callback."""
    x, y = _inputs((20,), jnp.float32)
    for alpha in (0.5, 3.0):
        _assert_axpy(_axpy_and_square(x, y, alpha)[0], x, y, alpha)


def test_vmap_runs_per_element():
    x, y = _inputs((3, 21), jnp.float32)
    axpy, square = jax.vmap(_axpy_and_square)(x, y)
    np.testing.assert_array_equal(np.asarray(axpy), np.asarray(2.0 * x + y))
    np.testing.assert_array_equal(np.asarray(square), np.asarray(x * x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gpu_on_xla_stream_without_transfers(dtype):
    """On the GPU the launch joins XLA's stream: results chained through XLA ops are exact and
    no byte crosses to the host inside the jitted step."""
    x, y = _inputs((1 << 20,), jnp.float32)
    x, y = x.astype(dtype), y.astype(dtype)
    seen = _Recorder()

    @jax.jit
    def chained(x, y):
        axpy, square = _axpy_and_square(x * 3, y, seen=seen)  # input produced by XLA just before
        return axpy + square  # consumed by XLA just after

    chained(x, y)
    with jax.transfer_guard("disallow"):
        got = chained(x, y).block_until_ready()
    assert seen.calls[-1]["x"][3].type == "cuda"
    x3 = (x * 3).astype(jnp.float32)
    want = (2.0 * x3 + y.astype(jnp.float32)).astype(dtype) + (x3 * x3).astype(dtype)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
