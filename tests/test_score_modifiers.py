"""Logit soft-capping and ALiBi (flash-attn's ``softcap`` and ``alibi_slopes``) in the references.

The references are the ground truth the fused kernels are held to, so they are checked here against
what they stand for, in float64:

* the forward against flash-attn's definitions written out naively (its test suite's
  ``attention_ref`` and ``attn_bias_from_alibi_slopes``: cap the scaled scores, then add
  ``-slope · |i + T_k - T_q - j|``), and per sequence for packed batches;
* every derivative order of the torch reference (torch.func) against the closed forms of
  docs/theory/attention_derivatives.md §8, implemented densely below: backward, JVP, double
  backward and second-order forward, so the derivation the kernels implement is checked on its own;
* the JAX reference against the torch one at every order, and against finite differences.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from _numerics import assert_accurate
from theria_jax import reference as jax_reference
from theria_torch.reference import alibi_bias, attention_reference, varlen_attention_reference, visible_keys

F64 = torch.float64
SOFTCAP = 1.5  # scores ~ N(0, 1) at scale 1/sqrt(D): the cap's tanh is far from linear and from saturated


def _draw(*shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def _slopes(batch, heads, per_batch, seed=7):
    gen = torch.Generator().manual_seed(seed)
    slopes = torch.rand(batch, heads, generator=gen, dtype=torch.float32) * 0.5 + 0.1
    return slopes if per_batch else slopes[0]


# (softcap, slopes per batch entry or None, causal, window): causal is bottom-right (flash-attn's).
MODIFIERS = {
    "softcap": (SOFTCAP, None, False, (-1, -1)),
    "alibi-per-batch": (0.0, True, False, (-1, -1)),
    "softcap-alibi-causal": (SOFTCAP, False, True, (-1, -1)),
    "softcap-alibi-window": (SOFTCAP, True, False, (2, 1)),
}


class Dense:
    """The closed forms of §1–§4, §7 with §8's score modifiers, on dense float64 (B, H, T, D)
    tensors of one call (grouped-query heads repeated; key-side results summed over each group)."""

    def __init__(self, q, k, v, *, scale, softcap, slopes, causal, window_size):
        self.group = q.shape[1] // k.shape[1]
        self.q, self.k, self.v = q, self._rep(k), self._rep(v)
        self.scale, self.softcap = scale, softcap
        t_q, t_k = q.shape[2], k.shape[2]
        r = scale * q @ self.k.transpose(-1, -2)
        if softcap:
            self.t = torch.tanh(r / softcap)
            self.g, self.curvature = 1 - self.t ** 2, -2 / softcap * self.t  # g' = curvature · g
            s = softcap * self.t
        else:
            self.g, self.curvature, s = torch.ones_like(r), torch.zeros_like(r), r
        if slopes is not None:
            s = s + alibi_bias(slopes, t_q, t_k, bottom_right=True, dtype=F64)
        visible = visible_keys(t_q, t_k, causal=causal, window_size=window_size, bottom_right=True)
        s = torch.where(visible, s, -math.inf)
        self.lse = torch.logsumexp(s, -1)
        self.p = torch.exp(s - self.lse[..., None])
        self.out = self.p @ self.v

    def _rep(self, t):
        return t.repeat_interleave(self.group, dim=1)

    def _sum_group(self, t):
        return t.unflatten(1, (-1, self.group)).sum(2)

    def _r_dot(self, q_dot, k_dot):
        return self.scale * (q_dot @ self.k.transpose(-1, -2) + self.q @ self._rep(k_dot).transpose(-1, -2))

    def backward(self, d_out, d_lse):
        """§2 with dR = g ∘ dS."""
        dp = d_out @ self.v.transpose(-1, -2)
        delta = (d_out * self.out).sum(-1) - d_lse
        dr = self.g * self.p * (dp - delta[..., None])
        dq = self.scale * dr @ self.k
        dk = self.scale * dr.transpose(-1, -2) @ self.q
        dv = self.p.transpose(-1, -2) @ d_out
        return dq, self._sum_group(dk), self._sum_group(dv)

    def jvp(self, q_dot, k_dot, v_dot):
        """§3 with Ṡ = g ∘ Ṙ."""
        s_dot = self.g * self._r_dot(q_dot, k_dot)
        mu = (self.p * s_dot).sum(-1)
        out_dot = (self.p * s_dot) @ self.v + self.p @ self._rep(v_dot) - mu[..., None] * self.out
        return out_dot, mu

    def backward_backward(self, d_out, d_lse, cot_dq, cot_dk, cot_dv):
        """§8's double backward: the five cotangents, ρ by §4.4's one-sweep expansion."""
        p, g, v, q, k = self.p, self.g, self.v, self.q, self.k
        cot_dk, cot_dv = self._rep(cot_dk), self._rep(cot_dv)
        dp = d_out @ v.transpose(-1, -2)
        delta = ((d_out * self.out).sum(-1) - d_lse)[..., None]
        ds = p * (dp - delta)
        dr = g * ds
        dr_bar = self._r_dot(cot_dq, torch.zeros_like(cot_dk[:, ::self.group])) + self.scale * q @ cot_dk.transpose(-1, -2)
        ds_bar = g * dr_bar
        sigma = (p * ds_bar).sum(-1, keepdim=True)
        p_gv = p @ cot_dv
        rho = ((p * ds_bar * dp).sum(-1, keepdim=True) - sigma * (2 * delta + d_lse[..., None])
               + (d_out * p_gv).sum(-1, keepdim=True))
        p_bar = ds_bar * (dp - delta) + d_out @ cot_dv.transpose(-1, -2) - sigma * dp
        s_bar = p * (p_bar - rho)
        dp_bar = p * (ds_bar - sigma)
        r_bar = g * (s_bar + self.curvature * dr_bar * ds)
        cot_q = self.scale * (r_bar @ k + dr @ cot_dk)
        cot_k = self.scale * (r_bar.transpose(-1, -2) @ q + dr.transpose(-1, -2) @ cot_dq)
        cot_v = dp_bar.transpose(-1, -2) @ d_out
        cot_d_out = p_gv + dp_bar @ v
        return cot_q, self._sum_group(cot_k), self._sum_group(cot_v), cot_d_out, sigma[..., 0]

    def forward_second(self, x_dot, y):
        """§7 with §8's Ṡ, S^y and S''."""
        (q_dot, k_dot, v_dot), (q_y, k_y, v_y) = x_dot, y
        r_dot, r_y = self._r_dot(q_dot, k_dot), self._r_dot(q_y, k_y)
        r_second = self.scale * (q_dot @ self._rep(k_y).transpose(-1, -2) + q_y @ self._rep(k_dot).transpose(-1, -2))
        s_dot, s_y = self.g * r_dot, self.g * r_y
        s_second = self.g * (r_second + self.curvature * r_dot * r_y)
        p, v, v_dot, v_y = self.p, self.v, self._rep(v_dot), self._rep(v_y)
        mu, mu_y = (p * s_dot).sum(-1, keepdim=True), (p * s_y).sum(-1, keepdim=True)
        m = (p * (s_y * s_dot + s_second)).sum(-1, keepdim=True)
        out_dot = (p * s_dot) @ v + p @ v_dot - mu * self.out
        out_y = (p * s_y) @ v + p @ v_y - mu_y * self.out
        out_second = ((p * (s_y * s_dot + s_second)) @ v + (p * s_dot) @ v_y + (p * s_y) @ v_dot
                      - mu_y * out_dot - mu * out_y - m * self.out)
        return out_second, (m - mu * mu_y)[..., 0]


