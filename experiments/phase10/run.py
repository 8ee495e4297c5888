"""Phase 10: MAML vs first-order MAML under each backend, in torch and in JAX.

The backend is that of the model's fused ops, attention and rmsnorm ("reference": plain torch /
jax.numpy; "triton_full_fused": the fused kernels); the rest of the model is the same in both.

Usage (from the repository root)::

    python experiments/phase10/run.py                                   # configs/tiny.yaml, CPU
    python experiments/phase10/run.py --config experiments/phase10/configs/in_context.yaml \\
        --backends reference triton_full_fused --set train.meta_steps=200 --out /tmp/run
    python experiments/phase10/run.py --frameworks torch --backends reference triton_full_fused \\
        --device cuda --cuda-graph                                      # GPU, graph replays

A config (YAML or JSON) has sections ``task``, ``model``, ``maml``, ``train`` and ``grid``
(see configs/tiny.yaml); ``--frameworks/--backends/--methods/--device/--dtype/--meta-steps/--seed``,
``--cuda-graph`` and ``--set section.key=value`` (value parsed as YAML) override it. Every run of
the grid starts from the same numpy weights and meets the same task batches (seeded per step), so
the curves differ only by method, backend and framework.

``--cuda-graph`` (``train.cuda_graph``, default false; needs ``--device cuda``) replays each torch
meta-gradient as a captured CUDA graph (experiments/phase10/frameworks.py), so a torch step's time
is the device's rather than Python's and the launches'; the first step includes the capture. JAX
runs are compiled by ``jax.jit`` anyway and ignore it. A replay computes what the eager step does,
to rounding (cuBLAS may pick other algorithms inside a capture).

Writes to ``--out`` (default experiments/phase10/runs/<name>-<time>/): ``config.json`` (resolved),
``metrics.csv`` (one row per run and meta-step), ``results.json`` (a summary per run),
``loss.png`` and ``step_time.png``. A run whose backend is not available (NotImplementedError)
is recorded as ``n/a`` and the command exits with status 2 after writing everything else.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
FUSED = "triton_full_fused"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML or JSON config")
    parser.add_argument("--frameworks", nargs="+", choices=["torch", "jax"])
    parser.add_argument("--backends", nargs="+", choices=["reference", FUSED],
                        help="backend of the model's fused ops: attention and rmsnorm")
    parser.add_argument("--methods", nargs="+", choices=["maml", "fo_maml"])
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--meta-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cuda-graph", action="store_const", const=True,
                        help="torch: replay the meta-gradient as a captured CUDA graph (device cuda)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config entry (repeatable)")
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> dict:
    """The config file with the command line's overrides applied."""
    config = yaml.safe_load(args.config.read_text())  # JSON is YAML too
    flags = {"grid.frameworks": args.frameworks, "grid.backends": args.backends,
             "grid.methods": args.methods, "train.device": args.device, "train.dtype": args.dtype,
             "train.meta_steps": args.meta_steps, "train.seed": args.seed, "train.cuda_graph": args.cuda_graph}
    overrides = {key: value for key, value in flags.items() if value is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        config.setdefault(section, {})
        node = config[section]
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def train(learner, draw, config: dict, *, label: str, progress: bool) -> list[dict]:
    """Meta-train one learner; one metrics row per meta-step (meta-test loss every eval_every).

    ``draw(n_tasks, seed_words)`` returns a numpy TaskBatch from its own seed, so every run of
    the grid sees the same training batches and the same meta-test tasks.
    """
    train_cfg = config["train"]
    seed, steps = train_cfg["seed"], train_cfg["meta_steps"]
    test_batch = learner.convert(draw(train_cfg["eval_tasks"], [seed, 2]))
    rows = []
    bar = tqdm(range(steps), desc=label, disable=not progress, leave=False)
    for step in bar:
        batch = learner.convert(draw(config["maml"]["meta_batch"], [seed, 1, step]))
        # Both losses belong to the parameters at the start of the step.
        evaluated = step % train_cfg["eval_every"] == 0 or step == steps - 1
        test_loss = learner.evaluate(test_batch) if evaluated else None
        learner.synchronize()
        start = time.perf_counter()
        loss = learner.step(batch)  # a Python float: the step has finished on the device
        rows.append({"step": step, "meta_train_loss": loss, "step_time_s": time.perf_counter() - start,
                     "meta_test_loss": test_loss})
        bar.set_postfix(loss=f"{loss:.4f}")
    return rows


def summarise(rows: list[dict]) -> dict:
    """Final losses (train: mean over the last tenth of the steps) and step times; the first
    step is reported apart because it includes compilation (and the CUDA-graph capture)."""
    tail = rows[-max(1, len(rows) // 10):]
    times = [row["step_time_s"] for row in rows[1:]] or [rows[0]["step_time_s"]]
    tests = [row["meta_test_loss"] for row in rows if row["meta_test_loss"] is not None]
    return {"final_meta_train_loss": statistics.fmean(row["meta_train_loss"] for row in tail),
            "final_meta_test_loss": tests[-1], "median_step_time_s": statistics.median(times),
            "first_step_time_s": rows[0]["step_time_s"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args)
    grid, train_cfg = config["grid"], config["train"]
    train_cfg.setdefault("cuda_graph", False)  # so that config.json and results.json record it
    if train_cfg["device"] == "cpu" and FUSED in grid["backends"]:
        # Must precede the first import of triton (by theria_torch below): the Triton kernels
        # then run in the interpreter on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not __package__:
        sys.path.insert(0, str(REPO))
    import torch

    from experiments.phase10 import frameworks, plot
    from theria_torch.models import ModelConfig, init_params
    from theria_torch.tasks import make_family, sample_meta_batch

    if train_cfg["device"] == "cpu" and train_cfg.get("threads"):
        torch.set_num_threads(train_cfg["threads"])
    family = make_family(config["task"]["family"], **config["task"].get("options", {}))
    model = ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, **config["model"])
    m = config["maml"]

    def draw(n_tasks, seed_words):
        return sample_meta_batch(family, np.random.default_rng(seed_words), n_tasks, m["k_support"],
                                 m["k_query"])

    setup = frameworks.MetaSetup(family=family, model=model, inner_lr=m["inner_lr"],
                                 inner_steps=m["inner_steps"], outer_lr=train_cfg["outer_lr"],
                                 dtype=train_cfg["dtype"], device=train_cfg["device"],
                                 cuda_graph=train_cfg["cuda_graph"])
    params = init_params(model, train_cfg["seed"])
    out = args.out or REPO / "experiments/phase10/runs" / f"{config['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))

    results, metrics = [], []
    for framework in grid["frameworks"]:
        for backend in grid["backends"]:
            for method in grid["methods"]:
                label = f"{framework}/{backend}/{method}"
                run = {"framework": framework, "backend": backend, "method": method}
                try:
                    learner = frameworks.make_learner(framework, setup, copy.deepcopy(params),
                                                      backend=backend, method=method)
                    rows = train(learner, draw, config, label=label, progress=not args.no_progress)
                except NotImplementedError as error:
                    results.append({**run, "status": f"n/a: {error}"})
                    print(f"{label}: n/a ({error})")
                    continue
                summary = summarise(rows)
                results.append({**run, "status": "ok", **summary})
                metrics.extend({**run, **row} for row in rows)
                print(f"{label}: meta-train {summary['final_meta_train_loss']:.4f}  "
                      f"meta-test {summary['final_meta_test_loss']:.4f}  "
                      f"{1e3 * summary['median_step_time_s']:.1f} ms/meta-step")

    (out / "results.json").write_text(json.dumps({"config": config, "runs": results}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as handle:
        columns = ["framework", "backend", "method", "step", "meta_train_loss", "meta_test_loss", "step_time_s"]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(metrics)
    if metrics:
        plot.plot_run(metrics, results, out, title=config["name"])
    print(f"results in {out}")
    return 2 if any(run["status"] != "ok" for run in results) else 0


if __name__ == "__main__":
    sys.exit(main())
