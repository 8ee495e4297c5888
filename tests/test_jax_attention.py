"""theria_jax attention on the fused kernels against the jax.numpy reference, under every JAX
transformation the primitives support, and against theria_torch on the same kernels.

Float64, tiny shapes, 1e-10 relative error (tests/_numerics.py), on the CPU through Triton's
interpreter or compiled on the GPU JAX runs on. Tests marked ``gpu`` compare low precision at GPU
sizes with the float64 reference by the criterion of the torch GPU tests.
"""

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

import theria_torch
from _attention_cases import SOFTCAP, ApiCase, one_sweep_rows_reading_dq, random_slopes
from _device import DEVICE
from _numerics import assert_tree_accurate, tolerance
from theria_jax import _primitives, attention, flash_attn_func, flash_attn_varlen_func
from theria_kernels import _launch_torch
from theria_kernels.attention import AttentionParams

FUSED, REFERENCE = "triton_full_fused", "reference"


class Case(ApiCase):
    """An ``ApiCase`` run on float64 inputs through either backend."""

    def inputs(self, seed=0):
        """Fresh float64 (q, k, v)."""
        return _random_like(tuple(jax.ShapeDtypeStruct(s, jnp.float64) for s in self.shapes()), seed)

    def attend(self, backend, q, k, v):
        """(out, lse) with the rows that see no key given lse 0 instead of +inf, so that smooth
        losses of lse stay finite (their derivatives there are 0 in both backends)."""
        if self.api == "attention":
            out, lse = attention(q, k, v, causal=self.causal, window_size=self.window_size, return_lse=True,
                                 backend=backend)
        else:
            out, lse = flash_attn_func(q, k, v, causal=self.causal, window_size=self.window_size, return_lse=True,
                                       backend=backend, softcap=self.softcap, alibi_slopes=_slopes(self.slopes()))
        return out, jnp.where(jnp.isfinite(lse), lse, 0.0)


def _slopes(slopes: torch.Tensor | None):
    """A case's ALiBi slopes (float32 torch, on the host) as a JAX array."""
    return None if slopes is None else jnp.asarray(slopes.numpy())


