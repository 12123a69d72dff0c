"""moto's S3 server for tests: one place that starts it, points boto3 and MLflow at it, and stops it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def moto_s3(monkeypatch: Any, bucket: str) -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 with ``bucket``; its endpoint and dummy credentials in the
    environment (through ``monkeypatch``). Yields an S3 client of the project's (tasks.s3.client)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    from tasks.s3 import client

    s3 = client()
    s3.create_bucket(Bucket=bucket)
    # moto keeps its buckets in the process, across servers: each test starts from an empty one.
    _empty(s3, bucket)
    try:
        yield s3
    finally:
        _empty(s3, bucket)
        server.stop()


def _empty(s3: Any, bucket: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
