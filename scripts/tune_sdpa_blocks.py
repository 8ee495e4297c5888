"""Time the attention launchers under candidate tile configurations (GPU only) and print the best
per sweep kind, to choose the entries of ``GPU_BLOCKS`` in kernels/attention/_launch.py.

    python scripts/tune_sdpa_blocks.py --shape 8,16,1024,64 --kinds backward_backward jvp
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton.testing

from theria_kernels.attention import AttentionParams
from theria_kernels.attention import _launch as plans
from theria_kernels.attention import torch_launchers as kernels

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = list(itertools.product((32, 64, 128), (32, 64), (4, 8), (1, 2)))


def workloads(q, k, v, params):
    out, lse = kernels.attention_forward(q, k, v, params)
    d_out = torch.randn_like(q)
    cots = [torch.randn_like(t) for t in (q, k, v)]
    return {
        "forward": lambda: kernels.attention_forward(q, k, v, params),
        "jvp": lambda: kernels.attention_jvp(q, k, v, *cots, params),
        "backward": lambda: kernels.attention_backward(q, k, v, out, lse, d_out, None, params),
        "backward_backward": lambda: kernels.attention_backward_backward(q, k, v, out, lse, d_out, None, *cots, params),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,16,1024,64", help="B,H,T,D")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--kinds", nargs="+", default=list(plans.GPU_BLOCKS))
    args = parser.parse_args()
    batch, heads, seq, head_dim = map(int, args.shape.split(","))
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=getattr(torch, args.dtype))
               for _ in range(3))
    params = AttentionParams(scale=1 / math.sqrt(head_dim), causal=args.causal)
    block_d = max(triton.next_power_of_2(head_dim), 64)
    runs = workloads(q, k, v, params)
    for kind in args.kinds:
        current = plans.GPU_BLOCKS[kind][block_d]
        timings = []
        for candidate in CANDIDATES:
            plans.GPU_BLOCKS[kind][block_d] = candidate
            kernels.clear_plans()  # plans are cached with the tiles they were built with
            try:
                timings.append((triton.testing.do_bench(runs[kind], warmup=10, rep=40, return_mode="median"), candidate))
            except Exception as err:  # out of shared memory / registers for this tile
                print(f"{kind} {candidate}: {type(err).__name__}")
        plans.GPU_BLOCKS[kind][block_d] = current
        kernels.clear_plans()
        timings.sort()
        now = next((ms for ms, c in timings if c == current), float("nan"))
        print(f"{kind}: current {current} {now:.3f} ms; best " +
              ", ".join(f"{c} {ms:.3f} ms" for ms, c in timings[:4]))


if __name__ == "__main__":
    main()
