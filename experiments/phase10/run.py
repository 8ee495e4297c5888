"""Phase 10: MAML vs first-order MAML under each backend, in torch and in JAX.

The backend is that of the model's fused ops, attention and rmsnorm ("reference": plain torch /
jax.numpy; "triton_full_fused": the fused kernels); the rest of the model is the same in both.

Usage (from the repository root)::

    python experiments/phase10/run.py                                   # configs/tiny.yaml, CPU
    python experiments/phase10/run.py --config experiments/phase10/configs/in_context.yaml \\
        --backends reference triton_full_fused --set train.meta_steps=200 --out /tmp/run
    python experiments/phase10/run.py --frameworks torch --backends reference triton_full_fused \\
        --device cuda --cuda-graph                                      # GPU, graph replays
    torchrun --nproc_per_node 8 experiments/phase10/run.py --frameworks torch --device cuda \\
        --config experiments/phase10/configs/t1024.yaml                 # torch, 8 GPUs
    python experiments/phase10/run.py --frameworks jax --device cuda --jax-devices 8 \\
        --config experiments/phase10/configs/t1024.yaml                 # JAX, a mesh of 8 GPUs

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

Several devices (docs/distributed.md): under ``torchrun`` every process runs this script, joins
the default process group (NCCL on cuda, gloo on cpu; each process on the GPU of its LOCAL_RANK)
and the torch learners split each meta-batch over the ranks; JAX runs need one process and split
it over a mesh of ``--jax-devices N`` (``train.jax_devices``) local devices. The meta-batch
(``maml.meta_batch``) and the meta-test batch (``train.eval_tasks``) must divide by the device
count. Every rank computes the same global losses; rank 0 alone prints and writes the outputs,
which are those of one device plus each run's device count, throughput and (torch) every rank's
step time.

Writes to ``--out`` (default experiments/phase10/runs/<name>-<time>/): ``config.json`` (resolved),
``metrics.csv`` (one row per run and meta-step), ``results.json`` (a summary per run),
``loss.png`` and ``step_time.png``. A run's summary in results.json has its final losses, its
device count (``devices``), the median time of a meta-step (each device takes part in every step,
so this is also the per-device step time; torch under torchrun adds each rank's median as
``rank_median_step_time_s``) and the global throughput (``tasks_per_s``: meta-batch tasks per
second over all devices). A run whose backend is not available (NotImplementedError) is recorded
as ``n/a`` and the command exits with status 2 after writing everything else.
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
    parser.add_argument("--jax-devices", type=int, metavar="N",
                        help="JAX: split each meta-batch over a mesh of the first N local devices")
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
             "train.meta_steps": args.meta_steps, "train.seed": args.seed, "train.cuda_graph": args.cuda_graph,
             "train.jax_devices": args.jax_devices}
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


def join_process_group(device: str) -> tuple[object, str]:
    """Under torchrun (which sets WORLD_SIZE, RANK and LOCAL_RANK): the default process group, NCCL
    on cuda (this process on GPU LOCAL_RANK) or gloo on cpu, and this process's device. Otherwise
    (None, ``device``)."""
    if "WORLD_SIZE" not in os.environ:
        return None, device
    import torch
    import torch.distributed as dist

    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.group.WORLD, device


def check_split(config: dict, devices: int, launcher: str) -> None:
    """Refuse, before any work, a meta-batch or meta-test batch that ``devices`` cannot share."""
    for section, key in (("maml", "meta_batch"), ("train", "eval_tasks")):
        n = config[section][key]
        if n % devices:
            raise SystemExit(f"{section}.{key} = {n} does not split evenly over the {devices} devices of "
                             f"{launcher}; set it to a multiple of {devices} "
                             f"(e.g. --set {section}.{key}={devices * -(-n // devices)})")


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


def summarise(rows: list[dict], *, meta_batch: int, devices: int) -> dict:
    """Final losses (train: mean over the last tenth of the steps), step times and throughput
    over ``devices`` devices; the first step is reported apart because it includes compilation
    (and the CUDA-graph capture)."""
    tail = rows[-max(1, len(rows) // 10):]
    times = [row["step_time_s"] for row in rows[1:]] or [rows[0]["step_time_s"]]
    tests = [row["meta_test_loss"] for row in rows if row["meta_test_loss"] is not None]
    step = statistics.median(times)
    return {"final_meta_train_loss": statistics.fmean(row["meta_train_loss"] for row in tail),
            "final_meta_test_loss": tests[-1], "devices": devices, "median_step_time_s": step,
            "first_step_time_s": rows[0]["step_time_s"], "meta_steps_per_s": 1.0 / step,
            "tasks_per_s": meta_batch / step}


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args)
    grid, train_cfg = config["grid"], config["train"]
    # So that config.json and results.json record the defaults.
    train_cfg.setdefault("cuda_graph", False)
    train_cfg.setdefault("jax_devices", None)
    if train_cfg["device"] == "cpu" and FUSED in grid["backends"]:
        # Must precede the first import of triton (by theria_torch below): the Triton kernels
        # then run in the interpreter on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not __package__:
        sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from experiments.phase10 import frameworks, plot
    from theria_kernels._models import ModelConfig, init_params
    from theria_kernels._tasks import make_family, sample_meta_batch

    if train_cfg["device"] == "cpu" and train_cfg.get("threads"):
        torch.set_num_threads(train_cfg["threads"])
    group, device = join_process_group(train_cfg["device"])
    ranks = dist.get_world_size(group) if group is not None else 1
    lead = group is None or dist.get_rank(group) == 0
    if ranks > 1 and "jax" in grid["frameworks"]:
        raise SystemExit(f"under torchrun with {ranks} processes, run --frameworks torch; JAX splits a "
                         f"meta-batch over local devices from one process (--jax-devices N)")
    if ranks > 1:
        check_split(config, ranks, "torchrun --nproc_per_node")
    if train_cfg["jax_devices"] and "jax" in grid["frameworks"]:
        check_split(config, train_cfg["jax_devices"], "--jax-devices")
    family = make_family(config["task"]["family"], **config["task"].get("options", {}))
    model = ModelConfig(d_in=family.d_in, d_out=family.d_out, max_len=family.seq_len, **config["model"])
    m = config["maml"]

    def draw(n_tasks, seed_words):
        return sample_meta_batch(family, np.random.default_rng(seed_words), n_tasks, m["k_support"],
                                 m["k_query"])

    setup = frameworks.MetaSetup(family=family, model=model, inner_lr=m["inner_lr"],
                                 inner_steps=m["inner_steps"], outer_lr=train_cfg["outer_lr"],
                                 dtype=train_cfg["dtype"], device=device, cuda_graph=train_cfg["cuda_graph"],
                                 group=group, jax_devices=train_cfg["jax_devices"])
    params = init_params(model, train_cfg["seed"])
    out = args.out or REPO / "experiments/phase10/runs" / f"{config['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if lead:
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
                    rows = train(learner, draw, config, label=label, progress=lead and not args.no_progress)
                except NotImplementedError as error:
                    results.append({**run, "status": f"n/a: {error}"})
                    if lead:
                        print(f"{label}: n/a ({error})")
                    continue
                devices = ranks if framework == "torch" else train_cfg["jax_devices"] or 1
                summary = summarise(rows, meta_batch=m["meta_batch"], devices=devices)
                if framework == "torch" and group is not None:
                    medians = [None] * ranks
                    dist.all_gather_object(medians, summary["median_step_time_s"], group=group)
                    summary["rank_median_step_time_s"] = medians
                results.append({**run, "status": "ok", **summary})
                metrics.extend({**run, **row} for row in rows)
                if lead:
                    print(f"{label}: meta-train {summary['final_meta_train_loss']:.4f}  "
                          f"meta-test {summary['final_meta_test_loss']:.4f}  "
                          f"{1e3 * summary['median_step_time_s']:.1f} ms/meta-step on {devices} device(s), "
                          f"{summary['tasks_per_s']:.1f} tasks/s")

    if group is not None:
        dist.destroy_process_group()
    if lead:
        write_outputs(out, config, results, metrics, plot)
    return 2 if any(run["status"] != "ok" for run in results) else 0


def write_outputs(out: Path, config: dict, results: list[dict], metrics: list[dict], plot) -> None:
    """results.json, metrics.csv and the plots of a finished grid."""
    (out / "results.json").write_text(json.dumps({"config": config, "runs": results}, indent=2))
    with open(out / "metrics.csv", "w", newline="") as handle:
        columns = ["framework", "backend", "method", "step", "meta_train_loss", "meta_test_loss", "step_time_s"]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(metrics)
    if metrics:
        plot.plot_run(metrics, results, out, title=config["name"])
    print(f"results in {out}")


if __name__ == "__main__":
    sys.exit(main())
