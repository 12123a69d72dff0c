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
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from sdpo_core.records import TrainStepResult, TrainStepSpec
from sdpo_core.train import TrainingError
from tasks.blocks import read_access
from tasks.context import RunContext, RunLocation
from tasks.training import publish_trained, record_path, train_step


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
    """
    from tasks.workspace import workspace_root

    # The worker reads the credentials block itself: the secrets are never flow run parameters.
    access = read_access(spec.config.storage.credentials_block)
    # The pipeline's paths are under its workspace. A worker with its own (SDPO_HOME set) keeps
    # its files there, at the same places relative to it; without one it uses the pipeline's
    # folder as is (one machine, or a volume mounted at the same path).
    pipeline_root = Path(context.root)
    root = workspace_root() if os.environ.get("SDPO_HOME") else pipeline_root
    run_dir = str(rebase(context.run_dir, pipeline_root, root))
    ctx = RunContext.at(context, access, root=str(root), run_dir=run_dir)
    chunk = spec.chunk.model_copy(update={"path": str(rebase(spec.chunk.path, pipeline_root, root))})
    local = spec.model_copy(update={"chunk": chunk, "ref_scores": str(rebase(spec.ref_scores, pipeline_root, root))})
    return publish_trained(ctx, train_step(ctx, local))


def rebase(path: str | Path, old_root: Path, new_root: Path) -> Path:
    """``path`` under ``old_root`` moved to the same place under ``new_root`` (others unchanged)."""
    path = Path(path)
    return new_root / path.relative_to(old_root) if path.is_relative_to(old_root) else path


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