def _case(name, batch=2, heads=4, heads_kv=2, t_q=5, t_k=7, head_dim=8):
    softcap, per_batch, causal, window = MODIFIERS[name]
    q, k, v = (_draw(batch, h, t, head_dim, seed=i) for i, (h, t) in enumerate(((heads, t_q), (heads_kv, t_k),
                                                                               (heads_kv, t_k))))
    slopes = None if per_batch is None else _slopes(batch, heads, per_batch)
    options = dict(scale=1 / math.sqrt(head_dim), softcap=softcap, alibi_slopes=slopes, causal=causal,
                   window_size=window, bottom_right=True)
    return (q, k, v), options


def _reference(options):
    return lambda q, k, v: attention_reference(q, k, v, return_lse=True, **options)


def _dense(xs, options):
    options = dict(options)
    options.pop("bottom_right")
    return Dense(*xs, slopes=options.pop("alibi_slopes"), **options)


def _check(name, got, want):
    for index, (g, w) in enumerate(zip(got, want)):
        assert_accurate(f"{name}[{index}]", g, w, F64)


@pytest.mark.parametrize("name", MODIFIERS)
def test_forward_matches_flash_attn_definitions(name):
    """flash-attn's attention_ref: scores / softcap, tanh, · softcap, then the ALiBi bias, per
    (batch, head, i, j) written out, the mask aligned bottom-right."""
    (q, k, v), options = _case(name)
    out, lse = _reference(options)(q, k, v)
    batch, heads, t_q, _ = q.shape
    t_k, group, slopes = k.shape[2], heads // k.shape[1], options["alibi_slopes"]
    visible = visible_keys(t_q, t_k, causal=options["causal"], window_size=options["window_size"], bottom_right=True)
    want_out, want_lse = torch.zeros_like(out), torch.zeros_like(lse)
    for b in range(batch):
        for h in range(heads):
            scores = torch.full((t_q, t_k), -math.inf, dtype=F64)
            for i in range(t_q):
                for j in range(t_k):
                    if not visible[i, j]:
                        continue
                    score = options["scale"] * float(q[b, h, i] @ k[b, h // group, j])
                    if options["softcap"]:
                        score = options["softcap"] * math.tanh(score / options["softcap"])
                    if slopes is not None:
                        slope = float(slopes[h] if slopes.dim() == 1 else slopes[b, h])
                        score -= slope * abs(i + t_k - t_q - j)
                    scores[i, j] = score
            want_lse[b, h] = torch.logsumexp(scores, -1)
            want_out[b, h] = torch.softmax(scores, -1) @ v[b, h // group]
    _check(name, (out, lse), (want_out, want_lse))


def test_causal_alibi_outputs_equal_flash_attn_kernels_column_bias():
    """flash-attn's CUDA kernel adds slope · j under causal masks instead: the same outputs (a
    constant per row), the lse shifted by slope · (i + T_k - T_q) (§8)."""
    (q, k, v), options = _case("softcap-alibi-causal")
    out, lse = _reference(options)(q, k, v)
    no_alibi = dict(options, alibi_slopes=None)
    scores_shift = options["alibi_slopes"][None, :, None, None].to(F64) * torch.arange(7, dtype=F64)
    # Reproduce the column bias by hand: softcapped scores plus slope · j, bottom-right causal.
    group = q.shape[1] // k.shape[1]
    r = options["scale"] * q @ k.repeat_interleave(group, 1).transpose(-1, -2)
    scores = SOFTCAP * torch.tanh(r / SOFTCAP) + scores_shift
    scores = torch.where(visible_keys(5, 7, causal=True, bottom_right=True), scores, -math.inf)
    assert_accurate("out", out, torch.softmax(scores, -1) @ v.repeat_interleave(group, 1), F64)
    row_shift = options["alibi_slopes"][None, :, None].to(F64) * (torch.arange(5, dtype=F64) + 2)
    assert_accurate("lse", lse + row_shift, torch.logsumexp(scores, -1), F64)
    assert not torch.allclose(out, attention_reference(q, k, v, **no_alibi))


def test_varlen_reference_uses_each_sequences_slopes_and_lengths():
    """Packed sequences: sequence b has its own row of (N, H) slopes and its own T_k - T_q."""
    lengths = ((3, 5), (4, 2), (2, 2))
    heads, head_dim = 2, 8
    q = _draw(sum(a for a, _ in lengths), heads, head_dim, seed=1)
    k, v = (_draw(sum(b for _, b in lengths), 1, head_dim, seed=s) for s in (2, 3))
    slopes = _slopes(len(lengths), heads, True)
    cu_q = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 9], dtype=torch.int32)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=True, softcap=SOFTCAP, alibi_slopes=slopes,
                                          return_lse=True)
    for b in range(len(lengths)):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = attention_reference(*(t[s].transpose(0, 1)[None] for t, s in ((q, rows), (k, cols), (v, cols))),
                                             causal=True, bottom_right=True, softcap=SOFTCAP,
                                             alibi_slopes=slopes[b], return_lse=True)
        _check(f"sequence {b}", (out[rows], lse[:, rows]), (want[0].transpose(0, 1), want_lse[0]))


