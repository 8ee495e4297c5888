"""theria_jax against theria_torch on the GPU (run with `pytest -m gpu`): the same kernels reached
through both frameworks, on the same rounded inputs, directions and loss weights.

For each case and dtype (fp16, bf16, fp32) both frameworks compute the output, the gradient of
a smooth loss of it, the JVP, the JVP of the JVP (the second-order forward kernel) and the
Hessian-vector product (``jax.jvp`` of ``jax.grad`` and ``torch.func.jvp`` of ``torch.func.grad``).
Each is compared with the float64 jax.numpy reference by tests/_numerics.py's criterion (the
dtype's tolerance and at most twice the error of plain jax.numpy attention in the same dtype, the
criterion of the torch GPU tests), and with the other framework within the dtype's tolerance.
The JAX side runs jitted under ``jax.transfer_guard("disallow")``:
its inputs live on the GPU before the guard, and no byte may cross to or from the host inside.

JAX arrays are (B, T, H, D); the torch tensors are built from the same values in the same
layout, and ``sdpa_custom`` gets (B, H, T, D) views of them, so both frameworks hand the kernels
identically strided buffers (and share their compiled variants).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import theria_jax
import theria_torch
from _attention_cases import SOFTCAP, ApiCase
from _numerics import as_float64, assert_accurate
from theria_jax.reference import attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU visible to JAX"),
]

DEVICE = "cuda"
DTYPES = {torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16, torch.float32: jnp.float32}
NAMES = ("out", "dq", "dk", "dv", "out_dot", "out_dot_dot", "hvp_q", "hvp_k", "hvp_v")


@dataclass(frozen=True)
class Case(ApiCase):
    """An ``ApiCase`` (no window) run through theria_jax, theria_torch and the JAX reference."""

    batch: int = 2

    def modifiers(self, framework):
        """flash_attn_func's softcap and alibi_slopes keywords, the slopes as ``framework``'s array."""
        slopes = self.slopes()
        if slopes is not None:
            slopes = jnp.asarray(slopes.numpy()) if framework == "jax" else slopes.to(DEVICE)
        return dict(softcap=self.softcap, alibi_slopes=slopes)

    def jax_attend(self, q, k, v):
        if self.api == "attention":
            return theria_jax.attention(q, k, v, causal=self.causal)
        return theria_jax.flash_attn_func(q, k, v, causal=self.causal, **self.modifiers("jax"))

    def reference_attend(self, q, k, v):
        return attention_reference(q, k, v, causal=self.causal, bottom_right=self.api == "flash_attn_func",
                                   **self.modifiers("jax"))

    def torch_attend(self, q, k, v):
        if self.api == "flash_attn_func":
            return theria_torch.flash_attn_func(q, k, v, causal=self.causal, **self.modifiers("torch"))
        bhtd = (t.transpose(1, 2) for t in (q, k, v))
        return theria_torch.sdpa_custom(*bhtd, causal=self.causal).transpose(1, 2)


CASES = [
    Case("attention", 128, 128, 4, 4, 64, causal=False),  # key length a block multiple: unmasked tiles
    Case("attention", 97, 203, 4, 1, 80, causal=True),  # grouped-query, top-left, T_q < T_k
    Case("flash_attn_func", 203, 97, 4, 2, 128, causal=True),  # 106 rows see no key
    # Logit soft-capping and ALiBi (§8): the cap far from linear, per-batch slopes, grouped-query.
    Case("flash_attn_func", 150, 211, 4, 2, 64, causal=True, softcap=SOFTCAP, alibi=True),
]


# ----------------------------------------------------------------------------------------------
# The four quantities, written once per framework. The loss Σ w ∘ sin(out) makes the gradient's
# cotangent depend on the inputs, so the HVP exercises both halves of the backward's JVP (the
# Hessian part and the Jᵀ part).
# ----------------------------------------------------------------------------------------------


def _jax_derivatives(attend):
    """Jitted functions of (q, k, v, w, q̇, k̇, v̇, q̈, k̈, v̈) for out, grads, out_dot, out_dot_dot (the
    JVP along (q̇, k̇, v̇) differentiated along (q̈, k̈, v̈)) and the HVP along (q̇, k̇, v̇)."""

    def loss(q, k, v, w):
        return jnp.sum(w * jnp.sin(attend(q, k, v)))

    grad = jax.grad(loss, argnums=(0, 1, 2))

    def tangent(*x, directions):
        return jax.jvp(attend, x, directions)[1]

    return {
        "out": jax.jit(lambda q, k, v, w, *tangents: attend(q, k, v)),
        "grad": jax.jit(lambda q, k, v, w, *tangents: grad(q, k, v, w)),
        "jvp": jax.jit(lambda q, k, v, w, *tangents: tangent(q, k, v, directions=tangents[:3])),
        "jvp_of_jvp": jax.jit(lambda q, k, v, w, *tangents: jax.jvp(
            lambda *x: tangent(*x, directions=tangents[:3]), (q, k, v), tangents[3:])[1]),
        "hvp": jax.jit(lambda q, k, v, w, *tangents: jax.jvp(lambda *x: grad(*x, w), (q, k, v), tangents[:3])[1]),
    }


def _by_name(results):
    """The results of ``_jax_derivatives`` or ``_torch_results`` as one array per name in NAMES."""
    return dict(zip(NAMES, [results["out"], *results["grad"], results["jvp"], results["jvp_of_jvp"],
                            *results["hvp"]]))


def _assert_dtype(results, dtype, what):
    for name, x in results.items():
        assert x.dtype == dtype, f"{what} {name}: dtype {x.dtype}, expected {dtype}"


def _torch_results(attend, q, k, v, w, *tangents):
    def loss(q, k, v):
        return (w * attend(q, k, v).sin()).sum()

    grad = torch.func.grad(loss, argnums=(0, 1, 2))
    tangent = lambda *x: torch.func.jvp(attend, x, tangents[:3])[1]  # noqa: E731
    return {
        "out": attend(q, k, v),
        "grad": grad(q, k, v),
        "jvp": tangent(q, k, v),
        "jvp_of_jvp": torch.func.jvp(tangent, (q, k, v), tangents[3:])[1],
        "hvp": torch.func.jvp(grad, (q, k, v), tangents[:3])[1],
    }


def _draws(case, seed):
    """Float64 numpy draws for q, k, v, the loss weights w (shaped like out), q̇, k̇, v̇ and q̈, k̈, v̈."""
    rng = np.random.default_rng(seed)
    shapes = case.shapes()
    return [rng.standard_normal(s) for s in (*shapes, shapes[0], *shapes, *shapes)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_jax_and_torch_agree_with_float64_reference(case, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is held to the tf32-off tolerance
    jax_dtype = DTYPES[dtype]
    draws = _draws(case, seed=case.head_dim)
    arrays = [jnp.asarray(x, jax_dtype) for x in draws]  # on the GPU before the guard
    derivatives = _jax_derivatives(case.jax_attend)
    for function in derivatives.values():  # compile outside the guard
        jax.block_until_ready(function(*arrays))
    with jax.transfer_guard("disallow"):
        jax_results = {name: jax.block_until_ready(function(*arrays)) for name, function in derivatives.items()}
    jax_results = _by_name(jax_results)
    _assert_dtype(jax_results, jax_dtype, f"{case} JAX")

    # The reference, plain jax.numpy attention and torch see exactly the rounded values JAX saw.
    rounded = [np.asarray(x, np.float64) for x in arrays]
    reference_derivatives = _jax_derivatives(case.reference_attend)
    reference = _by_name({name: function(*map(jnp.asarray, rounded))
                          for name, function in reference_derivatives.items()})
    _assert_dtype(reference, jnp.float64, f"{case} reference")
    plain = _by_name({name: function(*arrays) for name, function in reference_derivatives.items()})
    torch_results = _by_name(_torch_results(case.torch_attend, *(torch.from_numpy(x).to(DEVICE, dtype)
                                                                 for x in rounded)))
    _assert_dtype(torch_results, dtype, f"{case} torch")

    for name in NAMES:
        want, from_jax, from_torch = (as_float64(r[name]) for r in (reference, jax_results, torch_results))
        assert_accurate(f"{case} {dtype} {name} (JAX)", from_jax, want, dtype, plain=plain[name])
        assert_accurate(f"{case} {dtype} {name} (torch)", from_torch, want, dtype, plain=plain[name])
        assert_accurate(f"{case} {dtype} {name} (JAX vs torch)", from_jax, from_torch, dtype)
