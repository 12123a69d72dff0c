"""Tasks that score pairs, train a step and evaluate it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from prefect import get_run_logger, task

from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import RunConfig
from sdpo_core.files import atomic_write_text
from sdpo_core.records import ChunkInfo, TrainStepResult, TrainStepSpec
from sdpo_core.tokenization import tokens_path
from tasks.context import RunContext
from tasks.retries import IO_TASK, attempt_key


def clear_checkpoints(ctx: RunContext, checkpoint_dir: str) -> None:
    """Remove a registered step's checkpoints, here and in storage."""
    from sdpo_core.checkpoint import Checkpoints
    from tasks.storage import remove

    Checkpoints(checkpoint_dir, 0).clear()
    remove(ctx, checkpoint_dir)


def step_checkpoints(
    cfg: RunConfig, ctx: RunContext, chunk: ChunkInfo, ref_dir: str, init_dir: str = ""
) -> Checkpoints:
    """The train step's checkpoints in the workspace; with storage.uri each one is also uploaded
    (its files, then the ``latest`` pointer) and a missing local copy is fetched from there."""
    from sdpo_core.checkpoint import LATEST, STATE, Checkpoints
    from sdpo_core.step import checkpoint_dir
    from tasks.storage import fetch, publish, remove
    from tasks.workspace import within

    root = within(Path(ctx.root), checkpoint_dir(cfg, chunk, ref_dir, Path(ctx.root) / "checkpoints", init_dir))

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
    if not ctx.storage_uri:
        return Checkpoints(root, cfg.train.checkpoint_every)
    from tasks.lease import step_lease

    # Machines sharing the store must not train the same step at once: a lease there (tasks.lease).
    return Checkpoints(root, cfg.train.checkpoint_every, upload, lease=lambda: step_lease(ctx, root, chunk.step))


@task(
    name="reference-logps",
    task_run_name="logps-{what}-under-{model_uri}",
    **IO_TASK,
)
def reference_logps(cfg: RunConfig, ctx: RunContext, model_uri: str, pairs_path: str, what: str) -> str:
    """Forward-only log-probs of a data file under a registered model (cached by content)."""
    from tasks.scores import cached_scores
    from tasks.storage import fetch, publish, require
    from tasks.tracking import fetch_for

    require(ctx, pairs_path)
    fetch(ctx, tokens_path(pairs_path), optional=True)  # without it the file is tokenized here
    model_dir, _ = fetch_for(ctx, model_uri)
    path, _ = cached_scores(cfg, ctx, model_dir, pairs_path)
    # Published even when it was already cached here: a train step on another machine reads it
    # from this run's storage, which an earlier run's cache may never have reached.
    publish(ctx, path)
    return str(path)


@task(name="mean-reference", task_run_name="mean-reference-step-{step}", **IO_TASK)
def mean_reference(ctx: RunContext, score_paths: list[str], step: int) -> str:
    """The multi-reference log-probs of step ``step``'s chunk (``loss.reference: mean``): the mean
    of M0 .. M(t-1)'s scores, written under the run folder (and to storage for a remote step)."""
    from sdpo_core.scores import load_scores, mean_scores, save_scores
    from tasks.storage import publish, require

    require(ctx, *score_paths)
    path = save_scores(
        mean_scores([load_scores(p) for p in score_paths]),
        Path(ctx.run_dir) / "references" / f"step-{step}-mean.safetensors",
    )
    publish(ctx, path)
    return str(path)


