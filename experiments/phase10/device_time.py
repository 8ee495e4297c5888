"""GPU: one torch full-MAML meta-step, eager and as a CUDA-graph replay, fused vs reference.

The backend is the model's (``theria_torch.models``): attention and rmsnorm run on the fused
kernels ("triton_full_fused") or on plain torch ("reference"). The eager time includes the host's
work (Python, torch.func's transform layers, the autograd Functions, kernel launches); the graph
replay time is the device's work alone, which is what the backend changes. Both are medians
from triton.testing (do_bench, do_bench_cudagraph).

    python experiments/phase10/device_time.py                      # the three configurations below
    python experiments/phase10/device_time.py --seq-len 1024 --d-model 512 --heads 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.phase10.frameworks import MetaSetup, make_learner  # noqa: E402
from theria_torch.models import ModelConfig, init_params  # noqa: E402
from theria_torch.tasks import SequenceClassification, sample_meta_batch  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    configurations = ([(args.d_model, args.heads, args.tasks, args.k)] if args.d_model else CONFIGURATIONS)
    print(f"# {torch.cuda.get_device_name()} full MAML, 1 inner step, T={args.seq_len}, {args.layers} layers, "
          f"{args.dtype}")
    print("| d_model | heads | tasks × seqs | reference eager ms | fused eager ms | reference graph ms | "
          "fused graph ms | speed-up eager | speed-up graph |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d_model, heads, tasks, k in configurations:
        ref = meta_step_ms("reference", args.seq_len, d_model, heads, tasks, k, args.layers, args.dtype)
        fused = meta_step_ms("triton_full_fused", args.seq_len, d_model, heads, tasks, k, args.layers, args.dtype)
        print(f"| {d_model} | {heads} | {tasks} × {k} | {ref[0]:.1f} | {fused[0]:.1f} | {ref[1]:.2f} | "
              f"{fused[1]:.2f} | {ref[0] / fused[0]:.2f}× | {ref[1] / fused[1]:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
