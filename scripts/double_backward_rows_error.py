"""The accuracy of the double backward's row outputs in bf16: the two row sweeps against the one
sweep (docs/theory/attention_derivatives.md §4.7, perf-notes items 30 and 35), measured against the
GPU accuracy test's bound.

The row kernel's cot_q (the q part of a Hessian-vector product, theory §4) and cot_dO are emulated
in float64 on one head, rounding what the kernels round: the inputs (bf16), the forward's stored
output O, and the 16-bit left operand of every product with a key-shaped tile (P before P Ḡv; S̄,
dS and dP̄ before S̄ K, dS Ḡk and dP̄ V; for the one sweep X, dS, P and P ∘ dS̄ before X K, dS K,
P K and (P ∘ dS̄) V). The two schedules:

  two sweeps   sigma and rho first, then cot_q = α (S̄ K + dS Ḡk), S̄ = P ∘ (P̄ − rho), and
               cot_dO = P Ḡv + dP̄ V, dP̄ = P ∘ (dS̄ − sigma)
  one sweep    cot_q = α (X K − sigma (dS K) − (sigma delta + rho) (P K) + dS Ḡk),
               X = P ∘ (dS̄ ∘ (dP − delta) + dO Ḡvᵀ), and cot_dO = P Ḡv + (P ∘ dS̄) V − sigma O,
               the row terms applied once at the end

Both are compared with the float64 reference (theria_torch.reference through autograd) and with
``plain``, the same HVP of plain attention computed in bf16 from the same rounded inputs, as
tests/test_attention_gpu.py computes it; the test's bound is twice plain's error (relative, and
largest element relative to max |exact|). The last column is the one sweep's largest-element
error as a share of that bound (the two sweeps' in brackets): below 1 passes.

    python scripts/double_backward_rows_error.py
    python scripts/double_backward_rows_error.py --lengths 257 --seeds 1 --scales 1
"""

from __future__ import annotations

import argparse
import math

import torch

from theria_torch.reference import attention_reference


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def reference_rows(q, k, v, d_out, cotangents, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The row outputs of the double backward, (cot_q, cot_dO): the q and d_out parts of the VJP of
    (dq, dk, dv) with ``cotangents``, through the reference, in the inputs' dtype: float64 for the
    exact value, bf16 for ``plain``."""
    leaves = [t[None, None].detach().requires_grad_() for t in (q, k, v, d_out)]
    out = attention_reference(*leaves[:3], causal=causal)
    grads = torch.autograd.grad(out, leaves[:3], leaves[3], create_graph=True)
    found = torch.autograd.grad(grads, [leaves[0], leaves[3]], [t[None, None] for t in cotangents])
    return found[0][0, 0], found[1][0, 0]


def row_outputs(q, k, v, d_out, cot_dq, cot_dk, cot_dv, causal: bool, rounding=_bf16):
    """{"two": (cot_q, cot_dO), "one": (cot_q, cot_dO)}: the row kernel's outputs for one head of
    (T, D) float64 tensors in both schedules, ``rounding`` applied where the kernels round to 16
    bits (the identity: exact arithmetic, where both equal the reference)."""
    t_q, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    scores = scale * q @ k.T
    if causal:
        scores = scores.masked_fill(torch.ones(t_q, k.shape[0], dtype=torch.bool).triu(1), float("-inf"))
    p = torch.exp(scores - torch.logsumexp(scores, -1, keepdim=True))
    out = rounding(rounding(p) @ v)
    dp = d_out @ v.T
    delta = (d_out * out).sum(-1, keepdim=True)
    ds_bar = scale * (cot_dq @ k.T + q @ cot_dk.T)
    sigma = (p * ds_bar).sum(-1, keepdim=True)
    p_gv = rounding(p) @ cot_dv
    rho = (p * ds_bar * dp).sum(-1, keepdim=True) - 2 * sigma * delta + (d_out * p_gv).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    p_bar_part = ds_bar * (dp - delta) + d_out @ cot_dv.T  # P̄ without its row terms (− sigma dP)
    s_bar = p * (p_bar_part - sigma * dp - rho)
    two = (scale * (rounding(s_bar) @ k + rounding(ds) @ cot_dk), p_gv + rounding(p * (ds_bar - sigma)) @ v)
    x = p * p_bar_part
    one_q = scale * (rounding(x) @ k - sigma * (rounding(ds) @ k) - (sigma * delta + rho) * (rounding(p) @ k)
                     + rounding(ds) @ cot_dk)
    return dict(two=two, one=(one_q, p_gv + rounding(p * ds_bar) @ v - sigma * out))


def errors(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(‖got − exact‖ / ‖exact‖, max |got − exact| / max |exact|)."""
    return ((got - exact).norm() / exact.norm()).item(), ((got - exact).abs().max() / exact.abs().max()).item()


def case(length: int, causal: bool, seed: int, scale: float, head_dim: int = 64) -> dict:
    """One head's errors, {output: {"plain" | "two" | "one": (relative, largest element)}} for
    output "cot_q" and "cot_dO": plain bf16, two sweeps and one sweep against float64."""
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randn(length, head_dim, generator=gen, dtype=torch.float64) for _ in range(7)]
    low = [t.to(torch.bfloat16) for t in draws[:4]] + [(scale * t).to(torch.bfloat16) for t in draws[4:]]
    x = [t.double() for t in low]
    exact = reference_rows(*x[:4], x[4:], causal)
    plain = [t.double() for t in reference_rows(*low[:4], low[4:], causal)]
    rows = row_outputs(*x, causal)
    return {name: dict(plain=errors(plain[i], exact[i]), two=errors(rows["two"][i], exact[i]),
                       one=errors(rows["one"][i], exact[i])) for i, name in enumerate(("cot_q", "cot_dO"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[257, 1024])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0], help="of the cotangents")
    args = parser.parse_args()
    print(f"{'T':>5s} {'mask':6s} {'seed':>4s} {'scale':>5s} {'output':6s} | {'plain rel':>9s} {'two rel':>9s} "
          f"{'one rel':>9s} | {'plain max':>9s} {'two max':>9s} {'one max':>9s} | one (two) / bound")
    for length in args.lengths:
        for causal in (False, True):
            for seed in range(args.seeds):
                for scale in args.scales:
                    for output, found in case(length, causal, seed, scale).items():
                        bound = 2 * found["plain"][1] + 1e-6
                        rel = " ".join(f"{found[name][0]:9.2e}" for name in ("plain", "two", "one"))
                        big = " ".join(f"{found[name][1]:9.2e}" for name in ("plain", "two", "one"))
                        print(f"{length:5d} {'causal' if causal else 'full':6s} {seed:4d} {scale:5g} {output:6s} | "
                              f"{rel} | {big} | {found['one'][1] / bound:4.2f} ({found['two'][1] / bound:4.2f})")


if __name__ == "__main__":
    main()
