"""theria_torch.rmsnorm and the kernels under it against the float64 PyTorch reference.

Tensors live on tests/_device.py's DEVICE: the CUDA GPU, or the CPU with the kernels in Triton's
interpreter, so shapes stay tiny; the tests marked ``gpu`` repeat the comparisons at model sizes.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad, gradcheck, gradgradcheck

import theria_kernels.rmsnorm.torch_launchers as rmsnorm_kernels
from theria_kernels.rmsnorm import RMSNormTuning, SweepTuning
from theria_kernels.rmsnorm.torch_launchers import (
    rmsnorm_backward,
    rmsnorm_backward_backward,
    rmsnorm_forward,
    rmsnorm_jvp,
)
from _device import DEVICE
from _numerics import assert_accurate
from theria_torch.rmsnorm import rmsnorm, rmsnorm_reference

# The interpreter warns on every runtime loop bound it converts to an int; noise, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")

EPS = 0.1  # large enough that eps visibly shapes every derivative

# tests/_numerics.py holds each dtype's tolerance against float64 (docs/design/rmsnorm.md).
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_inputs(leading, n_cols, dtype, seed=0, requires_grad=False):
    """Fresh random x (leading + (N,)) and a weight away from zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, n_cols, generator=gen, dtype=torch.float64)
    weight = 1.0 + 0.5 * torch.randn(n_cols, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (x, weight)]


