"""What every task of a pipeline run needs to find the workspace and the MLflow runs.

A train-step deployment run is given a :class:`RunLocation` by whoever calls the Prefect API, so
its worker trusts none of its paths: :meth:`RunLocation.confined` moves them into the worker's
own workspace and refuses any that would land outside it (:class:`OutsideWorkspace`).
"""

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

    def confined(self, root: Path) -> RunLocation:
        """This location as a worker whose workspace is ``root`` may use it.

        The paths (under ``self.root``, the caller's workspace) move to the same places under
        ``root``; the run folder must then lie in ``root/runs``, a local tracking store (SQLite
        or a folder) in ``root``, and the storage must be an ``s3://`` URI.

        Raises:
            OutsideWorkspace: naming the field and the path, before anything is read or written.
        """
        root = Path(root).resolve()
        given = Path(self.root)
        run_dir = confine(self.run_dir, given, root, "context.run_dir", inside=root / "runs")
        store = local_store(self.tracking_uri)
        if store is not None:
            # The URI is used as given (it names the caller's tracking store too), so it is checked
            # where it points, not moved.
            confine(store, Path.cwd(), Path.cwd(), "context.tracking_uri", inside=root)
        if self.storage_uri is not None and not self.storage_uri.startswith("s3://"):
            raise OutsideWorkspace(f"context.storage_uri {shown(self.storage_uri)}: not an s3:// URI")
        return RunLocation(**(_location_fields(self) | {"root": str(root), "run_dir": str(run_dir)}))


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


class OutsideWorkspace(ValueError):
    """A path a deployment run was given lies outside the worker's workspace."""


def shown(text: str, limit: int = 200) -> str:
    """``text`` quoted for a message, cut at ``limit`` characters (a parameter may be huge)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def confine(path: str | Path, given_root: Path, root: Path, what: str, inside: Path | None = None) -> Path:
    """``path``, given under ``given_root`` (the caller's workspace), at the same place under
    ``root`` (this worker's), resolved (symlinks and ``..``); a relative path is taken under
    ``root``.

    Raises:
        OutsideWorkspace: when the resolved path is not inside ``inside`` (default ``root``),
            naming ``what`` and the path as given.
    """
    inside = Path(inside or root).resolve()
    p = Path(path)
    if p.is_absolute() and p.is_relative_to(given_root):
        p = root / p.relative_to(given_root)
    elif not p.is_absolute():
        p = root / p
    resolved = p.resolve()
    if str(path) == "" or not resolved.is_relative_to(inside):
        raise OutsideWorkspace(
            f"{what} {shown(str(path))}: outside this worker's workspace {inside} (resolved to {shown(str(resolved))}); "
            "a train-step deployment run reads and writes only there (its SDPO_HOME)"
        )
    return resolved


def local_store(tracking_uri: str) -> Path | None:
    """The file or folder a local MLflow tracking URI writes to (SQLite, ``file:`` or a plain
    path); None for a tracking server or the worker's own default (an empty URI)."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///"))  # sqlite:////abs or sqlite:///relative
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri.removeprefix("file:").removeprefix("//"))
    if "://" in tracking_uri or tracking_uri.startswith(("databricks", "uc:")):
        return None
    return Path(tracking_uri)
