"""MLflow's views of a run (on SQLite): the experiment's kind, a version's metrics on its logged
model, and the training curves read back by step."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.entities import LoggedModelStatus, Metric

from tasks import tracking
from tasks.model_metrics import link_version_metrics, metric_curves


@pytest.fixture
def mlflow_client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return tracking.client(uri), (tmp_path / "artifacts").as_uri()


def test_experiment_is_a_model_development_experiment(mlflow_client):
    c, location = mlflow_client
    key, kind = tracking.EXPERIMENT_KIND
    assert (key, kind) == ("mlflow.experimentKind", "custom_model_development")
    new = tracking.ensure_experiment(c, "new", location)
    assert c.get_experiment(new).tags[key] == kind
    # An experiment made before (by an older version, or by hand) gets the tag when next used ...
    old = c.create_experiment("old", artifact_location=location + "/old")
    assert key not in c.get_experiment(old).tags
    assert tracking.ensure_experiment(c, "old", location + "/old") == old
    assert c.get_experiment(old).tags[key] == kind
    # ... but a kind a user chose is kept.
    other = c.create_experiment("other", artifact_location=location + "/other", tags={key: "genai_development"})
    tracking.ensure_experiment(c, "other", location + "/other")
    assert c.get_experiment(other).tags[key] == "genai_development"


def test_version_metrics_live_on_a_logged_model_linked_to_the_version(mlflow_client, tmp_path):
    c, location = mlflow_client
    experiment = tracking.ensure_experiment(c, "e", location)
    run = tracking.start_run(c, experiment, "step-1-orca", tags={"sdpo.step": "1"})
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    version = tracking.register(c, "m", run, str(model), {"sdpo.step": "1"})
    metrics = {"eval/reward_accuracy_vs_m0": 0.625, "eval/gamma": -3.25}

    model_id = link_version_metrics(c, "m", version, metrics, step=4)
    logged = c.get_logged_model(model_id)
    assert {m.key: (m.value, m.step) for m in logged.metrics} == {k: (v, 4) for k, v in metrics.items()}
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "m", "version": version}]
    assert logged.source_run_id == run and logged.status == LoggedModelStatus.READY
    assert logged.tags["sdpo.step"] == "1"
    assert logged.tags["sdpo.model_source"] == c.get_model_version("m", version).source
    # The step run carries them as its metrics too (run comparison views).
    assert c.get_run(run).data.metrics == metrics
    # A retry (or a rerun that reuses the version) finds the same logged model.
    assert link_version_metrics(c, "m", version, metrics, step=4) == model_id
    assert len(c.search_logged_models([experiment])) == 1


def test_metric_curves_by_step_keep_the_last_value(mlflow_client):
    c, location = mlflow_client
    run = tracking.start_run(c, tracking.ensure_experiment(c, "e", location), "r")
    now = int(time.time() * 1000)
    c.log_batch(
        run,
        metrics=[
            Metric("train/loss", 0.69, now, 1),
            Metric("train/loss", 0.60, now, 2),
            Metric("train/rewards/margins", 0.1, now, 2),
            Metric("train/loss", 0.61, now + 1, 2),  # a resumed step replays its history
        ],
    )
    assert metric_curves(c, run, ("train/loss", "train/rewards/margins")) == [
        (1, {"train/loss": 0.69}),
        (2, {"train/loss": 0.61, "train/rewards/margins": 0.1}),
    ]
