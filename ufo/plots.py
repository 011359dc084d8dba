"""Every PNG the project draws, in one place: a training run's losses and weights and its learned
paths, a path search's Pareto front, and the benchmarks' comparisons. Each function takes plain
values and writes its file atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ufo.atomic import atomic_file
from ufo.model.paths import OPEN


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path, dpi: int) -> None:
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)


def plot_history(history: Path, png: Path, title: str = "") -> Path:
    """Each task's loss and weight over the steps of a run's `history.jsonl`, as a PNG."""
    plt = _pyplot()
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    tasks = list(records[0]["loss"]) if records else []
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_weight) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for task in tasks:
        ax_loss.plot(steps, [r["loss"].get(task) for r in records], label=task)
        ax_weight.plot(steps, [r["weight"].get(task) for r in records], label=task)
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_weight.set_ylabel("weight")
    ax_weight.set_xlabel("step")
    ax_loss.legend()
    ax_loss.set_title(title)
    _save(fig, png, 100)
    return png


def plot_diagnostics(history: Path, png: Path, title: str = "") -> Path | None:
    """The diagnostic steps of a run's `history.jsonl` (ufo/diagnostics.py): each task's loss against its
    first (speed), its gradient norm on the shared parameters (dominance), the cosine between every pair
    of tasks' shared gradients (conflict), and the global gradient norm of every step. None when the
    run measured no diagnostic step."""
    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    measured = [r for r in records if "shared_grad_norm" in r]
    if not measured:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    steps = [r["step"] for r in measured]
    for key, ax, label in (("loss_ratio", axes[0], "loss / first loss"),
                           ("shared_grad_norm", axes[1], "shared gradient norm"),
                           ("grad_cosine", axes[2], "gradient cosine")):
        for name in measured[0][key]:
            ax.plot(steps, [r[key].get(name) if r[key].get(name) is not None else np.nan for r in measured],
                    marker="o", ms=3, label=name)
        ax.set_ylabel(label)
        if measured[0][key]:
            ax.legend(fontsize=7)
        else:  # one task: no pair to measure
            ax.text(0.5, 0.5, "one task: no pairs", transform=ax.transAxes, ha="center", color="gray")
    axes[0].set_yscale("log")
    axes[2].axhline(0.0, color="gray", lw=0.8)
    every = [(r["step"], r["global_grad_norm"]) for r in records if r.get("global_grad_norm") is not None]
    axes[3].plot([s for s, _ in every], [n for _, n in every], lw=0.8)
    axes[3].set_ylabel("global gradient norm")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("step")
    axes[0].set_title(title)
    _save(fig, png, 100)
    return png


def plot_paths(policy, png: Path, title: str = "") -> Path:
    """A heatmap of the learned paths: tasks x blocks, the probability of the task's own FFN, each
    decided block marked with its letter."""
    plt = _pyplot()
    tasks = list(policy.probs)
    probs = np.array([policy.probs[t] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * probs.shape[1], 1.0 + 0.5 * len(tasks)))
    image = ax.imshow(probs, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, task in enumerate(tasks):
        for j, letter in enumerate(policy.decided[task]):
            ax.text(j, i, letter if letter != OPEN else f"{probs[i, j]:.2f}", ha="center", va="center",
                    color="white" if probs[i, j] < 0.6 else "black", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(probs.shape[1]), [str(j) for j in range(probs.shape[1])])
    ax.set_xlabel("block (letter: decided; number: P(FFN-task) while open)")
    fig.colorbar(image, ax=ax, label="P(FFN-task)")
    ax.set_title(title, fontsize=9)
    _save(fig, png, 100)
    return png


def plot_pareto(result, png: Path) -> Path:
    """Metric against parameters (and latency) of every candidate, the Pareto front drawn as a line."""
    plt = _pyplot()
    latency = all(e["latency_ms"] is not None for e in result.evaluated)
    fig, axes = plt.subplots(1, 2 if latency else 1, figsize=(10 if latency else 5, 4), squeeze=False)
    for ax, key, label in [(axes[0][0], "params", "parameters (M)")] + (
            [(axes[0][1], "latency_ms", "latency (ms, this machine)")] if latency else []):
        scale = 1e-6 if key == "params" else 1.0
        ax.scatter([e[key] * scale for e in result.evaluated], [e["value"] for e in result.evaluated],
                   s=12, alpha=0.5, label="evaluated")
        front = sorted(result.pareto, key=lambda e: e[key])
        ax.plot([e[key] * scale for e in front], [e["value"] for e in front], "r.-", label="Pareto front")
        limit = result.budget.get("max_params" if key == "params" else "max_latency_ms")
        if limit is not None:
            ax.axvline(limit * scale, color="gray", linestyle="--", label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel(result.metric)
        ax.legend(fontsize="small")
    axes[0][0].set_title(f"ufo search: {result.task}")
    _save(fig, png, 100)
    return png


def plot_deploy(result: dict, png: Path) -> Path:
    """`ufo bench deploy`: each deployable model's metric against its batch-1 latency, the Pareto front drawn."""
    plt = _pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    import math

    logs, values = [math.log10(r["ms_b1"]) for r in rows.values()], [r["metric"] for r in rows.values()]
    width, height = (max(logs) - min(logs)) or 1.0, (max(values) - min(values)) or 1.0

    def near(a: dict, b: dict) -> float:  # distance on the plot, in axis fractions: log latency, metric
        return (abs(math.log10(a["ms_b1"]) - math.log10(b["ms_b1"])) / width
                + abs(a["metric"] - b["metric"]) / height)

    for name, row in rows.items():
        marker = {"torch": "s", "onnx-int8": "^"}.get(row["kind"], "o")
        ax.scatter(row["ms_b1"], row["metric"], marker=marker, s=30)
        # the label above the point, below it where its nearest neighbour lies higher (or as high and slower):
        # pairs do not overprint
        other = min((r for r in rows.values() if r is not row), key=lambda r: near(r, row), default=row)
        ax.annotate(name, (row["ms_b1"], row["metric"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3 if (row["metric"], row["ms_b1"]) >= (other["metric"], other["ms_b1"]) else -10))
    front, best = [], -1.0
    for name, row in sorted(rows.items(), key=lambda item: (item[1]["ms_b1"], -item[1]["metric"])):
        if row["metric"] > best:
            front.append(row)
            best = row["metric"]
    ax.plot([r["ms_b1"] for r in front], [r["metric"] for r in front], "r--", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1 0.2 0.5 1 2 5 ...: plain numbers
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency, batch 1 (ms, this CPU)")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"ufo bench deploy: {result['task']}")
    ax.legend(fontsize="small")
    _save(fig, png, 100)
    return png


def plot_strategies(out: Path, strategies: list[str], png: Path) -> None:
    """`ufo bench weighting`: each strategy's losses and weights per task over the steps (one row each)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(strategies), 2, figsize=(10, 2.2 * len(strategies)), squeeze=False, sharex=True)
    for row, name in zip(axes, strategies):
        records = [json.loads(line) for line in (out / name / "history.jsonl").read_text().splitlines() if line]
        steps = [r["step"] for r in records]
        for task in records[0]["loss"]:
            row[0].plot(steps, [r["loss"][task] for r in records], label=task)
            row[1].plot(steps, [r["weight"][task] for r in records], label=task)
        row[0].set_ylabel(f"{name}\nloss")
        row[0].set_yscale("log")
        row[1].set_ylabel("weight")
    axes[0][0].legend(fontsize="small")
    axes[0][0].set_title("loss per task")
    axes[0][1].set_title("weight per task")
    axes[-1][0].set_xlabel("step")
    axes[-1][1].set_xlabel("step")
    _save(fig, png, 90)


def plot_ufo(r: dict[str, Any], labels: dict[str, str], png: Path) -> None:
    """`ufo bench ufo`: each task's headline metric per setting (`labels`: setting -> legend, in order)."""
    plt = _pyplot()
    table, tasks = r["table"], r["tasks"]
    settings = [s for s in labels if s in table]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tasks), 4))
    width = 0.8 / max(1, len(settings))
    spread = r.get("table_std", {})
    for i, s in enumerate(settings):  # error bars: the seeds' standard deviation (none for one seed)
        ax.bar([t + i * width for t in range(len(tasks))], [table[s].get(task, 0) for task in tasks], width,
               yerr=[spread.get(s, {}).get(task, 0) for task in tasks] if r.get("seeds", 1) > 1 else None,
               capsize=2, label=labels[s])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))],
                  [f"{task}\n{r['metrics'][task]}" for task in tasks])
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_title(f"ufo bench ufo: {r['steps']} steps per run")
    _save(fig, png, 90)