@pytest.mark.parametrize("name", MODIFIERS)
def test_reference_derivatives_match_closed_forms(name):
    """torch.func on the reference against §8's closed forms: gradient of <dO, O> + <dl, lse>,
    JVP, double backward (all five cotangents) and the second-order forward f''[ẋ, y]."""
    xs, options = _case(name)
    f = _reference(options)
    dense = _dense(xs, options)
    d_out, d_lse = _draw(*dense.out.shape, seed=11), _draw(*dense.lse.shape, seed=12)
    x_dot = tuple(_draw(*x.shape, seed=20 + i) for i, x in enumerate(xs))
    y = tuple(_draw(*x.shape, seed=30 + i) for i, x in enumerate(xs))
    cots = tuple(_draw(*x.shape, seed=40 + i) for i, x in enumerate(xs))

    _, vjp = torch.func.vjp(f, *xs)
    _check(f"{name} backward", vjp((d_out, d_lse)), dense.backward(d_out, d_lse))
    _check(f"{name} jvp", torch.func.jvp(f, xs, x_dot)[1], dense.jvp(*x_dot))

    def backward(q, k, v, d_out, d_lse):
        return torch.func.vjp(f, q, k, v)[1]((d_out, d_lse))

    _, vjp_of_vjp = torch.func.vjp(backward, *xs, d_out, d_lse)
    _check(f"{name} double backward", vjp_of_vjp(cots), dense.backward_backward(d_out, d_lse, *cots))
    second = torch.func.jvp(lambda *x: torch.func.jvp(f, x, x_dot)[1], xs, y)[1]
    _check(f"{name} second-order forward", second, dense.forward_second(x_dot, y))


