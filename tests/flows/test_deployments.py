"""Deployments on a real Prefect server with process workers, all on 127.0.0.1.

Starts a Prefect server, creates the CPU and GPU work pools, registers the deployments from
deployments/prefect.yaml, serves both pools with process workers, and runs the pipeline
deployment with its train steps as runs of the train-step deployment. The registry must then
hold every step, and the server must show one completed train-step flow run per step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.moto_s3 import moto_s3

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Prefect server at {url} after {seconds} s")


def api(url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def s3_store(monkeypatch):
    """moto's S3 server on 127.0.0.1 with a bucket; its endpoint and dummy credentials in the environment."""
    with moto_s3(monkeypatch, "sdpo-deploy") as s3:
        yield s3


@pytest.mark.slow
def test_pipeline_deployment_runs_train_steps_on_the_gpu_pool(tmp_path):
    """Both workers share one workspace (one machine, or a shared volume)."""
    run_deployed_pipeline(tmp_path, {"cpu-pool": tmp_path / "workspace", "gpu-pool": tmp_path / "workspace"}, None)
    trained = sorted((tmp_path / "workspace" / "runs").glob("deployed-*/models/step-*.trained.json"))
    assert [p.name for p in trained] == ["step-1.trained.json", "step-2.trained.json"]


@pytest.mark.slow
def test_gpu_worker_without_shared_disk_works_through_s3(tmp_path, s3_store):
    """Each worker has its own workspace and nothing is shared but the S3 bucket (and MLflow):
    the train steps' models and records reach the pipeline through storage.uri."""
    cpu_ws, gpu_ws = tmp_path / "cpu-machine", tmp_path / "gpu-machine"
    run_deployed_pipeline(tmp_path, {"cpu-pool": cpu_ws, "gpu-pool": gpu_ws}, "s3://sdpo-deploy")
    # The GPU worker trained and saved the step models in its own workspace ...
    assert len(list(gpu_ws.glob("runs/deployed-*/models/step-[12]/model.safetensors"))) == 2
    assert not list(gpu_ws.glob("runs/deployed-*/data/*")), "the GPU worker fetched only what a step needs"
    # ... and the pipeline got them (and the records) from the bucket into its own.
    assert len(list(cpu_ws.glob("runs/deployed-*/models/step-*.trained.json"))) == 2
    assert len(list(cpu_ws.glob("runs/deployed-*/models/step-[12]/model.safetensors"))) == 2
    keys = {o["Key"] for o in s3_store.list_objects_v2(Bucket="sdpo-deploy")["Contents"]}
    assert any(k.startswith("mlflow/") and k.endswith("/model/model.safetensors") for k in keys)
    assert any(k.startswith("sdpo/runs/deployed-") and k.endswith("step-1.trained.json") for k in keys)


