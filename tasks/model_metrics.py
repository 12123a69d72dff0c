"""Metrics that MLflow's comparison views read: each step's curves and each version's metrics.

Explicit clients and run ids, as everywhere in tasks/ (tasks.tracking).
"""

from __future__ import annotations

import json
from typing import Any


def metric_curves(c: Any, run_id: str, keys: tuple[str, ...]) -> list[tuple[int, dict[str, float]]]:
    """A run's metrics ``keys`` by step: [(step, {key: value})], sorted by step. A step logged
    twice (a resumed train step replays its history) keeps the last value."""
    by_step: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            by_step.setdefault(m.step, {})[key] = m.value
    return sorted(by_step.items())


def link_version_metrics(c: Any, model_name: str, version: str, metrics: dict[str, float], step: int) -> str:
    """Give a registered version its metrics where MLflow 3's model views show them; returns the
    logged model's id.

    MLflow 3 keeps metrics of a model on a *logged model* (shown in the experiment's Models tab,
    comparable and chartable there), linked to registry versions by its ``mlflow.modelVersions``
    tag; the registry's own version record has no metrics. The version's weights stay where
    :func:`register` put them (its run's ``model`` folder): the logged model carries the metrics,
    logged to the version's run at ``step`` as well, and points at the version. Safe to call again:
    the logged model made for this version before is reused.
    """
    import time

    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    mv = c.get_model_version(model_name, version)
    run = c.get_run(mv.run_id)
    link = [{"name": model_name, "version": str(version)}]
    found = [
        m
        for m in c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{mv.run_id}'")
        if m.tags.get(MLFLOW_MODEL_VERSIONS) == json.dumps(link)
    ]
    if found:
        model = found[0]
    else:
        model = c.create_logged_model(
            run.info.experiment_id,
            name=f"{model_name}-v{version}",
            source_run_id=mv.run_id,
            tags={MLFLOW_MODEL_VERSIONS: json.dumps(link), "sdpo.model_source": mv.source, **_step_tag(mv)},
        )
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step, model_id=model.model_id) for k, v in metrics.items()]
    c.log_batch(mv.run_id, metrics=items)
    c.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def _step_tag(mv: Any) -> dict[str, str]:
    return {"sdpo.step": mv.tags["sdpo.step"]} if "sdpo.step" in mv.tags else {}