def test_slopes_get_no_gradient():
    """The slopes are constants (flash-attn returns no gradient for them): slopes that require grad
    stay out of the graph."""
    (q, k, v), options = _case("alibi-per-batch")
    slopes = options["alibi_slopes"].clone().requires_grad_()
    out = attention_reference(q.requires_grad_(), k, v, **dict(options, alibi_slopes=slopes))
    grad_q, grad_slopes = torch.autograd.grad(out.square().sum(), (q, slopes), allow_unused=True)
    assert grad_slopes is None and torch.isfinite(grad_q).all()


def _jax_case(name):
    (q, k, v), options = _case(name)
    to_jax = lambda t: jnp.asarray(t.transpose(1, 2).numpy())  # noqa: E731  (B, H, T, D) -> (B, T, H, D)
    slopes = options.pop("alibi_slopes")
    options["alibi_slopes"] = None if slopes is None else jnp.asarray(slopes.numpy())
    return (q, k, v), tuple(map(to_jax, (q, k, v))), options


@pytest.mark.parametrize("name", ["softcap-alibi-causal"])
def test_jax_reference_matches_torch_at_every_order(name):
    """Output, gradient, JVP, gradient of a gradient penalty and the second-order forward of the
    JAX reference equal the torch reference's (which the closed forms above check)."""
    xs, jxs, options = _jax_case(name)
    torch_options = dict(options, alibi_slopes=None if options["alibi_slopes"] is None
                         else torch.from_numpy(np.array(options["alibi_slopes"])))
    f_torch = lambda *x: attention_reference(*x, return_lse=True, **torch_options)[0]  # noqa: E731
    f_jax = jax.jit(lambda *x: jax_reference.attention_reference(*x, return_lse=True, **options)[0])
    to_torch = lambda a: torch.from_numpy(np.array(a)).transpose(1, 2)  # noqa: E731
    x_dot = tuple(_draw(*x.shape, seed=50 + i) for i, x in enumerate(xs))
    jx_dot = tuple(jnp.asarray(t.transpose(1, 2).numpy()) for t in x_dot)

    def loss_torch(*x):
        return f_torch(*x).sin().sum()

    def loss_jax(*x):
        return jnp.sin(f_jax(*x)).sum()

    _check("out", [to_torch(f_jax(*jxs))], [f_torch(*xs)])
    _check("grad", map(to_torch, jax.jit(jax.grad(loss_jax, argnums=(0, 1, 2)))(*jxs)),
           torch.func.grad(loss_torch, argnums=(0, 1, 2))(*xs))
    _check("jvp", [to_torch(jax.jit(lambda *x: jax.jvp(f_jax, x, jx_dot)[1])(*jxs))], [torch.func.jvp(f_torch, xs, x_dot)[1]])
    penalty_jax = lambda *x: sum(jnp.sum(g ** 2) for g in jax.grad(loss_jax, argnums=(0, 1, 2))(*x))  # noqa: E731
    penalty_torch = lambda *x: sum((g ** 2).sum() for g in torch.func.grad(loss_torch, argnums=(0, 1, 2))(*x))  # noqa
    _check("grad of grad", map(to_torch, jax.jit(jax.grad(penalty_jax, argnums=(0, 1, 2)))(*jxs)),
           torch.func.grad(penalty_torch, argnums=(0, 1, 2))(*xs))
    second_jax = jax.jit(lambda *x: jax.jvp(lambda *x: jax.jvp(f_jax, x, jx_dot)[1], x, jx_dot)[1])(*jxs)
    second_torch = torch.func.jvp(lambda *x: torch.func.jvp(f_torch, x, x_dot)[1], xs, x_dot)[1]
    _check("jvp of jvp", [to_torch(second_jax)], [second_torch])