@dataclass(frozen=True)
class VarlenCase:
    """A packed variable-length batch for ``flash_attn_varlen_func``: (T_q, T_k) per sequence."""

    lengths: tuple[tuple[int, int], ...]
    heads: int
    heads_kv: int
    head_dim: int
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False  # random (sequences, H) slopes

    def __str__(self):
        mask = "causal" if self.causal else "window" if self.window_size != (-1, -1) else "full"
        modifiers = ("-softcap" if self.softcap else "") + ("-alibi" if self.alibi else "")
        lengths = ",".join(f"{t_q}x{t_k}" for t_q, t_k in self.lengths)
        return f"varlen-{mask}{modifiers}-T{lengths}-H{self.heads}/{self.heads_kv}-D{self.head_dim}"

    def sequences(self):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) as NumPy int32 and ints."""
        lengths_q, lengths_k = zip(*self.lengths)
        cu_q, cu_k = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32) for lengths in (lengths_q, lengths_k))
        return cu_q, cu_k, max(lengths_q), max(lengths_k)

    def inputs(self, seed=0):
        """Fresh float64 packed (q, k, v)."""
        total_q, total_k = (sum(lengths) for lengths in zip(*self.lengths))
        shapes = ((total_q, self.heads, self.head_dim), (total_k, self.heads_kv, self.head_dim))
        return _random_like(tuple(jax.ShapeDtypeStruct(s, jnp.float64) for s in (shapes[0], shapes[1], shapes[1])),
                            seed)

    def attend(self, backend, q, k, v, sequences=None):
        """(out, lse) like :meth:`Case.attend`; ``sequences`` overrides the cu_seqlens (e.g. traced ones)."""
        slopes = _slopes(random_slopes(len(self.lengths), self.heads)) if self.alibi else None
        out, lse = flash_attn_varlen_func(q, k, v, *(sequences or self.sequences()), causal=self.causal,
                                          window_size=self.window_size, return_lse=True, backend=backend,
                                          softcap=self.softcap, alibi_slopes=slopes)
        return out, jnp.where(jnp.isfinite(lse), lse, 0.0)


CASES = [
    Case("attention", 9, 9, 2, 2, 16),
    Case("attention", 7, 13, 4, 2, 8, causal=True),  # T_q != T_k, grouped-query, top-left
    Case("flash_attn_func", 13, 7, 2, 1, 12, causal=True),  # bottom-right: 6 rows see no key
    Case("flash_attn_func", 17, 17, 2, 2, 32, window_size=(3, 2)),
    # Logit soft-capping and ALiBi (§8), per-batch slopes, grouped heads, rows with no key.
    Case("flash_attn_func", 11, 7, 4, 2, 8, causal=True, batch=2, softcap=SOFTCAP, alibi=True),
    # Queries shorter and longer than keys (rows without keys), an empty query and an empty key
    # sequence, grouped heads, causal per sequence (the last case: the varlen tests below use it).
    VarlenCase(((3, 5), (0, 2), (9, 4), (2, 0)), 2, 1, 8, causal=True),
]


def _random_like(tree, seed):
    """Standard normal arrays shaped like the leaves of ``tree`` (NumPy draws: no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


# ----------------------------------------------------------------------------------------------
# The transformations: each maps (attend, weights) to a jittable function of (q, k, v), where
# ``attend`` is (q, k, v) ↦ (out, lse) on one backend and ``weights`` holds fixed random arrays.
# Smooth nonlinear losses make every cotangent depend on the inputs, so grad∘grad and jvp∘grad
# exercise both halves of the backward's JVP (the Hessian part and the Jᵀ part).
# ----------------------------------------------------------------------------------------------


class Weights(NamedTuple):  # a pytree: jitted functions take it as an argument
    outputs: tuple  # shaped like (out, lse): loss weights
    inputs: tuple  # shaped like (q, k, v): tangents, and weights of losses of the gradients


def _weights(case, inputs, seed=0):
    outputs = jax.eval_shape(partial(case.attend, REFERENCE), *inputs)
    return Weights(_random_like(outputs, seed), _random_like(inputs, seed + 1))


def _loss(attend, weights):
    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(weights.outputs[0] * jnp.sin(out)) + jnp.sum(weights.outputs[1] * jnp.sin(lse))

    return loss


def _grad(attend, weights):
    return jax.grad(_loss(attend, weights), argnums=(0, 1, 2))


def _grad_of_grad(attend, weights):
    grad = _grad(attend, weights)
    loss_of_grad = lambda *x: sum(jnp.sum(w * jnp.tanh(g)) for w, g in zip(weights.inputs, grad(*x)))  # noqa: E731
    return jax.grad(loss_of_grad, argnums=(0, 1, 2))


def _jvp(attend, weights):
    return lambda *x: jax.jvp(attend, x, weights.inputs)


def _jvp_of_grad(attend, weights):  # Hessian-vector product, forward over reverse
    return lambda *x: jax.jvp(_grad(attend, weights), x, weights.inputs)


def _grad_of_jvp(attend, weights):  # reverse over forward
    loss_of_tangent = lambda *x: sum(  # noqa: E731
        jnp.sum(w * jnp.sin(t)) for w, t in zip(weights.outputs, jax.jvp(attend, x, weights.inputs)[1]))
    return jax.grad(loss_of_tangent, argnums=(0, 1, 2))


def _jvp_of_jvp(attend, weights):  # forward over forward, with a tangent of the tangent
    tangent = lambda *x: jax.jvp(attend, x, weights.inputs)[1]  # noqa: E731
    return lambda *x: jax.jvp(tangent, x, tuple(0.5 * w[..., ::-1] for w in weights.inputs))


def _vmap_of_grad(attend, weights):
    """An extra leading axis of size 2 on every input, folded into B by the batching rule."""
    grad = _grad(attend, weights)
    return lambda *x: jax.vmap(grad)(*(jnp.stack([a, 0.5 * a[:, ::-1]]) for a in x))


TRANSFORMS = {
    "forward": lambda attend, weights: attend,
    "grad": _grad,
    "grad_of_grad": _grad_of_grad,
    "jvp": _jvp,
    "jvp_of_grad": _jvp_of_grad,
    "grad_of_jvp": _grad_of_jvp,
    "jvp_of_jvp": _jvp_of_jvp,
    "vmap_of_grad": _vmap_of_grad,
}


def _transformed(transform, case, backend, weights):
    return TRANSFORMS[transform](partial(case.attend, backend), weights)


def _jitted(transform, attend):
    """``TRANSFORMS[transform]`` of ``attend`` jitted as a function of (weights, q, k, v): the weights
    are arguments, not constants closed over, which XLA would fold at compile time (the products of
    two tangents in a second-order program are dots of constants: seconds each, on the host, at the
    GPU cases' shapes)."""
    return jax.jit(lambda weights, *x: TRANSFORMS[transform](attend, weights)(*x))


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_transformation_matches_reference(case, transform):
    inputs = case.inputs()
    weights = _weights(case, inputs)
    got = _jitted(transform, partial(case.attend, FUSED))(weights, *inputs)
    want = _jitted(transform, partial(case.attend, REFERENCE))(weights, *inputs)
    assert_tree_accurate(f"{case} {transform}", got, want, jnp.float64)


@pytest.mark.parametrize("transform", ["forward", "grad", "jvp_of_grad"])
def test_eager_matches_jit(transform):
    case = CASES[1]
    inputs = case.inputs(seed=1)
    fused = _transformed(transform, case, FUSED, _weights(case, inputs))
    assert_tree_accurate(transform, fused(*inputs), jax.jit(fused)(*inputs), jnp.float64)


@pytest.mark.parametrize("transform", ["grad_of_grad", "jvp_of_grad"])
def test_loss_of_out_alone(transform):
    """Without return_lse the lse cotangent is a symbolic zero at every order."""
    case = CASES[1]
    inputs = case.inputs(seed=16)
    weights = _weights(case, inputs, seed=17)

    def out_only(backend):
        return lambda q, k, v: (attention(q, k, v, causal=case.causal, backend=backend), jnp.zeros(()))

    got = jax.jit(TRANSFORMS[transform](out_only(FUSED), weights))(*inputs)
    want = jax.jit(TRANSFORMS[transform](out_only(REFERENCE), weights))(*inputs)
    assert_tree_accurate(transform, got, want, jnp.float64)


@pytest.mark.parametrize("transform", ["grad_of_grad", "jvp_of_grad"])
def test_the_one_row_sweep_reads_the_backwards_dq(transform, monkeypatch):
    """The backward's jvp rule hands its dq to the double backward (through attention_bwd_tangent),
    whose row kernel in one sweep (forced here: the interpreter's table sweeps twice) reads dS K
    from it instead of summing it (theory §4.7): the row launches get it, and the numbers are the
    reference's."""
    from theria_kernels.attention.torch_launchers import clear_plans

    rows = one_sweep_rows_reading_dq(monkeypatch, "jax")
    case = CASES[1]
    inputs = case.inputs(seed=23)
    weights = _weights(case, inputs, seed=24)
    clear_plans()  # plans are cached with the schedule they were built with
    try:
        got = _jitted(transform, partial(case.attend, FUSED))(weights, *inputs)
    finally:
        clear_plans()
    assert rows and all(rows)
    want = _jitted(transform, partial(case.attend, REFERENCE))(weights, *inputs)
    assert_tree_accurate(transform, got, want, jnp.float64)


def test_hessian_of_small_scalar_function():
    """jax.hessian (jacfwd of jacrev) of a loss of 3 scalars that move q, k and v."""
    case = CASES[2]
    inputs = case.inputs(seed=2)
    directions = _random_like(inputs, seed=3)
    weights = _weights(case, inputs)

    def scalar_loss(backend):
        loss = _loss(partial(case.attend, backend), weights)
        return lambda theta: loss(*(x + t * d for x, t, d in zip(inputs, theta, directions)))

    theta = jnp.array([0.3, -0.2, 0.1])
    got = jax.jit(jax.hessian(scalar_loss(FUSED)))(theta)
    assert_tree_accurate("hessian", got, jax.jit(jax.hessian(scalar_loss(REFERENCE)))(theta), jnp.float64)
    assert_tree_accurate("hessian symmetry", got, got.T, jnp.float64)


# check_grads cases beyond CASES: the head dims of issue #9 (padded head-dim blocks) with
# bottom-right causal both ways (T_q > T_k leaves rows with no key) and a sliding window.
PADDED_HEAD_DIM_CASES = [
    Case("flash_attn_func", 9, 5, 2, 1, 40, causal=True),
    Case("flash_attn_func", 5, 9, 1, 1, 80, causal=True),
    Case("flash_attn_func", 7, 7, 1, 1, 96, window_size=(2, 1)),
    VarlenCase(((4, 6), (7, 3), (2, 2)), 2, 2, 16, window_size=(2, 1)),
    # Per-sequence slopes and lengths (each its own ALiBi diagonal), a cap, a window.
    VarlenCase(((4, 6), (7, 3), (2, 2)), 2, 1, 8, window_size=(3, 1), softcap=SOFTCAP, alibi=True),
]


@pytest.mark.parametrize("case", [CASES[1], CASES[3]] + PADDED_HEAD_DIM_CASES, ids=str)
def test_check_grads(case):
    """Finite differences to second order in forward and reverse mode (jvp∘jvp, grad∘jvp,
    jvp∘grad, grad∘grad) of out and lse: grouped heads, top-left and bottom-right alignment
    (rows with no key), a window over several blocks, head dims 40, 80, 96, and a packed
    variable-length batch. (CASES[2], bottom-right causal with grouped heads and rows with no key,
    is PADDED_HEAD_DIM_CASES[0]'s mask and layout; its own head dim runs every transformation
    against the reference above.)"""
    attend = jax.jit(partial(case.attend, FUSED))
    check_grads(attend, case.inputs(seed=4), order=2, modes=("fwd", "rev"))


def test_third_order_raises_and_names_the_reference_backend():
    case = CASES[0]
    q, k, v = case.inputs()
    attend = lambda q: case.attend(FUSED, q, k, v)[0]  # noqa: E731
    with pytest.raises(NotImplementedError, match="third-order.*backend='reference'"):
        jax.jvp(lambda q: jax.jvp(lambda q: jax.jvp(attend, (q,), (q,))[1], (q,), (q,))[1], (q,), (q,))
    second = jax.grad(lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(attend(q) ** 3))(q) ** 3))
    third = jax.grad(lambda q: jnp.sum(second(q)))
    with pytest.raises(NotImplementedError, match="third-order.*backend='reference'"):
        third(q)


