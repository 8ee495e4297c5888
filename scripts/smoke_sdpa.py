"""One forward, backward, JVP and double backward through theria's fused attention per case;
prints the relative error of each against a float64 reference. Runs on a GPU, or on the CPU in
Triton's interpreter (TRITON_INTERPRET=1 is set automatically there; keep shapes small).

    python scripts/smoke_sdpa.py --shape 2,4,1000,1000,64 --dtypes bfloat16 float16 float32
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from theria_torch import sdpa_custom  # noqa: E402
from theria_torch.reference import attention_reference  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def smoke(batch, heads, t_q, t_k, head_dim, dtype, causal, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    draw = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    q64, k64, v64 = draw(batch, heads, t_q, head_dim), draw(batch, heads, t_k, head_dim), draw(batch, heads, t_k, head_dim)
    d_out, tangents, cots = draw(batch, heads, t_q, head_dim), [draw(*t.shape) for t in (q64, k64, v64)], [
        draw(*t.shape) for t in (q64, k64, v64)]

    def pipeline(q, k, v, backend):
        out = sdpa_custom(q, k, v, causal=causal, backend=backend)
        grads = torch.autograd.grad((out * d_out.to(q.dtype)).sum(), (q, k, v), create_graph=True)
        hvp = torch.autograd.grad(sum((g * c.to(g.dtype)).sum() for g, c in zip(grads, cots)), (q, k, v))
        return out, grads, hvp

    leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
    out, grads, hvp = pipeline(*leaves, "triton_full_fused")
    _, out_dot = torch.func.jvp(lambda q, k, v: sdpa_custom(q, k, v, causal=causal),
                                tuple(t.detach() for t in leaves), tuple(t.to(dtype) for t in tangents))
    ref_leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref_out, ref_grads, ref_hvp = pipeline(*ref_leaves, "reference")
    _, ref_out_dot = torch.func.jvp(
        lambda q, k, v: attention_reference(q, k, v, causal=causal), (q64, k64, v64), tuple(tangents))
    errors = {"out": rel(out, ref_out), "out_dot": rel(out_dot, ref_out_dot)}
    errors.update({f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    errors.update({f"hvp_{n}": rel(g, r) for n, g, r in zip("qkv", hvp, ref_hvp)})
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1,2,33,45,32", help="B,H,T_q,T_k,D")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32", "bfloat16"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    batch, heads, t_q, t_k, head_dim = map(int, args.shape.split(","))
    print(f"device={device} B={batch} H={heads} T_q={t_q} T_k={t_k} D={head_dim}")
    for dtype_name in args.dtypes:
        for causal in (False, True):
            errors = smoke(batch, heads, t_q, t_k, head_dim, getattr(torch, dtype_name), causal, device)
            print(f"{dtype_name:9s} causal={causal!s:5s} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
