"""Continual sDPO: new preference batches become the next steps of the registered chain.

``sdpo_continue(config)`` (``sdpo run --config R --continue``; the ``sdpo-continue`` deployment,
on a schedule) extends the chain that the registered model's ``final`` alias reaches:

1. It takes the chain's lock (tasks.continual.chain_lock) and walks ``final`` back to M0.
   A ``final`` that this pipeline did not register is refused.
2. It lists the batch files of ``data.watch`` (a folder or an S3 prefix). Files whose sha256 a
   step of the chain records are done. When nothing is left, the run logs one line and ends,
   successfully, having registered and tracked nothing.
3. With no chain yet, the first run is the pipeline itself (flows.pipeline.run_pipeline): the
   recipe's data.sources, its held-out split and partition make steps 1..T. The recipe's sources
   usually name the watched folder (use: train or split), and a held-out source.
4. Otherwise it refuses a model whose weights, tokenizer or chat template are not the chain's M0,
   reads what the chain trained (each step run's content keys) and its held-out split (the
   ``eval.jsonl`` logged by the run that trained step 1), and makes one step per new file, in
   name order: the file's pairs less those already trained and those in the held-out split,
   both dropped and counted (tasks.batches.read_batches). Step T+k trains from, and against,
   step T+k-1, exactly as a pipeline step does (the same tasks), and is registered with the
   usual lineage tags plus the batch's (file, sha256, pairs, drops, eval split hash).
5. At the end the aliases step-0..step-T' and final move together, and the chain's lineage (a
   table, JSON and a plot of the held-out metrics) is logged to the run.

A run that fails part-way moves no alias; a rerun reuses the steps it registered (same batch,
reference and config), except versions a rollback abandoned, which train again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.pipeline import run_pipeline
from flows.steps import run_one_step
from sdpo_core.config import ConfigError, RunConfig
from sdpo_core.continual import (
    ABANDONED,
    BATCH_FILE,
    BATCH_IN_EVAL,
    BATCH_OVERLAP,
    BATCH_PAIRS,
    BATCH_SHA256,
    EVAL_HASH,
    BatchFile,
    ChainError,
    ChainLink,
    check_same_base,
    unseen_batches,
)
from sdpo_core.hashing import sha256_file
from sdpo_core.model_io import check_model_source
from sdpo_core.records import PreparedData
from sdpo_core.redact import redact, redact_run_logs
from sdpo_core.tokenization import tokens_path
from tasks import tracking
from tasks.batches import BatchStep, list_batches, read_batches
from tasks.blocks import S3Access, read_access
from tasks.context import RunContext
from tasks.continual import chain_lock, chain_records, find_chain, log_lineage, tag_version
from tasks.outage import end_run
from tasks.registry import open_tracking, point_aliases, save_base
from tasks.report import report
from tasks.storage import publish
from tasks.tracking import version_uri
from tasks.training import reference_logps
from tasks.workspace import run_folder, workspace_root


@dataclass(frozen=True)
class ContinueResult:
    """What a continue run returns: the steps it added (none when nothing was new)."""

    rows: list[dict] = field(default_factory=list)
    table: str = ""
    lineage: str = ""
    run_dir: str = ""
    model_name: str = ""
    final_version: str = ""
    message: str = ""
    """One line saying what the run did (also logged)."""


def _flow_run_name() -> str:
    config = flow_run.get_parameters().get("config")
    name = config.run_name if isinstance(config, RunConfig) else (config or {}).get("run_name", "sdpo")
    return f"sdpo-continue-{name}"


def continue_chain(cfg: RunConfig, root: Path, access: S3Access | None = None) -> ContinueResult:
    """The continue run for a resolved config (called inside the flow); see the module docstring.

    Raises:
        ConfigError: data.watch is not set. ChainError: a foreign or broken chain, another base.
        ChainBusy: another run holds the chain. DataError: a batch file that cannot be read.
    """
    logger = get_run_logger()
    if not cfg.data.watch:
        raise ConfigError(
            ["data.watch: a continue run needs the folder or s3://bucket/prefix that receives the batches"]
        )
    name = cfg.tracking.registered_model
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, root)
    c = tracking.client(uri)
    with chain_lock(root, uri, name, cfg.storage.uri, access):
        chain = find_chain(c, name)
        run_dir = run_folder(root, cfg.run_name)
        batches = list_batches(cfg.data.watch, str(run_dir / "batches"), access)
        fresh = unseen_batches(batches, chain or [])
        where = redact(cfg.data.watch)
        if not fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
            final = chain[-1].version if chain else "none"
            message = f"nothing new in {where}: {len(batches)} batch file(s), all trained; final stays version {final}"
            logger.info(message)
            return ContinueResult(model_name=name, final_version=final if chain else "", message=message)
        if chain is None:
            logger.info("registered model %r has no chain yet: this run starts it from the recipe's data", name)
            result = run_pipeline(_local_watch(cfg, run_dir), root, access=access, run_dir=str(run_dir))
            lineage = log_lineage(tracking_context(cfg, root, result.run_dir, result.parent_run_id, access))
            final = str(c.get_model_version_by_alias(name, "final").version)
            message = f"started the chain of {name!r}: steps 1..{len(result.rows)} from the recipe's data"
            logger.info(message)
            return ContinueResult(result.rows, result.table, lineage, result.run_dir, name, final, message)
        return _extend(cfg, root, run_dir, chain, fresh, access)


def _local_watch(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The config with each source that names the watched S3 prefix reading the copy that
    list_batches downloaded into the run folder (sources read local files only)."""
    watch = (cfg.data.watch or "").rstrip("/")
    if not watch.startswith("s3://"):
        return cfg
    local = str(run_dir / "batches")
    sources = [s.model_copy(update={"path": local}) if s.path.rstrip("/") == watch else s for s in cfg.data.sources]
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})