def test_vmap_two_extra_axes():
    case = Case("attention", 5, 6, 1, 1, 8, causal=True)
    q, k, v = (jnp.stack([jnp.stack([x, -x]), jnp.stack([2 * x, x[:, ::-1]])]) for x in case.inputs(seed=6))
    attend = lambda backend: jax.vmap(jax.vmap(partial(case.attend, backend)))  # noqa: E731
    assert_tree_accurate("vmap∘vmap", jax.jit(attend(FUSED))(q, k, v), attend(REFERENCE)(q, k, v), jnp.float64)


def _poisoned_launches(monkeypatch):
    """Make every bridge launch fill the floating buffers it writes with NaN first, so an element a
    kernel fails to write shows (buffers that must start at zero, e.g. counters, are integers)."""
    launch_one = _launch_torch.launch_one

    def poison_then_launch(launch, tensors):
        for name in launch.writes_buffers:
            if tensors[name].is_floating_point():
                tensors[name].fill_(float("nan"))
        launch_one(launch, tensors)

    monkeypatch.setattr(_launch_torch, "launch_one", poison_then_launch)


def _primitive_calls(q, k, v, params, seed, seqs=(), lengths=None):
    """name -> (primitive, operands after q, k, v, parameters besides params and lengths)."""
    out, lse = _primitives.forward_p.bind(q, k, v, *seqs, params=params, lengths=lengths)
    d_out, d_lse = _random_like((out, lse), seed=seed)
    cot = _random_like((q, k, v), seed=seed + 1)
    direction = _random_like((q, k, v), seed=seed + 2)
    dq = _primitives.backward_p.bind(q, k, v, out, lse, d_out, d_lse, *seqs, params=params, lengths=lengths)[0]
    double_backward = (_primitives.backward_backward_p, (out, lse, d_out, d_lse, *cot))
    return {
        "forward": (_primitives.forward_p, (), {}),
        "jvp": (_primitives.forward_tangent_p, (out, lse, *cot), {}),
        "forward_second": (_primitives.forward_second_p, (out, lse, *cot, *direction), {}),
        "backward": (_primitives.backward_p, (out, lse, d_out, d_lse), {}),
        "backward_backward": (*double_backward, dict(cot_d_out=True, has_dq=False)),
        "backward_backward without cot_d_out": (*double_backward, dict(cot_d_out=False, has_dq=False)),
        "backward_backward with the backward's dq": (_primitives.backward_backward_p,
                                                     (out, lse, d_out, d_lse, *cot, dq),
                                                     dict(cot_d_out=False, has_dq=True)),
    }


