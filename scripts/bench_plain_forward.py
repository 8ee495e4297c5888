"""A yardstick for theria's forward on Hopper: the plainest FlashAttention-2 forward Triton can
express, timed beside theria's forward and torch SDPA's cuDNN backend in one run.

The plain kernel does only what the benchmark shapes need: fixed lengths that its tiles divide,
no masks but the causal one, no score modifiers, no derivative flags; Q, K, V and the output go
through host-built TMA descriptors, the scale joins the exponent's shift, and the causal sweep is
split into the blocks below the diagonal (no mask) and the diagonal blocks (masked). If it beats
theria's forward at the same tile, theria's generality costs that much; if neither reaches
cuDNN, the gap is in the schedule Triton generates, not in what the kernel computes
(docs/perf-notes.md item 23). Not part of the library: it returns lse but has no backward.

    python scripts/bench_plain_forward.py                      # B8 H16 T4096 D64 and B4 H16 T4096 D128
    python scripts/bench_plain_forward.py --tiles 128,64,4,3 128,64,8,3 --theria-tiles 128,64,8,3
    python scripts/bench_plain_forward.py --check              # correctness (Hopper GPU, else the interpreter)

Times are ``do_bench_cudagraph`` medians (the device's time); each row prints its time, TFLOP/s
(4·B·H·T²·D, half when causal) and cuDNN's time over its own.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# --check runs the compiled kernel on a Hopper-or-later GPU (host-built descriptors need sm_90) and
# Triton's interpreter elsewhere. Not the interpreter where a GPU can run it: the interpreter's
# range() over a tensor bound converts a 1-element array to an int, an error from numpy 2.4 on.
CHECK_ON_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
if "--check" in sys.argv and not CHECK_ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _key_sweep(acc, row_sum, row_max, q, keys, values, row0, lo, hi, offs_m, qk_scale, BLOCK_N: tl.constexpr,
               DIAGONAL: tl.constexpr):
    """Online softmax over the key blocks [lo, hi); DIAGONAL masks keys after each query (by a
    large negative bias, which leaves every row's maximum finite)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        dot = tl.dot(q, keys.load([row0 + start_n, 0]).T)
        if DIAGONAL:
            scores = dot * qk_scale + tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], 0.0, -1.0e6)
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            p = tl.exp2(scores - new_max[:, None])
        else:
            new_max = tl.maximum(row_max, tl.max(dot, 1) * qk_scale)
            p = tl.exp2(dot * qk_scale - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = values.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None])
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _plain_forward_kernel(queries, keys, values, outputs, Lse, qk_scale, T, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    row0 = tl.program_id(1) * T  # (batch, head) pairs are stacked along the rows of each 2-D view
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = queries.load([row0 + start_m, 0])
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row_sum = tl.full([BLOCK_M], 1.0, tl.float32)  # rescaled by exp2(−∞) = 0 at the first block
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if CAUSAL:
        acc, row_sum, row_max = _key_sweep(acc, row_sum, row_max, q, keys, values, row0, 0, start_m, offs_m,
                                           qk_scale, BLOCK_N, False)
        acc, row_sum, row_max = _key_sweep(acc, row_sum, row_max, q, keys, values, row0, start_m, start_m + BLOCK_M,
                                           offs_m, qk_scale, BLOCK_N, True)
    else:
        acc, row_sum, row_max = _key_sweep(acc, row_sum, row_max, q, keys, values, row0, 0, T, offs_m, qk_scale,
                                           BLOCK_N, False)
    tl.store(Lse + row0 + offs_m, (row_max + tl.log2(row_sum)) / 1.4426950408889634)
    outputs.store([row0 + start_m, 0], (acc / row_sum[:, None]).to(q.dtype))


def plain_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, tile: tuple[int, int, int, int]):
    """(out, lse) of contiguous (B, H, T, D) q, k, v; T a multiple of both tile sides (and, causal,
    BLOCK_M a multiple of BLOCK_N)."""
    block_m, block_n, warps, stages = tile
    batch, heads, t, head_dim = q.shape
    if t % block_m or t % block_n or (causal and block_m % block_n):
        raise ValueError(f"T = {t} and the tile {tile} do not fit this kernel (see plain_forward's docstring)")
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, t, device=q.device, dtype=torch.float32)
    rows = batch * heads * t
    descriptors = [TensorDescriptor.from_tensor(x.reshape(rows, head_dim), [block, head_dim])
                   for x, block in ((q, block_m), (k, block_n), (v, block_n), (out, block_m))]
    _plain_forward_kernel[(t // block_m, batch * heads)](
        *descriptors, lse, head_dim ** -0.5 * _LOG2E, t, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, num_warps=warps, num_stages=stages)
    return out, lse


def _tile(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a tile is BLOCK_M,BLOCK_N,num_warps,num_stages, got {text!r}")
    return values


def check() -> None:
    """The plain kernel against torch's float32 attention of the same inputs: float32 in Triton's
    interpreter, bfloat16 compiled on a Hopper-or-later GPU (``CHECK_ON_GPU``), each within its
    dtype's rounding."""
    torch.manual_seed(0)
    device, dtype, out_bound, lse_bound = (("cuda", torch.bfloat16, 1e-2, 1e-2) if CHECK_ON_GPU
                                           else ("cpu", torch.float32, 1e-5, 1e-4))
    print(f"checking on {device} in {dtype}")
    for causal in (False, True):
        q, k, v = (torch.randn(1, 2, 256, 64, device=device).to(dtype) for _ in range(3))
        out, lse = plain_forward(q, k, v, causal, (128, 64, 4, 2))
        q, k, v, out = (x.float() for x in (q, k, v, out))
        scores = q @ k.transpose(-1, -2) / 8.0
        if causal:
            scores = scores.masked_fill(torch.ones(256, 256, dtype=torch.bool, device=device).triu(1), float("-inf"))
        out_error = ((out - torch.softmax(scores, -1) @ v).norm() / out.norm()).item()
        lse_error = (lse - scores.logsumexp(-1)).abs().max().item()
        print(f"causal={causal}: out relative error {out_error:.1e}, lse max error {lse_error:.1e}")
        if not (out_error < out_bound and lse_error < lse_bound):
            raise SystemExit("the plain kernel disagrees with torch's attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", nargs="+", type=_tile, help="plain kernel tiles (default: a set per head dim)")
    parser.add_argument("--theria-tiles", nargs="+", type=_tile, default=[],
                        help="also time theria's forward with these sm_90 table tiles (its own tile always runs)")
    parser.add_argument("--check", action="store_true",
                        help="check the plain kernel (on a Hopper GPU, else in the interpreter) and exit")
    args = parser.parse_args()
    if args.check:
        check()
        return
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU (--check also runs in the interpreter)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from tune_attention import with_tile

    from theria_kernels.attention import _tuning, torch_launchers
    from theria_torch import sdpa_custom

    default_tiles = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3)],
                     128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]}
    print(f"# {torch.cuda.get_device_name()} bfloat16, do_bench_cudagraph medians; cudnn/this > 1: faster than cuDNN")
    print(f"{'B H T D':14s} {'causal':6s} {'impl':7s} {'tile':18s} {'ms':>7s} {'TFLOP/s':>8s} {'cudnn/this':>10s}")
    torch.manual_seed(0)
    for batch, head_dim in ((8, 64), (4, 128)):
        heads, t = 16, 4096
        q, k, v = (torch.randn(batch, heads, t, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * heads * t * t * head_dim
        for causal in (False, True):
            label = f"{batch} {heads} {t} {head_dim}"
            expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                        is_causal=causal)

            def row(impl, tile, call):
                error = ((call()[0].float() - expected).norm() / expected.norm()).item()
                if not error < 2e-2:
                    raise SystemExit(f"{impl} {tile}: relative error {error:.1e} against float32 attention")
                ms = do_bench_cudagraph(call)
                print(f"{label:14s} {str(causal):6s} {impl:7s} {str(tile):18s} {ms:7.3f} "
                      f"{flops / (2 if causal else 1) / ms / 1e9:8.1f} {cudnn_ms / ms:10.3f}", flush=True)

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn_ms = do_bench_cudagraph(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
            print(f"{label:14s} {str(causal):6s} {'cudnn':7s} {'':18s} {cudnn_ms:7.3f} "
                  f"{flops / (2 if causal else 1) / cudnn_ms / 1e9:8.1f} {1.0:10.3f}")
            # the entry this mask class reads (causal calls take BANDED_TILES' where there is one)
            own = _tuning.tile(90, "forward", head_dim, "bfloat16", causal)
            for tile in [own] + [x for x in args.theria_tiles if x != own]:
                with_tile("forward", head_dim, "bfloat16", 90, tile, causal)
                torch_launchers.clear_plans()
                row("theria", tile, lambda: (sdpa_custom(q, k, v, causal=causal),))
            with_tile("forward", head_dim, "bfloat16", 90, own, causal)
            torch_launchers.clear_plans()
            for tile in args.tiles or default_tiles[head_dim]:
                if causal and tile[0] % tile[1]:
                    continue
                row("plain", tile, lambda: plain_forward(q, k, v, causal, tile))


if __name__ == "__main__":
    main()
