"""A wall-clock limit on a call of Python code, from any thread.

:func:`call_with_time_limit` runs a function in a helper thread (one per calling thread, reused)
and waits for it at most the given seconds. When time runs out the caller gets
:class:`TimeLimitExceeded` at once, and the helper is stopped by an exception raised in its
thread (``PyThreadState_SetAsyncExc``) at its next Python instruction, then abandoned.

Why this way: a chat template is untrusted code that may loop for hours (jinja's sandbox caps one
``range`` at 100000 items, not nested loops), and it runs wherever data is tokenized, in the CLI's
main thread or in a Prefect task's worker thread. ``signal.setitimer`` works only in the main
thread and takes over a process-wide signal; an exception raised asynchronously into the caller's
own thread can land anywhere in the caller's code after the call returns. Raised into a helper
thread that only ever runs the limited call, it can land nowhere else. What cannot be stopped: one
long call into C (a huge string repetition), which ends on its own or in a MemoryError.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TimeLimitExceeded(Exception):
    """The call did not finish within its time limit."""


class _Stop(BaseException):
    """Raised inside an abandoned helper thread to stop its call (a BaseException, so that no
    ``except Exception`` in the limited code swallows it)."""


class _Job:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _serve(jobs: queue.SimpleQueue) -> None:
    """The helper thread: run jobs until given None or stopped (the outer try also catches a _Stop
    that lands between two jobs)."""
    try:
        while (job := jobs.get()) is not None:
            try:
                job.result = job.fn()
            except _Stop:
                return
            except BaseException as exc:  # handed to the caller, who raises it
                job.error = exc
            job.done.set()
    except _Stop:
        return


class _Helper:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=_serve, args=(self.jobs,), name="sdpo-time-limit", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the running call at its next Python instruction, and let the thread end."""
        ident = self.thread.ident
        assert ident is not None
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_Stop))
        self.jobs.put(None)  # if it was between jobs, waiting for the next one


_local = threading.local()


def call_with_time_limit(fn: Callable[[], T], seconds: float) -> T:
    """``fn()``, or TimeLimitExceeded when it has not returned after ``seconds``.

    An exception of ``fn`` reaches the caller as it was raised. ``fn`` runs in a helper thread:
    it must not rely on thread-local state of the caller's thread.
    """
    helper: _Helper | None = getattr(_local, "helper", None)
    if helper is None or not helper.thread.is_alive():
        helper = _local.helper = _Helper()
    job = _Job(fn)
    helper.jobs.put(job)
    if not job.done.wait(seconds):
        _local.helper = None  # the next call gets a fresh helper
        helper.stop()
        raise TimeLimitExceeded(f"did not finish within {seconds:g} s")
    if job.error is not None:
        raise job.error.with_traceback(job.error.__traceback__)
    return job.result
