"""S3 credentials from a Prefect block (storage.credentials_block), for boto3 and MLflow alike.

A run names a block, ``<block-type-slug>/<block-name>`` (``s3-credentials/prod``); only that name
is in the config. The pipeline flow and the train-step flow each read the block once, when they
start, into an :class:`S3Access` that travels in the run's :class:`~tasks.context.RunContext`
and is handed to every S3 client explicitly: boto3's (tasks/s3.py) and MLflow's artifact store
(tasks/artifacts.py). Nothing is written to the process environment. What the block leaves empty
comes from boto3's usual chain. The secrets are SecretStr: never logged, tracked, written to a
file or sent as a flow run parameter.

Two block types are read: :class:`S3Credentials` (this module; register it with
``prefect block register -m tasks.blocks``) and prefect-aws's ``AwsCredentials``
(``aws-credentials/<name>``), whose document is read by its field names, so prefect-aws need not
be installed where the pipeline runs.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, SecretStr


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


class S3Access(BaseModel):
    """What an S3 client needs beyond boto3's usual chain: a key pair, region and endpoint.

    Secrets are SecretStr (their repr and JSON are masked). None: boto3's chain decides.
    """

    model_config = ConfigDict(frozen=True)

    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    region_name: str | None = None
    endpoint_url: str | None = None

    def boto3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``boto3.client("s3", ...)`` for what is set."""
        secret = self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None
        token = self.aws_session_token.get_secret_value() if self.aws_session_token else None
        values = {
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": secret,
            "aws_session_token": token,
            "region_name": self.region_name,
            "endpoint_url": self.endpoint_url,
        }
        return {k: v for k, v in values.items() if v}


BLOCK_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "region_name", "endpoint_url")


def read_credentials(reference: str) -> S3Access:
    """The block's values. A key pair comes with its session token or none; a block without a
    key pair leaves the credentials to boto3's usual chain."""
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
    fields = {key: data.get(key) for key in BLOCK_FIELDS}
    if fields["endpoint_url"] is None and isinstance(data.get("aws_client_parameters"), dict):
        fields["endpoint_url"] = data["aws_client_parameters"].get("endpoint_url")  # AwsCredentials
    values = {key: str(value) for key, value in fields.items() if value}
    has_key = "aws_access_key_id" in values
    if has_key != ("aws_secret_access_key" in values) or ("aws_session_token" in values and not has_key):
        raise CredentialsError(
            f"storage.credentials_block {reference!r}: aws_access_key_id and aws_secret_access_key must be "
            "set together, and aws_session_token only with them (or all left empty for boto3's usual chain)"
        )
    return S3Access(**values)


def read_access(reference: str | None) -> S3Access | None:
    """:func:`read_credentials` of a config's block; None when the config names none."""
    return read_credentials(reference) if reference else None


def _read_block_data(reference: str, slug: str, name: str) -> dict[str, Any]:
    """The block document's data, secrets included, from the Prefect API of this process."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    from sdpo_core.redact import redact

    api = get_current_settings().api.url
    where = f"the Prefect API at {redact(api)}" if api else "the workspace's temporary Prefect server"
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
            f"{type(exc).__name__}: {redact(str(exc))}"
        ) from None
    return dict(document.data)