def run_deployed_pipeline(tmp_path: Path, workspaces: dict[str, Path], bucket: str | None) -> None:
    """Server, pools, deployments, a process worker per pool (each with its own SDPO_HOME), and a
    pipeline deployment run whose train steps run on the GPU pool; checks the flow runs and registry."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # Earlier tests in this process may have set MLflow's URIs (mlflow.set_tracking_uri exports one).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        SDPO_PROJECT_DIR=str(REPO),
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    prefect = str(BIN / "prefect")
    # A local tracking store stands in for an MLflow server: the train-step worker refuses one
    # outside its own workspace (as every path a deployment run is given), so it lives there.
    tracking_uri = f"sqlite:///{workspaces['gpu-pool'] / 'mlflow.db'}"
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str, home: Path | None = None) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc_env = env | ({"SDPO_HOME": str(home)} if home else {})
        proc = subprocess.Popen([prefect, *args], cwd=REPO, env=proc_env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_healthy(url, server)
        for pool in ("cpu-pool", "gpu-pool"):
            run("work-pool", "create", pool, "--type", "process")
        run("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        start("cpu-worker", "worker", "start", "--pool", "cpu-pool", home=workspaces["cpu-pool"])
        start("gpu-worker", "worker", "start", "--pool", "gpu-pool", home=workspaces["gpu-pool"])

        recipe = {
            "run_name": "deployed",
            "model": {"name_or_path": str(REPO / "models" / "stories260K")},
            "data": {
                "sources": [
                    {
                        "name": "orca",
                        "path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"),
                        "max_pairs": 12,
                    },
                    {"name": "mix", "path": str(REPO / "data/llamafactory_dpo_en_demo.json"), "max_pairs": 12},
                ],
                "eval_fraction": 0.25,
                "max_length": 64,
                "max_prompt_length": 32,
            },
            "train": {"micro_batch_size": 4, "deployment": "sdpo_train_step/sdpo-train-step"},
            "tracking": {
                "tracking_uri": tracking_uri,
                "experiment": "deployed",
                "registered_model": "deployed-model",
            },
        }
        if bucket:
            recipe["tracking"]["artifact_location"] = f"{bucket}/mlflow"
            recipe["storage"] = {"uri": f"{bucket}/sdpo"}
        # The deployment stores the flow's parameter schema: the typed config, as the UI's form.
        with urllib.request.urlopen(f"{url}/deployments/name/sdpo_pipeline/sdpo-pipeline", timeout=10) as r:
            deployment = json.loads(r.read())
        schema = deployment["parameter_openapi_schema"]
        loss = schema["definitions"]["LossConfig"]["properties"]
        assert loss["beta"]["default"] == 0.1 and "temperature" in loss["beta"]["description"]
        assert deployment["parameters"]["config"]["run_name"] == "default"
        # A run with non-default parameters, as the UI starts one.
        params = json.dumps({"config": recipe})
        run("deployment", "run", "sdpo_pipeline/sdpo-pipeline", "--params", params, "--watch", "--watch-timeout", "540")
        runs = api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["sdpo_train_step"]}}})
        assert sorted(r["name"] for r in runs) == ["train-step-1-mix", "train-step-2-orca"] or sorted(
            r["name"] for r in runs
        ) == ["train-step-1-orca", "train-step-2-mix"]
        assert {r["state_type"] for r in runs} == {"COMPLETED"}
        assert {r["work_pool_name"] for r in runs} == {"gpu-pool"}
        pipeline_runs = api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["sdpo_pipeline"]}}})
        assert [(r["state_type"], r["work_pool_name"]) for r in pipeline_runs] == [("COMPLETED", "cpu-pool")]
        if bucket is None:
            refuses_a_run_folder_outside_the_workspace(tmp_path, prefect, env, url, runs[0]["parameters"])
    except BaseException:
        for name in ("server", "cpu-worker", "gpu-worker"):
            if (logs / f"{name}.log").exists():
                print(f"--- {name} ---\n" + (logs / f"{name}.log").read_text()[-3000:])
        raise
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = {
        a: c.get_model_version_by_alias("deployed-model", a).version for a in ("step-0", "step-1", "step-2", "final")
    }
    assert versions["final"] == versions["step-2"] and len(set(versions.values())) == 3


def refuses_a_run_folder_outside_the_workspace(tmp_path: Path, prefect: str, env: dict, url: str, params: dict) -> None:
    """A train-step run started through the API with a step's real parameters but a run folder
    outside the worker's workspace fails before it trains, and the folder there is untouched."""
    victim = tmp_path / "elsewhere" / "models" / "step-1"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    params["context"]["run_dir"] = str(tmp_path / "elsewhere")
    cmd = [prefect, "deployment", "run", "sdpo_train_step/sdpo-train-step", "--params", json.dumps(params)]
    proc = subprocess.run(
        [*cmd, "--watch", "--watch-timeout", "300"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    runs = api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["sdpo_train_step"]}}})
    assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED", "FAILED"]
    failed = next(r for r in runs if r["state_type"] == "FAILED")
    assert "outside this worker's workspace" in failed["state"]["message"]
    assert sorted(p.name for p in (tmp_path / "elsewhere").rglob("*")) == ["keep.txt", "models", "step-1"]
    assert (victim / "keep.txt").read_text() == "precious"