@task(
    name="train-step",
    task_run_name="train-step-{spec.chunk.step}-{spec.chunk.label}",
    **IO_TASK,  # I/O failures only; the retry resumes from the newest checkpoint
)
def train_step(ctx: RunContext, spec: TrainStepSpec) -> TrainStepResult:
    """DPO on the chunk, policy and reference both M(t-1); metrics to the step's MLflow run.

    Fetches the reference named by ``spec.ref_uri`` and fills the spec's local paths (the
    step model under this run's folder, the checkpoints under the workspace) before training.
    """
    from sdpo_core.fingerprint import model_fingerprint
    from sdpo_core.harness import check_available as check_harness
    from sdpo_core.step import run_step
    from sdpo_core.train import batch_plan
    from tasks import tracking
    from tasks.harness import log_harness
    from tasks.outage import MetricBuffer
    from tasks.progress import Progress
    from tasks.storage import fetch, require

    cfg, chunk = spec.config, spec.chunk
    check_harness(cfg)  # evaluate.harness without lm_eval fails before the step trains
    c = tracking.client(ctx.tracking_uri)
    require(ctx, chunk.path, spec.ref_scores)
    fetch(ctx, tokens_path(chunk.path), optional=True)
    ref_dir, ref_version = tracking.fetch_for(ctx, spec.ref_uri)
    init_dir = tracking.fetch_for(ctx, spec.init_uri)[0] if spec.init_uri else ""
    # A retry of this task run continues the step run its first try opened (and its checkpoints).
    key = attempt_key()
    run_id = tracking.find_run(c, ctx.experiment_id, key) or tracking.start_run(
        c,
        ctx.experiment_id,
        f"step-{chunk.step}-{chunk.label}",
        parent_id=ctx.parent_run_id,
        tags={"sdpo.step": str(chunk.step), "sdpo.source": chunk.label, "sdpo.reference": spec.ref_uri},
        key=key,
    )
    tracking.log_params(
        c,
        run_id,
        {
            "step": str(chunk.step),
            "chunk.label": chunk.label,
            "chunk.size": str(chunk.size),
            "chunk.content_hash": chunk.content_hash,
            "reference.uri": spec.ref_uri,
            "reference.version": ref_version,
            "init.uri": spec.init_uri or spec.ref_uri,
        },
    )

    logger = get_run_logger()
    checkpoints = step_checkpoints(cfg, ctx, chunk, ref_dir, init_dir)
    resume = checkpoints.latest()
    if resume is not None:
        logger.info("resuming train step %d from checkpoint %s", chunk.step, resume)
        c.set_tag(run_id, "sdpo.resumed_from", resume.name)

    # Buffered: a tracking server down for a while costs metrics a delay, not the train step.
    buffer = MetricBuffer(c, run_id, warn=logger.warning)
    # A progress artifact on the flow run, moved by every optimizer step (tasks.progress).
    progress = Progress(f"training step {chunk.step} ({chunk.label}), optimizer steps")
    total_steps = len(batch_plan(chunk.size, cfg.train))

    def log(step: int, metrics: dict[str, float]) -> None:
        buffer.add({f"train/{k}": v for k, v in metrics.items()}, step)
        progress(step, total_steps)
        if step == 1 or step % 10 == 0:
            logger.info(
                "optimizer step %d: loss %.4f, reward accuracy %.3f, margin %.3f",
                step,
                metrics["loss"],
                metrics["rewards/accuracies"],
                metrics["rewards/margins"],
            )

    local = spec.model_copy(
        update={
            "ref_dir": ref_dir,
            "init_dir": init_dir,
            "out_dir": str(Path(ctx.run_dir) / "models" / f"step-{chunk.step}"),
            "checkpoint_dir": str(checkpoints.root),
            "meta": {
                **spec.meta,
                "reference_uri": spec.ref_uri,
                "reference_version": ref_version,
                # What the policy started from: the reference, or M0 under train.init=base.
                "init_uri": spec.init_uri or spec.ref_uri,
                "init_sha256": model_fingerprint(init_dir or ref_dir),
            },
        }
    )
    try:
        result = run_step(local, callback=log, checkpoints=checkpoints)
    except Exception:
        buffer.flush(final=True)
        c.set_terminated(run_id, "FAILED")
        raise
    buffer.flush(final=True)
    if result.resumed_from:
        logger.info(
            "train step %d resumed at optimizer step %d of %d", chunk.step, result.resumed_from, result.optimizer_steps
        )
    log_harness(cfg, ctx, result.model_dir, run_id, result.optimizer_steps)  # evaluate.harness, where it trained
    return result.model_copy(update={"run_id": run_id, "checkpoint_dir": str(checkpoints.root)})


@task(
    name="evaluate-step",
    task_run_name="evaluate-step-{chunk.step}-{chunk.label}",
    **IO_TASK,
)
def evaluate_step(
    cfg: RunConfig,
    ctx: RunContext,
    chunk: ChunkInfo,
    trained: TrainStepResult,
    eval_path: str,
    m0_eval_scores: str,
    prev_eval_scores: str,
    ref_scores: str,
) -> tuple[dict[str, float], str]:
    """Held-out metrics of Mt against M0 and M(t-1) (sdpo_core.evaluate.step_metrics); returns
    them and the path of Mt's eval scores (the next step's "previous")."""
    from sdpo_core.evaluate import step_metrics
    from sdpo_core.scores import load_scores
    from tasks import tracking
    from tasks.scores import cached_scores
    from tasks.storage import fetch, publish, require

    require(ctx, eval_path, m0_eval_scores, prev_eval_scores, ref_scores)
    fetch(ctx, tokens_path(eval_path), optional=True)
    # An adapter step model (train.lora.registered_as: adapter) is scored merged into its base.
    model_dir = str(tracking.full_model_dir(ctx.tracking_uri, trained.model_dir, ctx.model_cache, ctx.s3))
    eval_scores, _ = cached_scores(cfg, ctx, model_dir, eval_path)
    publish(ctx, eval_scores)
    metrics = step_metrics(
        load_scores(eval_scores),
        load_scores(m0_eval_scores),
        load_scores(prev_eval_scores),
        load_scores(ref_scores),
        cfg.loss.beta,
    )
    tracking.log_metrics(tracking.client(ctx.tracking_uri), trained.run_id, metrics, trained.optimizer_steps)
    return metrics, str(eval_scores)


def record_path(ctx: RunContext, step: int) -> Path:
    return Path(ctx.run_dir) / "models" / f"step-{step}.trained.json"


def relative(path: str | Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root.resolve()).as_posix()


@task(
    name="publish-trained",
    task_run_name="publish-trained-step-{trained.step}",
    **IO_TASK,
)
def publish_trained(ctx: RunContext, trained: TrainStepResult) -> dict:
    """Write the step's record (trained.json: the result and the model's files, relative to the
    workspace) and, with storage.uri, upload the model and the record for the pipeline to fetch."""
    from tasks.storage import publish

    root = Path(ctx.root)
    files = sorted(p for p in Path(trained.model_dir).rglob("*") if p.is_file())
    record = {
        "result": trained.model_dump()
        | {
            "model_dir": relative(trained.model_dir, root),
            "checkpoint_dir": relative(trained.checkpoint_dir, root) if trained.checkpoint_dir else "",
        },
        "files": [relative(p, root) for p in files],
    }
    path = atomic_write_text(record_path(ctx, trained.step), json.dumps(record))
    publish(ctx, *files, path)
    return record
