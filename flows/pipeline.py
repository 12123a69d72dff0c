"""The sDPO pipeline flow: prepare, partition, then for each step score, train, evaluate, register.

At step t both the reference and the starting policy are M(t-1), loaded from the registry by
its version, ``models:/<name>/<version>`` (sDPO, arXiv 2403.19270, section 3.2); the result is
registered as a version. When every step is done, aliases ``step-0`` .. ``step-T`` and ``final``
move together to this run's versions. Nothing happens at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.steps import run_one_step
from sdpo_core.carry import chain_schedule
from sdpo_core.config import ConfigError, RunConfig
from sdpo_core.model_io import check_model_source
from sdpo_core.records import PreparedData
from sdpo_core.redact import redact_run_logs
from sdpo_core.train import batch_plan
from tasks import tracking
from tasks.blocks import S3Access, read_access
from tasks.data import partition, prepare_data
from tasks.outage import end_run
from tasks.registry import open_tracking, point_aliases, register_base
from tasks.report import flow_run_artifacts, report
from tasks.samples import sample_generations
from tasks.tracking import version_uri
from tasks.training import reference_logps
from tasks.workspace import run_folder, within, workspace_root


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run returns: the per-step rows, the table and where things are."""

    rows: list[dict]
    table: str
    run_dir: str
    tracking_uri: str
    parent_run_id: str
    model_name: str
    m0_version: str = ""


def _flow_run_name() -> str:
    config = flow_run.get_parameters().get("config")
    name = config.run_name if isinstance(config, RunConfig) else (config or {}).get("run_name", "sdpo")
    return f"sdpo-{name}"


def run_tags(cfg: RunConfig) -> list[str]:
    """The tags of a pipeline flow run: its run name, its model and its partition strategy."""
    model = Path(cfg.model.name_or_path).name or cfg.model.name_or_path
    return ["sdpo", f"run:{cfg.run_name}", f"model:{model}", f"strategy:{cfg.partition.strategy}"]


def tag_flow_run(cfg: RunConfig) -> None:
    """Add :func:`run_tags` to the current flow run through the API: they depend on the config,
    so a deployment's fixed tags cannot carry them, and this way a CLI run and a run started
    from the UI or a schedule get the same tags."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(context.flow_run.id).tags
        client.update_flow_run(context.flow_run.id, tags=sorted(set(current) | set(run_tags(cfg))))


def run_pipeline(
    cfg: RunConfig,
    root: Path,
    prepared: PreparedData | None = None,
    access: S3Access | None = None,
    parent_run_id: str | None = None,
    run_dir: str | None = None,
) -> PipelineResult:
    """The steps of the pipeline for a resolved config (called inside the flow).

    ``prepared``: the data already prepared (by the CLI's early check under ``<run folder>/data``,
    or once for all arms of an experiment), so it is not read again; None prepares it here.
    ``parent_run_id``: an MLflow run to nest this run's parent run under (an experiment's).
    ``run_dir``: this run's folder; None: the one holding ``prepared``, or a new one.
    """
    if run_dir is None:  # the CLI's run folder holds its prepared data; else a new one
        run_dir = str(Path(prepared.train_path).parent.parent if prepared else run_folder(root, cfg.run_name))
    run_dir = str(within(root / "runs", Path(run_dir)))
    if prepared is None:
        prepared = prepare_data(cfg, run_dir)
    elif prepared.config_hash != cfg.data_hash():
        raise ConfigError(
            [f"prepared data {prepared.train_path} was prepared for config {prepared.config_hash or '?'}, "
             f"not for this run's {cfg.data_hash()}: leave `prepared` empty to prepare the data for this config"]
        )  # fmt: skip
    # Refuse an unsafe or missing model before anything is tracked or registered.
    check_model_source(cfg.model)
    ctx = open_tracking(cfg, str(root), run_dir, prepared, access, parent_run_id)
    try:
        versions = {0: register_base(cfg, ctx)}
        # References are loaded by version, not alias: another run may move the aliases meanwhile.
        m0 = version_uri(ctx.model_name, versions[0])
        chunks = partition(cfg, ctx, prepared, m0)
        # train.carry_optimizer: one warmup + cosine over every step's optimizer steps, in order.
        schedules = (
            chain_schedule([len(batch_plan(c.size, cfg.train)) for c in chunks])
            if cfg.train.carry_optimizer
            else [(0, 0)] * len(chunks)
        )
        m0_eval = reference_logps(cfg, ctx, m0, prepared.eval_path, "eval")
        prev_eval = m0_eval
        rows = []
        for chunk, schedule in zip(chunks, schedules, strict=True):
            row, prev_eval = run_one_step(cfg, ctx, chunk, versions, prepared.eval_path, m0_eval, prev_eval, schedule)
            rows.append(row)
        # Every step's model continues the same eval prompts: one MLflow table, a column per model.
        sample_generations(cfg, ctx, prepared.eval_path, versions)
        table = report(ctx, rows)
        flow_run_artifacts(rows, ctx)
        # Only a run that finished moves the aliases, all together (step-0 .. step-T, final).
        point_aliases(ctx, versions)
        tracking.client(ctx.tracking_uri).set_terminated(ctx.parent_run_id)
    except BaseException:
        # Best effort and bounded: a tracking server that is down must not hide the error.
        end_run(ctx.tracking_uri, ctx.parent_run_id, "FAILED")
        raise
    return PipelineResult(rows, table, run_dir, ctx.tracking_uri, ctx.parent_run_id, ctx.model_name, versions[0])


@flow(name="sdpo_pipeline", flow_run_name=_flow_run_name, validate_parameters=True)
def sdpo_pipeline(
    config: RunConfig,
    prepared: PreparedData | None = None,
    parent_run_id: str | None = None,
    run_dir: str | None = None,
) -> PipelineResult:
    """Stepwise DPO: split the data into steps; train step t from and against M(t-1).

    Args:
        config: the resolved run configuration (a recipe file is the CLI's convenience; a run
            started from the Prefect UI fills this form).
        prepared: data the caller has already prepared (the CLI does, in its early check; an
            experiment does once for its arms); None reads and prepares it here.
        parent_run_id: an MLflow run to nest this run under (an experiment's parent run).
        run_dir: this run's folder under the workspace; None: the one holding ``prepared``, or new.
    """
    redact_run_logs()  # log lines printed or stored by Prefect pass through the one redaction
    tag_flow_run(config)  # run name, model, strategy: the UI's filters
    # The block's credentials are read once and handed to every S3 client of the run.
    access = read_access(config.storage.credentials_block)
    return run_pipeline(config, workspace_root(), prepared, access, parent_run_id, run_dir)


if __name__ == "__main__":
    from sdpo_core.config import load_config

    sdpo_pipeline(load_config("recipes/default.yaml"))