def tracking_context(
    cfg: RunConfig, root: Path, run_dir: str, parent_run_id: str, access: S3Access | None
) -> RunContext:
    """The RunContext of a finished pipeline run (its parent run), to log the lineage there."""
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, root)
    experiment = tracking.client(uri).get_run(parent_run_id).info.experiment_id
    name = cfg.tracking.registered_model
    return RunContext(str(root), run_dir, uri, experiment, parent_run_id, name, cfg.storage.uri, access)


def _extend(
    cfg: RunConfig,
    root: Path,
    run_dir: Path,
    chain: list[ChainLink],
    fresh: list[BatchFile],
    access: S3Access | None,
) -> ContinueResult:
    """Train the new batches as steps T+1.. of ``chain`` (the lock is held by the caller)."""
    logger = get_run_logger()
    name = cfg.tracking.registered_model
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, root)
    try:
        trained, eval_path = chain_records(uri, name, chain, str(run_dir / "data"), access)
        steps = read_batches(cfg, fresh, eval_path, trained, chain[-1].step + 1, str(run_dir))
        if steps:
            check_model_source(cfg.model)
            # The base guard: the configured model must be the chain's M0, weights and tokenizer.
            weights, tokenizer_id = save_base(cfg, run_dir / "models" / "step-0")
            check_same_base(name, chain[0], weights, tokenizer_id, cfg.model.name_or_path)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # refused or failed before anything was tracked
        raise
    if not steps:
        shutil.rmtree(run_dir, ignore_errors=True)
        message = (
            f"nothing new in {redact(cfg.data.watch)}: {len(fresh)} new file(s) hold no pair the chain has not "
            f"trained on or holds out; final stays version {chain[-1].version}"
        )
        logger.info(message)
        return ContinueResult(model_name=name, final_version=chain[-1].version, message=message)
    eval_hash = sha256_file(eval_path)[:16]
    data_dir = run_dir / "data"
    prepared = PreparedData(
        train_path=str(data_dir / "train.jsonl"),
        eval_path=eval_path,
        train_hash=sha256_file(data_dir / "train.jsonl")[:16],
        eval_hash=eval_hash,
        counts={
            s.chunk.label: {
                "path": s.batch.origin, "format": "auto", "content_hash": s.batch.sha256[:16],
                "rows": s.read, "kept": s.chunk.size, "train": s.chunk.size, "eval": 0,
                "dropped": {"already trained": s.overlap, "in eval split": s.in_eval},
            }
            for s in steps
        },
        report_path=str(data_dir / "data_report.json"),
        config_hash=cfg.data_hash(),
    )  # fmt: skip
    ctx = open_tracking(cfg, str(root), str(run_dir), prepared, access)
    try:
        # The chunks go to storage as the pipeline's partition sends them: a train step that runs
        # on another machine (train.deployment) fetches its chunk and token ids from there.
        publish(ctx, *[p for s in steps for p in (Path(s.chunk.path), tokens_path(s.chunk.path)) if p.is_file()])
        versions = {link.step: link.version for link in chain}
        m0_eval = reference_logps(cfg, ctx, version_uri(name, versions[0]), eval_path, "eval")
        prev_eval = reference_logps(cfg, ctx, version_uri(name, chain[-1].version), eval_path, "eval")
        rows = []
        for s in steps:
            row, prev_eval = _train_batch(cfg, ctx, s, versions, eval_path, m0_eval, prev_eval, eval_hash)
            rows.append(row)
        table = report(ctx, rows)
        point_aliases(ctx, versions)  # step-0..step-T' and final, together, only now
        lineage = log_lineage(ctx)
        c = tracking.client(ctx.tracking_uri)
        c.set_terminated(ctx.parent_run_id)
    except BaseException:
        end_run(ctx.tracking_uri, ctx.parent_run_id, "FAILED")
        raise
    final = versions[max(versions)]
    message = (
        f"trained {len(steps)} new batch(es) as step(s) {steps[0].chunk.step}..{steps[-1].chunk.step}; "
        f"final is version {final}"
    )
    logger.info(message)
    return ContinueResult(rows, table, lineage, str(run_dir), name, final, message)


