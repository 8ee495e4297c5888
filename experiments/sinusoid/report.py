"""The table and the figure of a sinusoid run, from its ``metrics.json`` dictionary."""

from __future__ import annotations

from pathlib import Path

LABELS = {"maml": "MAML", "fo_maml": "first-order MAML", "pretrained": "pretrained"}
COLOURS = {"maml": "tab:green", "fo_maml": "tab:orange", "pretrained": "tab:blue"}
LINESTYLES = {"torch": "-", "jax": "--"}


def _rows(metrics: dict):
    """(shots, method, lr, {framework: final curve}) in table order."""
    protocol = metrics["protocol"]
    frameworks = sorted({run["framework"] for run in metrics["runs"]}, key=["torch", "jax"].index)
    for shots in protocol["shots"]:
        for method in metrics["methods"]:
            runs = {run["framework"]: run for run in metrics["runs"]
                    if run["shots"] == shots and run["method"] == method}
            for lr in next(iter(runs.values()))["final"]:
                yield shots, method, lr, {fw: runs[fw]["final"][lr] for fw in frameworks if fw in runs}


def table(metrics: dict) -> str:
    """Markdown: held-out MSE (mean ± 95 % interval over tasks) after 1 and ``eval_steps`` inner
    steps, one column pair per framework, then the training time of every run."""
    protocol = metrics["protocol"]
    last = protocol["eval_steps"]
    frameworks = [fw for fw in ("torch", "jax") if any(run["framework"] == fw for run in metrics["runs"])]
    head = ["K", "method", "eval. inner lr"]
    for fw in frameworks:
        head += [f"{fw}: 0 steps", f"{fw}: 1 step", f"{fw}: {last} steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shots, method, lr, finals in _rows(metrics):
        cells = [str(shots), LABELS[method], lr]
        for fw in frameworks:
            curve = finals.get(fw)
            cells += ["–"] * 3 if curve is None else [
                f"{curve[s]['mean']:.3f} ± {curve[s]['ci95']:.3f}" for s in (0, 1, last)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{protocol['eval_tasks']} held-out tasks, MSE on {protocol['eval_query']} query points "
              f"each after adapting on K support points; ± is the 95 % interval over tasks. "
              f"{protocol['iterations']:,} meta-iterations per run.", "",
              "| framework | K | method | training s |", "|---|---|---|---|"]
    for run in metrics["runs"]:
        lines.append(f"| {run['framework']} | {run['shots']} | {LABELS[run['method']]} | {run['train_s']:.0f} |")
    wall = metrics["wall_s"]
    lines += ["", f"Wall time {wall['total']:.0f} s in all with {metrics['jobs']} worker process(es); per "
              "(framework, K), training and evaluation: "
              + ", ".join(f"{pair} {seconds:.0f} s" for pair, seconds in wall.items() if pair != "total") + "."]
    return "\n".join(lines) + "\n"


def plot(metrics: dict, path: Path) -> None:
    """One row per K: held-out MSE after one inner step during meta-training (left) and the
    final model's MSE against the number of inner steps at test time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocol = metrics["protocol"]
    shots_list = protocol["shots"]
    fig, axes = plt.subplots(len(shots_list), 2, figsize=(11, 3.8 * len(shots_list)), squeeze=False)
    inner_lr = str(protocol["inner_lr"])
    steps = list(range(protocol["eval_steps"] + 1))
    for row, shots in zip(axes, shots_list):
        for run in metrics["runs"]:
            if run["shots"] != shots:
                continue
            style = {"color": COLOURS[run["method"]], "linestyle": LINESTYLES[run["framework"]]}
            label = f"{LABELS[run['method']]} ({run['framework']})"
            row[0].plot(run["curve"]["iteration"], run["curve"]["test_loss_1"], label=label, **style)
            final = run["final"][inner_lr]
            mean = [final[s]["mean"] for s in steps]
            half = [final[s]["ci95"] for s in steps]
            row[1].plot(steps, mean, marker="o", markersize=3, label=label, **style)
            row[1].fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                                color=style["color"], alpha=0.08)
        row[0].set(title=f"K = {shots}: held-out MSE after 1 inner step", xlabel="meta-iteration",
                   ylabel="mean squared error", yscale="log")
        row[1].set(title=f"K = {shots}: after meta-training (inner lr {inner_lr})",
                   xlabel="inner gradient steps at test time", ylabel="mean squared error", ylim=(0, None))
        for axis in row:
            axis.grid(alpha=0.3)
        row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
