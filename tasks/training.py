"""Tasks that score pairs, train a step and evaluate it."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import RunConfig
from sdpo_core.stages import ChunkInfo
from tasks.context import RunContext
from tasks.retries import IO_RETRIES


@dataclass(frozen=True)
class TrainedStep:
    """A trained step model on local disk, with its MLflow step run."""

    step: int
    model_dir: str
    run_id: str
    optimizer_steps: int
    final_loss: float
    checkpoint_dir: str = ""
    """The step's checkpoints, removed once its model is registered."""


def clear_checkpoints(ctx: RunContext, checkpoint_dir: str) -> None:
    """Remove a registered step's checkpoints, here and in storage."""
    from sdpo_core.checkpoint import Checkpoints
    from tasks.storage import remove

    Checkpoints(checkpoint_dir, 0).clear()
    remove(ctx, checkpoint_dir)


def step_checkpoints(cfg: RunConfig, ctx: RunContext, chunk: ChunkInfo, ref_dir: str) -> Checkpoints:
    """The train step's checkpoints in the workspace; with storage.uri each one is also uploaded
    (its files, then the ``latest`` pointer) and a missing local copy is fetched from there."""
    from tasks.workspace import within
    from sdpo_core.checkpoint import LATEST, STATE, Checkpoints
    from sdpo_core.stages import checkpoint_dir
    from tasks.storage import fetch, publish, remove

    root = within(Path(ctx.root), checkpoint_dir(cfg, chunk, ref_dir, Path(ctx.root) / "checkpoints"))

    uploaded: list[Path] = []

    def upload(path: Path) -> None:
        from tasks.s3 import UploadError

        try:
            publish(ctx, *sorted(p for p in path.iterdir() if p.name != STATE), path / STATE)
            publish(ctx, root / LATEST)
            # The store keeps only the newest checkpoint too, once `latest` points past the older.
            for older in uploaded:
                remove(ctx, older)
            uploaded[:] = [path]
        except UploadError as exc:
            # The local checkpoint is whole; a store that is down must not stop training. The
            # next checkpoint tries again; only the step's model has to reach the store.
            warnings.warn(f"checkpoint {path} not uploaded: {exc}", stacklevel=2)

    if ctx.storage_uri and not (root / LATEST).is_file() and fetch(ctx, root / LATEST):
        # Saved on another machine: bring the newest checkpoint here (verified when loaded).
        name = (root / LATEST).read_text().strip()
        if fetch(ctx, root / name / STATE):
            for f in json.loads((root / name / STATE).read_text())["files"]:
                fetch(ctx, root / name / f)
    if (root / LATEST).is_file():  # resuming: the checkpoint the next one replaces
        uploaded.append(root / (root / LATEST).read_text().strip())
    return Checkpoints(root, cfg.train.checkpoint_every, upload if ctx.storage_uri else None)


@task(
    name="reference-logps",
    task_run_name="logps-{what}-under-{model_uri}",
    cache_policy=NO_CACHE,
    persist_result=False,
    **IO_RETRIES,
)
def reference_logps(cfg: RunConfig, ctx: RunContext, model_uri: str, pairs_path: str, what: str) -> str:
    """Forward-only log-probs of a data file under a registered model (cached by content)."""
    from sdpo_core.stages import model_fingerprint, score_file, scores_key
    from tasks.storage import fetch, publish, require
    from tasks.tracking import fetch_for

    require(ctx, pairs_path)
    model_dir, _ = fetch_for(ctx, model_uri)
    # Scored before, maybe on another machine: the cache entry is in storage.
    fetch(ctx, ctx.cache_dir / f"{scores_key(cfg, model_fingerprint(model_dir), pairs_path)}.safetensors")
    path = score_file(cfg, model_dir, pairs_path, ctx.cache_dir)
    publish(ctx, path)
    return path


