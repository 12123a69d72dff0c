"""MLflow calls that must survive a tracking server going away for a while.

- Training metrics (:class:`MetricBuffer`): a train step logs metrics after every optimizer step.
  A failed log must not kill the step (hours of training lost to a restarting server), so the
  metrics are buffered and sent in batches; a batch that fails stays in the buffer and goes with
  the next flush, and the step's end flushes what is left.
- Ending a run on a failure path (:func:`end_run`): best effort and bounded, so that the error
  being handled is the one reported.

MLflow's own HTTP timeout and retries (tasks.workspace) bound each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sdpo_core.redact import redact

BATCH_LIMIT = 1000
"""MLflow's most metrics in one log_batch."""


class MetricBuffer:
    """Metrics of one MLflow run, held until a flush sends them with ``log_batch``.

    Args:
        c: the MLflow client.
        run_id: the run the metrics belong to.
        retry_after: seconds to wait after a failed flush before :meth:`add` tries again, so an
            outage costs the training loop one timed-out call now and then, not one per step.
        warn: where warnings go (a Prefect run logger's ``warning``, say).
        clock: the time source (tests pass their own).
    """

    def __init__(
        self,
        c: Any,
        run_id: str,
        retry_after: float = 30.0,
        warn: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.c, self.run_id, self.retry_after, self.clock = c, run_id, retry_after, clock
        self.warn = warn or warning
        self.pending: list[Any] = []
        self._next_try = 0.0
        self._failing = False

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step`` and flush, unless a recent flush failed."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self.clock() >= self._next_try:
            self.flush()

    def flush(self, final: bool = False) -> bool:
        """Send every buffered metric; True when none is left.

        A failure keeps the unsent metrics for the next flush and logs one warning per outage
        (``final``: a warning naming how many are lost, since no flush comes after it).
        """
        try:
            while self.pending:
                batch = self.pending[:BATCH_LIMIT]
                self.c.log_batch(self.run_id, metrics=batch)
                del self.pending[: len(batch)]
        except Exception as exc:  # any failure: the training step must go on
            self._next_try = self.clock() + self.retry_after
            why = redact(f"{type(exc).__name__}: {exc}")[:500]
            if final:
                self.warn(f"{len(self.pending)} metric value(s) of MLflow run {self.run_id} not logged: {why}")
            elif not self._failing:
                self.warn(f"logging metrics to MLflow run {self.run_id} failed, kept to send again: {why}")
            self._failing = True
            return False
        if self._failing:
            self.warn(f"metrics of MLflow run {self.run_id} logged again")
        self._failing = False
        return True


def end_run(uri: str, run_id: str, status: str = "FINISHED", wait: float = 60.0) -> bool:
    """End a run with ``status``, best effort: used on a failure path, where the error being
    handled must not be hidden by a tracking server that is down too.

    The call runs in a daemon thread waited for at most ``wait`` seconds (MLflow's own timeouts,
    tasks.workspace, bound it too); a failure or a timeout is logged as a warning and returns
    False, and the run stays as it was (RUNNING).
    """
    import threading

    from tasks import tracking

    problem: list[BaseException] = []

    def end() -> None:
        try:
            tracking.client(uri).set_terminated(run_id, status)
        except Exception as exc:  # reported below, in the caller's thread
            problem.append(exc)

    worker = threading.Thread(target=end, name=f"end-run-{run_id}", daemon=True)
    worker.start()
    worker.join(wait)
    if worker.is_alive() or problem:
        why = f"{type(problem[0]).__name__}: {problem[0]}" if problem else f"no answer within {wait:g} s"
        warning(f"MLflow run {run_id} could not be marked {status} at {redact(uri)} ({redact(why)}); it stays RUNNING")
        return False
    return True


def warning(message: str) -> None:
    """A warning in the current Prefect run's log, else in this module's logger."""
    import logging

    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # outside a flow or task run (Prefect's MissingContextError)
        logging.getLogger(__name__).warning(message)
