"""The sample generations stage: M0 and every step's model continue the same eval prompts, logged
as one MLflow table on the parent run (a column per model), so the step models read side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from sdpo_core.config import RunConfig
from sdpo_core.files import atomic_write_text
from tasks.context import RunContext
from tasks.retries import IO_TASK

TABLE_FILE = "samples/generations.json"
"""The table's artifact path on the MLflow parent run (MLflow's table JSON, shown in its UI)."""


def column_name(step: int) -> str:
    """The table column of a step's model: ``M0`` for the base, ``step-<t>`` after (the aliases' names)."""
    return "M0" if step == 0 else f"step-{step}"


@task(name="sample_generations", task_run_name="sample generations", **IO_TASK)
def sample_generations(cfg: RunConfig, ctx: RunContext, eval_path: str, versions: dict[int, str]) -> str | None:
    """Continue the first ``evaluate.samples`` distinct eval prompts with every model in
    ``versions`` (step -> registry version), ``evaluate.sample_tokens`` tokens each, seeded by
    ``train.seed``; write ``generations.json`` to the run folder and log the table on the parent run.

    Returns:
        The run folder's generations.json, or None when ``evaluate.samples`` is 0.

    Safe to retry: the samples are the same on every try, and a table already on the run is not
    logged again (MLflow's log_table appends to an existing table).
    """
    from prefect import get_run_logger

    from sdpo_core.generations import continue_prompts, eval_prompts, generations_table, prompt_text
    from sdpo_core.model_io import load_model, load_tokenizer, resolve_device
    from sdpo_core.pairs import read_pairs
    from tasks import tracking
    from tasks.storage import publish, require

    n, tokens = cfg.evaluate.samples, cfg.evaluate.sample_tokens
    if n == 0:
        return None
    require(ctx, eval_path)
    prompts = eval_prompts(read_pairs(Path(eval_path)), n)
    device = resolve_device(cfg.train.device)
    columns: dict[str, list[str]] = {}
    shown: list[str] = []
    for step in sorted(versions):
        model_dir, _ = tracking.fetch_for(ctx, tracking.version_uri(ctx.model_name, versions[step]))
        tokenizer = load_tokenizer(cfg.model, model_dir)
        model = load_model(cfg.model, model_dir, device).eval()
        columns[column_name(step)] = continue_prompts(model, tokenizer, prompts, tokens, cfg.train.seed)
        if not shown:  # the prompt column: the text M0 was given (every step shares its tokenizer)
            shown = [prompt_text(p, tokenizer) for p in prompts]
        del model  # one model in memory at a time
    table = generations_table(shown, columns)
    path = Path(ctx.run_dir) / "generations.json"
    atomic_write_text(path, json.dumps(table, indent=2, ensure_ascii=False) + "\n")

    c = tracking.client(ctx.tracking_uri)
    if ctx.s3 is None:
        logged = {f.path for f in c.list_artifacts(ctx.parent_run_id, "samples")}
        if TABLE_FILE not in logged:
            c.log_table(ctx.parent_run_id, table, TABLE_FILE)
    else:
        # Credentials from a Prefect block reach S3 only through tasks.artifacts (MLflow's own
        # artifact client would look for them in the environment): the same table file and tag
        # log_table writes, uploaded with the block's credentials (an upload replaces, so a retry
        # is safe).
        log_table_file(c, ctx, table)
    publish(ctx, path)
    get_run_logger().info(
        "sample generations: %d prompt(s) x %d model(s), %d tokens each, logged as %s on MLflow run %s",
        len(shown),
        len(columns),
        tokens,
        TABLE_FILE,
        ctx.parent_run_id,
    )
    return str(path)


def log_table_file(c: Any, ctx: RunContext, table: dict[str, list[str]]) -> None:
    """``table`` as MLflow's table artifact ``TABLE_FILE`` (pandas' split JSON, the run tag that
    lists it as a table), uploaded through tasks.artifacts with the run's S3 credentials."""
    import tempfile

    import pandas as pd

    from tasks import artifacts

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / Path(TABLE_FILE).parent
        folder.mkdir(parents=True)
        (folder / Path(TABLE_FILE).name).write_text(pd.DataFrame(table).to_json(orient="split", index=False))
        artifacts.log_artifacts(c, ctx.parent_run_id, folder, str(Path(TABLE_FILE).parent), ctx.s3)
    c.set_tag(ctx.parent_run_id, "mlflow.loggedArtifacts", json.dumps([{"path": TABLE_FILE, "type": "table"}]))
