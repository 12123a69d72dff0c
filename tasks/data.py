"""Tasks that prepare and partition the preference data."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sdpo_core.config import RunConfig
from sdpo_core.stages import ChunkInfo, PreparedData
from tasks.context import RunContext
from tasks.retries import IO_RETRIES


@task(name="prepare-data", task_run_name="prepare-data", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def prepare_data(cfg: RunConfig, run_dir: str) -> PreparedData:
    """Load, normalise and validate every source; hold out the eval split."""
    from sdpo_core import stages

    return stages.prepare_data(cfg, Path(run_dir) / "data")


@task(name="partition", task_run_name="partition", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def partition(cfg: RunConfig, ctx: RunContext, prepared: PreparedData, m0_uri: str) -> list[ChunkInfo]:
    """Split the training pairs into the steps' chunks; log partition.json to the parent run."""
    import json

    from sdpo_core import stages
    from tasks import tracking
    from tasks.storage import publish, require

    require(ctx, prepared.train_path)
    m0_dir, _ = tracking.fetch_for(ctx, m0_uri)
    out_dir = Path(ctx.run_dir) / "chunks"
    started = time.time()
    chunks = stages.partition(cfg, prepared, m0_dir, out_dir, ctx.cache_dir)
    record_path = out_dir / stages.PARTITION_FILE
    # The chunks, the partition record and the log-probs partition computed or split out of M0's.
    fresh_scores = [p for p in ctx.cache_dir.glob("*.safetensors") if p.stat().st_mtime >= started - 1]
    publish(ctx, *[c.path for c in chunks], record_path, *fresh_scores)
    tracking.client(ctx.tracking_uri).log_artifact(ctx.parent_run_id, str(record_path))
    record = json.loads(record_path.read_text())
    logger = get_run_logger()
    logger.info(
        "partition %s: %s",
        cfg.partition.strategy,
        ", ".join(f"step {c.step} {c.label} ({c.size} pairs)" for c in chunks),
    )
    if record["unused_pairs"]:
        logger.warning(
            "%d of %d training pairs are in no chunk (partition.sizes) and are not trained on",
            record["unused_pairs"],
            record["train_pairs"],
        )
    return chunks
