"""The chain in one view: a row per version (its data batch, reference and held-out metrics), as
a plain-text table, JSON rows and a plot of the held-out metrics along the chain.

Rows are read from the versions' tags only (register_step's lineage tags and a continue run's
batch tags, sdpo_core.continual), so ``sdpo lineage`` needs nothing but the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdpo_core.continual import (
    ABANDONED_FOR,
    BATCH_FILE,
    BATCH_IN_EVAL,
    BATCH_OVERLAP,
    BATCH_PAIRS,
    BATCH_SHA256,
    EVAL_HASH,
    ChainLink,
)
from sdpo_core.files import atomic_path

METRICS = ("eval/reward_accuracy_vs_m0", "eval/reward_margin_vs_m0", "eval/gamma")
"""The held-out metrics shown and plotted: the same eval pairs at every step, so they compare."""

COLUMNS = [
    ("step", "step", "{}"),
    ("version", "version", "{}"),
    ("batch", "batch", "{}"),
    ("pairs", "pairs", "{}"),
    ("hash", "hash", "{}"),
    ("dropped (overlap/eval)", "dropped", "{}"),
    ("reference", "reference", "{}"),
    ("eval acc vs M0", METRICS[0], "{:.3f}"),
    ("eval margin vs M0", METRICS[1], "{:.3f}"),
    ("eval gamma", METRICS[2], "{:.2f}"),
    ("run", "run", "{}"),
]


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def lineage_row(link: ChainLink) -> dict[str, Any]:
    """One version's row: step, version, batch file (or the chunk's label for a step the
    pipeline partitioned), pair count, content hash, drops, reference version, metrics."""
    t = link.tags
    if link.step == 0:
        batch, pairs, digest = f"M0: {t.get('sdpo.source_model', '?')}", None, t.get("sdpo.weights_sha256", "")[:16]
    elif BATCH_FILE in t:
        batch, pairs, digest = t[BATCH_FILE], t.get(BATCH_PAIRS), t.get(BATCH_SHA256, "")[:16]
    else:
        batch, pairs, digest = (
            t.get("sdpo.chunk.source", "?"),
            t.get("sdpo.chunk.size"),
            t.get("sdpo.chunk.content_hash"),
        )
    row: dict[str, Any] = {
        "step": link.step,
        "version": link.version,
        "batch": batch,
        "pairs": int(pairs) if pairs and pairs.isdigit() else None,
        "hash": digest or None,
        "dropped": f"{t[BATCH_OVERLAP]}/{t.get(BATCH_IN_EVAL, '0')}" if BATCH_OVERLAP in t else None,
        "reference": link.reference_version or None,
        "run": t.get("sdpo.run"),
        "eval_hash": t.get(EVAL_HASH),
    }
    for key in METRICS:
        row[key] = _float(t.get(f"sdpo.{key}"))
    if ABANDONED_FOR in t:
        row["abandoned_for"] = t[ABANDONED_FOR]
    return row


def format_lineage(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of lineage rows; missing values show as '-'."""
    cells = [[title for title, _, _ in COLUMNS]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def lineage_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """A PNG of each held-out metric along the chain (x: step, one panel per metric), written
    atomically; steps without the metric (M0) are left out of its line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.2))
    for ax, key in zip(axes, METRICS, strict=True):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        ax.set_title(key.removeprefix("eval/"), fontsize=10)
        ax.set_xlabel("step")
        ax.set_xticks([r["step"] for r in rows])
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
