"""MLflow helpers: runs, metrics, and the registry that holds every step's model.

Everything goes through an explicit :class:`mlflow.MlflowClient` and run ids (no fluent
"active run" state), so a task can log to a run that another process started.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from sdpo_core.files import atomic_write_text
from sdpo_core.locks import file_lock
from sdpo_core.redact import redact, redact_mapping
from tasks import artifacts
from tasks.workspace import default_tracking_uri, within


def tracking_uri(configured: str | None, root: Path) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else SQLite in the workspace."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


_READY: set[str] = set()
"""SQLite tracking URIs whose database this process has created or checked."""


def client(uri: str) -> Any:
    """An MLflow client of ``uri`` (tracking and registry). The URI is the client's own: nothing
    here sets MLflow's process-wide tracking URI."""
    import mlflow

    if uri.startswith("sqlite:///") and uri not in _READY:
        # MLflow creates or upgrades its tables the first time a process opens the database; two
        # runs starting at once on a new workspace would otherwise race in its migrations (seen:
        # "table _alembic_tmp_experiments already exists", "Online migration expected to match
        # one row"). So the first opening holds a lock beside the database.
        db = Path(uri.removeprefix("sqlite:///"))
        with file_lock(db.with_name(db.name + ".lock")):
            c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store
            c.search_registered_models(max_results=1)  # and the registry store, on the same database
        _READY.add(uri)
        return c
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow's experiment-kind tag: the UI opens a model-development experiment on its training
views (runs, metrics, models) instead of the GenAI overview (traces, token usage)."""


def ensure_experiment(c: Any, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it with the given artifact location when it is new.

    An existing experiment keeps its location; asking for another one is an error, not a silent
    change of where models go. Another run creating it between the lookup and the creation is
    fine: the lookup is made again. The experiment carries :data:`EXPERIMENT_KIND`, set on an
    existing one that has no kind yet (one a user gave another kind keeps it).
    """
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        raise ValueError(
            f"MLflow experiment {name!r} keeps its artifacts at {exp.artifact_location}, not at "
            f"{artifact_location}; choose another tracking.experiment for the new location"
        )
    if EXPERIMENT_KIND[0] not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} for MLflow params, redacted (sdpo_core.redact): values
    under secret-named keys masked, URIs' user info and token parameters masked."""
    return _flatten(redact_mapping(data), prefix)