def test_jax_reference_check_grads_and_constant_slopes():
    """Finite differences (forward and reverse mode), and the slopes' gradient is 0."""
    _, (q, k, v), options = _jax_case("softcap-alibi-window")
    f = jax.jit(lambda q, k, v: jax_reference.attention_reference(q, k, v, **options))
    check_grads(f, (q, k, v), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
    slopes_grad = jax.grad(lambda s: jnp.sum(jax_reference.attention_reference(
        q, k, v, **dict(options, alibi_slopes=s)) ** 2))(options["alibi_slopes"])
    assert not np.any(np.asarray(slopes_grad))


def test_varlen_jax_reference_matches_torch():
    lengths_q, lengths_k = (3, 4, 2), (5, 2, 2)
    heads, head_dim = 2, 8
    q = _draw(sum(lengths_q), heads, head_dim, seed=1)
    k, v = (_draw(sum(lengths_k), 1, head_dim, seed=s) for s in (2, 3))
    slopes = _slopes(3, heads, True)
    cu_q = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 9], dtype=torch.int32)
    options = dict(causal=True, softcap=SOFTCAP, return_lse=True)
    out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, alibi_slopes=slopes, **options)
    varlen = jax.jit(lambda *x: jax_reference.varlen_attention_reference(
        *x, cu_q.numpy(), cu_k.numpy(), alibi_slopes=jnp.asarray(slopes.numpy()), **options))
    jout, jlse = varlen(*(jnp.asarray(t.numpy()) for t in (q, k, v)))
    _check("varlen", (np.asarray(jout), np.asarray(jlse)), (out, lse))