def as_reference(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def fused(x, weight):
    return rmsnorm(x, weight, EPS)


def reference(x, weight):
    return rmsnorm_reference(x, weight, EPS)


def scalar_loss(norm):
    """A non-quadratic loss, so second derivatives exercise every term."""
    return lambda x, weight: norm(x, weight).sin().sum()


# ---------------------------------------------------------------------------------------------
# Forward and first derivatives, every dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_cols", [7, 32])
@pytest.mark.parametrize("leading", [(5,), (2, 3)], ids=str)
def test_forward_backward_match_float64_reference(dtype, n_cols, leading):
    x, weight = make_inputs(leading, n_cols, dtype, requires_grad=True)
    y = fused(x, weight)
    dy = torch.randn_like(y)
    dx, dweight = torch.autograd.grad(y, (x, weight), dy)

    x_ref, weight_ref = as_reference(x, weight)
    y_ref = reference(x_ref, weight_ref)
    dx_ref, dweight_ref = torch.autograd.grad(y_ref, (x_ref, weight_ref), dy.double())
    assert y.dtype == dx.dtype == dweight.dtype == dtype
    assert_accurate("y", y, y_ref, dtype)
    assert_accurate("dx", dx, dx_ref, dtype)
    assert_accurate("dweight", dweight, dweight_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_launchers_write_every_element_of_preallocated_outputs(dtype):
    """The JAX bridge hands the launchers uninitialised buffers: poison them with NaN."""
    x, weight = make_inputs((3, 2), 9, dtype)
    x_dot, dy, cot_dx = (torch.randn_like(x) for _ in range(3))
    weight_dot, cot_dweight = torch.randn_like(weight), torch.randn_like(weight)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def poisoned(like, dtype=None):
        return torch.full_like(like, float("nan"), dtype=dtype)

    y, rstd, y_dot = rmsnorm_jvp(x, weight, x_dot, weight_dot, EPS, y=poisoned(x),
                                 rstd=poisoned(x[..., 0], acc), y_dot=poisoned(x))
    dx, dweight = rmsnorm_backward(x, weight, rstd, dy, dx=poisoned(x), dweight=poisoned(weight))
    cot_x, cot_weight, cot_dy = rmsnorm_backward_backward(
        x, weight, rstd, dy, cot_dx, cot_dweight,
        cot_x=poisoned(x), cot_weight=poisoned(weight), cot_dy=poisoned(x))

    x_ref, weight_ref, dy_ref = as_reference(x, weight, dy)
    y_ref = reference(x_ref, weight_ref)
    _, y_dot_ref = torch.func.jvp(reference, (x_ref.detach(), weight_ref.detach()),
                                  (x_dot.double(), weight_dot.double()))
    dx_ref, dweight_ref = torch.autograd.grad(y_ref, (x_ref, weight_ref), dy_ref, create_graph=True)
    second = (dx_ref * cot_dx.double()).sum() + (dweight_ref * cot_dweight.double()).sum()
    cot_ref = torch.autograd.grad(second, (x_ref, weight_ref, dy_ref))
    rstd_ref = torch.rsqrt(x_ref.detach().pow(2).mean(-1) + EPS)
    outputs = {"y": (y, y_ref), "rstd": (rstd, rstd_ref), "y_dot": (y_dot, y_dot_ref),
               "dx": (dx, dx_ref), "dweight": (dweight, dweight_ref), "cot_x": (cot_x, cot_ref[0]),
               "cot_weight": (cot_weight, cot_ref[1]), "cot_dy": (cot_dy, cot_ref[2])}
    for name, (out, ref) in outputs.items():
        assert_accurate(name, out, ref.detach(), dtype)
    # Same entry points, one sweep: the plain forward agrees with the JVP's primal bit for bit.
    y_plain, rstd_plain = rmsnorm_forward(x, weight, EPS)
    assert torch.equal(y_plain, y) and torch.equal(rstd_plain, rstd)


def test_grouped_weights_reduce_per_group():
    """weight (G, N) with x (G, R, N): the layout vmap over weights relies on."""
    x, _ = make_inputs((2, 3), 5, torch.float64)
    weight = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    dy = torch.randn_like(x)
    y, rstd = rmsnorm_forward(x, weight, EPS)
    dx, dweight = rmsnorm_backward(x, weight, rstd, dy)
    for g in range(2):
        x_ref, weight_ref = as_reference(x[g], weight[g])
        y_ref = reference(x_ref, weight_ref)
        dx_ref, dweight_ref = torch.autograd.grad(y_ref, (x_ref, weight_ref), dy[g])
        assert_accurate(f"y[{g}]", y[g], y_ref.detach(), torch.float64, tol=1e-12)
        assert_accurate(f"dx[{g}]", dx[g], dx_ref, torch.float64, tol=1e-12)
        assert_accurate(f"dweight[{g}]", dweight[g], dweight_ref, torch.float64, tol=1e-12)


def test_column_sum_over_several_rounds():
    """The second stage of dweight: more partial rows than one program tile holds."""
    partial = torch.randn(2, 600, 37, dtype=torch.float64, device=DEVICE)
    out = torch.full((2, 37), float("nan"), dtype=torch.float32, device=DEVICE)
    rmsnorm_kernels._sum_partials(partial, out)
    assert_accurate("column sum", out, partial.sum(1), torch.float32, tol=1e-6)


@pytest.mark.parametrize("tuning", [
    # 1 row per tile; 16 partial rows from a persistent grid looping over 3 stages
    RMSNormTuning(SweepTuning(1, 16), SweepTuning(1, 16, programs_per_sm=4, loop_stages=3)),
    # 8 rows per tile, 2 warps, with a ragged last tile
    RMSNormTuning(SweepTuning(64, 1), SweepTuning(64, 1, programs_per_sm=2)),
], ids=["row_per_tile", "packed_rows"])
def test_launch_shapes_do_not_change_results(tuning):
    """Other launch shapes: one row per tile with each program looping over several tiles;
    several rows per tile with a ragged last tile."""
    x, weight = make_inputs((37,), 5, torch.float64, seed=9)
    dy, cot_dx = torch.randn_like(x), torch.randn_like(x)
    y, rstd = rmsnorm_forward(x, weight, EPS, tuning=tuning)
    dx, dweight = rmsnorm_backward(x, weight, rstd, dy, tuning=tuning)
    _, cot_weight, _ = rmsnorm_backward_backward(x, weight, rstd, dy, cot_dx, None, tuning=tuning)
    x_ref, weight_ref = as_reference(x, weight)
    y_ref = reference(x_ref, weight_ref)
    dx_ref, dweight_ref = torch.autograd.grad(y_ref, (x_ref, weight_ref), dy, create_graph=True)
    (cot_weight_ref,) = torch.autograd.grad(dx_ref, weight_ref, cot_dx)
    for name, out, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", dweight, dweight_ref),
                           ("cot_weight", cot_weight, cot_weight_ref)):
        assert_accurate(name, out, ref.detach(), torch.float64, tol=1e-12)


def test_nan_propagates_to_its_row_only_and_empty_input_is_fine():
    x, weight = make_inputs((3,), 6, torch.float64)
    x[1, 2] = float("nan")
    y = fused(x, weight)
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()
    empty = torch.empty(0, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight.requires_grad_()
    y_empty = fused(empty, weight)
    dx, dweight = torch.autograd.grad(y_empty, (empty, weight), torch.ones_like(y_empty))
    assert y_empty.shape == (0, 6) and dx.shape == (0, 6) and torch.equal(dweight, torch.zeros_like(weight))


# ---------------------------------------------------------------------------------------------
# Every derivative order in float64
# ---------------------------------------------------------------------------------------------


# fast_mode: a random projection of the Jacobian (one launch per check instead of one per input
# element); the element-wise comparisons with the float64 reference are the tests below.
def test_gradcheck_with_forward_ad():
    x, weight = make_inputs((3,), 5, torch.float64, requires_grad=True)
    assert gradcheck(fused, (x, weight), check_forward_ad=True, fast_mode=True)


def test_gradgradcheck_with_forward_over_reverse():
    x, weight = make_inputs((2,), 3, torch.float64, requires_grad=True)
    assert gradgradcheck(fused, (x, weight), check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("tangents", ["x", "weight", "both"])
def test_jvp_matches_reference(tangents):
    x, weight = make_inputs((2, 3), 7, torch.float64, seed=1)
    x_dot = torch.randn_like(x) if tangents != "weight" else torch.zeros_like(x)
    weight_dot = torch.randn_like(weight) if tangents != "x" else torch.zeros_like(weight)
    y, y_dot = torch.func.jvp(fused, (x, weight), (x_dot, weight_dot))
    y_ref, y_dot_ref = torch.func.jvp(reference, (x, weight), (x_dot, weight_dot))
    assert_accurate("y", y, y_ref, torch.float64, tol=1e-12)
    assert_accurate("y_dot", y_dot, y_dot_ref, torch.float64, tol=1e-12)
    # The same through torch.autograd.forward_ad dual tensors, with only the requested tangent.
    with forward_ad.dual_level():
        x_in = forward_ad.make_dual(x, x_dot) if tangents != "weight" else x
        weight_in = forward_ad.make_dual(weight, weight_dot) if tangents != "x" else weight
        dual_y_dot = forward_ad.unpack_dual(fused(x_in, weight_in)).tangent
    assert_accurate("forward_ad y_dot", dual_y_dot, y_dot_ref, torch.float64, tol=1e-12)


def test_hvp_forward_over_reverse_equals_reverse_over_reverse_equals_reference():
    x, weight = make_inputs((2, 3), 6, torch.float64, seed=2)
    v = (torch.randn_like(x), torch.randn_like(weight))

    def forward_over_reverse(norm):
        grad = torch.func.grad(scalar_loss(norm), argnums=(0, 1))
        return torch.func.jvp(grad, (x, weight), v)[1]

    def reverse_over_reverse(norm):
        primals = as_reference(x, weight)
        grads = torch.autograd.grad(scalar_loss(norm)(*primals), primals, create_graph=True)
        return torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), primals)

    hvp_ref = reverse_over_reverse(reference)
    for name, hvp in (("fwd-over-rev", forward_over_reverse(fused)),
                      ("rev-over-rev", reverse_over_reverse(fused))):
        for part, out, ref in zip(("x", "weight"), hvp, hvp_ref):
            assert_accurate(f"{name} hvp[{part}]", out, ref, torch.float64, tol=1e-11)


def test_reverse_over_forward_matches_reference():
    """grad of a jvp: the VJP of the JVP Function (double backward + backward kernels)."""
    x, weight = make_inputs((3,), 5, torch.float64, seed=3)
    x_dot, weight_dot = torch.randn_like(x), torch.randn_like(weight)

    def tangent_loss(norm):
        return lambda x, weight: torch.func.jvp(norm, (x, weight), (x_dot, weight_dot))[1].sin().sum()

    grads = torch.func.grad(tangent_loss(fused), argnums=(0, 1))(x, weight)
    grads_ref = torch.func.grad(tangent_loss(reference), argnums=(0, 1))(x, weight)
    for part, out, ref in zip(("x", "weight"), grads, grads_ref):
        assert_accurate(f"grad of jvp [{part}]", out, ref, torch.float64, tol=1e-11)


def _nested(outer, inner):
    return lambda f, argnums: outer(inner(f, argnums=argnums), argnums=argnums)


@pytest.mark.parametrize("hessian", [
    torch.func.hessian,
    _nested(torch.func.jacrev, torch.func.jacrev),
    _nested(torch.func.jacfwd, torch.func.jacfwd),
], ids=["jacfwd_jacrev", "jacrev_jacrev", "jacfwd_jacfwd"])
def test_hessian_matches_reference(hessian):
    x, weight = make_inputs((2,), 4, torch.float64, seed=4)
    out = hessian(scalar_loss(fused), argnums=(0, 1))(x, weight)
    ref = hessian(scalar_loss(reference), argnums=(0, 1))(x, weight)
    for i in range(2):
        for j in range(2):
            assert_accurate(f"hessian[{i}][{j}]", out[i][j], ref[i][j], torch.float64, tol=1e-11)


def test_forward_over_forward_matches_reference():
    x, weight = make_inputs((2, 3), 5, torch.float64, seed=8)
    first = (torch.randn_like(x), torch.randn_like(weight))
    second = (torch.randn_like(x), torch.randn_like(weight))

    def jvp_of_jvp(norm):
        tangent = lambda x, weight: torch.func.jvp(norm, (x, weight), first)[1]
        return torch.func.jvp(tangent, (x, weight), second)[1]

    assert_accurate("jvp of jvp", jvp_of_jvp(fused), jvp_of_jvp(reference), torch.float64, tol=1e-11)


def test_third_order_raises_clearly():
    x, weight = make_inputs((3,), 4, torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(scalar_loss(fused)(x, weight), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivatives.*backend='reference'"):
        torch.autograd.grad(ddx.sum(), x)
    v = torch.randn_like(x)
    jvp_jvp = lambda x: torch.func.jvp(lambda x: torch.func.jvp(lambda x: fused(x, weight), (x,), (v,))[1],
                                       (x,), (v,))[1]
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.func.jvp(jvp_jvp, (x.detach(),), (v,))


# ---------------------------------------------------------------------------------------------
# vmap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dims", [(0, None), (None, 0), (0, 0), (1, None)], ids=str)
def test_vmap_forward_and_grad(in_dims):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    x = x if in_dims[0] is not None else x[0]
    weight = weight if in_dims[1] is not None else weight[0]
    transforms = {"forward": lambda norm: lambda x, weight: (norm(x, weight),),
                  "grad": lambda norm: torch.func.grad(scalar_loss(norm), argnums=(0, 1))}
    for name, transform in transforms.items():
        out = torch.func.vmap(transform(fused), in_dims=in_dims)(x, weight)
        ref = torch.func.vmap(transform(reference), in_dims=in_dims)(x, weight)
        for i, (o, r) in enumerate(zip(out, ref)):
            assert_accurate(f"vmap {name} output {i}", o, r, torch.float64, tol=1e-12)


def test_nested_vmap_of_jvp_of_grad():
    """vmap over tangents of an HVP, inside vmap over examples: every Function's vmap rule."""
    gen = torch.Generator().manual_seed(6)
    xs = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    tangents = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    weight = torch.randn(4, generator=gen, dtype=torch.float64).to(DEVICE)

    def hvps(norm):
        grad_x = torch.func.grad(scalar_loss(norm))
        one = lambda x, t: torch.func.jvp(lambda x: grad_x(x, weight), (x,), (t,))[1]
        return torch.func.vmap(torch.func.vmap(one, in_dims=(None, 0)))(xs, tangents)

    assert_accurate("nested vmap hvp", hvps(fused), hvps(reference), torch.float64, tol=1e-11)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, error, match", [
    ("weight_shape", ValueError, r"weight must have shape \(N,\) = \(6,\)"),
    ("mixed_dtypes", TypeError, "weight has dtype float32 but x has dtype float64"),
    ("int_dtype", TypeError, "x has dtype int64"),
    ("scalar_x", ValueError, "x must have shape"),
    ("n_zero", ValueError, "N = 0"),
    ("eps_tensor", TypeError, "eps must be a Python float"),
    ("negative_eps", ValueError, "eps must be >= 0"),
    ("backend", ValueError, "unknown backend"),
    ("not_tensor", TypeError, "weight must be a torch.Tensor"),
])
def test_bad_input_raises_naming_the_tensor(case, error, match):
    x, weight = make_inputs((2,), 6, torch.float64)
    args, kwargs = [x, weight], {}
    if case == "weight_shape":
        args[1] = weight[:5]
    elif case == "mixed_dtypes":
        args[1] = weight.float()
    elif case == "int_dtype":
        args[0] = x.long()
    elif case == "scalar_x":
        args[0] = x[0, 0]
    elif case == "n_zero":
        args = [x[:, :0], weight[:0]]
    elif case == "eps_tensor":
        kwargs["eps"] = torch.tensor(1e-6)
    elif case == "negative_eps":
        kwargs["eps"] = -1.0
    elif case == "backend":
        kwargs["backend"] = "cuda"
    elif case == "not_tensor":
        args[1] = weight.tolist()
    with pytest.raises(error, match=match):
        rmsnorm(*args, **kwargs)


def test_cpu_tensors_without_interpreter_point_to_the_alternatives(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match='backend="reference", or set TRITON_INTERPRET=1'):
        rmsnorm(x, torch.ones(4))
    assert torch.allclose(rmsnorm(x, torch.ones(4), backend="reference"), rmsnorm_reference(x, torch.ones(4)))


@pytest.mark.gpu
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        rmsnorm(torch.randn(2, 4, device="cuda"), torch.ones(4))


# ---------------------------------------------------------------------------------------------
# GPU: model sizes
# ---------------------------------------------------------------------------------------------


def test_torch_compile_matches_eager():
    """``torch.compile`` of a loss over the fused rmsnorm traces the registered operators (it
    cannot trace the launchers' Python and Triton's) and gives eager's value and gradient
    (``aot_eager`` generates no code, so the same kernels run). Double backward and torch.func
    transforms inside a compiled function are beyond torch.compile here (docs/usage.md)."""
    x, weight = make_inputs((3, 5), 16, torch.float64, requires_grad=True)
    loss = scalar_loss(fused)
    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager")):
        value = fn(x, weight)
        results.append((value, *torch.autograd.grad(value, (x, weight))))
    for name, eager, compiled in zip(("value", "grad_x", "grad_weight"), *results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 1024, 4096), (4, 77, 4097), (8, 65536), (3, 5, 1)], ids=str)
