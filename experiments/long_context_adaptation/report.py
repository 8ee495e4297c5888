"""The table and the figure of long-context adaptation runs, from ``results.jsonl`` files.

Usage::

    python experiments/long_context_adaptation/report.py RESULTS.jsonl [...] --out DIR

Takes the runs of one preset name (the first file's, or ``--preset NAME``); runs whose settings
differ (a regime study: ``--set inner_lr=...`` and the like) are kept apart as settings, named by
the fields that differ. Writes ``table.md`` (per setting, framework and method: held-out query
loss and accuracy after 0, 1, ... inner steps, mean ± standard error over seeds, each seed's value
being the mean over the held-out tasks) and per setting a figure, ``curves.png`` (one setting) or
``curves_<setting>.png``: meta-train loss during training and held-out loss against inner steps,
mean ± standard error over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

LABELS = {"maml": "MAML", "fo_maml": "first-order MAML", "pretrained": "pretrained",
          "untrained": "untrained (initial weights)"}
COLOURS = {"maml": "tab:green", "fo_maml": "tab:orange", "pretrained": "tab:blue", "untrained": "tab:grey"}
LINESTYLES = {"jax": "-", "torch": "--"}


def load(paths: list[Path], preset: str | None = None) -> list[dict]:
    runs = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    name = preset or runs[0]["preset"]["name"]
    # One run per (setting, framework, method, seed): the last one read (a run made twice, as
    # the untrained one is by every command that lists it, counts once).
    unique = {(json.dumps(run["preset"], sort_keys=True), run["framework"], run["method"], run["seed"]): run
              for run in runs if run["preset"]["name"] == name}
    return list(unique.values())


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for one value)."""
    if len(values) < 2:
        return statistics.fmean(values), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def settings(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs split by preset settings, each named by the fields that differ between settings
    ("" when there is one setting)."""
    keys = {json.dumps(run["preset"], sort_keys=True) for run in runs}
    presets = [json.loads(key) for key in sorted(keys)]
    differ = [field for field in presets[0] if len({json.dumps(p[field]) for p in presets}) > 1]
    out: dict[str, list[dict]] = {}
    for run in runs:
        name = " ".join(f"{field}={run['preset'][field]}" for field in differ)
        out.setdefault(name, []).append(run)
    return dict(sorted(out.items()))


def groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for framework in ("jax", "torch"):
        for method in LABELS:
            chosen = sorted((r for r in runs if r["framework"] == framework and r["method"] == method),
                            key=lambda r: r["seed"])
            if chosen:
                out[framework, method] = chosen
    return out


def per_seed(chosen: list[dict], steps: str, metric: str) -> list[float]:
    return [statistics.fmean(r["held_out"][steps][metric]) for r in chosen]


def table(runs: list[dict]) -> str:
    split = settings(runs)
    preset = next(iter(split.values()))[0]["preset"]
    steps = [str(s) for s in preset["eval_steps"]]
    head = ((["setting"] if len(split) > 1 else []) + ["framework", "method", "seeds"]
            + [f"loss, {s} step{'s' * (s != '1')}" for s in steps]
            + [f"accuracy, {s} step{'s' * (s != '1')}" for s in steps] + ["ms / meta-step", "train s / run"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, chosen_runs in split.items():
        for (framework, method), chosen in groups(chosen_runs).items():
            seeds = " ".join(str(r["seed"]) for r in chosen)
            cells = ([name] if len(split) > 1 else []) + [framework, LABELS[method], seeds]
            for metric in ("loss", "accuracy"):
                for s in steps:
                    m, se = mean_sem(per_seed(chosen, s, metric))
                    cells.append(f"{m:.3f}" if math.isnan(se) else f"{m:.3f} ± {se:.3f}")
            trained = [r for r in chosen if r["train_losses"]]
            cells.append(f"{1e3 * statistics.fmean(r['median_step_s'] for r in trained):.0f}" if trained else "–")
            cells.append(f"{statistics.fmean(r['train_s'] for r in trained):.0f}" if trained else "–")
            lines.append("| " + " | ".join(cells) + " |")
    n_tasks = preset["eval_tasks"]
    lines += ["", f"T = {preset['seq_len']}, {preset['n_layers']} layer(s), d_model {preset['d_model']}, "
              f"{preset['n_heads']} heads, {preset['dtype']}, backend {preset['backend']}; "
              f"{preset['meta_steps']} meta-steps (Adam {preset['outer_lr']}), meta-batch {preset['meta_batch']}, "
              f"K = {preset['k_support']} support / {preset['k_query']} query sequences, "
              f"{preset['inner_steps']} inner step(s) at lr {preset['inner_lr']} in training"
              + (" (the first setting's values; the setting column names what differs)" if len(split) > 1 else "")
              + f". Held-out: {n_tasks} tasks on keys training never shows, query cross-entropy (chance "
              f"ln {preset['n_classes']} = {math.log(preset['n_classes']):.3f}) and accuracy (chance "
              f"{1 / preset['n_classes']:.2f}) after adapting on the support set at the training inner lr; "
              f"mean ± standard error over seeds."]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, *, smooth: int = 20, title: str = "") -> None:
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
                se = smoothed.std(0, ddof=1) / np.sqrt(len(chosen))
                left.fill_between(x, mean - se, mean + se, color=COLOURS[method], alpha=0.15)
        steps = list(preset["eval_steps"])
        scores = np.array([per_seed(chosen, str(s), "loss") for s in steps]).T  # (seeds, steps)
        error = scores.std(0, ddof=1) / np.sqrt(len(chosen)) if len(chosen) > 1 else None
        right.errorbar(steps, scores.mean(0), yerr=error,
                       marker="o", capsize=3, label=f"{LABELS[method]} ({framework})", **style)
    chance = math.log(preset["n_classes"])
    for axis in (left, right):
        axis.axhline(chance, color="grey", linewidth=0.8, linestyle=":")
        axis.set_ylabel("query cross-entropy")
    left.set_xlabel("meta-step")
    left.set_title(f"meta-train loss after adaptation ({smooth}-step mean)")
    right.set_xlabel("inner steps at test time")
    right.set_title("held-out tasks after adaptation")
    for axis in (left, right):
        if axis.get_legend_handles_labels()[0]:  # untrained alone draws no training curve
            axis.legend(fontsize=7)
    fig.suptitle(f"key-value retrieval, T = {preset['seq_len']}, {preset['backend']}, {preset['dtype']}"
                 + (f"; {title}" if title else "") + " (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(runs: list[dict], out: Path, *, smooth: int = 20) -> str:
    """table.md and the figures of ``runs`` into ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "table.md").write_text(text)
    split = settings(runs)
    for name, chosen in split.items():
        stem = "curves" if len(split) == 1 else "curves_" + name.replace(" ", "_").replace("=", "")
        plot(chosen, out / f"{stem}.png", smooth=smooth, title=name)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--preset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smooth", type=int, default=20)
    args = parser.parse_args(argv)
    print(write(load(args.results, args.preset), args.out, smooth=args.smooth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