def test_launchers_write_every_output_element(monkeypatch):
    """Every primitive's launches through the bridge, written buffers pre-filled with NaN, on the
    case with rows that see no key (whose outputs are zeros the kernel must still write)."""
    case = CASES[2]
    q, k, v = case.inputs(seed=9)
    params = AttentionParams(scale=case.head_dim ** -0.5, causal=True, bottom_right=True)
    calls = _primitive_calls(q, k, v, params, seed=10)
    want = {name: p.bind(q, k, v, *rest, params=params, lengths=None, **extra)
            for name, (p, rest, extra) in calls.items()}
    _poisoned_launches(monkeypatch)
    for name, (primitive, rest, extra) in calls.items():
        got = primitive.bind(q, k, v, *rest, params=params, lengths=None, **extra)
        for index, (g, w) in enumerate(zip(got, want[name])):
            assert not jnp.isnan(g).any(), f"{name} left output {index} partly unwritten"
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_jvp_runs_the_forward_once(monkeypatch):
    """``jax.jvp`` runs the forward plan, then the tangent plan on the forward's out and lse
    (``given_primal``): the primal is not computed a second time."""
    case = CASES[1]
    q, k, v = case.inputs(seed=17)
    tangents = _random_like((q, k, v), seed=18)
    run_plan, plans = _primitives.run_plan, []
    monkeypatch.setattr(_primitives, "run_plan", lambda plan, arrays: plans.append(
        [(launch.arguments["HAS_TANGENT"], launch.arguments["GIVEN_PRIMAL"]) for launch in plan.launches])
        or run_plan(plan, arrays))
    jax.jvp(lambda *x: case.attend(FUSED, *x)[0], (q, k, v), tangents)
    assert plans == [[(False, False)], [(True, True)]]


