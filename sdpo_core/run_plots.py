"""PNG plots of one pipeline run (matplotlib's Agg backend, no display): the training curves of
every step, the held-out metrics against the step, and the partition's chunks.

Values in, files out: the caller gathers the numbers (the per-step rows of the report, each
step's per-optimizer-step metrics) and logs the files where it likes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdpo_core.plots import _pyplot, _save

TRAIN_PANELS = (
    ("loss", "DPO loss"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
)
"""Per-optimizer-step metrics (TRL's names) drawn by :func:`training_curves_plot`."""

HELDOUT_PANELS = (
    ("reward accuracy", ("eval/reward_accuracy_vs_m0", "eval/reward_accuracy_vs_prev")),
    ("reward margin", ("eval/reward_margin_vs_m0", "eval/reward_margin_vs_prev")),
    ("mean gamma", ("eval/gamma", "eval/ref_gamma")),
)
"""Held-out metrics of a step (sdpo_core.evaluate.step_metrics) drawn by :func:`heldout_plot`."""


def training_curves_plot(curves: dict[str, Sequence[tuple[int, dict[str, float]]]], path: Path) -> Path:
    """Loss, reward margin and reward accuracy against the optimizer step, one line per step.

    Args:
        curves: a label per sDPO step ("step 1: orca") -> (optimizer step, metrics) pairs, the
            metrics under TRL's names (``loss``, ``rewards/margins``, ``rewards/accuracies``).
        path: the PNG to write (atomically).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(TRAIN_PANELS), figsize=(4.2 * len(TRAIN_PANELS), 3.6), layout="constrained")
    for ax, (key, title) in zip(axes, TRAIN_PANELS, strict=True):
        for label, points in curves.items():
            xs = [step for step, metrics in points if key in metrics]
            ys = [metrics[key] for _, metrics in points if key in metrics]
            if xs:
                ax.plot(xs, ys, label=label, linewidth=1.2, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training of each sDPO step (policy and reference start at M(t-1))")
    return _save(fig, path)


def heldout_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The held-out metrics of M1..MT against the step: accuracy and margin against M0 and against
    M(t-1), the mean gamma of Mt and of its reference on the eval split."""
    plt = _pyplot()
    steps = [int(row["step"]) for row in rows]
    fig, axes = plt.subplots(1, len(HELDOUT_PANELS), figsize=(4.2 * len(HELDOUT_PANELS), 3.6), layout="constrained")
    for ax, (title, keys) in zip(axes, HELDOUT_PANELS, strict=True):
        for key in keys:
            points = [(s, row[key]) for s, row in zip(steps, rows, strict=True) if row.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=key.removeprefix("eval/"))
        ax.set_xticks(steps)
        ax.set_xlabel("sDPO step t")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Held-out metrics of each step's model Mt")
    return _save(fig, path)


def partition_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The chunks in training order: their sizes and the M0 reward accuracy that ordered them
    (easy to hard: the paper's section 3.2)."""
    plt = _pyplot()
    labels = [f"{row['step']}: {row['chunk']}" for row in rows]
    fig, (sizes, accuracy) = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    sizes.bar(labels, [row["pairs"] for row in rows], color="tab:blue")
    sizes.set_title("pairs per chunk")
    accuracy.bar(labels, [row.get("m0_accuracy") or 0.0 for row in rows], color="tab:orange")
    accuracy.set_ylim(0.0, 1.0)
    accuracy.set_title("M0 reward accuracy")
    accuracy.set_ylabel("share of pairs with gamma_M0 > 0")
    for ax in (sizes, accuracy):
        ax.set_xlabel("step: chunk")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("Partition: one chunk per step, in training order")
    return _save(fig, path)


def run_plots(
    rows: Sequence[dict[str, Any]], curves: dict[str, Sequence[tuple[int, dict[str, float]]]], folder: Path
) -> list[Path]:
    """The three plots of a run in ``folder``: training.png, heldout.png, partition.png."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        training_curves_plot(curves, folder / "training.png"),
        heldout_plot(rows, folder / "heldout.png"),
        partition_plot(rows, folder / "partition.png"),
    ]
