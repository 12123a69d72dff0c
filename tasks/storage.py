"""A run's intermediate files on S3 (storage.uri), so a stage can run where the last one did not.

Files keep their place relative to the workspace: ``<workspace>/runs/x/chunks/step-1.jsonl`` is
``<storage.uri>/runs/x/chunks/step-1.jsonl``. A stage publishes what it wrote (uploaded and
verified) and fetches what it needs when it is not on its own disk.
"""

from __future__ import annotations

from pathlib import Path

from tasks.context import RunContext


def _uri(ctx: RunContext, path: Path) -> str:
    relative = Path(path).resolve().relative_to(Path(ctx.root).resolve()).as_posix()
    return f"{ctx.storage_uri.rstrip('/')}/{relative}"


def publish(ctx: RunContext, *paths: str | Path) -> list[str]:
    """Upload each file (verified) when the run has storage; returns their URIs (or paths)."""
    if not ctx.storage_uri:
        return [str(p) for p in paths]
    from tasks.s3 import client, upload_file

    s3 = client(ctx.s3)
    return [upload_file(Path(p), _uri(ctx, Path(p)), s3) for p in paths]


def fetch(ctx: RunContext, path: str | Path, optional: bool = False) -> bool:
    """Make ``path`` present locally, downloading it from storage if needed; False if nowhere.

    ``optional``: a file the caller can do without (a token sidecar). A store that refuses it
    (a missing key reads as 403 without s3:ListBucket on AWS) then counts as not there.
    """
    path = Path(path)
    if path.is_file():
        return True
    if not ctx.storage_uri:
        return False
    from botocore.exceptions import ClientError

    from tasks.s3 import client, download_file

    try:
        return download_file(_uri(ctx, path), path, client(ctx.s3))
    except ClientError:
        if optional:
            return False
        raise


def require(ctx: RunContext, *paths: str | Path) -> None:
    """:func:`fetch` every path; a file found nowhere is an error naming it."""
    for p in paths:
        if not fetch(ctx, p):
            where = f" nor under {ctx.storage_uri}" if ctx.storage_uri else ""
            raise FileNotFoundError(f"{p}: not on this machine{where}")


def remove(ctx: RunContext, folder: str | Path) -> None:
    """Remove a folder from storage (when the run has one); the local copy is the caller's."""
    if ctx.storage_uri:
        from tasks.s3 import client, delete_prefix

        delete_prefix(_uri(ctx, Path(folder)), client(ctx.s3))
