"""Benchmark theria's fused attention against torch SDPA's backends in one run (GPU only).

Modes (each a row per implementation: ms, TFLOP/s where meaningful, peak MB, and flash's,
cuDNN's and math's time over the row's: above 1 is faster than that backend):
  fwd       out = attention(q, k, v)
  fwd_bwd   forward + backward of <out, dO>
  jvp       torch.func.jvp of the forward (out and out_dot: for theria the forward, then the
            tangent kernel on its results)
  hvp       Hessian-vector product of <out, W> by reverse-over-reverse: forward, backward with
            create_graph, backward of <grads, t> (W is a constant: theria's double backward forms
            no cotangent for d_out = W); for theria also the double-backward kernel alone, with
            every output

    python scripts/bench_sdpa.py --preset large --dtype bfloat16 --mode fwd fwd_bwd
    python scripts/bench_sdpa.py --preset medium --mode hvp jvp --causal
    python scripts/bench_sdpa.py --preset tiny --mode fwd fwd_bwd hvp     # per-call wall time

Timing (``--timing``): ``wall`` is a user's eager time per call (a burst of back-to-back calls and
one sync, timed on the host; scripts/_timing.py), the default for the tiny preset, where the host
is the cost; ``events`` is ``triton.testing.do_bench`` (CUDA events around each call after an L2
clear: the device's time when the host keeps up, the default elsewhere); ``graph`` (or
``--graph``) times CUDA-graph replays, the device's time alone. Under ``events`` a host path
shorter than the L2-clearing kernel (a 256 MB write) overlaps it and does not show, so
``events`` must not be read as wall time at small shapes.

--varlen times theria alone, on equal total tokens: flash_attn_func on the padded B×T batch,
flash_attn_varlen_func on the same B·T tokens packed as B sequences of length T (the same work,
so any difference is the varlen overhead; the target is within 10 %), and packed as B sequences of
random lengths in [T/2, 3T/2) summing to B·T (TFLOP/s counts each sequence's own T_q·T_k). The
varlen API checks the cu_seqlens values with one host read per cu_seqlens tensor and version,
so only the first call syncs and eager timing of large shapes is fair (under --graph the check
is skipped during capture):

    python scripts/bench_sdpa.py --preset large --varlen --mode fwd fwd_bwd --causal
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from theria_kernels.attention import AttentionParams
from theria_kernels.attention.torch_launchers import (attention_backward, attention_backward_backward,
                                                       attention_forward)
from theria_torch import flash_attn_func, flash_attn_varlen_func, sdpa_custom

from _timing import median_wall_ms

PRESETS = {  # B, H, T, D
    "tiny": (64, 4, 256, 16),  # the MAML shape
    "small": (8, 16, 512, 64),
    "medium": (8, 16, 1024, 64),
    "large": (8, 16, 4096, 64),
    "large_d128": (4, 16, 4096, 128),
}
TORCH_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Nominal FLOPs in units of one forward (two T×T GEMMs): backward 2.5 (five GEMMs).
UNITS = {"fwd": 1.0, "fwd_bwd": 3.5}


def torch_sdpa(causal: bool):
    """torch SDPA; the backend is chosen around the measurement (``backend_of``), not per call, so
    its rows carry no context manager's host time."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                          enable_gqa=k.shape[1] != q.shape[1])


def backend_of(name: str):
    """The context an implementation runs in: torch's SDPA backend for its rows, nothing for theria's."""
    return sdpa_kernel(TORCH_BACKENDS[name]) if name in TORCH_BACKENDS else contextlib.nullcontext()


def theria(causal: bool, window_size: tuple[int, int]):
    return lambda q, k, v: sdpa_custom(q, k, v, causal=causal, window_size=window_size)


