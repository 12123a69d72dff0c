"""The progress callback (tasks.progress.Progress): one artifact, created once and moved, at most
every min_interval seconds but always at the end; nothing outside a flow run; an API error stops
the bar with a warning, never the work. Prefect's artifact calls are replaced by recorders here
(the e2e test tests/flows/test_deployment_ui_run.py sees the real ones)."""

from __future__ import annotations

import pytest

import tasks.progress as progress_module
from tasks.progress import Progress


@pytest.fixture
def calls(monkeypatch):
    import prefect.artifacts

    seen: list[tuple] = []
    monkeypatch.setattr(progress_module, "in_flow_run", lambda: True)
    monkeypatch.setattr(
        prefect.artifacts,
        "create_progress_artifact",
        lambda p, description=None: seen.append(("create", p, description)) or "id-1",
    )
    monkeypatch.setattr(
        prefect.artifacts,
        "update_progress_artifact",
        lambda artifact_id, p, description=None: seen.append(("update", artifact_id, p, description)),
    )
    return seen


def test_created_once_then_moved_and_always_finished(calls):
    bar = Progress("scoring eval.jsonl", min_interval=3600.0)
    for done in range(1, 11):
        bar(done, 10)
    # The first call creates it; the others within the interval are skipped, except the last.
    assert calls == [
        ("create", 10.0, "scoring eval.jsonl: 1/10"),
        ("update", "id-1", 100.0, "scoring eval.jsonl: 10/10"),
    ]


def test_every_call_moves_it_with_no_interval(calls):
    bar = Progress("training step 1 (orca), optimizer steps", min_interval=0.0)
    bar(1, 3)
    bar(2, 3)
    bar(5, 3)  # more than planned (a resumed step's replay): capped at 100 %
    assert [c[-2] for c in calls] == [33.3, 66.7, 100.0]
    assert calls[-1][-1].endswith(": 3/3")


def test_nothing_outside_a_flow_run(monkeypatch):
    import prefect.artifacts

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *a, **k: pytest.fail("called"))
    bar = Progress("scoring")  # the real check: no flow run in a unit test
    bar(1, 2)
    bar(2, 2)
    assert not bar.enabled and bar.artifact_id is None


def test_an_api_error_stops_the_bar_not_the_work(monkeypatch, calls):
    import prefect.artifacts

    def refuse(*args, **kwargs):
        raise ConnectionError("server gone")

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", refuse)
    bar = Progress("scoring", min_interval=0.0)
    with pytest.warns(UserWarning, match="progress artifact not updated .*server gone"):
        bar(1, 4)
    bar(4, 4)  # no second warning, no call
    assert not bar.enabled and calls == []
