"""The workspace: one folder for everything a run writes, and the environment that keeps it there.

Call :func:`configure_environment` before Prefect, MLflow or transformers are imported: they read
their settings from the environment at import time.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path


def workspace_root() -> Path:
    """``$SDPO_HOME``, else ``.sdpo`` in the working directory."""
    return Path(os.environ.get("SDPO_HOME", ".sdpo")).resolve()


def within(root: Path, path: Path) -> Path:
    """``path``, after checking that it resolves to a place inside ``root`` (defence in depth:
    config names are validated, but nothing a run writes may land outside the workspace)."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise ValueError(f"{path}: outside the workspace {root}")
    return resolved


def run_folder(root: Path, run_name: str) -> Path:
    """A new run's folder: ``<root>/runs/<run_name>-<UTC time to the microsecond>``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
    return within(root, root / "runs" / f"{run_name}-{stamp}")


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def configure_environment(root: Path | None = None) -> Path:
    """Point Prefect, MLflow and Hugging Face at the workspace and turn their telemetry off.

    Settings the user already made in the environment win (``setdefault``), so an existing
    Prefect server (``PREFECT_API_URL``) or MLflow server (``MLFLOW_TRACKING_URI``) is used as is.
    """
    root = root or workspace_root()
    root.mkdir(parents=True, exist_ok=True)
    defaults = {
        # Prefect: its home (profiles, the temporary server's SQLite database) in the workspace.
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The temporary server needs ~13 s to start cold on 2 cores; Prefect's default limit is 20 s.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # matplotlib (the run's plots) keeps its font cache here, not in the home folder.
        "MPLCONFIGDIR": str(root / "matplotlib"),
        # MLflow's HTTP client waits 120 s a request and retries 7 times with backoff (about 4 min
        # before a call to a server that is gone fails). Bounded here: a call fails within about
        # 50 s at worst (3 tries of 15 s, 1 + 2 s of backoff), in a few seconds when the server
        # refuses connections; Prefect's task retries (tasks.retries) come on top.
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_HOME": str(root / "huggingface"),
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return root
