"""GPU: where a full-MAML meta-gradient's device time goes, per framework and backend.

For each framework (torch eager, JAX jitted) and backend (the math reference, the fused kernels)
it profiles a few meta-gradients at the t1024 configuration (d_model 256, 8 heads, 2 layers, T =
1024, 8 tasks × 8 sequences, bfloat16) and sums the device time of every kernel by kind: theria's
attention kernels, theria's rmsnorm kernels, matrix products (cuBLAS / cuDNN / CUTLASS / XLA's
GEMMs) and the rest (elementwise, reductions, copies). It prints the per-meta-gradient totals and
the bound they put on the fused backend's speed-up over the reference: with the attention kernels
taking no time at all, the fused meta-gradient still costs its other kernels.

    python experiments/phase10/breakdown.py                   # both frameworks, both backends
    python experiments/phase10/breakdown.py --frameworks jax --top 20

torch is timed through ``torch.profiler`` (CUPTI), JAX through ``jax.profiler.trace``'s Perfetto
trace (the kernels on its GPU streams); CUPTI takes one subscriber a process, so each framework
runs in a process of its own. Beside the kernel sums it prints the median wall time of one
synchronised call: for JAX's jitted step a little above its kernels (the gaps between them), for
torch's eager one mostly the host's work (docs/results/device_time.md replays it as a CUDA graph).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.phase10.frameworks import MetaSetup, make_learner  # noqa: E402
from theria_kernels._models import ModelConfig, init_params  # noqa: E402
from theria_kernels._tasks import SequenceClassification, sample_meta_batch  # noqa: E402

# Triton names a kernel after its function: theria's attention kernels all start with _attn_;
# rmsnorm's are the functions of kernels/rmsnorm/_kernels.py.
RMSNORM_KERNELS = ("_forward_kernel", "_backward_kernel", "_double_backward_kernel", "_forward_second_kernel",
                   "_column_sum_kernel")
# cuBLAS on Hopper names its kernels nvjet_*; XLA calls it for its dots too.
GEMM_MARKS = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "cudnn", "wgmma", "matmul")
KINDS = ("attention", "rmsnorm", "gemm", "rest")


def kind_of(name: str) -> str:
    lowered = name.lower()
    if "_attn_" in lowered:
        return "attention"
    if any(lowered.startswith(kernel) for kernel in RMSNORM_KERNELS):
        return "rmsnorm"
    if any(mark in lowered for mark in GEMM_MARKS):
        return "gemm"
    return "rest"


def learner_and_batch(framework: str, backend: str, args):
    family = SequenceClassification(vocab_size=32, seq_len=args.seq_len, n_classes=4,
                                    n_signal=max(1, args.seq_len // 64))
    config = ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=args.seq_len, d_model=args.d_model,
                         n_heads=args.heads, n_layers=args.layers, causal=True)
    setup = MetaSetup(family=family, model=config, inner_lr=0.1, inner_steps=1, outer_lr=0.0, dtype=args.dtype,
                      device="cuda")
    learner = make_learner(framework, setup, init_params(config, 0), backend=backend, method="maml")
    batch = learner.convert(sample_meta_batch(family, np.random.default_rng(1), args.tasks, args.k, args.k))
    return learner, batch


def wall_ms(step, calls: int) -> float:
    """Median wall time of one call, each call synchronised (step blocks until done)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def torch_kernels(step, calls: int) -> dict[str, float]:
    """Device µs by kernel name over ``calls`` steps (torch.profiler, CUDA activity)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.time_range.elapsed_us()
    return totals


def jax_kernels(step, calls: int) -> dict[str, float]:
    """Device µs by kernel name over ``calls`` steps, from the GPU streams of jax.profiler's
    Perfetto trace."""
    import jax

    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(calls):
                step()
        traces = sorted(Path(log_dir).rglob("*perfetto_trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace under {log_dir}")
        with gzip.open(traces[0], "rt") as handle:
            trace = json.load(handle)
    return gpu_stream_kernels(trace["traceEvents"] if isinstance(trace, dict) else trace)


def gpu_stream_kernels(events: list[dict]) -> dict[str, float]:
    """µs by kernel name of a Chrome/Perfetto trace's complete events on a GPU device's "Stream #N"
    lines. XLA's derived lines on the same device (its modules, its ops) repeat the same time and
    are left out."""
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals = collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        where = process.get(event["pid"], "")
        line = thread.get((event["pid"], event["tid"]), "")
        if "GPU" in where and line.startswith("Stream"):
            totals[event["name"]] += float(event.get("dur", 0.0))
    if not totals:
        lines = sorted({f"{process.get(p, p)} / {name}" for (p, _), name in thread.items()})
        raise RuntimeError("no kernel events on a GPU stream line; the trace's lines: " + "; ".join(lines[:40]))
    return totals


def measure(framework: str, backend: str, args) -> dict:
    learner, batch = learner_and_batch(framework, backend, args)

    def step():
        result = learner.meta_gradient(batch)  # JAX's blocks until ready; torch's is then synchronised
        learner.synchronize()
        return result

    for _ in range(3):  # compile, autotune, allocate
        step()
    wall = wall_ms(step, args.calls)
    totals = (torch_kernels if framework == "torch" else jax_kernels)(step, args.calls)
    per_step = {name: us / 1e3 / args.calls for name, us in totals.items()}
    by_kind = dict.fromkeys(KINDS, 0.0)
    for name, ms in per_step.items():
        by_kind[kind_of(name)] += ms
    return dict(framework=framework, backend=backend, wall=wall, kinds=by_kind, kernels=per_step)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="sequences per support and per query set")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="list this many kernels by device time per run")
    args = parser.parse_args(argv)
    if len(args.frameworks) > 1:  # one process per framework (CUPTI); the last --frameworks given wins
        for framework in args.frameworks:
            given = sys.argv[1:] if argv is None else list(argv)
            subprocess.run([sys.executable, __file__, *given, "--frameworks", framework], check=True)
        return

    print(f"# full MAML, 1 inner step, T={args.seq_len}, d_model {args.d_model}, {args.heads} heads, "
          f"{args.layers} layers, {args.tasks} × {args.k} tasks × seqs, {args.dtype}; ms per meta-gradient")
    print(f"{'framework':9} {'backend':18} {'wall':>8} {'kernels':>8} " + " ".join(f"{k:>9}" for k in KINDS))
    runs = []
    for framework in args.frameworks:
        for backend in ("reference", "triton_full_fused"):
            run = measure(framework, backend, args)
            runs.append(run)
            kinds = run["kinds"]
            print(f"{framework:9} {backend:18} {run['wall']:8.2f} {sum(kinds.values()):8.2f} "
                  + " ".join(f"{kinds[k]:9.2f}" for k in KINDS), flush=True)
    for run in runs:
        print(f"\n## {run['framework']} {run['backend']}: top {args.top} kernels (ms per meta-gradient, kind)")
        for name, ms in sorted(run["kernels"].items(), key=lambda item: -item[1])[:args.top]:
            print(f"{ms:8.3f}  {kind_of(name):9}  {name[:110]}")
    print()
    for framework in args.frameworks:
        reference = next(r for r in runs if r["framework"] == framework and r["backend"] == "reference")
        fused = next(r for r in runs if r["framework"] == framework and r["backend"] == "triton_full_fused")
        others = sum(fused["kinds"].values()) - fused["kinds"]["attention"]
        print(f"{framework}: reference / fused wall {reference['wall'] / fused['wall']:.2f}×; fused kernels other "
              f"than attention {others:.2f} ms, so with attention free the speed-up is at most "
              f"{sum(reference['kinds'].values()) / others:.2f}× (kernel sums) / "
              f"{reference['wall'] / (fused['wall'] - fused['kinds']['attention']):.2f}× (wall)")


if __name__ == "__main__":
    main()