def _flatten(data: dict[str, Any], prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, full + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(_flatten(item, f"{full}.{i}."))
        else:
            out[full] = (json.dumps(value) if not isinstance(value, str) else value)[:6000]
    return out


RETRY_KEY_TAG = "sdpo.task_run_id"
"""Tag naming the Prefect task run that started a run (tasks.retries.attempt_key), so a retried
task finds the run its first try opened instead of opening a second one."""


def start_run(
    c: Any,
    experiment_id: str,
    name: str,
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
    key: str | None = None,
) -> str:
    """Start a run and return its id; ``key`` (a task run's id) is recorded for :func:`find_run`."""
    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    if key:
        all_tags[RETRY_KEY_TAG] = key
    return c.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def find_run(c: Any, experiment_id: str, key: str | None) -> str | None:
    """The run that :func:`start_run` started with ``key`` (an earlier try of the same task run),
    marked running again if that try ended it; None when there is none or no key."""
    if not key:
        return None
    found = c.search_runs([experiment_id], filter_string=f"tags.`{RETRY_KEY_TAG}` = '{key}'", max_results=1)
    if not found:
        return None
    run = found[0].info
    if run.status != "RUNNING":
        c.update_run(run.run_id, status="RUNNING")
    return run.run_id


def log_params(c: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        c.log_batch(run_id, params=items[start : start + 100])


def log_metrics(c: Any, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_yaml(c: Any, run_id: str, data: dict[str, Any], name: str, scratch: Path, access: Any = None) -> None:
    """Log ``data`` as the YAML artifact ``name``, redacted as MLflow params are (:func:`flatten`)."""
    path = atomic_write_text(scratch / name, yaml.safe_dump(redact_mapping(data), sort_keys=False))
    artifacts.log_artifact(c, run_id, path, access)


def register(c: Any, model_name: str, run_id: str, model_dir: str, tags: dict[str, str], access: Any = None) -> str:
    """Log the model folder to the run and register it as a version; returns the version number.

    The version's source is the run's artifact folder ``model``. No alias is moved here: a run
    points its aliases only when it has finished (:func:`point_aliases`), so that they never
    name versions of two runs at once.

    Safe to run again, so the Prefect task around it may retry it: a version that this run
    already registered with these tags (a first try that failed after creating it) is reused,
    never registered a second time.
    """
    version = run_version(c, model_name, run_id, tags)
    if version is None:
        source = artifacts.log_artifacts(c, run_id, model_dir, "model", access)
        if source.startswith("s3://"):
            from tasks.s3 import client as s3_client
            from tasks.s3 import verify_upload

            verify_upload(Path(model_dir), source, s3_client(access))
        ensure_registered_model(c, model_name)
        version = str(c.create_model_version(model_name, source, run_id=run_id, tags=tags).version)
    return version


def run_version(c: Any, model_name: str, run_id: str, tags: dict[str, str]) -> str | None:
    """The newest version of ``model_name`` that run ``run_id`` registered with all these tags, or None."""
    found = search_versions(c, f"name = '{model_name}' and run_id = '{run_id}'")
    # Tags are compared here rather than in the filter: their values may hold any character.
    mine = [int(v.version) for v in found if all(v.tags.get(k) == value for k, value in tags.items())]
    return str(max(mine)) if mine else None


def point_aliases(c: Any, model_name: str, versions: dict[int, str]) -> None:
    """Point ``step-0`` .. ``step-T`` at one finished run's versions and ``final`` at step T's,
    and delete every ``step-k`` alias with k > T: afterwards no alias names a version of another
    run's chain.

    Another run moving the same alias at the same moment can make a write fail
    (tasks.retries.lost_race); the Prefect task around it retries it then, and setting an alias
    again is harmless.
    """
    last = max(versions)
    for step in sorted(versions):
        c.set_registered_model_alias(model_name, f"step-{step}", versions[step])
    c.set_registered_model_alias(model_name, "final", versions[last])
    for alias in c.get_registered_model(model_name).aliases:
        rest = alias.removeprefix("step-")
        if alias != rest and rest.isdigit() and int(rest) > last:
            c.delete_registered_model_alias(model_name, alias)


def ensure_registered_model(c: Any, model_name: str) -> None:
    """Create the registered model unless it exists; another run creating it first is fine."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(model_name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        c.create_registered_model(model_name, description="sDPO step models; alias step-<t> is M_t.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def model_uri(model_name: str, step: int) -> str:
    """The alias URI of step ``step``'s model: what users load; it names the last run that finished."""
    return f"models:/{model_name}@step-{step}"


def version_uri(model_name: str, version: str | int) -> str:
    """One registered version, fixed: what a pipeline run loads its references from, so that
    another run re-pointing the aliases meanwhile cannot change a run's lineage."""
    return f"models:/{model_name}/{version}"


def fetch_model(tracking_uri: str, uri: str, cache_root: Path, access: Any = None) -> tuple[str, str]:
    """Download a registered model (``models:/name@alias`` or ``models:/name/version``) into the
    cache; returns (folder, version). The folder holds a full model: a version registered as a
    LoRA adapter comes back merged into its base (:func:`full_model_dir`).

    Each version is downloaded once; the folder is keyed by the registry (a hash of its URI: two
    registries may share a workspace and both have a version 1), the name, the version and the
    run that logged it (a registry recreated at the same URI numbers its versions from 1 again).
    Runs at the same time may download the same version: each into its own temporary folder, the
    first rename wins.
    """
    folder, version = _download(tracking_uri, uri, cache_root, access)
    return str(full_model_dir(tracking_uri, folder, cache_root, access)), version


def _download(tracking_uri: str, uri: str, cache_root: Path, access: Any = None) -> tuple[Path, str]:
    from mlflow.exceptions import MlflowException

    from sdpo_core.hashing import sha256_bytes
    from sdpo_core.model_io import ModelError

    c = client(tracking_uri)
    cache_root = cache_root / sha256_bytes(tracking_uri)[:16]
    path = uri.removeprefix("models:/")
    if "@" in path:
        name, alias = path.split("@", 1)
        found = c.get_model_version_by_alias(name, alias)
    else:
        name, number = path.rsplit("/", 1)
        try:
            found = c.get_model_version(name, number)
        except MlflowException as exc:  # an adapter's base that was deleted, say
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ModelError(f"{uri}: not in the registry at {redact(tracking_uri)}") from None
            raise
    version = str(found.version)
    dest = within(cache_root, cache_root / name / f"{version}-{found.run_id or 'norun'}")
    if not _complete(dest):
        tmp = cache_root / name / f".{version}.{uuid.uuid4().hex}.partial"
        tmp.mkdir(parents=True)
        try:
            # The version's own artifact URI, resolved by this client: MLflow resolves a models:/
            # URI through its process-wide registry URI, which this project never sets.
            local = artifacts.download(
                c.get_model_version_download_uri(name, version), tmp / "download", tracking_uri, access
            )
            if dest.exists() and not _complete(dest):
                shutil.rmtree(dest)  # left half-made by an older version of this code
            try:
                Path(local).rename(dest)
            except OSError:
                if not _complete(dest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, version


def _complete(folder: Path) -> bool:  # a model's config.json or an adapter's is in place
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def full_model_dir(tracking_uri: str, folder: str | Path, cache_root: Path, access: Any = None) -> Path:
    """``folder`` itself, or for a LoRA adapter its merge into the base it records, the bases
    fetched from this registry (:func:`sdpo_core.lora.resolve_adapter`), merged once, cached."""
    from sdpo_core.hashing import sha256_bytes
    from sdpo_core.lora import resolve_adapter

    merged_root = cache_root / sha256_bytes(tracking_uri)[:16] / "merged"
    return resolve_adapter(Path(folder), lambda u: _download(tracking_uri, u, cache_root, access)[0], merged_root)


def fetch_for(ctx: Any, uri: str) -> tuple[str, str]:
    """:func:`fetch_model` with a pipeline run's tracking URI and model cache."""
    return fetch_model(ctx.tracking_uri, uri, ctx.model_cache, ctx.s3)


def log_data_sources(c: Any, run_id: str, counts: dict[str, dict], source_types: dict[str, str]) -> None:
    """Each source as an MLflow dataset input: its name, content hash, path and counts."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for name, info in counts.items():
        profile = {k: info[k] for k in ("rows", "kept", "train", "eval", "dropped") if k in info}
        dataset = Dataset(
            name=name,
            digest=info["content_hash"],
            source_type=source_types.get(name, "local"),
            source=json.dumps({"uri": redact(info["path"]), "format": info["format"]}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")]))
    c.log_inputs(run_id, datasets=inputs)


def find_version(c: Any, model_name: str, tags: dict[str, str]) -> Any:
    """The newest version of a registered model carrying all these tags, or None."""
    quoted = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = search_versions(c, f"name = '{model_name}' and {quoted}")
    return max(found, key=lambda v: int(v.version)) if found else None


def search_versions(c: Any, filter_string: str) -> list[Any]:
    """The model versions matching ``filter_string``; none when the registered model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return list(c.search_model_versions(filter_string))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
