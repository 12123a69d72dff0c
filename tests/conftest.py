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
