"""Which task failures are worth retrying.

I/O is: a tracking server, an S3 endpoint or the hub that did not answer, a SQLite database
briefly locked by another run, a registry write that lost a race with another run's write of the
same row. Computation and input are not: a NaN loss, running out of memory, bad data, a
missing file or a full disk (ENOSPC, EDQUOT) fail the same way again, so they fail the task at
once. A train step retried after an I/O failure resumes from its newest checkpoint, so the retry
costs little.

This is the one retry of a whole task. A single S3 request is retried by botocore (tasks.s3.client)
and nothing else is retried by code of our own, so attempts multiply across two layers at most.
A task that writes to MLflow is written to be safe to run again (tasks.tracking.register reuses
the version a first try created; :func:`attempt_key` finds the run it opened).
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

# Exceptions that are never transient, whatever they derive from.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_MARKERS = ("database is locked", "API request to", "Could not connect", "Connection reset", "timed out")
# How SQL databases word a broken unique key (SQLite, PostgreSQL, MySQL), as MLflow passes it on.
_UNIQUE_KEY_MARKERS = ("IntegrityError", "UNIQUE constraint", "duplicate key", "Duplicate entry")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like I/O that may succeed when tried again."""
    from sdpo_core.data import DataError
    from sdpo_core.files import is_disk_full
    from sdpo_core.train import TrainingError
    from tasks.s3 import UploadError

    if isinstance(exc, (TrainingError, DataError, MemoryError, *_PERMANENT_OS_ERRORS)):
        return False
    if is_disk_full(exc):  # ENOSPC or EDQUOT, however wrapped: a retry would fill the disk again
        return False
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, a RuntimeError
        return False
    if isinstance(exc, (UploadError, ConnectionError, TimeoutError, OSError)):
        return True
    module = type(exc).__module__
    if module.startswith(("botocore", "boto3", "urllib3", "requests")):
        return True
    if module.startswith("mlflow") and lost_race(exc):
        return True
    # MLflow wraps connection failures in MlflowException("API request to ... failed ..."), and
    # SQLAlchemy a locked SQLite database in OperationalError.
    return any(marker in str(exc) for marker in _TRANSIENT_MARKERS)


def lost_race(exc: BaseException) -> bool:
    """Whether an MLflow error is another writer's doing: a broken unique key or a locked database.

    MLflow's SQL store sets an alias by reading the row and then inserting or updating it. Two
    runs moving one alias at the same moment can both read "absent" and both insert: the second
    insert breaks the unique key and comes back as BAD_REQUEST (a SQLite database locked by the
    other writer comes back as TEMPORARILY_UNAVAILABLE). Run again, the write finds the row.
    """
    code = getattr(exc, "error_code", None)
    if code == "TEMPORARILY_UNAVAILABLE":
        return True
    return code == "BAD_REQUEST" and any(marker in str(exc) for marker in _UNIQUE_KEY_MARKERS)


def attempt_key() -> str | None:
    """The Prefect task run's id: the same for every try of one task run, so a retried task can
    find what its first try created (tagged with it). None outside a Prefect task run."""
    from prefect.runtime import task_run

    key = task_run.id
    return str(key) if key else None


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only failures :func:`is_transient` accepts."""
    exc = state.data
    return isinstance(exc, BaseException) and is_transient(exc)


IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_on_io}
"""Task options for tasks that talk to MLflow, S3 or the hub: two retries, after 2 s and 10 s,
of I/O failures only."""

IO_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False, **IO_RETRIES}
"""The options of every pipeline stage task: IO_RETRIES, and no result caching or persistence
(stages hand each other paths, URIs and small records; a rerun's reuse is the registry's)."""