def _train_batch(
    cfg: RunConfig,
    ctx: RunContext,
    s: BatchStep,
    versions: dict[int, str],
    eval_path: str,
    m0_eval: str,
    prev_eval: str,
    eval_hash: str,
) -> tuple[dict, str]:
    """One batch's step, as the pipeline runs a step (flows.steps.run_one_step), except that a
    version a rollback abandoned is trained again; then the batch's tags. Fills ``versions``;
    returns the report row and the step model's eval scores."""
    client = tracking.client(ctx.tracking_uri)

    def reusable(version: str) -> bool:  # a rollback took abandoned versions out of the chain
        return client.get_model_version(ctx.model_name, version).tags.get(ABANDONED) != "true"

    row, prev_eval = run_one_step(cfg, ctx, s.chunk, versions, eval_path, m0_eval, prev_eval, reusable=reusable)
    chunk, version = s.chunk, row["version"]
    tag_version(
        ctx,
        version,
        {
            BATCH_FILE: s.batch.name,
            BATCH_SHA256: s.batch.sha256,
            BATCH_PAIRS: str(chunk.size),
            BATCH_OVERLAP: str(s.overlap),
            BATCH_IN_EVAL: str(s.in_eval),
            EVAL_HASH: eval_hash,
        },
    )
    return row, prev_eval


@flow(name="sdpo_continue", flow_run_name=_flow_run_name, validate_parameters=True)
def sdpo_continue(config: RunConfig) -> ContinueResult:
    """Continual sDPO: train the batches new in data.watch as the next steps of the chain behind
    the registered model's ``final``; end at once, successfully, when nothing is new.

    Args:
        config: the chain's recipe (its model must be the chain's M0; data.watch names the folder
            or S3 prefix of batches; a run started from the Prefect UI fills this form).
    """
    redact_run_logs()  # log lines printed or stored by Prefect pass through the one redaction
    access = read_access(config.storage.credentials_block)
    return continue_chain(config, workspace_root(), access)


__all__ = ["ChainError", "ContinueResult", "continue_chain", "sdpo_continue"]


if __name__ == "__main__":
    from sdpo_core.config import load_config

    sdpo_continue(load_config("recipes/continual.yaml"))
