"""Adaptation at long context: MAML vs first-order MAML vs a pretrained baseline vs the untrained
network on key-value retrieval (experiments/long_context_adaptation/protocol.py), trained through
theria's MAML functions (``theria_torch.maml``, ``theria_jax.maml``) on the fused kernels.

Usage (from the repository root)::

    python experiments/long_context_adaptation/run.py --quick                 # CPU, interpreter, torch, ~1 min
    python experiments/long_context_adaptation/run.py --preset gpu --seeds 0 1 2 \
        --frameworks jax torch --out $OUT/lca --math-oom --probe 5           # one H200, T = 8192
    python experiments/long_context_adaptation/run.py --preset cpu --frameworks torch \
        --seeds 0 1 2 --set inner_lr=0.3 --out runs/cpu_lr0.3                # the regime study

``--quick`` trains torch alone by default (``--quick --frameworks jax torch`` runs both, minutes
more: JAX's jitted steps and scorers compile once per run, which under Triton's interpreter
dominates at this size); JAX's fused path is also checked on the CPU by
tests/test_long_context_adaptation.py (one float64 meta-gradient against torch's).

Every (seed, method, framework) run starts from the seed's numpy weights (head weight zero: loss
ln n_classes) and meets the seed's task batches, trains for ``meta_steps`` Adam steps, then is
scored on the same held-out tasks after 0, 1, ... inner steps at the training inner lr (query
cross-entropy and accuracy, per task). ``--set FIELD=VALUE`` overrides a preset field
(value parsed as YAML). Everything lands in ``--out``: results.jsonl (one line per run), and when
the runs end report.py's table.md (mean ± standard error over seeds) and curves.png.

Partial-result safe: each finished run is appended to ``--out``/results.jsonl at once, and runs
already there (same preset fields, framework, method, seed) are skipped, so a command cut short
is resumed by running it again. ``--time-budget S`` starts no run that its estimate says would
end after S seconds: the last run of that framework and method (in ``--out``, from this command or
an earlier one), else full MAML's (the dearest step: ``--probe``'s, which a resumed command does
not repeat). ``--math-oom`` first tries one meta-gradient of the same configuration with torch's
math attention (theria's "reference" backend: plain torch softmax(QKᵀ)V, what SDPA's math backend
computes) and records the out-of-memory error; ``--probe`` times a few meta-steps per framework
first.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
if not __package__:
    sys.path.insert(0, str(REPO))

from experiments.long_context_adaptation import protocol as P  # noqa: E402

PROGRESS_EVERY = 100  # meta-steps between progress lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(P.PRESETS), default="gpu")
    parser.add_argument("--quick", action="store_true", help="the 'quick' preset (CPU, interpreter)")
    parser.add_argument("--frameworks", nargs="+", choices=["torch", "jax"],
                        help="default: jax torch; torch alone with --quick (see the module's docstring)")
    parser.add_argument("--methods", nargs="+", choices=P.METHODS, default=list(P.METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--time-budget", type=float, help="seconds; start no run expected to end later")
    parser.add_argument("--math-oom", action="store_true", help="try the math reference first (GPU)")
    parser.add_argument("--probe", type=int, default=0, metavar="STEPS",
                        help="time STEPS meta-steps of each framework and method before the runs")
    return parser.parse_args(argv)


def resolve_preset(args) -> P.Preset:
    preset = P.PRESETS["quick" if args.quick else args.preset]
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in {field.name for field in dataclasses.fields(P.Preset)}:
            raise SystemExit(f"--set expects FIELD=VALUE with a Preset field, got {item!r}")
        value = yaml.safe_load(value)
        if isinstance(getattr(preset, key), float) and isinstance(value, (int, str)):
            value = float(value)  # YAML reads 1e-2 as a string
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(preset, **overrides)


def setup_for(preset: P.Preset, method: str):
    from experiments.phase10.frameworks import MetaSetup

    steps = 0 if method in ("pretrained", "untrained") else preset.inner_steps
    return MetaSetup(family=preset.family(), model=preset.model(), inner_lr=preset.inner_lr, inner_steps=steps,
                     outer_lr=preset.outer_lr, dtype=preset.dtype, device=preset.device)


def make_learner(preset: P.Preset, framework: str, method: str, seed: int, params=None):
    """experiments/phase10's learner (parameters, Adam, the MAML calls) for one run; ``params``
    (numpy) replace the seed's initial parameters when given."""
    from experiments.phase10.frameworks import make_learner as phase10_learner

    params = P.initial_params(preset, seed) if params is None else params
    return phase10_learner(framework, setup_for(preset, method), params, backend=preset.backend,
                           method="fo_maml" if method == "fo_maml" else "maml")


