"""Tasks of an experiment: score the arms' models, read their loss curves, and write, log and
publish the comparison (comparison.json, comparison.md, PNG plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from sdpo_core.config import RunConfig
from sdpo_core.files import atomic_write_text
from tasks.context import RunContext
from tasks.retries import IO_TASK


@task(name="loss-curves", task_run_name="loss-curves-step-{step}", **IO_TASK)
def loss_curves(ctx: RunContext, versions: dict[str, str], step: int) -> dict[str, list[tuple[int, float]]]:
    """The training-loss history of each labelled registered version's step run, from MLflow."""
    from tasks import tracking

    c = tracking.client(ctx.tracking_uri)
    curves = {}
    for label, version in versions.items():
        run_id = c.get_model_version(ctx.model_name, version).run_id
        history = c.get_metric_history(run_id, "train/loss")
        curves[label] = sorted((int(m.step), float(m.value)) for m in history)
    return curves


def eval_prompts(eval_path: str, limit: int) -> list[Any]:
    """The first ``limit`` distinct prompts of the eval split, in file order (for sampling)."""
    from sdpo_core.data import read_pairs

    seen: dict[str, Any] = {}
    for pair in read_pairs(Path(eval_path)):
        seen.setdefault(pair.prompt_key, pair.prompt)
        if len(seen) >= limit:
            break
    return list(seen.values())


def source_outcomes(cfg: RunConfig, ctx: RunContext, m0_uri: str, train_path: str) -> dict[str, np.ndarray]:
    """M0's preference (gamma > 0, as 0/1) per training pair, grouped by source."""
    from sdpo_core.data import read_pairs
    from sdpo_core.evaluate import gamma
    from sdpo_core.scores import load_scores
    from tasks.training import reference_logps

    scores = load_scores(reference_logps(cfg, ctx, m0_uri, train_path, "train"))
    wins = (gamma(scores, cfg.partition.accuracy) > 0).double().numpy()
    by_source: dict[str, list[float]] = {}
    for pair, win in zip(read_pairs(Path(train_path)), wins, strict=True):
        by_source.setdefault(pair.source, []).append(float(win))
    return {s: np.asarray(v) for s, v in by_source.items()}


@task(name="publish-comparison", task_run_name="publish-comparison", **IO_TASK)
def publish_comparison(ctx: RunContext, comparison: dict[str, Any], curves: dict[str, list], step: int) -> list[str]:
    """Write comparison.json, comparison.md and the plots under the experiment's folder; log them
    to the experiment's parent run and as Prefect artifacts on the flow run. Returns the paths."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from sdpo_core import plots
    from sdpo_core.comparison import comparison_markdown
    from tasks import artifacts, tracking

    out = Path(ctx.run_dir) / "comparison"
    files = [
        atomic_write_text(out / "comparison.json", json.dumps(comparison, indent=2) + "\n"),
        atomic_write_text(out / "comparison.md", comparison_markdown(comparison)),
    ]
    c = comparison["comparison"]
    files.append(plots.arms_plot(c, out / "arms.png"))
    if comparison.get("gamma_matrix"):
        files.append(plots.gamma_matrix_plot(comparison["gamma_matrix"], out / "gamma_matrix.png"))
    if any(curves.values()):
        files.append(plots.loss_overlay_plot(curves, out / f"step{step}_loss.png", step))
    if any("gold_win_rate" in a for a in c["arms"].values()):
        files.append(plots.win_rate_plot(c, out / "gold_win_rate.png"))
    client = tracking.client(ctx.tracking_uri)
    for path in files:
        artifacts.log_artifact(client, ctx.parent_run_id, path, ctx.s3)
    # The headline numbers as metrics of the parent run, so MLflow can chart and compare them.
    metrics = {f"{arm}/{m}": v["mean"] for arm, values in c["arms"].items() for m, v in values.items()}
    tracking.log_metrics(client, ctx.parent_run_id, metrics, 0)
    create_markdown_artifact(comparison_markdown(comparison), key="experiment-comparison")
    rows = [
        {"arm": arm, "metric": m, "mean": v["mean"], "low": v["low"], "high": v["high"]}
        for arm, values in c["arms"].items()
        for m, v in values.items()
    ]
    create_table_artifact(rows, key="experiment-arms")
    get_run_logger().info("comparison written to %s and logged to MLflow run %s", out, ctx.parent_run_id)
    return [str(p) for p in files]
