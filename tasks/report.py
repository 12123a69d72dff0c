"""The per-step report: a table on the terminal and as MLflow artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from sdpo_core.files import atomic_write_text
from tasks.context import RunContext
from tasks.retries import IO_TASK

COLUMNS = [
    ("step", "step", "{}"),
    ("chunk", "chunk", "{}"),
    ("pairs", "pairs", "{}"),
    ("M0 acc", "m0_accuracy", "{:.3f}"),
    ("ref gamma (eval)", "eval/ref_gamma", "{:.2f}"),
    ("eval acc vs M0", "eval/reward_accuracy_vs_m0", "{:.3f}"),
    ("eval margin vs M0", "eval/reward_margin_vs_m0", "{:.3f}"),
    ("eval gamma", "eval/gamma", "{:.2f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("model", "model_uri", "{}"),
]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the per-step rows; missing values show as '-'."""
    cells = [[title for title, _, _ in COLUMNS]]
    for row in rows:
        line = []
        for _, key, fmt in COLUMNS:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


@task(
    name="report",
    task_run_name="report",
    **IO_TASK,
)
def report(ctx: RunContext, rows: list[dict]) -> str:
    """Write the table and the rows (JSON) to the run folder and the MLflow parent run."""
    from prefect import get_run_logger

    from tasks import artifacts, tracking

    table = format_table(rows)
    run_dir = Path(ctx.run_dir)
    atomic_write_text(run_dir / "report.txt", table + "\n")
    atomic_write_text(run_dir / "report.json", json.dumps(rows, indent=2) + "\n")
    c = tracking.client(ctx.tracking_uri)
    artifacts.log_artifact(c, ctx.parent_run_id, run_dir / "report.txt", ctx.s3)
    artifacts.log_artifact(c, ctx.parent_run_id, run_dir / "report.json", ctx.s3)
    from tasks.storage import publish

    publish(ctx, run_dir / "report.txt", run_dir / "report.json")
    get_run_logger().info("report written to %s and logged to MLflow run %s", run_dir / "report.txt", ctx.parent_run_id)
    return table