def random_lengths(batch: int, seq: int, seed: int = 0) -> list[int]:
    """``batch`` lengths drawn from [seq/2, 3·seq/2), adjusted to sum to batch·seq exactly."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + seq // 2, (batch,), generator=gen).tolist()
    lengths[-1] += batch * seq - sum(lengths)
    return lengths if lengths[-1] > 0 else [seq] * batch


def varlen_cases(causal: bool, window: tuple[int, int], batch: int, seq: int, device) -> dict:
    """{name: (attend, pack, lengths)} for --varlen: flash_attn_func on the padded (B, T, H, D)
    batch (``pack`` keeps it) and flash_attn_varlen_func on its B·T tokens packed (``pack``
    flattens B and T) as B sequences of length T and as B sequences of random lengths."""

    def packed(lengths):
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        attend = lambda q, k, v: flash_attn_varlen_func(  # noqa: E731
            q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, window_size=window)
        return attend, lambda t: t.flatten(0, 1), lengths

    return {
        "padded": (lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window_size=window), lambda t: t,
                   [seq] * batch),
        "varlen equal": packed([seq] * batch),
        "varlen random": packed(random_lengths(batch, seq)),
    }


def bench_varlen(args, q, k, v, timing: str):
    """Rows per mode: padded, varlen with equal lengths, varlen with random lengths (see the
    docstring); q, k, v are the (B, H, T, D) inputs of the other modes."""
    batch, heads, seq, head_dim = q.shape
    window = tuple(map(int, args.window.split(",")))
    fraction = 0.5 if args.causal else 1.0
    bthd = [t.detach().transpose(1, 2).contiguous() for t in (q, k, v)]
    # Cotangent and tangents drawn once, before any CUDA-graph capture has touched the generator.
    d_out_bthd, tangents_bthd = torch.randn_like(bthd[0]), [torch.randn_like(t) for t in bthd]
    print(f"{'mode':8s} {'impl':16s} {'ms':>9s} {'TFLOP/s':>8s} {'peak MB':>9s} {'vs padded':>9s}")
    for mode in args.mode:
        results = {}
        for name, (attend, pack, lengths) in varlen_cases(args.causal, window, batch, seq, q.device).items():
            inputs = [pack(t).requires_grad_() for t in bthd]
            d_out = pack(d_out_bthd)
            tangents = tuple(pack(t) for t in tangents_bthd)
            flops = 4 * heads * head_dim * sum(n * n for n in lengths) * fraction
            results[name] = (measure(workload(mode, attend, *inputs, d_out, tangents), timing), flops)
        padded = results["padded"][0]
        for name, (res, flops) in results.items():
            if isinstance(res, str):
                print(f"{mode:8s} {name:16s} {'error: ' + res}")
                continue
            ms, peak = res
            tflops = f"{UNITS[mode] * flops / ms / 1e9:8.1f}" if mode in UNITS else f"{'':8s}"
            ratio = f"{ms / padded[0]:8.3f}x" if isinstance(padded, tuple) else f"{'-':>9s}"
            print(f"{mode:8s} {name:16s} {ms:9.3f} {tflops} {peak:9.1f} {ratio}")


def workload(mode: str, attend, q, k, v, d_out, tangents):
    """A closure running one instance of ``mode`` through ``attend``."""
    if mode == "fwd":
        return lambda: attend(q, k, v)
    if mode == "fwd_bwd":
        return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), d_out)
    if mode == "jvp":
        primals = tuple(t.detach() for t in (q, k, v))
        return lambda: torch.func.jvp(attend, primals, tangents)
    if mode == "hvp":
        def hvp():
            grads = torch.autograd.grad(attend(q, k, v), (q, k, v), d_out, create_graph=True)
            return torch.autograd.grad(grads, (q, k, v), tangents)
        return hvp
    raise ValueError(mode)


def measure(fn, timing: str) -> tuple[float, float] | str:
    """(median ms, peak MB above what was allocated before), or the error's first line. ``timing``
    is ``wall``, ``events`` or ``graph`` (the module's docstring)."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if timing == "graph":
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        elif timing == "events":
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        else:
            ms = median_wall_ms(fn, lambda _: torch.cuda.synchronize(), reps=50, burst=10)
        return ms, peak
    except (RuntimeError, NotImplementedError) as err:  # unsupported derivative, out of memory
        torch.cuda.empty_cache()
        return str(err).strip().splitlines()[0][:60]


def print_kernels(mode: str, fn, calls: int = 5) -> None:
    """Device ms per call of ``fn`` by kernel name, largest first (torch.profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3 / calls
    print(f"# {mode}: theria's kernels, device ms per call (sum {sum(totals.values()):.3f})")
    for name, ms in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"#   {ms:8.3f}  {name[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="medium")
    parser.add_argument("--shape", help="B,H,T,D (overrides --preset)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--window", default="-1,-1",
                        help="LEFT,RIGHT sliding window for theria (torch SDPA has none: skip its rows)")
    parser.add_argument("--mode", nargs="+", choices=["fwd", "fwd_bwd", "jvp", "hvp"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out, e.g. math")
    parser.add_argument("--heads-kv", type=int, help="key/value heads (grouped-query); default: H")
    parser.add_argument("--timing", choices=["wall", "events", "graph"],
                        help="wall (per-call wall time), events (do_bench) or graph (CUDA-graph replays); "
                             "default: wall for the tiny preset, events otherwise")
    parser.add_argument("--graph", action="store_true", help="--timing graph")
    parser.add_argument("--kernels", action="store_true",
                        help="after each mode's table, theria's device time per call by kernel (torch.profiler)")
    parser.add_argument("--varlen", action="store_true",
                        help="theria only: flash_attn_varlen_func against the padded batch on equal total tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sdpa.py needs a CUDA GPU")
    tiny = args.preset == "tiny" and not args.shape
    timing = "graph" if args.graph else args.timing or ("wall" if tiny else "events")

    batch, heads, seq, head_dim = map(int, args.shape.split(",")) if args.shape else PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads_kv = args.heads_kv or heads
    q, k, v = (torch.randn(batch, h, seq, head_dim, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for h in (heads, heads_kv, heads_kv))
    d_out = torch.randn_like(q)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    forward_flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if args.causal else 1.0)
    window = tuple(map(int, args.window.split(",")))
    if args.varlen:
        print(f"# {torch.cuda.get_device_name()} B={batch} H={heads} H_kv={heads_kv} T={seq} D={head_dim} "
              f"{args.dtype} causal={args.causal} window={window} timing={timing}, "
              "varlen against padded")
        bench_varlen(args, q, k, v, timing)
        return
    impls = {"theria": theria(args.causal, window), **{n: torch_sdpa(args.causal) for n in TORCH_BACKENDS}}
    impls = {n: f for n, f in impls.items() if n not in args.skip}

    print(f"# {torch.cuda.get_device_name()} B={batch} H={heads} H_kv={heads_kv} T={seq} D={head_dim} {args.dtype} "
          f"causal={args.causal} window={window} timing={timing}")
    print(f"{'mode':8s} {'impl':16s} {'ms':>9s} {'TFLOP/s':>8s} {'peak MB':>9s} {'vs flash':>9s} {'vs cudnn':>9s} "
          f"{'vs math':>8s}")
    for mode in args.mode:
        results = {}
        for name, fn in impls.items():
            with backend_of(name):
                results[name] = measure(workload(mode, fn, q, k, v, d_out, tangents), timing)
        if mode == "hvp":
            params = AttentionParams(scale=1 / math.sqrt(head_dim), causal=args.causal, window_size=window)
            qd, kd, vd = (t.detach() for t in (q, k, v))
            out, lse = attention_forward(qd, kd, vd, params)
            dq = attention_backward(qd, kd, vd, out, lse, d_out, None, params)[0]  # as autograd passes it
            results["theria bwd_bwd"] = measure(
                lambda: attention_backward_backward(qd, kd, vd, out, lse, d_out, None, *tangents, params, dq=dq),
                timing)
        for name, res in results.items():
            if isinstance(res, str):
                print(f"{mode:8s} {name:16s} {'error: ' + res}")
                continue
            ms, peak = res
            tflops = f"{UNITS[mode] * forward_flops / ms / 1e9:8.1f}" if mode in UNITS else f"{'':8s}"
            ratios = []
            for ref in ("flash", "cudnn", "math"):
                other = results.get(ref)
                ratios.append(f"{other[0] / ms:8.2f}x" if isinstance(other, tuple) else f"{'-':>9s}")
            print(f"{mode:8s} {name:16s} {ms:9.3f} {tflops} {peak:9.1f} {' '.join(ratios)}")
        if args.kernels and "theria" in impls:
            print_kernels(mode, workload(mode, impls["theria"], q, k, v, d_out, tangents))


if __name__ == "__main__":
    main()
