"""Task retries: I/O failures are retried with backoff; training and input failures are not."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from sdpo_core.data import DataError
from sdpo_core.train import TrainingError
from tasks.retries import IO_RETRIES, attempt_key, is_transient, retry_on_io


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("read timed out"),
        OSError(104, "Connection reset by peer"),
        sqlite3.OperationalError("database is locked"),
        RuntimeError("API request to http://mlflow:5000/api/2.0/mlflow/runs/get failed with exception ..."),
    ],
)
def test_io_failures_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


def test_s3_failures_are_retried() -> None:
    from botocore.exceptions import EndpointConnectionError

    from tasks.s3 import UploadError

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(UploadError("s3://b/k: upload of f failed: Could not connect to the endpoint URL"))


def test_registry_writes_that_lost_a_race_are_retried() -> None:
    """Another run wrote the same registry row at the same moment (tasks.tracking.point_aliases):
    run again, the write finds the row. Other MLflow errors are the request's own fault."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    for message in ("(sqlite3.IntegrityError) UNIQUE constraint failed", "duplicate key value", "Duplicate entry"):
        assert is_transient(MlflowException(message, error_code=BAD_REQUEST)), message
    assert is_transient(MlflowException("(sqlite3.OperationalError) busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("(sqlite3.DataError) value too long", error_code=BAD_REQUEST))
    assert not is_transient(MlflowException("Registered Model 'm' not found", error_code=RESOURCE_DOES_NOT_EXIST))
    # The same words outside MLflow are not a lost race.
    assert not is_transient(ValueError("IntegrityError"))


@pytest.mark.parametrize(
    "exc",
    [
        TrainingError("the loss is nan at optimizer step 3; stopping"),
        torch.OutOfMemoryError("CUDA out of memory"),
        MemoryError(),
        DataError("data/x.jsonl, line 3: not valid JSON"),
        FileNotFoundError("runs/x/chunks/step-1.jsonl: not on this machine"),
        ValueError("a bug"),
    ],
)
def test_training_and_input_failures_are_not_retried(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_condition_reads_the_failed_state() -> None:
    from prefect.states import Failed

    assert retry_on_io(None, None, Failed(data=ConnectionResetError()))
    assert not retry_on_io(None, None, Failed(data=TrainingError("nan")))


@task(cache_policy=NO_CACHE, persist_result=False, **(IO_RETRIES | {"retry_delay_seconds": 0}))
def flaky(keys: list[str | None]) -> str | None:
    keys.append(attempt_key())
    if len(keys) == 1:
        raise ConnectionResetError("the first try loses its connection")
    return keys[-1]


def test_attempt_key_is_the_same_for_every_try_of_a_task_run(prefect_harness) -> None:
    assert attempt_key() is None  # outside a task run
    keys: list[str | None] = []
    assert flaky(keys) == keys[0]
    assert len(keys) == 2 and keys[0] is not None and keys[0] == keys[1]
    other: list[str | None] = []
    flaky(other)
    assert other[0] != keys[0], "another task run, another key"


def test_every_task_that_does_io_retries_only_io() -> None:
    from tasks import data, registry, report, training

    tasks = [
        data.prepare_data, data.partition, registry.open_tracking, registry.register_base, registry.register_step,
        registry.find_finished_step, report.report, training.reference_logps, training.train_step,
        training.evaluate_step,
    ]  # fmt: skip
    for t in tasks:
        assert t.retries == IO_RETRIES["retries"] == 2, t.name
        assert t.retry_condition_fn is retry_on_io, t.name


def test_a_full_disk_is_not_retried() -> None:
    """ENOSPC and EDQUOT are OSErrors, which are otherwise retried as I/O: a retry would only fill
    the disk again (and Prefect would wait for it), however the error reaches the task."""
    import errno

    from sdpo_core.files import DiskFullError

    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_transient(DiskFullError(errno.ENOSPC, "runs/x/partition.json: cannot write, the disk is full"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("Error while serializing") from inner
    except RuntimeError as wrapped:
        assert not is_transient(wrapped)
    assert is_transient(OSError(errno.ECONNRESET, "Connection reset by peer"))  # still I/O
