"""theria's backward with one tile a query block in its dK/dV sweep against the block as two
halves (``_sweeps._column_tile``'s HALVES; ``_tuning.BACKWARD_COLUMNS_HALVES``: where the table
takes them), alternating in one process, beside torch SDPA's cuDNN backend.

For each shape (by default the anchors B8 H16 T4096 D64 and B4 H16 T4096 D128; bf16) and mask
(none, causal) it times, twice in turn, forward + backward with one tile a block on sm_90's table
tile and with the dK/dV sweep in halves on that tile and on candidate tiles; then issue #20's
second-order pipeline (forward, backward with create_graph, double backward of <grads, w> for a
fixed w), whose backward is the same sweep, both ways. Each configuration's gradients are checked
first: the first-order ones against float32 attention, the HVPs against the one-tile pipeline's.
Times are ``do_bench_cudagraph`` medians (the device's time), each first-order one with cuDNN's time
over its own. Needs a Hopper GPU (the candidates are sm_90 table entries).

    python scripts/ab_backward_halves.py
    python scripts/ab_backward_halves.py --shapes 8,16,1024,64      # a small shape
"""

from __future__ import annotations

import argparse

import torch

from ab_forward_halves import shape_argument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=shape_argument, default=[(8, 16, 4096, 64), (4, 16, 4096, 128)],
                        help="B,H,T,D (D 64 or 128)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from tune_attention import with_tile

    from theria_kernels.attention import _tuning, torch_launchers
    from theria_torch import sdpa_custom

    table = {head_dim: _tuning.tile(90, "backward", head_dim, "bfloat16") for head_dim in (64, 128)}
    candidates = {64: [(128, 64, 8, 2), (128, 64, 4, 2)], 128: [(128, 64, 8, 2), (128, 32, 8, 2)]}

    def schedule(head_dim, tile, halves):
        """``tile`` in the sm_90 backward entry of this head dim (both mask classes), the dK/dV
        sweep in ``halves`` or one tile a block."""
        for banded in (False, True):
            with_tile("backward", head_dim, "bfloat16", 90, tile, banded)
        _tuning.HALVES_OVERRIDE = None
        entries = frozenset({(head_dim, 2, False), (head_dim, 2, True)})
        _tuning.BACKWARD_COLUMNS_HALVES[90] = entries if halves else frozenset()
        torch_launchers.clear_plans()  # plans are cached with the tile and schedule they were built with

    def fwd_bwd(attend, q, k, v, d_out):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(attend(*leaves), leaves, d_out)

    def pipeline(attend, q, k, v, d_out, w):
        """The HVP of bench_sdpa.py's hvp mode: grads with create_graph, then the gradient of <grads, w>."""
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(attend(*leaves), leaves, d_out, create_graph=True)
        return torch.autograd.grad(grads, leaves, w)

    print(f"# {torch.cuda.get_device_name()} bfloat16, forward + backward, do_bench_cudagraph medians in ms "
          "(cudnn/this, worst relative error of dq, dk, dv)")
    torch.manual_seed(0)
    for batch, heads, seq, head_dim in args.shapes:
        q, k, v, d_out = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
                          for _ in range(4))
        for causal in (False, True):
            def sdpa(q, k, v):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

            expected = fwd_bwd(sdpa, q.float(), k.float(), v.float(), d_out.float())
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = do_bench_cudagraph(lambda: fwd_bwd(sdpa, q, k, v, d_out))
            line = f"B{batch} H{heads} T{seq} D{head_dim} causal={causal} cudnn {cudnn:.3f}"
            runs = [("one tile", table[head_dim], False), ("halves", table[head_dim], True)]
            runs += [("halves", tile, True) for tile in candidates[head_dim]]

            def attend(q, k, v):
                return sdpa_custom(q, k, v, causal=causal)

            for _ in range(2):
                for name, tile, halves in runs:
                    schedule(head_dim, tile, halves)
                    got = fwd_bwd(attend, q, k, v, d_out)
                    error = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, expected))
                    if not error < 2e-2:
                        raise SystemExit(f"{name} {tile}: relative error {error:.1e} against float32 attention")
                    ms = do_bench_cudagraph(lambda: fwd_bwd(attend, q, k, v, d_out))
                    line += f" | {name} {tile} {ms:.3f} ({cudnn / ms:.3f}x, {error:.1e})"
            print(line, flush=True)
            # Math attention's second order would need tens of GB here: the halves are checked
            # against the one-tile pipeline's HVP (their numerics against float64 are the tests').
            w = tuple(torch.randn_like(x) for x in (q, k, v))
            line = f"  second-order pipeline, B{batch} H{heads} T{seq} D{head_dim} causal={causal}"
            expected = None
            for _ in range(2):
                for name, halves in (("one tile", False), ("dK/dV sweep in halves", True)):
                    schedule(head_dim, table[head_dim], halves)
                    got = [x.float() for x in pipeline(attend, q, k, v, d_out, w)]
                    expected = got if expected is None else expected
                    error = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, expected))
                    if not error < 2e-2:
                        raise SystemExit(f"pipeline, {name}: relative difference {error:.1e} from one tile's")
                    ms = do_bench_cudagraph(lambda: pipeline(attend, q, k, v, d_out, w))
                    line += f" | {name} {ms:.3f} ({error:.1e})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
