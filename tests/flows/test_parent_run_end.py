"""A failed pipeline run ends its MLflow parent run, best effort, and keeps its own error.

When the tracking server is down, marking the parent run FAILED fails too (or hangs); that must
neither hide the error that stopped the run nor wait without end. No Prefect server or MLflow
here: the stages are replaced by stand-ins, the client by one whose set_terminated fails.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdpo_core.config import RunConfig
from tasks.context import RunContext

REPO = Path(__file__).resolve().parents[2]


class DownClient:
    """An MLflow client of a tracking server that is gone: every run end fails (or hangs)."""

    def __init__(self, hang: float = 0.0) -> None:
        self.hang, self.ended = hang, []

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self.ended.append((run_id, status))
        if self.hang:
            time.sleep(self.hang)
        raise ConnectionError("API request to http://mlflow:5000/api/2.0/mlflow/runs/update failed")


def test_failed_run_keeps_its_error_when_the_parent_run_cannot_be_ended(tmp_path, monkeypatch, caplog, capfd):
    import flows.pipeline as pipeline
    from tasks import tracking

    cfg = RunConfig.model_validate(
        {"model": {"name_or_path": str(REPO / "models" / "stories260K")}, "data": {"sources": [{"path": "a.jsonl"}]}}
    )
    ctx = RunContext(str(tmp_path), str(tmp_path / "runs" / "r"), "http://mlflow:5000", "1", "parent-1", "m")
    down = DownClient()

    def register_base(cfg, ctx):
        raise RuntimeError("the original error: registering M0 failed")

    monkeypatch.setattr(pipeline, "prepare_data", lambda cfg, run_dir: SimpleNamespace(config_hash=None))
    monkeypatch.setattr(pipeline, "check_model_source", lambda model: None)
    monkeypatch.setattr(pipeline, "open_tracking", lambda *args, **kwargs: ctx)
    monkeypatch.setattr(pipeline, "register_base", register_base)
    monkeypatch.setattr(tracking, "client", lambda uri: down)
    caplog.set_level(logging.WARNING)
    with pytest.raises(RuntimeError, match="the original error"):
        pipeline.run_pipeline(cfg, tmp_path)
    assert down.ended == [("parent-1", "FAILED")], "the run end was tried"
    logged = caplog.text + capfd.readouterr().err  # Prefect's logging setup may take the record first
    assert "MLflow run parent-1 could not be marked FAILED" in logged and "stays RUNNING" in logged


def test_ending_a_run_is_bounded_when_the_server_hangs(monkeypatch, caplog, capfd):
    from tasks import tracking
    from tasks.outage import end_run

    down = DownClient(hang=30.0)
    monkeypatch.setattr(tracking, "client", lambda uri: down)
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    assert end_run("https://u:pw@mlflow:5000", "run-9", "FAILED", wait=0.3) is False
    assert time.monotonic() - start < 5
    logged = caplog.text + capfd.readouterr().err
    assert "at https://***@mlflow:5000 (no answer within 0.3 s); it stays RUNNING" in logged
    assert not any(t.name == "end-run-run-9" and not t.daemon for t in threading.enumerate())


def test_ending_a_run_that_answers(monkeypatch):
    from tasks import tracking
    from tasks.outage import end_run

    ended = []
    monkeypatch.setattr(tracking, "client", lambda uri: SimpleNamespace(set_terminated=lambda *a: ended.append(a)))
    assert end_run("sqlite:///x.db", "run-1", "FAILED") is True
    assert ended == [("run-1", "FAILED")]
