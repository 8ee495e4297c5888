"""GPU benchmark: one full-MAML meta-step at long sequence lengths, fused backend vs reference.

One command (on the GPU machine, from the repository root)::

    python experiments/phase10/long_context.py --out /tmp/long_context

For each framework (torch, JAX), sequence length (default 1024 and 4096) and backend it times a
full-MAML meta-gradient (second order through the inner step) on a sequence-classification
meta-batch, median of ``--repeats`` after ``--warmup``, and records the peak device memory.
Each measurement runs in its own process, so peak memory is per measurement and an
out-of-memory reference does not disturb the rest. At the lengths in ``--check-lens`` (default
1024) the meta-gradients are also compared with a float64 reference-backend one:
the fused error must be at most ``max(2 × the reference backend's own error in the same dtype,
--tol)`` (the flash-attention criterion; ``--tol`` defaults to DESIGN.md's 5e-3 for float32 with
TF32, 2e-2 for bfloat16).

Writes ``long_context.csv``, ``long_context.json``, ``long_context.md`` (the table) and
``long_context.png`` into ``--out``. Exit status 1 when a check fails or the fused backend fails
to run at any length (the reference running out of memory at 4096 is reported, not a failure).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("reference", "triton_full_fused")
DEFAULT_TOL = {"float32": 5e-3, "bfloat16": 2e-2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--check-lens", type=int, nargs="*", default=[1024],
                        help="lengths at which meta-gradients are checked against float64")
    parser.add_argument("--frameworks", nargs="+", choices=["torch", "jax"], default=["torch", "jax"])
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOL), default="float32")
    parser.add_argument("--tol", type=float)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="support and query sequences per task")
    parser.add_argument("--inner_lr", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu only to try the script at tiny sizes (kernels interpreted)")
    parser.add_argument("--one", nargs=4, metavar=("FRAMEWORK", "BACKEND", "SEQ_LEN", "DTYPE"),
                        help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    return parser.parse_args(argv)


def measure_one(args, framework: str, backend: str, seq_len: int, dtype: str) -> dict:
    """Time one meta-gradient in this process; save it as .npy when its length is checked."""
    if args.device == "cpu" and backend == "triton_full_fused":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO))
    from experiments.phase10.frameworks import MetaSetup, make_learner
    from theria_kernels._models import ModelConfig, init_params
    from theria_kernels._tasks import SequenceClassification, sample_meta_batch

    family = SequenceClassification(vocab_size=32, seq_len=seq_len, n_classes=4, n_signal=max(1, seq_len // 64))
    config = ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=seq_len, d_model=args.d_model,
                         n_heads=args.n_heads, n_layers=args.n_layers, causal=True)
    setup = MetaSetup(family=family, model=config, inner_lr=args.inner_lr, inner_steps=1, outer_lr=0.0,
                      dtype=dtype, device=args.device)
    learner = make_learner(framework, setup, init_params(config, 0), backend=backend, method="maml")
    batch = learner.convert(sample_meta_batch(family, np.random.default_rng(1), args.tasks, args.k, args.k))
    times = []
    for i in range(args.warmup + args.repeats):
        learner.synchronize()
        start = time.perf_counter()
        grads, _ = learner.meta_gradient(batch)
        learner.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if seq_len in args.check_lens:
        flat = np.concatenate([value.ravel() for _, value in sorted(learner.numpy(grads).items())])
        np.save(args.out / f"grad_{framework}_{backend}_{seq_len}_{dtype}.npy", flat)
    return {"median_s": statistics.median(times), "peak_memory_gb": _peak_memory(framework) / 2**30}


def _peak_memory(framework: str) -> float:
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else float("nan")
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan"))


def run_one(args, framework: str, backend: str, seq_len: int, dtype: str) -> dict:
    """One measurement in a fresh process: {"status": "ok", ...} or the reason it failed."""
    command = [sys.executable, __file__, *args.argv, "--one", framework, backend, str(seq_len), dtype]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # torch and JAX share the GPU
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    row = {"framework": framework, "backend": backend, "seq_len": seq_len, "dtype": dtype}
    if done.returncode == 0:
        return {**row, "status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}
    tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    out_of_memory = any(word in done.stderr for word in ("OutOfMemoryError", "RESOURCE_EXHAUSTED", "out of memory"))
    return {**row, "status": "OOM" if out_of_memory else f"error: {tail}"}


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check_gradients(args, rows: list[dict], tol: float) -> list[dict]:
    """Fused and reference errors against the float64 reference, per framework and length."""
    checks = []
    for framework in args.frameworks:
        for seq_len in args.check_lens:
            def load(backend, dtype):
                path = args.out / f"grad_{framework}_{backend}_{seq_len}_{dtype}.npy"
                return np.load(path) if path.exists() else None

            truth, ref, fused = load("reference", "float64"), load("reference", args.dtype), load(
                "triton_full_fused", args.dtype)
            check = {"framework": framework, "seq_len": seq_len}
            if truth is None or fused is None:
                checks.append({**check, "status": "missing (a run failed)", "ok": False})
                continue
            fused_error = relative_error(fused, truth)
            ref_error = relative_error(ref, truth) if ref is not None else float("nan")
            bound = max(2 * ref_error, tol) if ref is not None else tol
            checks.append({**check, "fused_error": fused_error, "reference_error": ref_error, "bound": bound,
                           "ok": fused_error <= bound, "status": "ok" if fused_error <= bound else "FAIL"})
    return checks


def write_outputs(args, rows: list[dict], checks: list[dict]) -> str:
    with open(args.out / "long_context.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["framework", "backend", "seq_len", "dtype", "status",
                                                    "median_s", "peak_memory_gb"])
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in writer.fieldnames} for row in rows)
    (args.out / "long_context.json").write_text(json.dumps({"command": args.argv,
                                                            "runs": rows, "checks": checks}, indent=2))
    lines = [f"Full-MAML meta-step (1 inner step), B = {args.tasks} tasks × {args.k} sequences, "
             f"d_model {args.d_model}, {args.n_heads} heads, {args.n_layers} layers, {args.dtype}", "",
             "| framework | T | backend | ms / meta-step | peak GB | status |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["dtype"] != args.dtype:
            continue
        time_ms = f"{1e3 * row['median_s']:.1f}" if row["status"] == "ok" else "—"
        memory = f"{row['peak_memory_gb']:.2f}" if row["status"] == "ok" else "—"
        lines.append(f"| {row['framework']} | {row['seq_len']} | {row['backend']} | {time_ms} | {memory} | "
                     f"{row['status']} |")
    lines += ["", "| framework | T | fused err vs fp64 | reference err vs fp64 | bound | check |",
              "|---|---|---|---|---|---|"]
    for check in checks:
        if "fused_error" in check:
            lines.append(f"| {check['framework']} | {check['seq_len']} | {check['fused_error']:.2e} | "
                         f"{check['reference_error']:.2e} | {check['bound']:.2e} | {check['status']} |")
        else:
            lines.append(f"| {check['framework']} | {check['seq_len']} | — | — | — | {check['status']} |")
    table = "\n".join(lines)
    (args.out / "long_context.md").write_text(table + "\n")
    _plot(args, rows)
    return table


def _plot(args, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(args.frameworks) * len(BACKENDS))
    labelled, shortest = set(), float("inf")
    for i, (framework, backend) in enumerate((f, b) for f in args.frameworks for b in BACKENDS):
        for j, seq_len in enumerate(args.seq_lens):
            row = next(r for r in rows if (r["framework"], r["backend"], r["seq_len"], r["dtype"])
                       == (framework, backend, seq_len, args.dtype))
            x = j + (i - (len(args.frameworks) * len(BACKENDS) - 1) / 2) * width
            if row["status"] == "ok":
                label = f"{framework}/{backend}"
                ax.bar(x, 1e3 * row["median_s"], width, color=f"C{i}", label=None if label in labelled else label)
                labelled.add(label)
                shortest = min(shortest, 1e3 * row["median_s"])
            else:  # no bar: name the failure (OOM, error) at the foot of its slot
                ax.text(x, 0.02, row["status"][:5], transform=ax.get_xaxis_transform(), rotation=90,
                        ha="center", va="bottom", fontsize=7, color=f"C{i}")
    ax.set_xticks(range(len(args.seq_lens)), [f"T = {t}" for t in args.seq_lens])
    if labelled:  # a log axis: start below the shortest bar so that every bar shows
        ax.set_ylim(bottom=shortest / 3)
    ax.set(ylabel="ms per full-MAML meta-step (median)", yscale="log",
           title=f"full MAML, {args.dtype}: fused vs reference backend")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "long_context.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv  # handed on to the per-measurement processes
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        framework, backend, seq_len, dtype = args.one
        print(json.dumps(measure_one(args, framework, backend, int(seq_len), dtype)))
        return 0
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]
    rows = []
    for framework in args.frameworks:
        for seq_len in args.seq_lens:
            dtypes = [args.dtype] + (["float64"] if seq_len in args.check_lens else [])
            for dtype in dtypes:
                for backend in BACKENDS if dtype == args.dtype else ("reference",):
                    rows.append(run_one(args, framework, backend, seq_len, dtype))
                    print(json.dumps(rows[-1]), flush=True)
    checks = check_gradients(args, rows, tol)
    print(write_outputs(args, rows, checks))
    fused_failed = [row for row in rows if row["backend"] == "triton_full_fused" and row["status"] != "ok"]
    return 1 if fused_failed or not all(check["ok"] for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
