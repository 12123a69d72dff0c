"""Which task failures are worth retrying.

I/O is: a tracking server, an S3 endpoint or the hub that did not answer, a SQLite database
briefly locked by another run. Computation and input are not: a NaN loss, running out of memory,
bad data or a missing file fail the same way again, so they fail the task at once. A train step
retried after an I/O failure resumes from its newest checkpoint, so the retry costs little.
"""

from __future__ import annotations

from typing import Any

# Exceptions that are never transient, whatever they derive from.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_MARKERS = ("database is locked", "API request to", "Could not connect", "Connection reset", "timed out")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like I/O that may succeed when tried again."""
    from sdpo_core.data import DataError
    from sdpo_core.train import TrainingError
    from tasks.s3 import UploadError

    if isinstance(exc, (TrainingError, DataError, MemoryError, *_PERMANENT_OS_ERRORS)):
        return False
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, a RuntimeError
        return False
    if isinstance(exc, (UploadError, ConnectionError, TimeoutError, OSError)):
        return True
    module = type(exc).__module__
    if module.startswith(("botocore", "boto3", "urllib3", "requests")):
        return True
    # MLflow wraps connection failures in MlflowException("API request to ... failed ..."), and
    # SQLAlchemy a locked SQLite database in OperationalError.
    return any(marker in str(exc) for marker in _TRANSIENT_MARKERS)


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only failures :func:`is_transient` accepts."""
    exc = state.data
    return isinstance(exc, BaseException) and is_transient(exc)


IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_on_io}
"""Task options for tasks that talk to MLflow, S3 or the hub: two retries, after 2 s and 10 s,
of I/O failures only."""
