"""theria's Triton forward against the warp-specialised Gluon forward (scripts/gluon_forward.py),
beside torch SDPA's cuDNN and flash backends, in one process on a Hopper GPU.

First it checks the Gluon forward on small shapes (odd head counts and lengths, grouped-query
heads, flash-attn's (B, T, H, D) layout, both masks; persistent and one program per work item):
out against float32 attention within the Triton forward's own error times two, lse against the
Triton forward's. Then, for each shape (by default the anchors B8 H16 T4096 D64 and B4 H16 T4096
D128; bf16) and mask, it times every candidate configuration (ROWS, BLOCK_N, STAGES, consumers,
consumer registers, ping-pong) of the Gluon kernel, persistent ("P") and one program per item,
the Triton forward, cuDNN and flash, twice in turn; ``do_bench_cudagraph`` medians (the device's
time), each with cuDNN's time over its own.

``--without-barriers`` adds each candidate's persistent kernel with the ``bar.sync``s of its
consumer partitions removed from the PTX (``without_barriers``), recompiled through Triton's
``ir_override`` option: those barriers, which Triton's shared-memory analysis puts before each
mbarrier wait and arrive of a partition, are where Nsight Compute found the kernel's warps
waiting (docs/perf-notes.md items 42 and 43). The stripped kernel's out and lse must equal the
kernel's bit for bit at the timed shape.

    python scripts/ab_forward_hopper.py
    python scripts/ab_forward_hopper.py --shapes 8,16,1024,64
    python scripts/ab_forward_hopper.py --without-barriers
"""

from __future__ import annotations

import argparse
import itertools
import re
import tempfile
from pathlib import Path

import torch

import gluon_forward
from ab_forward_halves import shape_argument

# (ROWS, BLOCK_N, STAGES, CONSUMERS, consumer registers, PINGPONG)
CANDIDATES = {64: [(64, 128, 3, 2, 240, False), (64, 128, 3, 1, 232, False), (64, 128, 2, 2, 240, True)],
              128: [(64, 128, 2, 2, 240, True), (64, 128, 2, 2, 240, False), (64, 64, 2, 1, 232, False)]}


def without_barriers(ptx: str) -> tuple[str, int]:
    """``ptx`` without the named ``bar.sync``s of 128 threads after the first register reallocation
    (``setmaxnreg.dec``, where the partitions begin: the ones before it follow the mbarriers'
    initialisation), and how many were removed. The warp-specialised region's own entry and exit
    (``barrier.sync``) stay."""
    lines = ptx.split("\n")
    start = next(i for i, line in enumerate(lines) if "setmaxnreg.dec" in line)
    kept = [line for i, line in enumerate(lines) if i <= start or not re.match(r"\s*bar\.sync\s+\d+, 128;", line)]
    return "\n".join(kept), len(lines) - len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=shape_argument, default=[(8, 16, 4096, 64), (4, 16, 4096, 128)],
                        help="B,H,T,D (D 64 or 128)")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--without-barriers", action="store_true",
                        help="also time each candidate with its consumers' bar.syncs removed (without_barriers)")
    parser.add_argument("--once", action="store_true",
                        help="run theria's forward and the Gluon forward (its default tile) three times each at the "
                             "first shape, without a mask, and nothing else: for a profiler, e.g. ncu -k "
                             "regex:_attn_fwd --launch-skip 2 --launch-count 1")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("needs a Hopper GPU (sm_90)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from theria_torch import sdpa_custom

    if args.once:
        batch, heads, seq, head_dim = args.shapes[0]
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for attend in (lambda: sdpa_custom(q, k, v), lambda: gluon_forward.forward(q, k, v)):
            for _ in range(3):
                attend()
        torch.cuda.synchronize()
        return

    print(f"# {torch.cuda.get_device_name()} checks: relative error of out (gluon, triton) vs float32, max |Δlse|")
    failures = 0
    for head_dim in (64, 128):
        for tile in CANDIDATES[head_dim]:
            for causal in (False, True):
                cases = (((2, 3, 256, head_dim), 3, False), ((1, 4, 389, head_dim), 2, False),
                         ((2, 2, 77, head_dim), 1, True))
                for (shape, heads_kv, flash_layout), persistent in itertools.product(cases, (True, False)):
                    batch, heads, seq, _ = shape
                    gluon_error, triton_error, lse, theria_lse = gluon_forward.against_theria(
                        batch, heads, heads_kv, seq, head_dim, causal, flash_layout, tile, seed=1,
                        persistent=persistent)
                    lse_error = (lse - theria_lse).abs().max().item()
                    good = gluon_error <= 2 * triton_error and lse_error < 1e-3  # tests/test_gluon_forward.py's rule
                    failures += not good
                    print(f"{'ok  ' if good else 'FAIL'} D{head_dim} {tile} {'P ' if persistent else ''}"
                          f"causal={causal} {shape} H_kv={heads_kv}: {'(B, T, H, D) ' if flash_layout else ''}"
                          f"{gluon_error:.2e} vs {triton_error:.2e}, lse {lse_error:.1e}", flush=True)
    if failures or args.check_only:
        raise SystemExit(f"{failures} checks failed" if failures else 0)

    print("# bfloat16, do_bench_cudagraph medians in ms (cudnn / this)")
    torch.manual_seed(0)
    for batch, heads, seq, head_dim in args.shapes:
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            def sdpa(backend):
                with sdpa_kernel(backend):
                    return do_bench_cudagraph(
                        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
            for _ in range(2):
                cudnn, flash = sdpa(SDPBackend.CUDNN_ATTENTION), sdpa(SDPBackend.FLASH_ATTENTION)
                triton_ms = do_bench_cudagraph(lambda: sdpa_custom(q, k, v, causal=causal))
                line = (f"B{batch} H{heads} T{seq} D{head_dim} causal={causal} cudnn {cudnn:.3f} flash {flash:.3f} "
                        f"({cudnn / flash:.3f}x) | triton {triton_ms:.3f} ({cudnn / triton_ms:.3f}x)")
                for tile in CANDIDATES[head_dim]:
                    for persistent in (False, True):
                        ms = do_bench_cudagraph(lambda: gluon_forward.forward(q, k, v, causal, tile=tile,
                                                                              persistent=persistent))
                        line += f" | gluon {tile}{' P' if persistent else ''} {ms:.3f} ({cudnn / ms:.3f}x)"
                    if args.without_barriers:
                        line += " | " + stripped_timing(q, k, v, causal, tile, cudnn, do_bench_cudagraph)
                print(line, flush=True)


def stripped_timing(q, k, v, causal, tile, cudnn, do_bench_cudagraph) -> str:
    """The persistent kernel of ``tile`` with its consumers' barriers removed (``without_barriers``),
    timed, after a check that its out and lse equal the kernel's bit for bit."""
    out, lse, compiled = gluon_forward.launch(q, k, v, causal, tile=tile)
    ptx, removed = without_barriers(compiled.asm["ptx"])
    path = Path(tempfile.mkdtemp()) / "stripped.ptx"
    path.write_text(ptx)
    stripped_out, stripped_lse, _ = gluon_forward.launch(q, k, v, causal, tile=tile, ir_override=str(path))
    if not (torch.equal(out, stripped_out) and torch.equal(lse, stripped_lse)):
        raise SystemExit(f"{tile}: the kernel without its barriers computes something else")
    ms = do_bench_cudagraph(lambda: gluon_forward.launch(q, k, v, causal, tile=tile, ir_override=str(path)))
    return f"{removed} bar.syncs removed {ms:.3f} ({cudnn / ms:.3f}x)"


if __name__ == "__main__":
    main()
