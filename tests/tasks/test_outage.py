"""MLflow calls that survive a tracking outage: buffered training metrics (tasks.outage)."""

from __future__ import annotations

import pytest

from tasks.outage import BATCH_LIMIT, MetricBuffer


class FlakyClient:
    """An MLflow client whose first ``failures`` log_batch calls fail, as a restarting server's do."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.logged = failures, 0, []

    def log_batch(self, run_id: str, metrics=()) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("API request to http://u:pw@mlflow:5000/api/2.0/mlflow/runs/log-batch failed")
        assert len(metrics) <= BATCH_LIMIT
        self.logged += [(run_id, m.key, m.value, m.step) for m in metrics]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_metrics_survive_a_transient_outage():
    """The server fails three times: no add raises, nothing is lost or sent twice, and while it
    is down the buffer waits ``retry_after`` between tries instead of trying at every step."""
    flaky, clock, warnings = FlakyClient(failures=3), Clock(), []
    buffer = MetricBuffer(flaky, "run-1", retry_after=30.0, warn=warnings.append, clock=clock)
    for step in range(1, 11):
        buffer.add({"train/loss": 1.0 / step}, step)  # never raises
        clock.now += 10.0
    assert flaky.calls == 3 + 1, "tries at steps 1, 4 and 7 fail; step 10's sends everything"
    assert [(s, v) for _, _, v, s in flaky.logged] == [(s, 1.0 / s) for s in range(1, 11)]
    assert buffer.pending == []
    assert len(warnings) == 2, "one warning for the outage, one when it is over"
    assert "kept to send again" in warnings[0] and "pw@" not in warnings[0]
    assert buffer.flush(final=True) is True


def test_a_final_flush_that_fails_warns_and_does_not_raise():
    flaky, warnings = FlakyClient(failures=100), []
    buffer = MetricBuffer(flaky, "run-2", warn=warnings.append, clock=Clock())
    buffer.add({"a": 1.0, "b": 2.0}, 1)
    assert buffer.flush(final=True) is False
    assert "2 metric value(s) of MLflow run run-2 not logged" in warnings[-1]
    assert "http://***@mlflow:5000" in warnings[-1]


def test_large_buffers_go_in_batches_mlflow_accepts():
    client = FlakyClient(failures=1)
    buffer = MetricBuffer(client, "run-3", retry_after=0.0, warn=lambda m: None, clock=Clock())
    buffer.add({f"m{i}": float(i) for i in range(2500)}, 1)  # fails: kept
    assert len(buffer.pending) == 2500
    assert buffer.flush() is True
    assert client.calls == 1 + 3 and len(client.logged) == 2500


@pytest.mark.parametrize("failures", [0, 1])
def test_the_train_step_callback_never_raises(failures):
    """What tasks.training's callback does at each optimizer step."""
    buffer = MetricBuffer(FlakyClient(failures), "run-4", warn=lambda m: None, clock=Clock())
    buffer.add({"train/loss": 0.5}, 1)


def test_mlflow_http_calls_are_bounded_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    """MLflow's defaults (120 s a request, 7 retries) take about 4 minutes to give up on a server
    that is gone; the workspace bounds them (measured: 2.4 s when the port refuses, 47 s when the
    server never answers). A value the user set wins."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from tasks.workspace import configure_environment

    for var in (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR):
        monkeypatch.delenv(var.name, raising=False)
    configure_environment(tmp_path)
    timeout, retries, backoff = (
        MLFLOW_HTTP_REQUEST_TIMEOUT.get(),
        MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
    )
    # Worst case for a server that never answers: every try times out, plus urllib3's backoff.
    worst = (retries + 1) * timeout + sum(backoff * 2**i + 1 for i in range(retries))
    assert worst < 60, worst
    monkeypatch.setenv(MLFLOW_HTTP_REQUEST_TIMEOUT.name, "300")
    configure_environment(tmp_path)
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300
