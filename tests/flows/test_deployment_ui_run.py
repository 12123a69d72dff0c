"""What a user of the Prefect UI gets, end to end: `deployments/serve.sh` (what `make serve` runs)
on a fresh workspace, a pipeline run started through the API as the UI's form starts one, with
non-default parameters, and what the run leaves in Prefect and MLflow.

One run, kept tiny: two sources of 12 pairs, 64 tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.flows.test_deployments import BIN, REPO, api, free_port

PIPELINE = "sdpo_pipeline/sdpo-pipeline"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError):
        return None


def post(url: str, path: str, body: dict) -> dict:
    """POST as the UI does; a 503 (SQLite busy while the workers register) is tried again, as
    Prefect's own client does."""
    for attempt in range(5):
        try:
            return api(url, path, body)
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 4:
                raise
            time.sleep(3)
    raise AssertionError("unreachable")


def wait_for(what: str, probe, seconds: float, serve: subprocess.Popen, log: Path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise RuntimeError(f"serve.sh exited with {serve.returncode}:\n{log.read_text()[-3000:]}")
        found = probe()
        if found:
            return found
        time.sleep(2)
    raise TimeoutError(f"{what}: not after {seconds} s\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_ui_started_run_with_its_own_parameters(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # A fresh clone: neither the workspace nor Prefect's home under it exist yet.
    prefect_home = tmp_path / "clone" / ".sdpo" / "prefect"
    workspace = tmp_path / "workspace"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=url,
        SDPO_PROJECT_DIR=str(REPO),
        SDPO_HOME=str(workspace),
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            ["bash", "deployments/serve.sh"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its server and workers are stopped with it, as a group
        )  # fmt: skip
    try:
        # serve.sh prints the UI's address once the deployments are made and the workers started.
        wait_for("serve.sh to be ready", lambda: "Prefect UI: http" in log.read_text(), 420, serve, log)
        deployment = wait_for("the deployment", lambda: get(f"{url}/deployments/name/{PIPELINE}"), 120, serve, log)
        assert (prefect_home / "prefect.db").is_file()
        # The example schedule is there, and off.
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["active"] is False
        assert set(deployment["tags"]) == {"sdpo", "deployment"}

        tracking_uri = f"sqlite:///{workspace / 'mlflow.db'}"
        recipe = {
            "run_name": "from-ui",
            "model": {"name_or_path": str(REPO / "models" / "stories260K")},
            "data": {
                "sources": [
                    {"name": "orca", "path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), "max_pairs": 12},
                    {"name": "mix", "path": str(REPO / "data/llamafactory_dpo_en_demo.json"), "max_pairs": 12},
                ],
                "eval_fraction": 0.25,
                "max_length": 64,
                "max_prompt_length": 32,
            },
            "loss": {"beta": 0.05},
            "train": {"micro_batch_size": 4, "grad_accum_steps": 1},
            "tracking": {"tracking_uri": tracking_uri, "experiment": "from-ui", "registered_model": "ui-model"},
        }  # fmt: skip
        # What the UI's "Run" button sends: the form's values as the flow run's parameters.
        run = post(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"config": recipe}})
        flow_run = wait_for(
            "the flow run to finish",
            lambda: (r := get(f"{url}/flow_runs/{run['id']}")) and r["state_type"] in TERMINAL and r,
            540,
            serve,
            log,
        )
        assert flow_run["state_type"] == "COMPLETED", flow_run["state"]
        assert flow_run["name"] == "sdpo-from-ui"
        assert {"sdpo", "deployment", "run:from-ui", "model:stories260K", "strategy:by_source"} <= set(flow_run["tags"])
        check_artifacts(url, run["id"])
        check_mlflow(tracking_uri)

        # The one documented command turns this schedule on, and only this one.
        on = subprocess.run(
            ["make", "schedule-on", f"DEPLOYMENT={PIPELINE}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert on.returncode == 0, on.stdout + on.stderr
        after = wait_for("the deployment", lambda: get(f"{url}/deployments/name/{PIPELINE}"), 120, serve, log)
        assert [s["active"] for s in after["schedules"]] == [True]
        continual = get(f"{url}/deployments/name/sdpo_continue/sdpo-continue")
        assert continual and [s["active"] for s in continual["schedules"]] == [False]
    except BaseException:
        print(log.read_text()[-4000:])
        raise
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


def check_artifacts(url: str, flow_run_id: str) -> None:
    """The table, the report and progress artifacts that reached 100 % are on the flow run."""
    found = post(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    by_type: dict[str, list[dict]] = {}
    for artifact in found:
        by_type.setdefault(artifact["type"], []).append(artifact)
    [table] = by_type["table"]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert table["key"] == "sdpo-steps" and [r["step"] for r in rows] == ["1", "2"]
    # Made in the flow's own body: the flow run's artifact, not a task run's (the UI lists those
    # under the task).
    assert table.get("task_run_id") is None, table.get("task_run_id")
    assert {r["chunk"] for r in rows} == {"orca", "mix"}
    [markdown] = by_type["markdown"]
    assert (
        markdown["key"] == "sdpo-report"
        and "| step |" in markdown["data"]
        and "models:/ui-model@step-t" in markdown["data"]
    )
    progress = by_type["progress"]
    training = [p for p in progress if p["description"].startswith("training step")]
    scoring = [p for p in progress if p["description"].startswith("scoring")]
    assert len(training) == 2 and scoring, [p["description"] for p in progress]
    assert all(float(p["data"]) == 100.0 for p in progress), [(p["description"], p["data"]) for p in progress]


def check_mlflow(tracking_uri: str) -> None:
    """The parameters took effect, and MLflow shows the run as the issue asks."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = c.get_experiment_by_name("from-ui")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [parent] = c.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'from-ui'")
    assert parent.data.params["loss.beta"] == "0.05" and parent.data.params["run_name"] == "from-ui"
    history = c.get_metric_history(parent.info.run_id, "eval/reward_accuracy_vs_m0")
    assert sorted(m.step for m in history) == [1, 2]
    plots = {f.path for f in c.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/training.png", "plots/heldout.png", "plots/partition.png"}
    models = c.search_logged_models([experiment.experiment_id])
    linked = {json.loads(m.tags["mlflow.modelVersions"])[0]["version"]: m for m in models}
    steps = {c.get_model_version("ui-model", v).tags["sdpo.step"]: m for v, m in linked.items()}
    assert set(steps) == {"1", "2"}
    for step, model in steps.items():
        keys = {m.key for m in model.metrics}
        assert {"eval/reward_accuracy_vs_m0", "eval/gamma"} <= keys, f"step {step}: {keys}"