def test_double_backward_forms_the_d_out_cotangent_only_when_wanted(monkeypatch):
    """As in torch: reverse over reverse of <out, W> with a fixed W (d_out = W, differentiated by
    nothing), forward over reverse and reverse over forward run the double backward without the
    cotangent of d_out (its row sweep skips dP̄ V); a loss whose d_out depends on the output forms
    it. The results match the reference's."""
    case = CASES[1]
    q, k, v = case.inputs(seed=23)
    weight, *tangents = _random_like((q, q, k, v), seed=24)
    run_plan, formed = _primitives.run_plan, []

    def record(plan, arrays):
        formed.extend(launch.arguments["Cot_d_out"] is not None for launch in plan.launches
                      if "Cot_d_out" in launch.arguments)
        return run_plan(plan, arrays)

    monkeypatch.setattr(_primitives, "run_plan", record)
    attend = lambda backend: lambda *x: case.attend(backend, *x)[0]  # noqa: E731

    def rev_over_rev(backend, loss):
        grads = lambda *x: jax.grad(lambda *x: loss(attend(backend)(*x)), argnums=(0, 1, 2))(*x)  # noqa: E731
        return jax.grad(lambda *x: sum(jnp.vdot(g, t) for g, t in zip(grads(*x), tangents)), argnums=(0, 1, 2))(
            q, k, v)

    def fwd_over_rev(backend):
        grads = lambda *x: jax.grad(lambda *x: jnp.vdot(attend(backend)(*x), weight), argnums=(0, 1, 2))(*x)  # noqa: E731
        return jax.jvp(grads, (q, k, v), tuple(tangents))[1]

    def rev_over_fwd(backend):
        tangent_out = lambda *x: jax.jvp(attend(backend), x, tuple(tangents))[1]  # noqa: E731
        return jax.grad(lambda *x: jnp.vdot(tangent_out(*x), weight), argnums=(0, 1, 2))(q, k, v)

    fixed, quadratic = (lambda out: jnp.vdot(out, weight)), (lambda out: jnp.sum(out ** 2))
    for run, wants in ((lambda b: rev_over_rev(b, fixed), False), (lambda b: rev_over_rev(b, quadratic), True),
                       (fwd_over_rev, False), (rev_over_fwd, False)):
        formed.clear()
        got = run(FUSED)
        assert formed == [wants]
        assert_tree_accurate("second order", got, run(REFERENCE), jnp.float64)


