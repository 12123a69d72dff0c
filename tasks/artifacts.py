"""MLflow run artifacts with the run's S3 credentials passed explicitly.

MLflow's own S3 artifact store reads its credentials and endpoint from the process environment.
A run whose credentials come from a Prefect block (:class:`~tasks.blocks.S3Access`) logs and
downloads S3 artifacts through :class:`_S3Repository` instead, which hands them to boto3
directly. Other stores (a local folder, an MLflow server's proxied artifacts) go through the
MLflow client as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository, _get_s3_client

from sdpo_core.redact import redact
from tasks.blocks import S3Access


@contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    """An S3 failure as one UploadError naming ``what``, its message redacted: botocore's
    messages quote the endpoint URL, which may carry user info or a token."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    from tasks.s3 import UploadError

    try:
        yield
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        # `from None`: the original's text (and its endpoint URL) stays out of tracebacks too.
        raise UploadError(redact(f"{what} failed: {type(exc).__name__}: {exc}")) from None


class _S3Repository(S3ArtifactRepository):
    """MLflow's S3 artifact repository with credentials, region and endpoint given, not read
    from the environment."""

    def __init__(self, artifact_uri: str, access: S3Access) -> None:
        kwargs = access.boto3_kwargs()
        super().__init__(
            artifact_uri,
            access_key_id=kwargs.get("aws_access_key_id"),
            secret_access_key=kwargs.get("aws_secret_access_key"),
            session_token=kwargs.get("aws_session_token"),
        )
        self._region_name = kwargs.get("region_name")
        self._endpoint_url = kwargs.get("endpoint_url")

    def _get_s3_client(self) -> Any:
        return _get_s3_client(
            access_key_id=self._access_key_id,
            secret_access_key=self._secret_access_key,
            session_token=self._session_token,
            region_name=self._region_name,
            s3_endpoint_url=self._endpoint_url,
        )


def _explicit(uri: str, access: S3Access | None) -> _S3Repository | None:
    return _S3Repository(uri, access) if access is not None and uri.startswith("s3://") else None


def log_artifact(c: Any, run_id: str, path: str | Path, access: S3Access | None = None) -> None:
    """Log one file to the run's artifact root."""
    repo = None if access is None else _explicit(c.get_run(run_id).info.artifact_uri, access)
    with _storage_errors(f"logging {path} to MLflow run {run_id}"):
        if repo is None:
            c.log_artifact(run_id, str(path))
        else:
            repo.log_artifact(str(path))


def log_artifacts(
    c: Any, run_id: str, local_dir: str | Path, artifact_path: str, access: S3Access | None = None
) -> str:
    """Log a folder under ``artifact_path`` of the run; returns the artifacts' URI."""
    root = c.get_run(run_id).info.artifact_uri.rstrip("/")
    repo = _explicit(root, access)
    with _storage_errors(f"{root}/{artifact_path}: upload of {local_dir}"):
        if repo is None:
            c.log_artifacts(run_id, str(local_dir), artifact_path)
        else:
            repo.log_artifacts(str(local_dir), artifact_path)
    return f"{root}/{artifact_path}"


def download(artifact_uri: str, dst: Path, tracking_uri: str, access: S3Access | None = None) -> Path:
    """Download a folder of artifacts into ``dst``; returns the local folder holding its files."""
    repo = _explicit(artifact_uri, access)
    with _storage_errors(f"{artifact_uri}: download to {dst}"):
        if repo is not None:
            dst.mkdir(parents=True, exist_ok=True)
            return Path(repo.download_artifacts("", str(dst)))
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking_uri)
        )
