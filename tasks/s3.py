"""S3 through boto3: checking that an upload arrived whole before anything points to it.

The endpoint comes from ``MLFLOW_S3_ENDPOINT_URL`` (what MLflow's own S3 uploads use) or
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``; region and credentials from boto3's usual chain
(environment, config files, instance roles), unless the run's Prefect block
(storage.credentials_block, tasks/blocks.py) gives them: its S3Access is passed to :func:`client`
explicitly, never through the environment. Works with AWS, MinIO and any
S3-compatible store.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo_core.files import atomic_path
from sdpo_core.redact import redact

if TYPE_CHECKING:
    from tasks.blocks import S3Access

MIB = 1 << 20
# Part sizes an upload may have used: boto3's default (8 MiB), MLflow's multipart default (100 MiB).
PART_SIZES = (8 * MIB, 16 * MIB, 100 * MIB)


class UploadError(RuntimeError):
    """An object in S3 is missing or differs from the local file it was uploaded from."""


def client(access: S3Access | None = None) -> Any:
    """An S3 client with the run's credentials, region and endpoint (``access``, from its Prefect
    block), passed to boto3 explicitly; what ``access`` leaves unset comes from boto3's usual chain,
    and the endpoint from ``MLFLOW_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``.

    botocore retries each request (standard mode, ``AWS_MAX_ATTEMPTS``, default 5). This is the
    only retry of a single S3 call. A whole upload or download that still fails is retried by the
    Prefect task around it (tasks.retries.IO_RETRIES), never by a loop here.
    """
    import boto3
    from botocore.config import Config

    kwargs = access.boto3_kwargs() if access is not None else {}
    kwargs.setdefault(
        "endpoint_url",
        os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"),
    )
    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        # Attempts in all, as AWS_MAX_ATTEMPTS counts them (botocore's "max_attempts" key would
        # count retries only: one attempt more).
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
    }
    return boto3.client("s3", config=Config(retries=retries, connect_timeout=10), **kwargs)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix")."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def etag_candidates(path: Path, parts: int) -> set[str]:
    """The ETags S3 gives ``path``: the MD5 of a single-part upload, or for a multipart upload
    of ``parts`` parts the MD5 of the parts' MD5s, suffixed ``-parts`` (for each usual part size)."""
    data_size = path.stat().st_size
    if parts <= 1:
        return {hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()}
    out = set()
    for size in (*PART_SIZES, -(-data_size // parts)):
        if -(-data_size // size) != parts:
            continue
        digests = b""
        with open(path, "rb") as fh:
            for block in iter(lambda size=size: fh.read(size), b""):
                digests += hashlib.md5(block, usedforsecurity=False).digest()
        out.add(f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{parts}")
    return out


def verify_upload(local_dir: Path, uri: str, s3: Any = None) -> int:
    """Check every file under ``local_dir`` against its object under ``uri``: size and ETag.

    Returns the number of files checked; raises UploadError naming the first that differs.
    """
    s3 = s3 or client()
    bucket, prefix = split_uri(uri)
    checked = 0
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        verify_file(path, bucket, object_key(prefix, path.relative_to(local_dir).as_posix()), s3)
        checked += 1
    if checked == 0:
        raise UploadError(f"{local_dir}: nothing to verify")
    return checked


def object_key(prefix: str, relative: str) -> str:
    return f"{prefix}/{relative}" if prefix else relative


def verify_file(path: Path, bucket: str, key: str, s3: Any) -> None:
    """Size and ETag of one object against the local file it came from."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError 404, or the endpoint is gone
        raise UploadError(redact(f"s3://{bucket}/{key}: not found after upload of {path} ({exc})")) from None
    size = path.stat().st_size
    if head["ContentLength"] != size:
        raise UploadError(f"s3://{bucket}/{key}: {head['ContentLength']} bytes, but {path} has {size}")
    etag = head["ETag"].strip('"')
    parts = int(etag.rsplit("-", 1)[1]) if "-" in etag else 1
    if etag not in etag_candidates(path, parts):
        raise UploadError(f"s3://{bucket}/{key}: checksum (ETag {etag}) does not match {path}")


def upload_file(path: Path, uri: str, s3: Any = None) -> str:
    """Upload one file to ``uri`` (multipart above 8 MiB) and verify it; returns the URI.

    Each request is retried by botocore (:func:`client`); an upload that still fails, or that
    arrived different from the file, is an UploadError naming the file, the URI and the cause,
    which the enclosing Prefect task retries as a whole. An incomplete multipart upload is never
    visible as an object, so nothing partial is left for a registry version to point to.
    """
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = s3 or client()
    bucket, key = split_uri(uri)
    config = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)
    try:
        s3.upload_file(str(path), bucket, key, Config=config)
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        # Redacted: botocore's message may quote an endpoint URL with user info or a token.
        raise UploadError(redact(f"{uri}: upload of {path} failed: {exc}")) from None
    verify_file(path, bucket, key, s3)
    return uri


def download_file(uri: str, path: Path, s3: Any = None) -> bool:
    """Download ``uri`` to ``path`` (atomically); False when there is no such object."""
    from botocore.exceptions import ClientError

    s3 = s3 or client()
    bucket, key = split_uri(uri)
    try:
        with atomic_path(path) as tmp:  # a unique temporary name: runs may fetch the same file at once
            s3.download_file(bucket, key, str(tmp))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def delete_prefix(uri: str, s3: Any = None) -> int:
    """Delete every object under ``uri`` (a folder-like prefix); returns how many."""
    s3 = s3 or client()
    bucket, prefix = split_uri(uri)
    deleted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
    return deleted
