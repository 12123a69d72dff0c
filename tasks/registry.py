"""Tasks that start the MLflow runs and register every step's model."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from sdpo_core.config import RunConfig
from sdpo_core.records import ChunkInfo, PreparedData
from tasks.blocks import S3Access
from tasks.context import RunContext
from tasks.retries import IO_TASK, attempt_key


@task(name="open-tracking", task_run_name="open-tracking", **IO_TASK)
def open_tracking(
    cfg: RunConfig,
    root: str,
    run_dir: str,
    prepared: PreparedData,
    access: S3Access | None = None,
    parent_id: str | None = None,
) -> RunContext:
    """Create the experiment if needed and the parent run; log the resolved config.

    ``access``: the S3 credentials read from the run's block, for its S3 clients (kept in the
    returned RunContext). ``parent_id``: an MLflow run the parent run is nested under (an
    experiment's parent run).

    A retry reuses the parent run its first try opened (found by the task run's id).
    """
    from tasks import artifacts, tracking

    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, Path(root))
    c = tracking.client(uri)
    location = cfg.tracking.artifact_location
    if location is None and (uri.startswith("sqlite:") or uri.startswith("file:")):
        location = (Path(root) / "mlartifacts").as_uri()
    experiment_id = tracking.ensure_experiment(c, cfg.tracking.experiment, location)

    key = attempt_key()
    parent = tracking.find_run(c, experiment_id, key) or tracking.start_run(
        c,
        experiment_id,
        cfg.run_name,
        parent_id=parent_id,
        tags={"sdpo.config_hash": cfg.hash(), "sdpo.run_dir": run_dir},
        key=key,
    )
    tracking.log_params(c, parent, tracking.flatten(cfg.to_dict()))
    tracking.log_yaml(c, parent, cfg.to_dict(), "config.yaml", Path(run_dir), access)
    if prepared.report_path:
        artifacts.log_artifact(c, parent, prepared.report_path, access)
    from tasks.continual import log_chain_file

    # The held-out split, where a continue run of this chain finds it (tasks.continual).
    log_chain_file(c, parent, prepared.eval_path, access, "eval.jsonl")
    tracking.log_data_sources(c, parent, prepared.counts, {s.name: source_type(s.path) for s in cfg.data.sources})
    ctx = RunContext(root, run_dir, uri, experiment_id, parent, cfg.tracking.registered_model, cfg.storage.uri, access)
    from sdpo_core.tokenization import tokens_path
    from tasks.storage import publish

    files = [prepared.train_path, prepared.eval_path, prepared.report_path]
    files += [t for t in (tokens_path(prepared.train_path), tokens_path(prepared.eval_path)) if t.is_file()]
    publish(ctx, *[f for f in files if f])
    return ctx


def source_type(path: str) -> str:
    """MLflow's source type of a data source: a local path, or a Hugging Face hub id."""
    return "local" if Path(path).expanduser().exists() else "hugging_face"


@task(
    name="register-step-0",
    task_run_name="register-step-0-M0",
    **IO_TASK,
)
def register_base(cfg: RunConfig, ctx: RunContext) -> str:
    """Register M0 as step 0's version, so the lineage starts at the SFT model (its alias step-0
    is set when the run finishes: :func:`point_aliases`).

    The model is loaded (safetensors only) and saved again, so the registry holds a clean
    safetensors folder whatever else the source folder contains. Returns the version.
    """
    from tasks import tracking

    out = Path(ctx.run_dir) / "models" / "step-0"
    fingerprint, tokenizer_id = save_base(cfg, out)
    c = tracking.client(ctx.tracking_uri)
    key = attempt_key()
    # A retry goes on with the run its first try opened (register reuses a version made there).
    run_id = tracking.find_run(c, ctx.experiment_id, key)
    if run_id is None:
        # The same M0 registered before (same weights): reuse its version, so reruns add none.
        existing = tracking.find_version(
            c,
            ctx.model_name,
            {"sdpo.step": "0", "sdpo.weights_sha256": fingerprint, "sdpo.tokenizer_sha256": tokenizer_id},
        )
        if existing is not None:
            return str(existing.version)
        run_id = tracking.start_run(
            c, ctx.experiment_id, "step-0-M0", parent_id=ctx.parent_run_id, tags={"sdpo.step": "0"}, key=key
        )
    tags = {
        "sdpo.step": "0",
        "sdpo.source_model": cfg.model.name_or_path,
        "sdpo.reference": "none",
        "sdpo.run": cfg.run_name,
        "sdpo.parent_run_id": ctx.parent_run_id,
        "sdpo.weights_sha256": fingerprint,
        "sdpo.tokenizer_sha256": tokenizer_id,
    }
    version = tracking.register(c, ctx.model_name, run_id, str(out), tags, access=ctx.s3)
    c.set_terminated(run_id)
    return version


def save_base(cfg: RunConfig, out: Path) -> tuple[str, str]:
    """Save M0 (the config's model) as a clean safetensors folder ``out``; returns (the weights'
    sha256, the tokenizer's fingerprint): what M0's version is tagged with and the continual
    base guard compares (tasks.continual)."""
    from sdpo_core.fingerprint import record_fingerprint
    from sdpo_core.model_io import load_model, load_tokenizer, save_model
    from sdpo_core.precision import save_dtype
    from sdpo_core.tokenization import tokenizer_fingerprint

    # Read in the master weights' dtype (fp32 unless bf16-pure), as every step model is saved:
    # a bf16 M0 is widened exactly, never rounded.
    master = save_dtype(cfg.model, cfg.train)
    tokenizer = load_tokenizer(cfg.model)
    save_model(
        load_model(cfg.model, dtype=master),
        tokenizer,
        out,
        {"step": 0, "source_model": cfg.model.name_or_path, "dtype": str(master)},
    )
    # M0 is its weights and its tokenizer (vocabulary, chat template, special tokens): the same
    # weights under a new chat template are another M0, and their steps train again.
    return record_fingerprint(out), tokenizer_fingerprint(tokenizer)


@task(
    name="register-step",
    task_run_name="register-step-{chunk.step}-{chunk.label}",
    **IO_TASK,
)
def register_step(
    cfg: RunConfig,
    ctx: RunContext,
    chunk: ChunkInfo,
    model_dir: str,
    run_id: str,
    ref_version: str,
    metrics: dict[str, float],
    train_loss: float,
    optimizer_steps: int,
) -> str:
    """Log Mt to its step run and register it as a version tagged with its step, its reference
    version and the pipeline run (``sdpo.parent_run_id``); returns the version. Aliases are set
    when the run finishes (:func:`point_aliases`).

    Safe to retry: register reuses the version an earlier try registered from this run.
    """
    from sdpo_core.lora import lineage_tags
    from tasks import tracking

    c = tracking.client(ctx.tracking_uri)
    tags = {
        "sdpo.step": str(chunk.step),
        "sdpo.chunk.source": chunk.label,
        "sdpo.chunk.size": str(chunk.size),
        "sdpo.chunk.content_hash": chunk.content_hash,
        "sdpo.reference": tracking.model_uri(ctx.model_name, chunk.step - 1),
        "sdpo.reference_version": ref_version,
        "sdpo.run": cfg.run_name,
        "sdpo.config_hash": cfg.hash(),
        "sdpo.parent_run_id": ctx.parent_run_id,
        "sdpo.train_loss": repr(train_loss),
        "sdpo.optimizer_steps": str(optimizer_steps),
        **lineage_tags(model_dir),  # full weights, or an adapter and the base version it needs
        **{f"sdpo.{k}": repr(v) for k, v in metrics.items()},
    }
    # The content keys of the chunk's pairs: what a continue run leaves out of new batches.
    from tasks.continual import log_trained_pairs

    log_trained_pairs(c, run_id, chunk.path, ctx.s3)
    version = tracking.register(c, ctx.model_name, run_id, model_dir, tags, access=ctx.s3)
    c.set_terminated(run_id)
    return version


@task(
    name="find-finished-step",
    task_run_name="find-finished-step-{chunk.step}-{chunk.label}",
    **IO_TASK,
)
def find_finished_step(cfg: RunConfig, ctx: RunContext, chunk: ChunkInfo, ref_version: str) -> dict | None:
    """A version registered for this step by an earlier run of the same pipeline, or None.

    Same run name, config hash, step, chunk content and reference version: the step is done.
    Its metrics are read back from its tags (its aliases are set when this run finishes).
    """
    from tasks import tracking

    c = tracking.client(ctx.tracking_uri)
    found = tracking.find_version(
        c,
        ctx.model_name,
        {
            "sdpo.run": cfg.run_name,
            "sdpo.config_hash": cfg.hash(),
            "sdpo.step": str(chunk.step),
            "sdpo.chunk.content_hash": chunk.content_hash,
            "sdpo.reference_version": ref_version,
        },
    )
    if found is None:
        return None
    metrics = {
        k.removeprefix("sdpo."): float(v) for k, v in found.tags.items() if k.startswith(("sdpo.eval/", "sdpo.chunk/"))
    }
    return {
        "version": str(found.version),
        "metrics": metrics,
        "train_loss": float(found.tags["sdpo.train_loss"]),
        "optimizer_steps": int(found.tags["sdpo.optimizer_steps"]),
    }


@task(name="point-aliases", task_run_name="point-aliases", **IO_TASK)
def point_aliases(ctx: RunContext, versions: dict[int, str]) -> None:
    """Point step-0 .. step-T and final at this finished run's versions, and delete any step-k
    alias with k > T, so the aliases never mix the chains of two runs.

    Called once, when every step is registered: a run that fails part-way moves no alias. Safe
    to retry (setting an alias again is harmless).
    """
    from tasks import tracking

    tracking.point_aliases(tracking.client(ctx.tracking_uri), ctx.model_name, versions)
