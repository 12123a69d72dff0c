"""Test session setup: an isolated workspace, no hub, no telemetry, nothing in the home folder.

The environment is set before Prefect, MLflow or transformers are imported by any test module.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="sdpo-tests-"))
os.environ["SDPO_HOME"] = str(_SESSION_HOME / "workspace")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from tasks.workspace import configure_environment  # noqa: E402

configure_environment(_SESSION_HOME / "workspace")

REPO = Path(__file__).resolve().parents[1]


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for the flow tests of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


# Test tiers (STYLE.md point 8): every test gets exactly one of these markers, here, so that the
# test files need not carry them. `make test-fast` runs the unit tier (under a minute, for the edit
# loop); `make test` runs all three.
#   unit         pure and fast: no Prefect server or flow run, no MLflow, no subprocess, no S3
#   integration  MLflow on SQLite, moto's S3, subprocesses and torchrun, Prefect tasks or blocks
#                without the whole pipeline, TRL parity runs, anything taking seconds
#   e2e          the whole pipeline flow, Prefect deployments and workers, the CLI in its own
#                process, the docker CLI
TIERS = ("unit", "integration", "e2e")

# Fixtures that start a service (Prefect's test server, moto's S3): a test using one, or marked
# `slow`, is at least integration. Only TIER_TABLE puts a test in e2e: that a test runs the whole
# pipeline does not show in its fixtures (a `slow` test on the Prefect server may retry one task).
SERVICE_FIXTURES = {"prefect_harness", "s3_server", "s3_store", "flaky_s3", "signed_s3"}

# Where the rules above put a test too low, by path under tests/ (a whole file) or path::test name
# (every parametrization): the tier is at least the one named here. test_tiers.py checks that each
# entry still names a test. (To put a test lower than the rules do, mark it in its own file.)
TIER_TABLE = {
    "benchmarks/test_kernels_benchmark.py": "integration",  # times kernels: seconds
    "benchmarks/test_profile_step.py": "integration",  # profiles train steps: seconds
    "benchmarks/test_step_phases.py": "integration",  # trains the tiny model twice: seconds
    "docker/test_docker.py::test_hadolint_passes": "integration",  # runs hadolint
    "docker/test_docker.py::test_compose_matches_the_compose_specification": "integration",  # subprocess
    "docker/test_docker.py::test_docker_compose_config": "e2e",  # runs the docker CLI
    "flows/test_deployments.py": "e2e",  # a Prefect server, work pools and workers
    "flows/test_deployment_ui_run.py": "e2e",  # serve.sh and a pipeline run started through the API
    "flows/test_browser.py": "e2e",  # a pipeline run, both servers and headless Chromium
    "tasks/test_model_metrics.py": "integration",  # MLflow on SQLite
    "flows/test_faults.py": "e2e",
    "flows/test_lora_pipeline.py": "e2e",  # a whole two-step pipeline with LoRA  # the CLI's whole run in processes that are killed and rerun
    "flows/test_partition_flow.py": "integration",  # a Prefect task tracked in MLflow
    "flows/test_cli_preflight.py": "integration",  # the CLI up to its checks, MLflow's client
    "flows/test_experiment.py": "e2e",  # the experiment flow: arms x seeds of whole pipelines
    "flows/test_continual.py": "e2e",  # continual sDPO: several whole continue runs of one chain
    "flows/test_continual_s3.py": "e2e",  # continual sDPO with the batches, storage and lease on moto's S3
    "flows/test_pipeline.py::test_two_step_pipeline_registers_lineage": "e2e",
    "flows/test_pipeline.py::test_cli_run_writes_only_to_workspace_and_no_secret": "e2e",
    "flows/test_pipeline.py::test_cli_unreachable_tracking_server": "integration",  # MLflow's client
    "flows/test_pipeline.py::test_cli_storage_failure_is_a_clear_message_with_how_to_resume": "integration",
    "sdpo_core/test_checkpoint.py::test_a_second_process_cannot_train_the_same_step": "integration",
    "sdpo_core/test_compiling.py::test_inductor_backend_equals_eager": "integration",  # builds C++ kernels: ~45 s
    "sdpo_core/test_compiling.py::test_bucketed_widths_compile_one_graph_per_bucket": "integration",  # compiles: seconds
    "sdpo_core/test_distributed.py": "integration",  # torchrun
    "sdpo_core/test_lora.py": "integration",  # peft, three LoRA train steps: seconds
    "sdpo_core/test_packed.py::test_compiled_flex_matches_the_padded_layout": "integration",  # compiles flex: a minute
    "sdpo_core/test_passes.py::test_compiled_training_follows_eager_training": "integration",  # traces 3 layouts: ~20 s
    "sdpo_core/test_passes.py::test_compiled_scoring_follows_eager_scoring": "integration",  # traces: seconds
    "sdpo_core/test_trl_parity.py": "integration",  # TRL's DPOTrainer
    "sdpo_core/test_tokenization_trl.py": "integration",  # TRL's DPOTrainer
    "tasks/test_registry_races.py": "integration",  # MLflow's registry on SQLite
    "tasks/test_model_cache.py": "integration",  # two MLflow registries on SQLite
    "tasks/test_s3_credentials.py": "integration",  # Prefect blocks, moto's S3, MLflow
    "tasks/test_s3_credentials.py::test_pipeline_with_block_credentials_keeps_the_secret_out": "e2e",
    "tasks/test_s3_faults.py": "integration",  # moto's S3 behind a flaky proxy
    "tasks/test_s3_pipeline.py": "integration",  # moto's S3
    "tasks/test_s3_pipeline.py::test_pipeline_with_artifacts_on_s3": "e2e",
    "test_tiers.py": "integration",  # collects the whole suite in a subprocess
}


def tier_of(item: pytest.Item) -> str:
    """The tier of one collected test: its own tier marker, else the highest of TIER_TABLE's and
    the rules'."""
    own = [name for name in TIERS if item.get_closest_marker(name)]
    if len(own) == 1:
        return own[0]
    try:
        path = item.path.relative_to(REPO / "tests").as_posix()
    except ValueError:  # a test file outside tests/, named on the command line
        path = item.path.as_posix()
    name = getattr(item, "originalname", item.name)
    tiers = [TIER_TABLE.get(key, "unit") for key in (path, f"{path}::{name}")]
    services = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if services or item.get_closest_marker("slow"):
        tiers.append("integration")
    return max(tiers, key=TIERS.index)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)
