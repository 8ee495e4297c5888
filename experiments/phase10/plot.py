"""Plots of a phase-10 run: meta-train / meta-test loss per meta-step and time per meta-step.

Called by run.py; also re-plots a finished run::

    python experiments/phase10/plot.py experiments/phase10/runs/<run>
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the CI or GPU machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Colour = framework × backend, line style = method, so MAML and FO-MAML pair up visually; torch
# is drawn wide and pale under JAX's thin line, because with the same seed the two coincide.
STYLES = {"maml": "-", "fo_maml": "--"}
WIDTHS = {"torch": dict(linewidth=4, alpha=0.4), "jax": dict(linewidth=1.2, alpha=1.0)}


def _label(run: dict) -> str:
    return f"{run['framework']}/{run['backend']}/{run['method']}"


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average (the meta-train loss of one meta-batch is noisy)."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - width, 0)
    return (cumulative[end] - cumulative[start]) / (end - start)


def plot_run(metrics: list[dict], runs: list[dict], out: Path, *, title: str) -> None:
    """Write ``loss.png`` and ``step_time.png`` into ``out``.

    Arguments:
        metrics: rows with framework, backend, method, step, meta_train_loss, meta_test_loss
            (None or "" when not evaluated) and step_time_s.
        runs: the per-run summaries of results.json (median_step_time_s for the bars).
    """
    curves = defaultdict(list)
    for row in metrics:
        curves[_label(row)].append(row)
    colours = {}
    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, rows in curves.items():
        family = label.rsplit("/", 1)[0]
        colour = colours.setdefault(family, f"C{len(colours)}")
        style = STYLES[rows[0]["method"]]
        steps = np.array([int(row["step"]) for row in rows])
        train = np.array([float(row["meta_train_loss"]) for row in rows])
        width = WIDTHS[rows[0]["framework"]]
        ax_train.plot(steps, _smooth(train, max(1, len(rows) // 20)), style, color=colour, label=label, **width)
        tested = [(int(row["step"]), float(row["meta_test_loss"])) for row in rows
                  if row["meta_test_loss"] not in (None, "")]
        ax_test.plot(*zip(*tested), style, marker="o", markersize=3, color=colour, label=label, **width)
    ax_train.set(title="meta-train loss (moving average)", xlabel="meta-step", ylabel="query loss after adaptation")
    ax_test.set(title="meta-test loss (held-out tasks)", xlabel="meta-step")
    ax_test.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    done = [run for run in runs if run.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(done)), 4))
    ax.bar(range(len(done)), [1e3 * run["median_step_time_s"] for run in done],
           color=[colours[_label(run).rsplit("/", 1)[0]] for run in done])
    ax.set_xticks(range(len(done)), [_label(run) for run in done], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="ms per meta-step (median)", title=f"{title}: time per meta-step", yscale="log")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0])
    with open(run_dir / "metrics.csv", newline="") as handle:
        metrics = list(csv.DictReader(handle))
    results = json.loads((run_dir / "results.json").read_text())
    plot_run(metrics, results["runs"], run_dir, title=results["config"]["name"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
