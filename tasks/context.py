"""What every task of a pipeline run needs to find the workspace and the MLflow runs."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from tasks.blocks import S3Access


@dataclass(frozen=True)
class RunLocation:
    """Where a pipeline run keeps its files, and its MLflow identity: what a train-step
    deployment run is given (no credentials: its worker reads the block itself)."""

    root: str
    """The workspace folder."""
    run_dir: str
    """This run's folder under the workspace: data, chunks, step models."""
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    model_name: str
    """The registered model whose versions are the step models."""
    storage_uri: str | None = None
    """``s3://bucket/prefix`` where the run's files are published (storage.uri); None: local only."""

    @property
    def cache_dir(self) -> Path:
        """Scores (log-probs) cache, shared by runs: keyed by model and data content."""
        return Path(self.root) / "cache" / "logps"

    @property
    def model_cache(self) -> Path:
        """Registry downloads, one folder per registered version."""
        return Path(self.root) / "cache" / "models"


@dataclass(frozen=True)
class RunContext(RunLocation):
    """A run's location, and the S3 access its tasks hand to every S3 client."""

    s3: S3Access | None = None
    """The S3 credentials, region and endpoint read from storage.credentials_block (None: boto3's
    chain). Given to each S3 client explicitly; never part of a deployment run's parameters."""

    @classmethod
    def at(cls, location: RunLocation, s3: S3Access | None, **changes: str) -> RunContext:
        """A context for ``location`` (fields replaced by ``changes``) with ``s3``."""
        return cls(**(_location_fields(location) | changes), s3=s3)

    def location(self) -> RunLocation:
        """The run's location without its credentials."""
        return RunLocation(**_location_fields(self))


def _location_fields(location: RunLocation) -> dict[str, str | None]:
    return {f.name: getattr(location, f.name) for f in fields(RunLocation)}
