"""Progress of long work (scoring, training) as a Prefect progress artifact on the flow run.

The artifact is made on the first update and moved as the work advances, at most every few
seconds (each move is an API call). Outside a flow run, or with the Prefect API unreachable,
nothing happens: progress is for watching, never a reason for the work to fail.
"""

from __future__ import annotations

import time
import warnings
from typing import Any


def in_flow_run() -> bool:
    """True inside a Prefect flow run (or a task run of one), where artifacts have a home."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """A callback ``progress(done, total)`` that moves one progress artifact (0-100 %).

    Args:
        description: what the artifact is about, shown with it in the UI ("scoring eval.jsonl
            under M1"); the count is appended on each move.
        min_interval: seconds between two moves; the first and the last (done == total) always go.
    """

    def __init__(self, description: str, min_interval: float = 2.0) -> None:
        self.description = description
        self.min_interval = min_interval
        self.artifact_id: Any = None
        self.enabled = in_flow_run()
        self._last = float("-inf")
        self.percent = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        self.percent = round(100.0 * min(done, total) / total, 1)
        text = f"{self.description}: {min(done, total)}/{total}"
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(self.percent, description=text)
            else:
                update_progress_artifact(self.artifact_id, self.percent, description=text)
        except Exception as exc:  # an API blip must not stop training or scoring
            self.enabled = False
            warnings.warn(f"progress artifact not updated ({type(exc).__name__}: {exc}); going on", stacklevel=2)