class TorchScorer:
    """Held-out query loss and accuracy after ``steps`` first-order inner steps, in torch."""

    def __init__(self, preset: P.Preset, learner):
        import torch

        from theria_torch import models

        self.torch, self.preset, self.learner = torch, preset, learner
        self.model = models.TransformerStack(preset.model(), backend=preset.backend, dtype=learner.dtype,
                                             device=learner.device)
        self.loss_fn = models.make_loss_fn(self.model, "cross_entropy")

    def __call__(self, tasks, steps: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        from torch.func import functional_call, vmap

        from theria_torch import maml

        def one_task(task):
            adapted = maml.inner_adapt(self.learner.params, (task.support_x, task.support_y), self.loss_fn,
                                       inner_lr=self.preset.inner_lr, steps=steps, first_order=True)
            logits = functional_call(self.model, adapted, (task.query_x,))[:, -1].float()
            loss = torch.nn.functional.cross_entropy(logits, task.query_y)
            return loss, (logits.argmax(-1) == task.query_y).float().mean()

        with torch.no_grad():
            losses, accuracies = vmap(one_task)(tasks)
        return losses.double().cpu().numpy(), accuracies.double().cpu().numpy()


class JaxScorer:
    """:class:`TorchScorer` in JAX (jitted per number of inner steps)."""

    def __init__(self, preset: P.Preset, learner):
        import jax
        import jax.numpy as jnp

        from theria_jax import maml, models

        config = preset.model()
        loss_fn = models.make_loss_fn(config, "cross_entropy", backend=preset.backend)

        def score(params, tasks, steps):
            def one_task(task):
                adapted = maml.inner_adapt(params, (task.support_x, task.support_y), loss_fn,
                                           inner_lr=preset.inner_lr, steps=steps, first_order=True)
                logits = models.apply(adapted, task.query_x, config, backend=preset.backend)[:, -1]
                logits = logits.astype(jnp.float32)
                log_probs = jax.nn.log_softmax(logits)
                loss = -jnp.mean(jnp.take_along_axis(log_probs, task.query_y[:, None], axis=-1))
                return loss, jnp.mean(jnp.argmax(logits, -1) == task.query_y)

            return jax.vmap(one_task)(tasks)

        self.learner = learner
        self.score = jax.jit(score, static_argnames="steps")

    def __call__(self, tasks, steps: int) -> tuple[np.ndarray, np.ndarray]:
        losses, accuracies = self.score(self.learner.params, tasks, steps=steps)
        return np.asarray(losses, np.float64), np.asarray(accuracies, np.float64)


def to_device(learner, batch, family):
    """A token-id batch as the learner's input vectors (``family.input_table()`` rows: one-hot,
    two-hot for pairs), made on its device."""
    table = family.input_table()
    if learner.framework == "torch":
        import torch

        table = torch.as_tensor(table, dtype=learner.dtype, device=learner.device)

        def encode(tokens):
            return table[torch.from_numpy(tokens.astype(np.int64)).to(learner.device)]
    else:
        import jax
        import jax.numpy as jnp

        table = jax.device_put(jnp.asarray(table, dtype=learner.dtype), learner.placement)

        def encode(tokens):
            return jnp.take(table, jax.device_put(tokens.astype(np.int32), learner.placement), axis=0)
    labels = learner.convert(batch._replace(support_x=np.zeros(1), query_x=np.zeros(1)))
    return labels._replace(support_x=encode(batch.support_x), query_x=encode(batch.query_x))


def evaluate(preset: P.Preset, framework: str, learner) -> dict:
    """{steps: {"loss": [...per task], "accuracy": [...]}} on the held-out tasks."""
    scorer = (TorchScorer if framework == "torch" else JaxScorer)(preset, learner)
    tasks = P.held_out_tasks(preset)
    result = {}
    for steps in preset.eval_steps:
        losses, accuracies = [], []
        for start in range(0, preset.eval_tasks, preset.eval_chunk):
            chunk = to_device(learner, type(tasks)(*(field[start:start + preset.eval_chunk] for field in tasks)),
                              preset.family())
            loss, accuracy = scorer(chunk, steps)
            losses.append(loss)
            accuracies.append(accuracy)
        result[str(steps)] = {"loss": np.concatenate(losses).tolist(),
                              "accuracy": np.concatenate(accuracies).tolist()}
    return result


def train_one(preset: P.Preset, framework: str, method: str, seed: int, *, steps: int | None = None,
              score: bool = True) -> dict:
    """Meta-train one learner and (``score``) score it on the held-out tasks; returns the run's record."""
    steps = preset.meta_steps if steps is None else steps
    if method == "untrained":
        steps = 0
    start = time.perf_counter()
    learner = make_learner(preset, framework, method, seed)
    losses, times = [], []
    for step in range(steps):
        batch = to_device(learner, P.train_batch(preset, seed, step), preset.family())
        learner.synchronize()
        tick = time.perf_counter()
        losses.append(learner.step(batch))  # a float: the step has finished on the device
        times.append(time.perf_counter() - tick)
        if not np.isfinite(losses[-1]):
            break
        if (step + 1) % PROGRESS_EVERY == 0:
            print(f"  {framework}/{method}/seed {seed} step {step + 1}: train loss "
                  f"{np.mean(losses[-PROGRESS_EVERY:]):.3f} ({PROGRESS_EVERY}-step mean)", flush=True)
    train_s = time.perf_counter() - start
    held_out = evaluate(preset, framework, learner) if score else None
    return {"framework": framework, "method": method, "seed": seed, "train_losses": losses,
            "step_times_s": times, "median_step_s": statistics.median(times[1:] or times) if times else None,
            "first_step_s": times[0] if times else None, "train_s": train_s,
            "eval_s": time.perf_counter() - start - train_s,
            "held_out": held_out}


def math_oom_attempt(preset: P.Preset) -> dict:
    """One full-MAML meta-gradient of the preset's meta-batch on torch's math attention."""
    import torch

    reference = dataclasses.replace(preset, backend="reference")
    learner = make_learner(reference, "torch", "maml", 0)
    batch = to_device(learner, P.train_batch(preset, 0, 0), preset.family())
    torch.cuda.reset_peak_memory_stats()
    try:
        learner.meta_gradient(batch)
        torch.cuda.synchronize()
        outcome = {"status": "ok", "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    except torch.cuda.OutOfMemoryError as error:
        outcome = {"status": "OOM", "message": str(error).splitlines()[0],
                   "peak_gb_before_failure": torch.cuda.max_memory_allocated() / 2**30}
    del learner, batch
    torch.cuda.empty_cache()
    outcome["total_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return outcome


def records(path: Path, preset: P.Preset) -> list[dict]:
    """The records of ``path`` (one JSON object a line) made with ``preset``; none if it is absent."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("preset") == preset.key()]


def done_runs(path: Path, preset: P.Preset) -> set[tuple]:
    return {(r["framework"], r["method"], r["seed"]) for r in records(path, preset)}


def maml_estimate(preset: P.Preset, probe: dict) -> float:
    """Seconds for a whole full-MAML run, from a probe's first and median step."""
    return probe["first_step_s"] + preset.meta_steps * probe["median_step_s"]


def known_estimates(out: Path, preset: P.Preset) -> dict[tuple, float]:
    """Seconds per whole run from an earlier invocation's records in ``out``, so that a resumed
    command budgets its runs without probing again: the last finished run of each (framework,
    method), else full MAML's probe."""
    estimate = {(r["framework"], "maml"): maml_estimate(preset, r) for r in records(out / "probe.jsonl", preset)}
    estimate.update(((r["framework"], r["method"]), r["train_s"] + r["eval_s"])
                    for r in records(out / "results.jsonl", preset))
    return estimate


def append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = resolve_preset(args)
    args.frameworks = args.frameworks or (["torch"] if args.quick else ["jax", "torch"])
    began = time.perf_counter()
    if preset.device == "cpu" and preset.backend == "triton_full_fused":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
    import torch

    if preset.threads:
        torch.set_num_threads(preset.threads)
    if preset.tf32:  # the model's matmuls and theria's kernels alike, in both frameworks
        torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's convolutions allow TF32 by default
        if "jax" in args.frameworks:
            import jax

            jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "experiments/long_context_adaptation/runs" / f"{preset.name}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    command = " ".join(["python", "experiments/long_context_adaptation/run.py", *(argv or sys.argv[1:])])
    if args.math_oom:
        outcome = math_oom_attempt(preset)
        print("math attention (torch reference backend):", outcome, flush=True)
        append(out / "math_oom.jsonl", {"preset": preset.key(), **outcome})
    estimate = known_estimates(out, preset)  # (framework, method) -> seconds for a whole run
    if args.probe:
        for framework in [f for f in args.frameworks if (f, "maml") not in estimate]:  # the dearest step
            record = train_one(preset, framework, "maml", 0, steps=args.probe, score=False)
            estimate[framework, "maml"] = maml_estimate(preset, record)
            print(f"probe {framework}/maml: first step {record['first_step_s']:.1f} s, "
                  f"{1e3 * record['median_step_s']:.1f} ms/step; training ≈ {estimate[framework, 'maml']:.0f} s",
                  flush=True)
            append(out / "probe.jsonl", {"preset": preset.key(), "command": command, **record})
    done = done_runs(results, preset)
    for seed in args.seeds:
        for method in args.methods:
            for framework in args.frameworks:
                if (framework, method, seed) in done:
                    continue
                left = args.time_budget - (time.perf_counter() - began) if args.time_budget else None
                # A method not run yet is bounded by full MAML's estimate: its step is the dearest.
                needed = estimate.get((framework, method), estimate.get((framework, "maml"), 0))
                if left is not None and needed > left:
                    print(f"skip {framework}/{method}/seed {seed}: ≈{needed:.0f} s needed, {left:.0f} s left",
                          flush=True)
                    continue
                record = train_one(preset, framework, method, seed)
                estimate[framework, method] = record["train_s"] + record["eval_s"]
                append(results, {"preset": preset.key(), "command": command, **record})
                summary = {s: f"{np.mean(v['loss']):.3f}/{np.mean(v['accuracy']):.2f}"
                           for s, v in record["held_out"].items()}
                trained = ""
                if record["train_losses"]:
                    trained = (f"train {record['train_s']:.0f} s ({1e3 * record['median_step_s']:.1f} ms/step), "
                               f"final train loss {np.mean(record['train_losses'][-10:]):.3f}, ")
                print(f"{framework}/{method}/seed {seed}: {trained}held-out loss/acc by inner steps {summary}",
                      flush=True)
    if results.exists():
        from experiments.long_context_adaptation import report

        report.write(records(results, preset), out)
    print(f"wall {time.perf_counter() - began:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
