"""The table and the figure of long-context adaptation runs, from ``results.jsonl`` files.

Usage::

    python experiments/long_context_adaptation/report.py RESULTS.jsonl [...] --out DIR

Groups runs by (framework, method) for one preset (the first file's, or ``--preset NAME``) and
writes ``table.md`` (held-out query loss and accuracy after 0, 1, ... inner steps: mean ± std over
seeds, each seed's value being the mean over the held-out tasks) and ``curves.png`` (meta-train
loss during training, mean ± std over seeds, and held-out loss against inner steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

LABELS = {"maml": "MAML", "fo_maml": "first-order MAML", "pretrained": "pretrained", "untrained": "untrained (initial weights)"}
COLOURS = {"maml": "tab:green", "fo_maml": "tab:orange", "pretrained": "tab:blue", "untrained": "tab:grey"}
LINESTYLES = {"jax": "-", "torch": "--"}


def load(paths: list[Path], preset: str | None = None) -> list[dict]:
    runs = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    name = preset or runs[0]["preset"]["name"]
    keys = {json.dumps(run["preset"], sort_keys=True) for run in runs if run["preset"]["name"] == name}
    if len(keys) > 1:
        raise SystemExit(f"runs of preset {name!r} with different settings; pass one setting's files")
    return [run for run in runs if run["preset"]["name"] == name]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for framework in ("jax", "torch"):
        for method in LABELS:
            chosen = sorted((r for r in runs if r["framework"] == framework and r["method"] == method),
                            key=lambda r: r["seed"])
            if chosen:
                out[framework, method] = chosen
    return out


def table(runs: list[dict]) -> str:
    preset = runs[0]["preset"]
    steps = [str(s) for s in preset["eval_steps"]]
    head = ["framework", "method", "seeds"] + [f"loss, {s} steps" for s in steps] + \
           [f"accuracy, {s} steps" for s in steps] + ["ms / meta-step", "train s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (framework, method), chosen in groups(runs).items():
        cells = [framework, LABELS[method], " ".join(str(r["seed"]) for r in chosen)]
        for metric in ("loss", "accuracy"):
            for s in steps:
                m, sd = mean_std([statistics.fmean(r["held_out"][s][metric]) for r in chosen])
                cells.append(f"{m:.3f}" if math.isnan(sd) else f"{m:.3f} ± {sd:.3f}")
        trained = [r for r in chosen if r["train_losses"]]
        cells.append(f"{1e3 * statistics.fmean(r['median_step_s'] for r in trained):.0f}" if trained else "–")
        cells.append(f"{statistics.fmean(r['train_s'] for r in trained):.0f}" if trained else "–")
        lines.append("| " + " | ".join(cells) + " |")
    n_tasks = preset["eval_tasks"]
    lines += ["", f"T = {preset['seq_len']}, {preset['n_layers']} layers, d_model {preset['d_model']}, "
              f"{preset['n_heads']} heads, {preset['dtype']}, backend {preset['backend']}; "
              f"{preset['meta_steps']} meta-steps (Adam {preset['outer_lr']}), meta-batch {preset['meta_batch']}, "
              f"K = {preset['k_support']} support / {preset['k_query']} query sequences, "
              f"{preset['inner_steps']} inner step(s) at lr {preset['inner_lr']} in training. Held-out: "
              f"{n_tasks} tasks, query cross-entropy (chance ln {preset['n_classes']} = "
              f"{math.log(preset['n_classes']):.3f}) and accuracy (chance {1 / preset['n_classes']:.2f}) after "
              f"adapting on the support set at the training inner lr; mean ± std over seeds."]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, *, smooth: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    preset = runs[0]["preset"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (framework, method), chosen in groups(runs).items():
        style = dict(color=COLOURS[method], linestyle=LINESTYLES[framework])
        length = min(len(r["train_losses"]) for r in chosen)
        if length < smooth:  # untrained: no curve, only the held-out scores
            length = 0
        curves = np.array([r["train_losses"][:length] for r in chosen])
        if length:
            kernel = np.ones(smooth) / smooth
            smoothed = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
            x = np.arange(smoothed.shape[1]) + smooth
            mean = smoothed.mean(0)
            left.plot(x, mean, label=f"{LABELS[method]} ({framework}, {len(chosen)} seeds)", **style)
            if len(chosen) > 1:
                sd = smoothed.std(0, ddof=1)
                left.fill_between(x, mean - sd, mean + sd, color=COLOURS[method], alpha=0.15)
        steps = list(preset["eval_steps"])
        per_seed = np.array([[statistics.fmean(r["held_out"][str(s)]["loss"]) for s in steps] for r in chosen])
        right.errorbar(steps, per_seed.mean(0), yerr=per_seed.std(0, ddof=1) if len(chosen) > 1 else None,
                       marker="o", capsize=3, label=f"{LABELS[method]} ({framework})", **style)
    chance = math.log(preset["n_classes"])
    for axis in (left, right):
        axis.axhline(chance, color="grey", linewidth=0.8, linestyle=":")
        axis.set_ylabel("query cross-entropy")
    left.set_xlabel("meta-step")
    left.set_title(f"meta-train loss after adaptation ({smooth}-step mean)")
    right.set_xlabel("inner steps at test time")
    right.set_title("held-out tasks after adaptation")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(f"needle classification, T = {preset['seq_len']}, {preset['backend']}, {preset['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--preset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smooth", type=int, default=20)
    args = parser.parse_args(argv)
    runs = load(args.results, args.preset)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table(runs))
    plot(runs, args.out / "curves.png", smooth=args.smooth)
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
