"""Finn, Abbeel & Levine (2017) sinusoid regression: MAML, first-order MAML and a pretrained
baseline, trained through theria's MAML functions in torch and/or JAX.

Usage (from the repository root)::

    python experiments/sinusoid/run.py --framework both            # the paper's protocol
    python experiments/sinusoid/run.py --quick                       # about a minute, for a look

The protocol (experiments/sinusoid/protocol.py): MLP 1-40-40-1 (ReLU); tasks y = A sin(x - φ),
A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[-5, 5]; K = 5 and 10 support (and K query) points per task;
one inner step at lr 0.01 in training; meta-batch 25; Adam 1e-3; 70,000 meta-iterations.
Evaluation: 600 held-out tasks, MSE on 100 query points after 0..10 inner steps at lr 0.01 (the
pretrained baseline also at 0.02). The pretrained baseline is joint regression on every point of
the same tasks (MAML with zero inner steps), trained for the same number of iterations. Both
frameworks start from the same numpy weights and see the same tasks.

``--jobs N`` runs the (framework, K) pairs in N worker processes, each single-threaded (default:
one per CPU, at most one per pair); the results do not depend on it.

Writes to ``--out`` (default experiments/sinusoid/runs/<preset>-<time>/): ``metrics.json`` (the
protocol, versions, every run's curves, final losses with 95 % intervals and wall times),
``table.md`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if not __package__:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=["torch", "jax", "both"], default="both")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 iterations and 200 held-out tasks (about a minute on 2 idle cores)")
    parser.add_argument("--shots", type=int, nargs="+", help="K values (default: 5 10)")
    parser.add_argument("--methods", nargs="+", choices=["maml", "fo_maml", "pretrained"])
    parser.add_argument("--iterations", type=int, help="override the preset's meta-iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch: torch.compile the meta-gradient (default: on, off with --quick)")
    parser.add_argument("--jobs", type=int,
                        help="worker processes for the (framework, K) pairs (default: one per CPU, at most one per pair)")
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    return parser.parse_args(argv)


def versions() -> dict:
    import jax
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def train_pair(protocol, framework: str, shots: int, methods: list[str], compile_torch: bool,
               progress: bool) -> tuple[list[dict], float]:
    """Train and evaluate every method at one K in one framework.

    Returns:
        (one result per method, as ``train_torch.train`` describes, with ``params`` as lists;
        wall seconds).
    """
    import torch

    # Every model here is a few thousand weights: more intra-op threads only synchronise.
    torch.set_num_threads(1)
    if framework == "torch":
        from experiments.sinusoid import train_torch as trainer
        options = {"compile": compile_torch}
    else:
        from experiments.sinusoid import train_jax as trainer
        options = {}
    start = time.perf_counter()
    results = []
    for method in methods:
        result = trainer.train(protocol, shots, method, progress=progress, **options)
        result["params"] = {name: array.tolist() for name, array in result["params"].items()}
        results.append(result)
    return results, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    from experiments.sinusoid import protocol as P
    from experiments.sinusoid import report

    protocol = P.QUICK if args.quick else P.FULL
    overrides = {"seed": args.seed}
    if args.shots:
        overrides["shots"] = tuple(args.shots)
    if args.iterations:
        overrides["iterations"] = args.iterations
        overrides["curve_every"] = overrides["chunk"] = min(protocol.curve_every, args.iterations)
    protocol = dataclasses.replace(protocol, **overrides)
    methods = args.methods or list(P.METHODS)
    frameworks = ["torch", "jax"] if args.framework == "both" else [args.framework]
    compile_torch = (not args.quick) if args.compile is None else args.compile
    out = args.out or REPO / "experiments" / "sinusoid" / "runs" / (
        f"{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    pairs = [(framework, shots) for framework in frameworks for shots in protocol.shots]
    jobs = args.jobs or min(os.cpu_count() or 1, len(pairs))
    start = time.perf_counter()
    if jobs > 1:
        # spawn: JAX's runtime threads do not survive a fork.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(train_pair, protocol, framework, shots, methods, compile_torch,
                                   not args.no_progress) for framework, shots in pairs]
            outcomes = [future.result() for future in futures]
    else:
        outcomes = [train_pair(protocol, framework, shots, methods, compile_torch, not args.no_progress)
                    for framework, shots in pairs]
    wall = {"total": time.perf_counter() - start,
            **{f"{framework} K={shots}": seconds for (framework, shots), (_, seconds) in zip(pairs, outcomes)}}
    runs = [result for results, _ in outcomes for result in results]

    metrics = {"protocol": dataclasses.asdict(protocol), "methods": methods, "torch_compile": compile_torch,
               "command": " ".join(["python", "experiments/sinusoid/run.py", *(argv or sys.argv[1:])]),
               "jobs": jobs, "versions": versions(), "wall_s": wall, "runs": runs}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "table.md").write_text(report.table(metrics))
    report.plot(metrics, out / "curves.png")
    print(report.table(metrics))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