# ----------------------------------------------------------------------------------------------
# Cross-framework: theria_jax and theria_torch on the same kernels
# ----------------------------------------------------------------------------------------------


def _torch(x) -> torch.Tensor:
    """A JAX array as a torch tensor on DEVICE."""
    return torch.from_numpy(np.array(x)).to(DEVICE)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _torch_out_lse_and_grads(case, backend, inputs, d_out, d_lse):
    q, k, v = (_torch(x).requires_grad_() for x in inputs)
    out, lse = theria_torch.flash_attn_func(
        q, k, v, causal=case.causal, window_size=case.window_size, return_lse=True, backend=backend) \
        if case.api == "flash_attn_func" else _torch_attention_bthd(case, backend, q, k, v)
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    grads = torch.autograd.grad((out, finite_lse), (q, k, v), (_torch(d_out), _torch(d_lse)))
    return (_numpy(out), _numpy(finite_lse)), [_numpy(g) for g in grads]


def _torch_attention_bthd(case, backend, q, k, v):
    out, lse = theria_torch.sdpa_custom(*(x.transpose(1, 2) for x in (q, k, v)), causal=case.causal,
                                        window_size=case.window_size, return_lse=True, backend=backend)
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=str)
def test_matches_theria_torch(case):
    """One JAX forward and vjp on the fused kernels against both torch backends."""
    inputs = case.inputs(seed=12)
    outputs, vjp = jax.vjp(partial(case.attend, FUSED), *inputs)
    cotangents = _random_like(outputs, seed=13)
    grads = vjp(cotangents)
    for torch_backend in (REFERENCE, FUSED):
        torch_outputs, torch_grads = _torch_out_lse_and_grads(case, torch_backend, inputs, *cotangents)
        assert_tree_accurate(f"torch {torch_backend} outputs", outputs, torch_outputs, jnp.float64)
        assert_tree_accurate(f"torch {torch_backend} grads", grads, torch_grads, jnp.float64)


def test_varlen_matches_theria_torch_and_traced_cu_seqlens(monkeypatch):
    """flash_attn_varlen_func: JAX and torch outputs and gradients agree; cu_seqlens passed as
    jit arguments (traced) give what closed-over ones give; the launchers write every output."""
    case = CASES[-1]
    inputs = case.inputs(seed=18)
    outputs, vjp = jax.vjp(partial(case.attend, FUSED), *inputs)
    cotangents = _random_like(outputs, seed=19)
    leaves = [_torch(x).requires_grad_() for x in inputs]
    sequences = case.sequences()
    out, lse = theria_torch.flash_attn_varlen_func(*leaves, _torch(sequences[0]), _torch(sequences[1]),
                                                   *sequences[2:], causal=True, return_lse=True)
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    grads = torch.autograd.grad((out, lse), leaves, [_torch(c) for c in cotangents])
    assert_tree_accurate("torch outputs", outputs, (_numpy(out), _numpy(lse)), jnp.float64)
    assert_tree_accurate("torch grads", vjp(cotangents), [_numpy(g) for g in grads], jnp.float64)

    traced = jax.jit(lambda q, k, v, cu_q, cu_k: case.attend(FUSED, q, k, v, (cu_q, cu_k, *sequences[2:])))
    assert_tree_accurate("traced cu_seqlens", traced(*inputs, *sequences[:2]), outputs, jnp.float64, tol=0.0)

    params = AttentionParams(scale=case.head_dim ** -0.5, causal=True, bottom_right=True)
    packed = [x[None] for x in inputs]
    calls = _primitive_calls(*packed, params, seed=21, seqs=sequences[:2], lengths=sequences[2:])
    _poisoned_launches(monkeypatch)
    for name in ("forward", "backward"):
        primitive, rest, extra = calls[name]
        got = primitive.bind(*packed, *rest, *sequences[:2], params=params, lengths=sequences[2:], **extra)
        assert not any(jnp.isnan(g).any() for g in got), f"{name} left outputs unwritten"


