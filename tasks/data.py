"""Tasks that prepare and partition the preference data."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from sdpo_core.config import RunConfig
from sdpo_core.stages import ChunkInfo, PreparedData
from tasks.context import RunContext


@task(name="prepare-data", task_run_name="prepare-data", cache_policy=NO_CACHE, persist_result=False)
def prepare_data(cfg: RunConfig, run_dir: str) -> PreparedData:
    """Load, normalise and validate every source; hold out the eval split."""
    from sdpo_core import stages

    return stages.prepare_data(cfg, Path(run_dir) / "data")


@task(name="partition", task_run_name="partition", cache_policy=NO_CACHE, persist_result=False)
def partition(cfg: RunConfig, ctx: RunContext, prepared: PreparedData, m0_uri: str) -> list[ChunkInfo]:
    """Split the training pairs into the steps' chunks (by_source: easy to hard for M0)."""
    from sdpo_core import stages
    from tasks.tracking import fetch_for

    m0_dir, _ = fetch_for(ctx, m0_uri)
    return stages.partition(cfg, prepared, m0_dir, Path(ctx.run_dir) / "chunks", ctx.cache_dir)
