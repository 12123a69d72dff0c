"""The per-step report: a table on the terminal, MLflow artifacts, metrics and plots on the
parent run, metrics on each step's registered version, and Prefect artifacts on the flow run."""

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


def table_records(rows: list[dict]) -> list[dict[str, str]]:
    """The table's rows as {column title: formatted value}: a Prefect table artifact."""
    return [
        {title: "-" if row.get(key) is None else fmt.format(row[key]) for title, key, fmt in COLUMNS} for row in rows
    ]


def markdown_report(rows: list[dict], ctx: RunContext, plots: list[Path]) -> str:
    """The report as Markdown: the per-step table and where the run's things are."""
    records = table_records(rows)
    titles = [title for title, _, _ in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(r[t].replace("|", "\\|") for t in titles) + " |" for r in records]
    return "\n".join(
        [
            f"# sDPO run: {len(rows)} steps",
            "",
            *lines,
            "",
            f"- MLflow parent run: `{ctx.parent_run_id}` (experiment `{ctx.experiment_id}`), with the plots "
            + ", ".join(f"`plots/{p.name}`" for p in plots),
            f"- registered model: `{ctx.model_name}`; step t's model is `models:/{ctx.model_name}@step-t`",
            f"- run folder: `{ctx.run_dir}` (report.txt, report.json)",
        ]
    )


HELDOUT_PREFIXES = ("eval/", "chunk/", "harness/")
"""Row keys that are the held-out metrics of a step (logged on the parent run with step=t)."""


def step_metrics_of(row: dict) -> dict[str, float]:
    """A row's held-out metrics (numbers under :data:`HELDOUT_PREFIXES`)."""
    return {k: float(v) for k, v in row.items() if k.startswith(HELDOUT_PREFIXES) and isinstance(v, int | float)}


@task(
    name="report",
    task_run_name="report",
    **IO_TASK,
)
def report(ctx: RunContext, rows: list[dict]) -> str:
    """Write the table and the rows (JSON) to the run folder and the MLflow parent run; log the
    held-out metrics of each step on the parent run (step=t) and on its registered version, the
    plots (sdpo_core.run_plots) on the parent run (the flow then adds the Prefect artifacts,
    :func:`flow_run_artifacts`). Safe to retry: every write replaces or repeats the same values."""
    from prefect import get_run_logger

    from sdpo_core.run_plots import TRAIN_PANELS, run_plots
    from tasks import artifacts, tracking
    from tasks.model_metrics import link_version_metrics, metric_curves
    from tasks.storage import publish

    table = format_table(rows)
    run_dir = Path(ctx.run_dir)
    atomic_write_text(run_dir / "report.txt", table + "\n")
    atomic_write_text(run_dir / "report.json", json.dumps(rows, indent=2) + "\n")
    c = tracking.client(ctx.tracking_uri)
    artifacts.log_artifact(c, ctx.parent_run_id, run_dir / "report.txt", ctx.s3)
    artifacts.log_artifact(c, ctx.parent_run_id, run_dir / "report.json", ctx.s3)

    curves = {}
    train_keys = tuple(f"train/{key}" for key, _ in TRAIN_PANELS)
    for row in rows:
        metrics = step_metrics_of(row)
        # The parent run's charts show the progression across steps (x axis: the sDPO step).
        final_loss = {"train/final_loss": row["train_loss"]} if row.get("train_loss") is not None else {}
        tracking.log_metrics(c, ctx.parent_run_id, metrics | final_loss, row["step"])
        # The version's metrics, where MLflow's model views compare them (a reused version too).
        link_version_metrics(c, ctx.model_name, row["version"], metrics, row["optimizer_steps"])
        step_run = c.get_model_version(ctx.model_name, row["version"]).run_id
        points = metric_curves(c, step_run, train_keys)
        curves[f"step {row['step']}: {row['chunk']}"] = [
            (step, {k.removeprefix("train/"): v for k, v in values.items()}) for step, values in points
        ]
    plots = run_plots(rows, curves, run_dir / "plots")
    artifacts.log_artifacts(c, ctx.parent_run_id, run_dir / "plots", "plots", ctx.s3)

    publish(ctx, run_dir / "report.txt", run_dir / "report.json", *plots)
    get_run_logger().info("report written to %s and logged to MLflow run %s", run_dir / "report.txt", ctx.parent_run_id)
    return table


def flow_run_artifacts(rows: list[dict], ctx: RunContext) -> None:
    """The per-step table as a table artifact and the report as a Markdown artifact of the flow run.

    Called in the flow's own body: an artifact made inside a task belongs to the task run only,
    and the flow run's Artifacts tab would list it under the task."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.progress import in_flow_run

    if not in_flow_run():
        return
    create_table_artifact(table_records(rows), key="sdpo-steps", description="sDPO: one row per step")
    plots = sorted((Path(ctx.run_dir) / "plots").glob("*.png"))
    create_markdown_artifact(markdown_report(rows, ctx, plots), key="sdpo-report", description="sDPO run report")
