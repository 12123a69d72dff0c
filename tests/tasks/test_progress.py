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


class FakeTerminal:
    """A stderr stand-in that says it is a TTY and keeps what is written to it."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty, ci, drawn", [(True, None, True), (False, None, False), (True, "true", False)])
def test_terminal_bar_only_on_a_tty_outside_ci(monkeypatch, tty, ci, drawn):
    import sys

    fake = FakeTerminal(tty)
    monkeypatch.setattr(sys, "stderr", fake)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    bar = Progress("training step 1 (orca), optimizer steps", min_interval=0.0)
    for done in range(1, 5):
        bar(done, 4)
    if drawn:
        # The description and the final count are on the terminal, and the bar is closed.
        assert "training step 1 (orca), optimizer steps" in fake.text and "4/4" in fake.text
        assert bar.bar is not None and bar.bar.n == 4
    else:
        assert fake.text == "" and bar.bar is None
    bar(5, 4)  # a replay past the end draws nothing more
    assert ("5/4" in fake.text) is False


def test_terminal_bar_and_artifact_move_together(monkeypatch, calls):
    import sys

    fake = FakeTerminal(True)
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.delenv("CI", raising=False)
    bar = Progress("scoring eval.jsonl", min_interval=3600.0)
    bar(1, 2)
    bar(2, 2)
    assert [c[0] for c in calls] == ["create", "update"] and "2/2" in fake.text
