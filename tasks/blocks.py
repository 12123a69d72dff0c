"""S3 credentials from a Prefect block (storage.credentials_block), for boto3 and MLflow alike.

A run names a block, ``<block-type-slug>/<block-name>`` (``s3-credentials/prod``); only that name
is in the config. The pipeline flow and the train-step flow each read the block once, when they
start, and put its values into their own process's environment, where boto3 (tasks/s3.py) and
MLflow's S3 artifact store read them. The block's values win over the environment's; what the
block leaves empty keeps coming from boto3's usual chain. The values are never logged, tracked or
written to a file.

Two block types are read: :class:`S3Credentials` (this module; register it with
``prefect block register -m tasks.blocks``) and prefect-aws's ``AwsCredentials``
(``aws-credentials/<name>``), whose document is read by its field names, so prefect-aws need not
be installed where the pipeline runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class CredentialsError(RuntimeError):
    """The credentials block cannot be read: a bad reference, an unknown type, no such block, or
    no Prefect API. The message names the block, never its values."""


class S3Credentials(Block):
    """Credentials, region and endpoint for an S3-compatible store (AWS, MinIO, ...).

    Name a saved block in a recipe as ``storage.credentials_block: s3-credentials/<name>``.
    """

    _block_type_name = "S3 Credentials"
    _block_type_slug = "s3-credentials"
    _description = "Credentials, region and endpoint of the S3 store that sdpo runs upload to."

    aws_access_key_id: str | None = Field(default=None, description="The access key id.")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="The secret access key.")
    aws_session_token: SecretStr | None = Field(default=None, description="A session token (temporary credentials).")
    region_name: str | None = Field(default=None, description="The region, e.g. us-east-1.")
    endpoint_url: str | None = Field(
        default=None, description="The S3 endpoint of a non-AWS store, e.g. http://minio:9000."
    )


BLOCK_TYPES = ("s3-credentials", "aws-credentials")
"""Block types a credentials block may have: ours, and prefect-aws's AwsCredentials."""

ENVIRONMENT = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "region_name": "AWS_DEFAULT_REGION",
    "endpoint_url": "MLFLOW_S3_ENDPOINT_URL",
}
"""Block field -> the variable that boto3 (tasks/s3.py) and MLflow's S3 store read."""


def read_credentials(reference: str) -> dict[str, str | None]:
    """The block's values as environment variables (ENVIRONMENT's names).

    Only what the block sets is given, but a key pair comes with its session token, None when the
    block has none (to be removed from the environment). A block without a key pair leaves the
    credentials to boto3's usual chain.
    """
    slug, _, name = reference.partition("/")
    if not slug or not name or "/" in name:
        raise CredentialsError(
            f"storage.credentials_block: {reference!r} is not <block-type-slug>/<block-name> (e.g. s3-credentials/prod)"
        )
    if slug not in BLOCK_TYPES:
        raise CredentialsError(
            f"storage.credentials_block {reference!r}: unknown block type {slug!r} (known: {', '.join(BLOCK_TYPES)})"
        )
    data = _read_block_data(reference, slug, name)
    fields = {key: data.get(key) for key in ENVIRONMENT}
    if fields["endpoint_url"] is None and isinstance(data.get("aws_client_parameters"), dict):
        fields["endpoint_url"] = data["aws_client_parameters"].get("endpoint_url")  # AwsCredentials
    values: dict[str, str | None] = {ENVIRONMENT[key]: str(value) for key, value in fields.items() if value}
    has_key = "AWS_ACCESS_KEY_ID" in values
    if has_key != ("AWS_SECRET_ACCESS_KEY" in values) or ("AWS_SESSION_TOKEN" in values and not has_key):
        raise CredentialsError(
            f"storage.credentials_block {reference!r}: aws_access_key_id and aws_secret_access_key must be "
            "set together, and aws_session_token only with them (or all left empty for boto3's usual chain)"
        )
    if has_key:
        values.setdefault("AWS_SESSION_TOKEN", None)  # a token in the environment belongs to another key
    return values


def _read_block_data(reference: str, slug: str, name: str) -> dict[str, Any]:
    """The block document's data, secrets included, from the Prefect API of this process."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    from tasks.tracking import redact_userinfo

    api = get_current_settings().api.url
    where = f"the Prefect API at {redact_userinfo(api)}" if api else "the workspace's temporary Prefect server"
    try:
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(name, block_type_slug=slug, include_secrets=True)
    except ObjectNotFound:
        raise CredentialsError(
            f"storage.credentials_block {reference!r}: no such block on {where} (register the type with "
            "`prefect block register -m tasks.blocks`, then create the block)"
        ) from None
    except (httpx.HTTPError, OSError) as exc:
        raise CredentialsError(
            f"storage.credentials_block {reference!r}: cannot read it from {where}: "
            f"{type(exc).__name__}: {redact_userinfo(str(exc))}"
        ) from None
    return dict(document.data)


@contextlib.contextmanager
def s3_credentials(reference: str | None) -> Iterator[None]:
    """Inside the ``with``, this process's S3 clients use the block's values (None: unchanged).

    On exit the environment is restored, and S3 clients made afterwards use it again. The
    environment is the process's: two flows with different blocks must not overlap in one process
    (a pipeline runs its steps one after the other; a train-step deployment runs on its worker).
    """
    if reference is None:
        yield
        return
    values = read_credentials(reference)
    saved = {key: os.environ.get(key) for key in values}
    _set_environment(values)
    try:
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    import boto3

    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # S3 clients made from now on must read the environment again: boto3's default session keeps
    # the credentials it first found, and MLflow keeps its S3 clients by endpoint.
    boto3.setup_default_session()
    with contextlib.suppress(ImportError, AttributeError):
        from mlflow.store.artifact.s3_artifact_repo import _cached_get_s3_client

        _cached_get_s3_client.cache_clear()
