"""theria's forward with one tile a query block against the two halves of ``_tuning.FORWARD_HALVES``
(docs/design/attention.md), alternating in one process, beside torch SDPA's cuDNN backend.

For each shape (by default the anchors B8 H16 T4096 D64 and B4 H16 T4096 D128; bf16; head dims
64 and 128) and mask (none, causal) it times, twice in turn: one tile a block on the tile sm_90's
table had before the halves, and the halves on each candidate tile; every configuration is checked
against float32 attention first. Times are ``do_bench_cudagraph`` medians (the device's time), each
with cuDNN's time over its own. Needs a Hopper GPU (the candidates are sm_90 table entries).

    python scripts/ab_forward_halves.py
    python scripts/ab_forward_halves.py --shapes 8,16,1024,64      # a small shape
    python scripts/ab_forward_halves.py --halves 128:256,64,8,2     # other halves tiles at D128
    python scripts/ab_forward_halves.py --window 255,0              # a sliding window for the masks

Under ``--window`` the masks are that window (without cuDNN, which has none) and that window with
the causal mask, both banded calls (the entries banded calls read are the ones set).
"""

from __future__ import annotations

import argparse

import torch


def shape_argument(text: str) -> tuple[int, int, int, int]:
    """``--shapes``' B,H,T,D (D 64 or 128, the head dims sm_90's halves were built for); also
    scripts/ab_backward_halves.py's."""
    shape = tuple(int(x) for x in text.split(","))
    if len(shape) != 4 or shape[3] not in (64, 128):
        raise argparse.ArgumentTypeError(f"a shape is B,H,T,D with D 64 or 128, got {text!r}")
    return shape


def halves_argument(text: str) -> tuple[int, tuple[int, int, int, int]]:
    """``--halves``' D:BLOCK_M,BLOCK_N,warps,stages, a tile the halves run on at head dim D."""
    head_dim, _, tile = text.partition(":")
    try:
        result = int(head_dim), tuple(int(x) for x in tile.split(","))
    except ValueError:
        result = None
    if result is None or result[0] not in (64, 128) or len(result[1]) != 4:
        raise argparse.ArgumentTypeError(f"a halves tile is D:BLOCK_M,BLOCK_N,warps,stages with D 64 or 128, "
                                         f"got {text!r}")
    return result


def window_argument(text: str) -> tuple[int, int]:
    """``--window``' LEFT,RIGHT, flash-attn's window_size (-1: unbounded on that side)."""
    try:
        window = tuple(int(x) for x in text.split(","))
    except ValueError:
        window = ()
    if len(window) != 2 or min(window) < -1:
        raise argparse.ArgumentTypeError(f"a window is LEFT,RIGHT with each -1 or more, got {text!r}")
    return window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=shape_argument, default=[(8, 16, 4096, 64), (4, 16, 4096, 128)],
                        help="B,H,T,D (D 64 or 128)")
    parser.add_argument("--halves", nargs="+", type=halves_argument, default=[],
                        help="D:BLOCK_M,BLOCK_N,warps,stages: the halves on these tiles instead of the default ones "
                             "at head dim D")
    parser.add_argument("--window", type=window_argument, default=None,
                        help="LEFT,RIGHT: time this sliding window (flash-attn's meaning) instead of no mask")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from tune_attention import with_tile

    from theria_kernels.attention import _tuning, torch_launchers
    from theria_torch import sdpa_custom
    from theria_torch.reference import visible_keys

    one_tile = {64: (128, 64, 4, 3), 128: (128, 128, 8, 3)}
    halves = {64: [(128, 128, 4, 2), (128, 64, 4, 3)], 128: [(128, 64, 4, 2), (128, 64, 4, 3)]}
    for head_dim in {head_dim for head_dim, _ in args.halves}:
        halves[head_dim] = [tile for dim, tile in args.halves if dim == head_dim]

    def schedule(head_dim, banded, tile, two_halves):
        """``tile`` in the sm_90 entries a call of this head dim and mask class reads, on one schedule:
        its class's and the short sweeps' (``with_tile`` writes one class at a time), so that a short
        shape or a narrow window runs on the tile named too."""
        for short in (False, True):
            with_tile("forward", head_dim, "bfloat16", 90, tile, banded, short)
        _tuning.HALVES_OVERRIDE = two_halves
        torch_launchers.clear_plans()  # plans are cached with the tile and schedule they were built with

    def expected_and_cudnn(q, k, v, causal):
        """Float32 attention under the mask, and cuDNN's time for it (None under a window)."""
        if args.window is None:
            expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                        is_causal=causal)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return expected, do_bench_cudagraph(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
        allowed = visible_keys(q.shape[2], k.shape[2], causal=causal, window_size=args.window, device="cuda")
        return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                attn_mask=allowed), None

    print(f"# {torch.cuda.get_device_name()} bfloat16, do_bench_cudagraph medians in ms (cudnn/this, relative error)")
    torch.manual_seed(0)
    window = (-1, -1) if args.window is None else args.window
    for batch, heads, seq, head_dim in args.shapes:
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            expected, cudnn = expected_and_cudnn(q, k, v, causal)
            banded = causal or window != (-1, -1)
            line = (f"B{batch} H{heads} T{seq} D{head_dim} causal={causal} window={window} cudnn "
                    + ("-" if cudnn is None else f"{cudnn:.3f}"))
            for _ in range(2):
                for name, tile, two_halves in [("one tile", one_tile[head_dim], False)] + [
                        ("halves", tile, True) for tile in halves[head_dim]]:
                    schedule(head_dim, banded, tile, two_halves)
                    call = lambda: sdpa_custom(q, k, v, causal=causal, window_size=window)  # noqa: E731
                    error = ((call().float() - expected).norm() / expected.norm()).item()
                    if not error < 2e-2:
                        raise SystemExit(f"{name} {tile}: relative error {error:.1e} against float32 attention")
                    ms = do_bench_cudagraph(call)
                    ratio = "" if cudnn is None else f"{cudnn / ms:.3f}x, "
                    line += f" | {name} {tile} {ms:.3f} ({ratio}{error:.1e})"
            print(line, flush=True)

if __name__ == "__main__":
    main()