def test_gpu_every_derivative_matches_float64_reference(dtype, shape):
    x, weight = make_inputs(shape[:-1], shape[-1], dtype, seed=7, requires_grad=True)
    y = fused(x, weight)
    dy = torch.randn_like(y)
    dx, dweight = torch.autograd.grad(y, (x, weight), dy, create_graph=True)
    cot_dx, cot_dweight = torch.randn_like(dx), torch.randn_like(dweight)
    cot_x, cot_weight = torch.autograd.grad((dx * cot_dx).sum() + (dweight * cot_dweight).sum(), (x, weight))
    _, y_dot = torch.func.jvp(fused, (x.detach(), weight.detach()), (cot_dx, cot_dweight))

    x_ref, weight_ref = as_reference(x, weight)
    y_ref = reference(x_ref, weight_ref)
    dx_ref, dweight_ref = torch.autograd.grad(y_ref, (x_ref, weight_ref), dy.double(), create_graph=True)
    second = (dx_ref * cot_dx.double()).sum() + (dweight_ref * cot_dweight.double()).sum()
    cot_x_ref, cot_weight_ref = torch.autograd.grad(second, (x_ref, weight_ref))
    _, y_dot_ref = torch.func.jvp(reference, (x_ref.detach(), weight_ref.detach()),
                                  (cot_dx.double(), cot_dweight.double()))
    for name, out, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", dweight, dweight_ref),
                           ("cot_x", cot_x, cot_x_ref), ("cot_weight", cot_weight, cot_weight_ref),
                           ("y_dot", y_dot, y_dot_ref)):
        assert_accurate(name, out, ref.detach(), dtype)


@pytest.mark.gpu
def test_gpu_matches_torch_rms_norm_bf16():
    x, weight = make_inputs((2, 1024), 4096, torch.bfloat16)
    ours = rmsnorm(x, weight, 1e-6)
    theirs = torch.nn.functional.rms_norm(x, (4096,), weight, 1e-6)
    assert_accurate("y vs F.rms_norm", ours, theirs, torch.bfloat16, tol=1e-2)
