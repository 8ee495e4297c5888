"""Benchmark theria's fused RMSNorm against torch.nn.functional.rms_norm and a copy (GPU only).

RMSNorm is memory-bound, so every row reports bandwidth: bytes the op must read and write
(inputs once, outputs once; the per-program dweight partials count against us), divided by the
median time, and that as a percentage of the bandwidth of a device-to-device copy that moves the
same number of bytes, measured in the same run. Equal bytes matter on a GPU whose L2 holds a
good part of the traffic (50 MB on an H100): a copy of x alone (2 × 16 MB at the default shape)
runs largely from L2 and is far faster per byte than the 84 MB of forward + backward, which
stream from HBM. The copy of x is printed too.
Each row is timed twice: ``eager`` (triton.testing.do_bench: Python and autograd overhead
included when they outrun the GPU) and ``graph`` (do_bench_cudagraph: the kernels alone). The
target is graph fwd+bwd ≥ 80 % of the copy's bandwidth on an H100.

    python scripts/bench_rmsnorm.py                        # (2, 1024, 4096) bfloat16
    python scripts/bench_rmsnorm.py --shape 8,512,8192 --dtype float16
    python scripts/bench_rmsnorm.py --sweep                # launch shapes for the kernels alone
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton.testing

from theria_kernels.rmsnorm import DEFAULT_TUNING, SweepTuning
from theria_kernels.rmsnorm.torch_launchers import rmsnorm_backward, rmsnorm_forward
from theria_torch.rmsnorm import rmsnorm

EPS = 1e-6


@dataclass(frozen=True)
class Traffic:
    """Bytes each workload must move, from the shape and dtype alone."""

    rows: int
    n_cols: int
    itemsize: int

    @property
    def activation(self) -> int:  # one tensor shaped like x
        return self.rows * self.n_cols * self.itemsize

    @property
    def weight(self) -> int:
        return self.n_cols * self.itemsize

    @property
    def rstd(self) -> int:
        return self.rows * 4

    def forward(self) -> int:  # read x, w; write y, rstd
        return 2 * self.activation + self.weight + self.rstd

    def backward(self) -> int:  # read x, w, rstd, dy; write dx, dweight
        return 3 * self.activation + 2 * self.weight + self.rstd

    def copy(self) -> int:
        return 2 * self.activation


def timed(fn) -> tuple[float, float]:
    """(eager ms, CUDA-graph ms), medians; the graph time is NaN if capture fails."""
    fn()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    except RuntimeError as err:
        print(f"# CUDA-graph capture failed ({str(err).splitlines()[0][:80]}); using eager time")
        graph = math.nan
    return eager, graph


def best_ms(times: tuple[float, float]) -> float:
    eager, graph = times
    return eager if math.isnan(graph) else graph


@functools.cache
def copy_bandwidth(nbytes: int, device) -> float:
    """GB/s of a copy that reads and writes ``nbytes`` in total (CUDA-graph timed); measured once
    per byte count, since the theria and torch rows of a workload share it."""
    source = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return nbytes / best_ms(timed(lambda: target.copy_(source))) / 1e6


def report(name: str, times: tuple[float, float], nbytes: int, peer=None) -> None:
    gbs = nbytes / best_ms(times) / 1e6
    copy_gbs = copy_bandwidth(nbytes, "cuda")
    versus = f"{best_ms(peer) / best_ms(times):6.2f}x" if peer else f"{'':7s}"
    print(f"{name:34s} {times[0]:9.4f} {times[1]:9.4f} {gbs:9.0f} {copy_gbs:9.0f} {100 * gbs / copy_gbs:7.1f}% "
          f"{versus}")


def sweep(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, traffic: Traffic) -> None:
    """Kernels alone (graph time) over launch shapes: the forward over ``row_local`` shapes, the
    backward over ``reducing`` ones; the best of each is what DEFAULT_TUNING should hold for this
    shape and device."""
    _, rstd = rmsnorm_forward(x, weight, EPS)
    kernels = {
        "forward": ("row_local", traffic.forward(), lambda tuning: rmsnorm_forward(x, weight, EPS, tuning=tuning),
                    itertools.product((2048, 4096, 8192), (8, 16, 32), (0,), (1,))),
        "backward": ("reducing", traffic.backward(),
                     lambda tuning: rmsnorm_backward(x, weight, rstd, dy, tuning=tuning),
                     itertools.product((4096, 8192, 16384), (16, 32), (1, 2), (1, 3, 4))),
    }
    for kernel, (field, nbytes, run, shapes) in kernels.items():
        copy_gbs = copy_bandwidth(nbytes, str(x.device))
        print(f"\n{kernel:9s} {'tile_elements':>13s} {'el/thread':>9s} {'prog/SM':>7s} {'stages':>6s} "
              f"{'GB/s':>9s} {'%copy':>6s}")
        best = (0.0, None)
        for shape in shapes:
            tuning = dataclasses.replace(DEFAULT_TUNING, **{field: SweepTuning(*shape)})
            gbs = nbytes / triton.testing.do_bench_cudagraph(lambda: run(tuning), rep=100) / 1e6
            print(f"{kernel:9s} {shape[0]:13d} {shape[1]:9d} {shape[2]:7d} {shape[3]:6d} {gbs:9.0f} "
                  f"{100 * gbs / copy_gbs:5.1f}%")
            best = max(best, (gbs, shape), key=lambda b: b[0])
        print(f"best {kernel}: {best[0]:.0f} GB/s ({100 * best[0] / copy_gbs:.1f}% of copy) with "
              f"{field}=SweepTuning{best[1]}")
    print(f"default: {DEFAULT_TUNING}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,1024,4096", help="leading dims and N, comma-separated")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also sweep the launch shapes (RMSNormTuning) for the kernels alone")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_rmsnorm.py needs a CUDA GPU")

    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    weight = (1.0 + 0.1 * torch.randn(shape[-1], device="cuda", dtype=dtype, generator=gen)).requires_grad_()
    dy = torch.randn_like(x)
    traffic = Traffic(math.prod(shape[:-1]), shape[-1], x.element_size())

    copy_out = torch.empty_like(x)
    copy_times = timed(lambda: copy_out.copy_(x.detach()))

    xd, wd = x.detach(), weight.detach()
    _, rstd = rmsnorm_forward(xd, wd, EPS)
    rows = {
        "forward": {
            "theria": lambda: rmsnorm(xd, wd, EPS),
            "torch F.rms_norm": lambda: F.rms_norm(xd, shape[-1:], wd, EPS),
        },
        "fwd+bwd (autograd)": {
            "theria": lambda: torch.autograd.grad(rmsnorm(x, weight, EPS), (x, weight), dy),
            "torch F.rms_norm": lambda: torch.autograd.grad(F.rms_norm(x, shape[-1:], weight, EPS), (x, weight), dy),
        },
        "backward kernel": {"theria": lambda: rmsnorm_backward(xd, wd, rstd, dy)},
    }
    nbytes = {"forward": traffic.forward(), "fwd+bwd (autograd)": traffic.forward() + traffic.backward(),
              "backward kernel": traffic.backward()}

    print(f"# {torch.cuda.get_device_name()} shape={shape} {args.dtype} eps={EPS}")
    print(f"{'workload':34s} {'eager ms':>9s} {'graph ms':>9s} {'GB/s':>9s} {'copy GB/s':>9s} {'%copy':>8s} "
          f"{'vs torch':>7s}")
    report("copy x", copy_times, traffic.copy())
    for workload, impls in rows.items():
        results = {name: timed(fn) for name, fn in impls.items()}
        peer = results.get("torch F.rms_norm")
        for name, times in results.items():
            report(f"{workload}: {name}", times, nbytes[workload], peer if name == "theria" else None)
    if args.sweep:
        sweep(xd, wd, dy, traffic)


if __name__ == "__main__":
    main()
