"""GPU: one torch full-MAML meta-step, eager and as a CUDA-graph replay, fused vs reference.

The backend is the model's (``theria_torch.models``): attention and rmsnorm run on the fused
kernels ("triton_full_fused") or on plain torch ("reference"). The eager time includes the host's
work (Python, torch.func's transform layers, the autograd Functions, kernel launches); the graph
replay time is the device's work alone, which is what the backend changes. Both are medians
from triton.testing (do_bench, do_bench_cudagraph).

    python experiments/phase10/device_time.py --out /tmp/device_time   # every configuration below
    python experiments/phase10/device_time.py --seq-len 1024 --d-model 512 --heads 8

With ``--out`` it also writes the table (``device_time.md``) and a bar plot of both backends'
times per configuration, eager and replayed, with the speed-ups (``device_time.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the GPU machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.phase10.frameworks import MetaSetup, make_learner  # noqa: E402
from theria_kernels._models import ModelConfig, init_params  # noqa: E402
from theria_kernels._tasks import SequenceClassification, sample_meta_batch  # noqa: E402

# (d_model, heads, tasks, sequences per support/query set)
CONFIGURATIONS = [(256, 4, 4, 4), (512, 8, 4, 4), (256, 4, 8, 8), (256, 8, 8, 8), (512, 8, 8, 8)]


def meta_step_ms(backend: str, seq_len: int, d_model: int, heads: int, tasks: int, k: int, layers: int,
                 dtype: str) -> tuple[float, float]:
    """(eager ms, CUDA-graph ms) of one meta-gradient."""
    family = SequenceClassification(vocab_size=32, seq_len=seq_len, n_classes=4, n_signal=max(1, seq_len // 64))
    config = ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=seq_len, d_model=d_model,
                         n_heads=heads, n_layers=layers, causal=True)
    setup = MetaSetup(family=family, model=config, inner_lr=0.1, inner_steps=1, outer_lr=0.0, dtype=dtype,
                      device="cuda")
    learner = make_learner("torch", setup, init_params(config, 0), backend=backend, method="maml")
    batch = learner.convert(sample_meta_batch(family, np.random.default_rng(1), tasks, k, k))

    def step():
        return learner.meta_gradient(batch)

    eager = triton.testing.do_bench(step, warmup=3, rep=300, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(step, rep=300, return_mode="median")
    return eager, graph


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars per configuration: reference and fused, eager and CUDA-graph replay (log
    scale), each fused bar labelled with its speed-up over the reference in the same timing."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bars = [("reference", "eager", "C0", 0.45), ("fused", "eager", "C1", 0.45),
            ("reference", "graph", "C0", 1.0), ("fused", "graph", "C1", 1.0)]
    width = 0.8 / len(bars)
    for i, (backend, timing, colour, alpha) in enumerate(bars):
        xs = np.arange(len(rows)) + (i - (len(bars) - 1) / 2) * width
        ms = [row[f"{backend}_{timing}_ms"] for row in rows]
        ax.bar(xs, ms, width, color=colour, alpha=alpha, label=f"{backend}, {timing}")
        if backend == "fused":
            for x, y, row in zip(xs, ms, rows):
                speed_up = row[f"reference_{timing}_ms"] / y
                ax.annotate(f"{speed_up:.1f}×", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [f"d{r['d_model']} h{r['heads']}\n{r['tasks']}×{r['k']} tasks×seqs" for r in rows],
                  fontsize=8)
    ax.set(yscale="log", ylabel="ms per full-MAML meta-gradient (median)", title=title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, help="folder for device_time.md and device_time.png")
    args = parser.parse_args()
    configurations = ([(args.d_model, args.heads, args.tasks, args.k)] if args.d_model else CONFIGURATIONS)
    title = (f"{torch.cuda.get_device_name()} full MAML, 1 inner step, T={args.seq_len}, {args.layers} layers, "
             f"{args.dtype}")
    lines = [f"# {title}",
             "| d_model | heads | tasks × seqs | reference eager ms | fused eager ms | reference graph ms | "
             "fused graph ms | speed-up eager | speed-up graph |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    rows = []
    for d_model, heads, tasks, k in configurations:
        ref = meta_step_ms("reference", args.seq_len, d_model, heads, tasks, k, args.layers, args.dtype)
        fused = meta_step_ms("triton_full_fused", args.seq_len, d_model, heads, tasks, k, args.layers, args.dtype)
        rows.append(dict(d_model=d_model, heads=heads, tasks=tasks, k=k, reference_eager_ms=ref[0],
                         fused_eager_ms=fused[0], reference_graph_ms=ref[1], fused_graph_ms=fused[1]))
        lines.append(f"| {d_model} | {heads} | {tasks} × {k} | {ref[0]:.1f} | {fused[0]:.1f} | {ref[1]:.2f} | "
                     f"{fused[1]:.2f} | {ref[0] / fused[0]:.2f}× | {ref[1] / fused[1]:.2f}× |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device_time.md").write_text("\n".join(lines) + "\n")
        plot(rows, title, args.out / "device_time.png")


if __name__ == "__main__":
    main()