@task(
    name="train-step",
    task_run_name="train-step-{chunk.step}-{chunk.label}",
    cache_policy=NO_CACHE,
    persist_result=False,
    **IO_RETRIES,  # I/O failures only; the retry resumes from the newest checkpoint
)
def train_step(cfg: RunConfig, ctx: RunContext, chunk: ChunkInfo, ref_uri: str, ref_scores: str) -> TrainedStep:
    """DPO on the chunk, policy and reference both M(t-1); metrics to the step's MLflow run."""
    from sdpo_core.stages import train_step as run_train_step
    from tasks import tracking
    from tasks.storage import require

    c = tracking.client(ctx.tracking_uri)
    require(ctx, chunk.path, ref_scores)
    ref_dir, ref_version = tracking.fetch_for(ctx, ref_uri)
    run_id = tracking.start_run(
        c,
        ctx.experiment_id,
        f"step-{chunk.step}-{chunk.label}",
        parent_id=ctx.parent_run_id,
        tags={"sdpo.step": str(chunk.step), "sdpo.source": chunk.label, "sdpo.reference": ref_uri},
    )
    tracking.log_params(
        c,
        run_id,
        {
            "step": str(chunk.step),
            "chunk.label": chunk.label,
            "chunk.size": str(chunk.size),
            "chunk.content_hash": chunk.content_hash,
            "reference.uri": ref_uri,
            "reference.version": ref_version,
        },
    )

    logger = get_run_logger()
    checkpoints = step_checkpoints(cfg, ctx, chunk, ref_dir)
    resume = checkpoints.latest()
    if resume is not None:
        logger.info("resuming train step %d from checkpoint %s", chunk.step, resume)
        c.set_tag(run_id, "sdpo.resumed_from", resume.name)

    def log(step: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(c, run_id, {f"train/{k}": v for k, v in metrics.items()}, step)
        if step == 1 or step % 10 == 0:
            logger.info(
                "optimizer step %d: loss %.4f, reward accuracy %.3f, margin %.3f",
                step,
                metrics["loss"],
                metrics["rewards/accuracies"],
                metrics["rewards/margins"],
            )

    try:
        model_dir, result = run_train_step(
            cfg,
            chunk.step,
            ref_dir,
            chunk,
            ref_scores,
            Path(ctx.run_dir) / "models" / f"step-{chunk.step}",
            callback=log,
            meta={"reference_uri": ref_uri, "reference_version": ref_version},
            checkpoints=checkpoints,
        )
    except Exception:
        c.set_terminated(run_id, "FAILED")
        raise
    if result.resumed_from:
        logger.info(
            "train step %d resumed at optimizer step %d of %d", chunk.step, result.resumed_from, result.optimizer_steps
        )
    return TrainedStep(chunk.step, model_dir, run_id, result.optimizer_steps, result.final_loss, str(checkpoints.root))


@task(
    name="evaluate-step",
    task_run_name="evaluate-step-{chunk.step}-{chunk.label}",
    cache_policy=NO_CACHE,
    persist_result=False,
    **IO_RETRIES,
)
def evaluate_step(
    cfg: RunConfig,
    ctx: RunContext,
    chunk: ChunkInfo,
    trained: TrainedStep,
    eval_path: str,
    m0_eval_scores: str,
    prev_eval_scores: str,
    ref_scores: str,
) -> tuple[dict[str, float], str]:
    """Held-out metrics of Mt against M0 and M(t-1); the reference's gamma on the chunk."""
    from sdpo_core.stages import evaluate_step as run_evaluate
    from sdpo_core.stages import score_file
    from tasks import tracking
    from tasks.storage import publish, require

    require(ctx, eval_path, m0_eval_scores, prev_eval_scores, ref_scores)
    eval_scores = score_file(cfg, trained.model_dir, eval_path, ctx.cache_dir)
    publish(ctx, eval_scores)
    metrics = run_evaluate(cfg, eval_scores, m0_eval_scores, prev_eval_scores, ref_scores)
    tracking.log_metrics(tracking.client(ctx.tracking_uri), trained.run_id, metrics, trained.optimizer_steps)
    return metrics, eval_scores
