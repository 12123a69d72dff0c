"""One sDPO train step as its own flow, so it can run as a deployment on a GPU work pool.

With ``train.deployment`` set (e.g. ``sdpo_train_step/sdpo-train-step``), the pipeline starts each
train step as a run of that deployment (``run_deployment``) with the step's
:class:`~sdpo_core.records.TrainStepSpec` as its parameter, and waits for it: the step runs on
whichever worker serves the deployment's pool, loads its reference from the registry, trains,
and leaves its model and a ``trained.json`` record (the :class:`TrainStepResult` and the model's
files) in the run folder, which the pipeline reads to go on. The worker keeps its files in its own
workspace (``SDPO_HOME``), at the places the pipeline's have in the pipeline's, so the two may
share one folder (one machine, a shared volume) or none: with storage.uri on S3 each side fetches
what the other published.

Whoever can call the Prefect API chooses a run's parameters, so the worker moves every path they
hold into its own workspace and refuses, before doing anything, one that would land outside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from sdpo_core.records import TrainStepResult, TrainStepSpec
from sdpo_core.train import TrainingError
from tasks.blocks import read_access
from tasks.context import RunContext, RunLocation, confine
from tasks.training import publish_trained, record_path, train_step

LOCAL_PATHS = ("ref_dir", "init_dir", "out_dir", "checkpoint_dir")
"""The spec's local paths, filled where the step trains (a record without one skips it)."""


def _flow_run_name() -> str:
    spec = flow_run.get_parameters().get("spec")
    chunk = spec.chunk if isinstance(spec, TrainStepSpec) else (spec or {}).get("chunk", {})
    step, label = (chunk.step, chunk.label) if not isinstance(chunk, dict) else (chunk.get("step"), chunk.get("label"))
    return f"train-step-{step}-{label}"


@flow(name="sdpo_train_step", flow_run_name=_flow_run_name, validate_parameters=True)
def sdpo_train_step(spec: TrainStepSpec, context: RunLocation) -> dict:
    """Train step ``spec.chunk.step`` on its chunk from, and against, the registered model ``spec.ref_uri``.

    Args:
        spec: the step's inputs: the pipeline's resolved config, the chunk, the reference.
        context: the pipeline run's workspace and MLflow run ids (no credentials).

    Raises:
        OutsideWorkspace: a path of ``spec`` or ``context`` lies outside the worker's workspace;
            nothing has been read or written.
    """
    from sdpo_core.redact import redact_run_logs
    from tasks.workspace import workspace_root

    redact_run_logs()  # log lines printed or stored by Prefect pass through the one redaction
    # Whoever can call the Prefect API chooses these parameters: every path is moved into this
    # worker's own workspace (SDPO_HOME, else .sdpo in its working folder) and checked there
    # before anything else happens, so a run cannot write or delete outside it.
    location, local = confined(spec, context, workspace_root())
    # The worker reads the credentials block itself: the secrets are never flow run parameters.
    access = read_access(spec.config.storage.credentials_block)
    ctx = RunContext.at(location, access)
    return publish_trained(ctx, train_step(ctx, local))


def confined(spec: TrainStepSpec, context: RunLocation, root: Path) -> tuple[RunLocation, TrainStepSpec]:
    """The location and spec of a deployment run with every path in the worker's workspace ``root``.

    The pipeline's paths lie under its workspace (``context.root``); the worker keeps its files at
    the same places relative to its own, so the two may share one folder (one machine, a shared
    volume) or none (with storage.uri on S3 each side fetches what the other published).

    Raises:
        OutsideWorkspace: naming the first parameter whose path, resolved (symlinks and ``..``),
            is not inside ``root``.
    """
    location = context.confined(root)
    given = Path(context.root)

    def inside(path: str, what: str) -> str:
        return str(confine(path, given, Path(location.root), what))

    chunk = spec.chunk.model_copy(update={"path": inside(spec.chunk.path, "spec.chunk.path")})
    # Filled where the step trains (tasks.training.train_step); one given anyway must be inside too.
    filled = {key: inside(getattr(spec, key), f"spec.{key}") for key in LOCAL_PATHS if getattr(spec, key, None)}
    local = spec.model_copy(update={"chunk": chunk, "ref_scores": inside(spec.ref_scores, "spec.ref_scores"), **filled})
    return location, local


def run_train_deployment(ctx: RunContext, spec: TrainStepSpec) -> TrainStepResult:
    """Run the train step as a run of the deployment ``train.deployment`` and wait for it."""
    from prefect.deployments import run_deployment

    from tasks.storage import require

    name = spec.config.train.deployment
    run = run_deployment(
        name=name,
        # The run's S3 access stays here: the worker reads the block itself.
        parameters={"spec": spec.model_dump(mode="json"), "context": asdict(ctx.location())},
        timeout=None,
        poll_interval=2,
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise TrainingError(f"train step {spec.step} ({name}, flow run {run.name}) ended {state}")
    require(ctx, record_path(ctx, spec.step))
    record = json.loads(record_path(ctx, spec.step).read_text())
    root = Path(ctx.root)
    require(ctx, *(root / f for f in record["files"]))
    result = record["result"]
    result["model_dir"] = str(root / result["model_dir"])
    result["checkpoint_dir"] = str(root / result["checkpoint_dir"]) if result["checkpoint_dir"] else ""
    return TrainStepResult.model_validate(result)
