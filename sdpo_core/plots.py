"""PNG plots of an experiment (matplotlib, without a display): the gamma matrix, the step-2 loss
overlay (Fig. 3), the arms with their intervals, and the gold-reward win rates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo_core.comparison import METRICS
from sdpo_core.files import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def gamma_matrix_plot(matrix: dict[str, dict[str, float]], path: Path) -> Path:
    """A heat map of mean gamma, models down, data columns across, each cell labelled."""
    plt = _pyplot()
    models = list(matrix)
    columns = list(next(iter(matrix.values())))
    values = [[matrix[m][c] for c in columns] for m in models]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.9 + 0.45 * len(models)))
    image = ax.imshow(values, cmap="RdBu_r", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="mean gamma = log p(y_w|x) - log p(y_l|x)")
    ax.set_title("Mean gamma of each model on the same data (sDPO Fig. 2)")
    return _save(fig, path)


def loss_overlay_plot(curves: dict[str, list[tuple[int, float]]], path: Path, step: int) -> Path:
    """Training loss against the optimizer step, one line per curve (sDPO Fig. 3)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=label, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss")
    ax.set_title(f"Step-{step} training loss: policy initialised from M{step - 1} or from M0")
    ax.legend(fontsize=8)
    return _save(fig, path)


def arms_plot(comparison: dict[str, Any], path: Path) -> Path:
    """Each metric in its own panel: every arm's mean with its interval."""
    plt = _pyplot()
    arms = comparison["arms"]
    metrics = [m for m in METRICS if any(m in a for a in arms.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        names = [a for a in arms if metric in arms[a]]
        means = [arms[a][metric]["mean"] for a in names]
        low = [arms[a][metric]["mean"] - arms[a][metric]["low"] for a in names]
        high = [arms[a][metric]["high"] - arms[a][metric]["mean"] for a in names]
        ax.errorbar(range(len(names)), means, yerr=[low, high], fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    level = round(100 * comparison["confidence"])
    fig.suptitle(f"Final models on the eval split, {level}% paired bootstrap intervals", fontsize=10, y=1.04)
    return _save(fig, path)


def win_rate_plot(comparison: dict[str, Any], path: Path) -> Path:
    """The gold-reward win rate of each arm against M0 with its interval; 0.5 is M0's level."""
    plt = _pyplot()
    arms = {a: v["gold_win_rate"] for a, v in comparison["arms"].items() if "gold_win_rate" in v}
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    names = list(arms)
    ax.bar(range(len(names)), [arms[a]["mean"] for a in names], color="#7aa6c2")
    ax.errorbar(
        range(len(names)),
        [arms[a]["mean"] for a in names],
        yerr=[[arms[a]["mean"] - arms[a]["low"] for a in names], [arms[a]["high"] - arms[a]["mean"] for a in names]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("gold win rate against M0")
    ax.set_ylim(0, 1)
    return _save(fig, path)
