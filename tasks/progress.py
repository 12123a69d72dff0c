"""Progress of long work (scoring, training): a Prefect progress artifact on the flow run, and a
tqdm bar on a terminal.

The artifact is made on the first update and moved as the work advances, at most every few
seconds (each move is an API call). Outside a flow run, or with the Prefect API unreachable,
nothing happens: progress is for watching, never a reason for the work to fail. The terminal bar
is drawn on stderr only when stderr is a TTY and ``CI`` is unset, so logs, pipes and CI output
stay as they are.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any


def on_terminal() -> bool:
    """True when a person watches stderr: a TTY, and not a CI job (``CI`` set to anything)."""
    if os.environ.get("CI"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream: no terminal to draw on
        return False


def in_flow_run() -> bool:
    """True inside a Prefect flow run (or a task run of one), where artifacts have a home."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class Progress:
    """A callback ``progress(done, total)`` that moves one progress artifact (0-100 %) and, on a
    terminal, one tqdm bar (closed when ``done`` reaches ``total``).

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
        self.terminal = on_terminal()
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        if self.terminal:
            self._draw(done, total)
        if not self.enabled:
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

    def _draw(self, done: int, total: int) -> None:
        """Moves the terminal bar to ``done`` of ``total``; tqdm limits the redraw rate itself."""
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, file=sys.stderr, leave=True, dynamic_ncols=True)
        self.bar.total = total
        step = min(done, total) - self.bar.n
        if step > 0:
            self.bar.update(step)
        if done >= total:
            self.bar.close()
            self.terminal = False  # finished: a replay past the end draws nothing more
