"""One sDPO train step as its own flow, so it can run as a deployment on a GPU work pool.

With ``train.deployment`` set (e.g. ``sdpo_train_step/sdpo-train-step``), the pipeline starts each
train step as a run of that deployment (``run_deployment``) and waits for it: the step runs on
whichever worker serves the deployment's pool, loads its reference from the registry, trains,
and leaves its model and a ``trained.json`` record in the run folder, which the pipeline reads to
go on. The worker keeps its files in its own workspace (``SDPO_HOME``), at the places the
pipeline's have in the pipeline's, so the two may share one folder (one machine, a shared
volume) or none: with storage.uri on S3 each side fetches what the other published.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from sdpo_core.config import RunConfig, from_dict
from sdpo_core.stages import ChunkInfo
from tasks.blocks import s3_credentials
from tasks.context import RunContext
from tasks.training import TrainedStep, train_step


def record_path(ctx: RunContext, step: int) -> Path:
    return Path(ctx.run_dir) / "models" / f"step-{step}.trained.json"


@flow(name="sdpo_train_step", flow_run_name="train-step-{step}-{label}")
def sdpo_train_step(
    config: dict[str, Any],
    context: dict[str, str | None],
    chunk: dict[str, Any],
    ref_uri: str,
    ref_scores: str,
    step: int,
    label: str,
) -> dict[str, Any]:
    """Train step ``step`` on its chunk from, and against, the registered model ``ref_uri``.

    Args:
        config: the pipeline's resolved config (RunConfig.to_dict()).
        context: the pipeline run's RunContext fields (workspace, MLflow run ids).
        chunk: the step's ChunkInfo fields.
        ref_uri: M(t-1) in the registry, ``models:/<name>/<version>``.
        ref_scores: path of the reference log-probs of the chunk.
        step, label: for the flow run's name.
    """
    cfg = from_dict(config)
    # The worker reads the credentials block itself: the secrets are never flow run parameters.
    with s3_credentials(cfg.storage.credentials_block):
        return _train_step(cfg, context, chunk, ref_uri, ref_scores, step)


def _train_step(
    cfg: RunConfig, context: dict[str, str | None], chunk: dict[str, Any], ref_uri: str, ref_scores: str, step: int
) -> dict[str, Any]:
    """sdpo_train_step's work, once the credentials are in place."""
    from tasks.workspace import workspace_root
    from tasks.storage import publish

    # The pipeline's paths are under its workspace. A worker with its own (SDPO_HOME set) keeps
    # its files there, at the same places relative to it; without one it uses the pipeline's
    # folder as is (one machine, or a volume mounted at the same path).
    pipeline_root = Path(context["root"])
    root = workspace_root() if os.environ.get("SDPO_HOME") else pipeline_root
    ctx = RunContext(**(context | {"root": str(root), "run_dir": str(rebase(context["run_dir"], pipeline_root, root))}))
    chunk_info = ChunkInfo(**(chunk | {"path": str(rebase(chunk["path"], pipeline_root, root))}))
    trained = train_step(cfg, ctx, chunk_info, ref_uri, str(rebase(ref_scores, pipeline_root, root)))
    files = sorted(p for p in Path(trained.model_dir).rglob("*") if p.is_file())
    # The record names files relative to the workspace, for the pipeline to find under its own.
    record = asdict(trained) | {
        "model_dir": relative(trained.model_dir, root),
        "checkpoint_dir": relative(trained.checkpoint_dir, root) if trained.checkpoint_dir else "",
        "files": [relative(p, root) for p in files],
    }
    path = record_path(ctx, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    # With storage.uri the pipeline may run elsewhere: it fetches the model and this record.
    publish(ctx, *files, path)
    return record


def rebase(path: str | Path, old_root: Path, new_root: Path) -> Path:
    """``path`` under ``old_root`` moved to the same place under ``new_root`` (others unchanged)."""
    path = Path(path)
    return new_root / path.relative_to(old_root) if path.is_relative_to(old_root) else path


def relative(path: str | Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root.resolve()).as_posix()


def run_train_deployment(
    cfg: RunConfig, ctx: RunContext, chunk: ChunkInfo, ref_uri: str, ref_scores: str
) -> TrainedStep:
    """Run the train step as a run of the deployment ``train.deployment`` and wait for it."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name=cfg.train.deployment,
        parameters={
            "config": cfg.to_dict(),
            "context": asdict(ctx),
            "chunk": asdict(chunk),
            "ref_uri": ref_uri,
            "ref_scores": ref_scores,
            "step": chunk.step,
            "label": chunk.label,
        },
        timeout=None,
        poll_interval=2,
    )
    if flow_run.state is None or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise RuntimeError(f"train step {chunk.step} ({cfg.train.deployment}, flow run {flow_run.name}) ended {state}")
    from tasks.storage import require

    require(ctx, record_path(ctx, chunk.step))
    record = json.loads(record_path(ctx, chunk.step).read_text())
    root = Path(ctx.root)
    require(ctx, *(root / f for f in record.pop("files")))
    record["model_dir"] = str(root / record["model_dir"])
    record["checkpoint_dir"] = str(root / record["checkpoint_dir"]) if record["checkpoint_dir"] else ""
    return TrainedStep(**record)
