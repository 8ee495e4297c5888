"""The accuracy criterion of every kernel test, torch and JAX, CPU and GPU (docs/design/attention.md).

A result ``got`` computed in ``dtype`` passes against the float64 reference ``exact`` when

* its relative error ‖got − exact‖ / ‖exact‖ is within the dtype's tolerance: float64 1e-10,
  float32 1e-4 (5e-3 where float32 matmuls may use tf32), float16 5e-3, bfloat16 2e-2; and
* given ``plain``, the same quantity computed by plain (unfused) attention in ``dtype`` from the
  same rounded inputs, it is at most twice as far from ``exact`` as ``plain`` is (flash-attn's
  rule, which scales with the dtype and the shape): by the relative error, and in float16 and
  bfloat16 also by the largest elementwise error, each with a small floor for round-off where
  plain attention happens to be (near) exact. In float64 ``plain`` is the reference itself, so
  the rule does not apply.

Non-finite entries must sit where the reference's are; the errors are taken over the finite
ones. A failure says what, how far (the relative error and the bound it broke), and where: the
largest absolute difference, its index and the two values there.
"""

from __future__ import annotations

import numpy as np
import torch

from _device import ON_GPU

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
TF32_TOLERANCE = 5e-3
# Floors of the 2× rule: on the relative error, and on the largest error relative to max |exact|.
RELATIVE_FLOOR = 1e-6
MAX_ERROR_FLOOR = 1e-6


def dtype_name(dtype) -> str:
    """'float16', ... for a torch, NumPy or JAX dtype."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def tolerance(dtype) -> float:
    """The relative-error tolerance of ``dtype`` (float32: tf32's where torch allows it on the GPU)."""
    name = dtype_name(dtype)
    if name == "float32" and ON_GPU and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[name]


def as_float64(x) -> np.ndarray:
    """A torch tensor or JAX/NumPy array as a float64 NumPy array on the host."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, np.float64)


def _errors(got: np.ndarray, exact: np.ndarray):
    """(relative error, max |got − exact|, its index) over the entries where ``exact`` is finite."""
    finite = np.isfinite(exact)
    diff = np.where(finite, np.abs(got - exact), 0.0)
    diff = np.where(np.isnan(diff), np.inf, diff)
    where = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
    norm = np.linalg.norm(exact[finite])
    relative = np.linalg.norm(np.where(finite, got - exact, 0.0)) / max(norm, 1e-300)
    return (np.inf if np.isnan(relative) else relative), (diff[where] if diff.size else 0.0), where


def relative_error(got, exact) -> float:
    """‖got − exact‖ / ‖exact‖ over the entries where ``exact`` is finite."""
    return float(_errors(as_float64(got), as_float64(exact))[0])


def assert_accurate(name: str, got, exact, dtype, *, plain=None, tol: float | None = None) -> None:
    """``got`` (computed in ``dtype``) against the float64 ``exact`` by the criterion of the module
    docstring; ``tol`` replaces the dtype's tolerance (e.g. for two fused paths that must agree
    more closely than either agrees with the reference)."""
    got, exact = as_float64(got), as_float64(exact)
    assert got.shape == exact.shape, f"{name}: shape {got.shape}, reference {exact.shape}"
    name_of_dtype = dtype_name(dtype)
    tol = tolerance(dtype) if tol is None else tol
    finite = np.isfinite(exact)
    mismatched = np.argwhere(finite != np.isfinite(got))
    if mismatched.size:
        where = tuple(int(i) for i in mismatched[0])
        raise AssertionError(f"{name}: {len(mismatched)} entries are finite in only one of result and reference; "
                             f"first at {where} (got {got[where]!r}, want {exact[where]!r})")
    relative, max_error, where = _errors(got, exact)
    where = tuple(int(i) for i in where)
    at = (f"max abs diff {max_error:.3e} at {where} (got {got[where]:.6g}, want {exact[where]:.6g})"
          if where or got.ndim == 0 else "no elements")
    if not relative <= tol:
        raise AssertionError(f"{name}: relative error {relative:.3e} > tolerance {tol:.1e} ({name_of_dtype}); {at}")
    if plain is None or name_of_dtype == "float64":
        return
    plain_relative, plain_max_error, _ = _errors(as_float64(plain), exact)
    bound = 2 * plain_relative + RELATIVE_FLOOR
    if not relative <= bound:
        raise AssertionError(f"{name}: relative error {relative:.3e} > {bound:.3e} = 2 × plain {name_of_dtype} "
                             f"attention's {plain_relative:.3e} + {RELATIVE_FLOOR:.0e}; {at}")
    if name_of_dtype in ("float16", "bfloat16"):
        # A half-precision rule: in float32 both maxima are round-off of single elements.
        scale = float(np.max(np.abs(np.where(finite, exact, 0.0)), initial=0.0))
        bound = 2 * plain_max_error + MAX_ERROR_FLOOR * scale
        if not max_error <= bound:
            raise AssertionError(f"{name}: {at} > {bound:.3e} = 2 × plain {name_of_dtype} attention's "
                                 f"{plain_max_error:.3e} + floor")


def assert_tree_accurate(name: str, got, exact, dtype, *, plain=None, tol: float | None = None) -> None:
    """:func:`assert_accurate` on each leaf of matching pytrees (JAX results), named by its path."""
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(got)
    exact_leaves = jax.tree.leaves(exact)
    plain_leaves = [None] * len(leaves) if plain is None else jax.tree.leaves(plain)
    assert len(leaves) == len(exact_leaves) == len(plain_leaves), f"{name}: trees of different structure"
    for (path, g), e, p in zip(leaves, exact_leaves, plain_leaves):
        assert_accurate(f"{name}{jax.tree_util.keystr(path)}", g, e, dtype, plain=p, tol=tol)
