"""The CLI's early checks: a start that fails leaves no run folder behind."""

from __future__ import annotations

import socket
from pathlib import Path

from flows.cli import EXIT_BAD_INPUT, main
from tests.flows.test_pipeline import write_recipe


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_any_file(tmp_path: Path, monkeypatch, capsys) -> None:
    workspace = tmp_path / "ws"
    monkeypatch.setenv("SDPO_HOME", str(workspace))
    uri = f"http://127.0.0.1:{_closed_port()}"
    code = main(["run", "-c", str(write_recipe(tmp_path, "orphan")), f"tracking.tracking_uri={uri}"])
    assert code == EXIT_BAD_INPUT
    assert "does not answer" in capsys.readouterr().err
    assert not list(workspace.glob("runs/*")), "no run folder is left by a failed start"


def test_bad_data_fails_before_any_file(tmp_path: Path, monkeypatch, capsys) -> None:
    workspace = tmp_path / "ws"
    monkeypatch.setenv("SDPO_HOME", str(workspace))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p2", "chosen": \n')
    recipe = write_recipe(tmp_path, "bad-data")
    code = main(["run", "-c", str(recipe), f"data.sources.1.path={bad}", "data.sources.1.format=standard"])
    assert code == EXIT_BAD_INPUT
    assert "bad.jsonl" in capsys.readouterr().err
    assert not list(workspace.glob("runs/*"))


def test_dry_run_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    workspace = tmp_path / "ws"
    monkeypatch.setenv("SDPO_HOME", str(workspace))
    assert main(["run", "-c", str(write_recipe(tmp_path, "dry")), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "run_name: dry" in out and "training pairs" in out
    assert not list(workspace.glob("runs/*"))
