"""Task retries: I/O failures are retried with backoff; training and input failures are not."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from sdpo_core.data import DataError
from sdpo_core.train import TrainingError
from tasks.retries import IO_RETRIES, is_transient, retry_on_io


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
    assert is_transient(UploadError("s3://b/k: upload of f failed after 4 attempts"))


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