def test_varlen_vmap_shares_cu_seqlens():
    case = CASES[-1]
    q, k, v = case.inputs(seed=20)
    queries = jnp.stack([q, 0.5 * q[:, ::-1]])
    attend = lambda backend: jax.vmap(lambda q: case.attend(backend, q, k, v))  # noqa: E731
    assert_tree_accurate("vmap", jax.jit(attend(FUSED))(queries), attend(REFERENCE)(queries), jnp.float64)
    cu_q, cu_k, max_q, max_k = case.sequences()
    with pytest.raises(NotImplementedError, match="vmap over cu_seqlens"):
        jax.vmap(lambda q, cu_q: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k))(
            queries, jnp.stack([cu_q, cu_q]))


# ----------------------------------------------------------------------------------------------
# Argument checking: the torch adapter's messages
# ----------------------------------------------------------------------------------------------


def _arrays(q_shape=(1, 8, 2, 16), kv_shape=(1, 8, 2, 16), dtype=jnp.float64, v_dtype=None):
    return jnp.ones(q_shape, dtype), jnp.ones(kv_shape, dtype), jnp.ones(kv_shape, v_dtype or dtype)


@pytest.mark.parametrize("arrays, kwargs, error, message", [
    (_arrays(q_shape=(8, 2, 16)), {}, ValueError, r"q must have 4 dimensions \(B, T, H, D\)"),
    (_arrays(q_shape=(1, 8, 2, 300), kv_shape=(1, 8, 2, 300)), {}, ValueError,
     "q has head dim 300; triton_full_fused supports 8–256; use backend='reference'"),
    (_arrays(q_shape=(1, 8, 3, 16)), {}, ValueError, "q has 3 heads and k, v have 2"),
    (_arrays(kv_shape=(1, 8, 2, 8)), {}, ValueError, "q has head dim 16 but k and v have 8"),
    (_arrays(v_dtype=jnp.float32), {}, TypeError, "q, k, v must share one dtype"),
    (_arrays(dtype=jnp.int32), {}, TypeError, "q has dtype int32; triton_full_fused supports"),
    (_arrays(), {"backend": "flash"}, ValueError, "backend must be one of"),
    (_arrays(), {"window_size": (2, -3)}, ValueError, "window_size must be a pair of ints >= -1"),
])
def test_bad_arguments(arrays, kwargs, error, message):
    for function in (attention, flash_attn_func):
        with pytest.raises(error, match=message):
            function(*arrays, **kwargs)


def _varlen_arrays(**overrides):
    args = dict(q=jnp.ones((14, 4, 16)), k=jnp.ones((11, 2, 16)), v=jnp.ones((11, 2, 16)),
                cu_seqlens_q=np.array([0, 3, 3, 12, 14], np.int32), cu_seqlens_k=np.array([0, 5, 7, 11, 11], np.int32),
                max_seqlen_q=9, max_seqlen_k=5)
    args.update(overrides)
    return args


@pytest.mark.parametrize("args, error, message", [
    (_varlen_arrays(q=jnp.ones((1, 14, 4, 16))), ValueError, r"q must have 3 dimensions \(total, H, D\)"),
    (_varlen_arrays(cu_seqlens_q=np.array([0, 3, 3, 12, 14])), TypeError, "cu_seqlens_q must be int32 .*, got int64"),
    (_varlen_arrays(cu_seqlens_k=np.array([0, 5, 11], np.int32)), ValueError,
     "cu_seqlens_q has 5 entries and cu_seqlens_k has 3"),
    (_varlen_arrays(cu_seqlens_q=np.array([0, 3, 2, 12, 14], np.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, but entry 2 \(2\) is less than entry 1 \(3\)"),
    (_varlen_arrays(cu_seqlens_k=np.array([0, 5, 7, 11, 12], np.int32)), ValueError,
     "cu_seqlens_k ends at 12 but k and v have 11 tokens"),
    (_varlen_arrays(max_seqlen_q=8), ValueError, "max_seqlen_q=8 but sequence 2 of cu_seqlens_q has 9 tokens"),
])
def test_varlen_bad_arguments_raise_torch_messages(args, error, message):
    with pytest.raises(error, match=message):
        flash_attn_varlen_func(**args)
    torch_args = {name: _torch(x) if hasattr(x, "shape") else x for name, x in args.items()}
    with pytest.raises(error, match=message):
        theria_torch.flash_attn_varlen_func(**torch_args)


def test_varlen_reference_needs_concrete_cu_seqlens():
    args = _varlen_arrays()
    cu_q, cu_k = args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k")
    with pytest.raises(ValueError, match="backend='reference' needs concrete cu_seqlens"):
        jax.jit(lambda cu_q, cu_k: flash_attn_varlen_func(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=REFERENCE,
                                                          **args))(cu_q, cu_k)


def test_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout_p=0.1: theria's attention has no dropout"):
        flash_attn_func(*_arrays(), dropout_p=0.1)


# ----------------------------------------------------------------------------------------------
# GPU: jit without host transfers, low precision against a float64 reference
# ----------------------------------------------------------------------------------------------

GPU_DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
GPU_CASES = [Case("attention", 257, 257, 4, 2, 64, causal=True, batch=2),
             Case("flash_attn_func", 200, 333, 4, 4, 128, window_size=(64, 16), batch=2)]


@pytest.mark.gpu
@pytest.mark.parametrize("transform", ["forward", "grad", "grad_of_grad", "jvp", "jvp_of_grad", "jvp_of_jvp"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_float64_reference(case, dtype, transform):
    """The transformation jitted without host transfers, against the float64 reference on the same
    rounded inputs and weights by the criterion of the torch GPU tests (tests/_numerics.py), plain
    jax.numpy attention in ``dtype`` giving the 2× bound; jvp_of_jvp runs the second-order forward
    kernel at its GPU tiles."""
    inputs = tuple(x.astype(dtype) for x in case.inputs(seed=14))
    weights = _weights(case, inputs, seed=15)
    fused = _jitted(transform, partial(case.attend, FUSED))
    fused(weights, *inputs)
    with jax.transfer_guard("disallow"):
        got = jax.block_until_ready(fused(weights, *inputs))
    # The float64 reference sees the same (rounded) inputs and weights (jitted too: run eagerly,
    # every primitive of a second-order program would compile on its own, on every worker).
    upcast = partial(jax.tree.map, lambda x: x.astype(jnp.float64))
    reference = _jitted(transform, partial(case.attend, REFERENCE))
    want = reference(upcast(weights), *upcast(inputs))
    plain = reference(weights, *inputs)
    assert_tree_accurate(f"{case} {transform} {jnp.dtype(dtype).name}", got, want, dtype, plain=plain)


# Varlen on the GPU: lengths off the block sizes, queries longer and shorter than keys.
GPU_VARLEN_CASE = VarlenCase(((1, 1), (300, 300), (513, 129), (129, 513), (17, 33)), 8, 2, 128, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("transform", ["forward", "grad", "jvp", "jvp_of_grad"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_gpu_varlen_matches_per_sequence_calls(dtype, transform):
    """flash_attn_varlen_func against flash_attn_func called on each sequence alone, in low precision."""
    case = GPU_VARLEN_CASE
    inputs = tuple(x.astype(dtype) for x in case.inputs(seed=22))
    weights = _weights(case, inputs, seed=23)
    starts_q, starts_k = (c.tolist() for c in case.sequences()[:2])

    def per_sequence(q, k, v):
        parts = [flash_attn_func(q[None, a:b], k[None, c:d], v[None, c:d], causal=case.causal,
                                 window_size=case.window_size, return_lse=True)
                 for a, b, c, d in zip(starts_q, starts_q[1:], starts_k, starts_k[1:])]
        lse = jnp.concatenate([lse[0] for _, lse in parts], axis=1)
        return jnp.concatenate([out[0] for out, _ in parts]), jnp.where(jnp.isfinite(lse), lse, 0.0)

    got = _jitted(transform, partial(case.attend, FUSED))(weights, *inputs)
    want = _jitted(transform, per_sequence)(weights, *inputs)
    assert_tree_accurate(f"varlen {transform} {jnp.dtype(dtype).name}", got, want, dtype, tol=tolerance(dtype) / 4)
