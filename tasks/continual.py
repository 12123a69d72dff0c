"""Continual sDPO, the registry side: the chain behind ``final``, its lock, its records (trained
pairs, held-out split), the batch tags, the lineage artifacts and rollback.

The lock: two continue runs (or a continue run and a rollback) on one chain would both train
step T+1 from the same ``final`` and then move the aliases over each other. A run holds the
chain's lock for its whole length: a file lock (``flock``, sdpo_core.locks) in the workspace,
``<workspace>/locks/chain-<id>.lock``, not waited for; and with storage.uri on S3 a lease there
too (tasks.lease, the train steps' conditional-write lease, under the key
``<storage.uri>/locks/chain-<id>.lease``), which holds across machines. ``<id>`` is a hash of the
tracking URI and the registered model's name: one chain per registered model per registry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from sdpo_core.continual import (
    ABANDONED,
    ABANDONED_FOR,
    CHAIN_FOLDER,
    TRAINED_PAIRS,
    ChainBusy,
    ChainError,
    ChainLink,
    rollback_plan,
    trained_keys,
    walk_chain,
)
from sdpo_core.files import atomic_write_text
from sdpo_core.hashing import sha256_bytes
from sdpo_core.pairs import read_pairs
from tasks import artifacts, tracking
from tasks.blocks import S3Access
from tasks.context import RunContext
from tasks.retries import IO_TASK


def chain_id(tracking_uri: str, model_name: str) -> str:
    """A short id of a chain: its registry and its registered model's name."""
    return sha256_bytes(f"{tracking_uri}\n{model_name}")[:16]


@contextlib.contextmanager
def chain_lock(
    root: Path, tracking_uri: str, model_name: str, storage_uri: str | None = None, access: S3Access | None = None
) -> Iterator[None]:
    """Hold the chain's lock for the block (see the module's docstring); never waits.

    Raises:
        ChainBusy: another run holds it, here or (with storage on S3) on another machine.
    """
    from sdpo_core.locks import file_lock

    key = chain_id(tracking_uri, model_name)
    path = Path(root) / "locks" / f"chain-{key}.lock"
    busy = (
        f"registered model {model_name!r}: another continue run or rollback holds its chain's lock "
        f"({{where}}); wait for it to finish, it moves final when done"
    )
    try:
        with file_lock(path, wait=False):
            if not (storage_uri or "").startswith("s3://"):
                yield
                return
            from tasks.lease import LeaseHeld, LeaseLost, step_lease

            ctx = RunContext(str(root), "", tracking_uri, "", "", model_name, storage_uri, access)
            try:
                with step_lease(ctx, Path(root) / "locks" / f"chain-{key}", 0):
                    yield
            except LeaseHeld as exc:
                raise ChainBusy(busy.format(where=f"a lease in {storage_uri}: {exc}")) from None
            except LeaseLost as exc:
                raise ChainBusy(
                    f"registered model {model_name!r}: the chain's lease was taken over by another run while "
                    f"this one held it (not renewed in time): {exc}"
                ) from None
    except BlockingIOError:
        raise ChainBusy(busy.format(where=path)) from None


def find_chain(c: Any, model_name: str) -> list[ChainLink] | None:
    """The chain that ``final`` reaches, step 0 first; None when the model or its final does not
    exist yet.

    Raises:
        ChainError: the chain is foreign or broken (sdpo_core.continual.walk_chain).
    """
    from mlflow.exceptions import MlflowException

    try:
        final = c.get_model_version_by_alias(model_name, "final")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise

    def lookup(version: str) -> tuple[dict[str, str], str] | None:
        try:
            mv = c.get_model_version(model_name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return dict(mv.tags), mv.run_id or ""

    return walk_chain(model_name, str(final.version), lookup)


# ---------------------------------------------------------------------------------------------
# The chain's records in MLflow: files under chain/ of a run


def log_chain_file(c: Any, run_id: str, path: str | Path, access: S3Access | None = None, name: str = "") -> None:
    """Log one file under the run's ``chain/`` artifact folder (as ``name``, default its own)."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / (name or Path(path).name)
        copy.write_bytes(Path(path).read_bytes())
        artifacts.log_artifacts(c, run_id, scratch, CHAIN_FOLDER, access)


def read_chain_file(
    c: Any, tracking_uri: str, run_id: str, name: str, dest: Path, access: S3Access | None = None
) -> Path | None:
    """A file of the run's ``chain/`` folder, downloaded under ``dest``; None when absent."""
    names = {Path(f.path).name for f in c.list_artifacts(run_id, CHAIN_FOLDER)}
    if name not in names:
        return None
    root = c.get_run(run_id).info.artifact_uri.rstrip("/")
    folder = artifacts.download(f"{root}/{CHAIN_FOLDER}", dest / run_id, tracking_uri, access)
    return Path(folder) / name


def log_trained_pairs(c: Any, run_id: str, chunk_path: str | Path, access: S3Access | None = None) -> None:
    """Record in a step run the content keys of the pairs of its chunk (``chain/trained_pairs.json``),
    which continue runs read to leave those pairs out of new batches."""
    with tempfile.TemporaryDirectory() as scratch:
        keys = trained_keys(read_pairs(Path(chunk_path)))
        path = atomic_write_text(Path(scratch) / TRAINED_PAIRS, json.dumps({"content_keys": keys}) + "\n")
        log_chain_file(c, run_id, path, access)


@task(name="chain-records", task_run_name="chain-records", **IO_TASK)
def chain_records(
    tracking_uri: str, model_name: str, chain: Sequence[ChainLink], dest: str, access: S3Access | None = None
) -> tuple[set[str], str]:
    """The content keys of every pair the chain trained on, and its held-out split (the
    ``eval.jsonl`` that the run which registered step 1 logged) downloaded into ``dest``.

    Raises:
        ChainError: a step without its record of trained pairs, or a chain without its held-out
            split (registered before continual runs existed): such a chain cannot be continued.
    """
    c = tracking.client(tracking_uri)
    scratch = Path(dest) / "records"
    keys: set[str] = set()
    for link in chain[1:]:
        path = read_chain_file(c, tracking_uri, link.run_id, TRAINED_PAIRS, scratch, access) if link.run_id else None
        if path is None:
            raise ChainError(
                f"registered model {model_name!r}: step {link.step} (version {link.version}) has no record of the "
                f"pairs it trained on ({CHAIN_FOLDER}/{TRAINED_PAIRS} in its run); it was registered before "
                "continual runs, so the chain cannot be continued: start a new one"
            )
        keys.update(json.loads(path.read_text())["content_keys"])
    first = chain[1] if len(chain) > 1 else None
    parent = first.tags.get("sdpo.parent_run_id", "") if first else ""
    eval_file = read_chain_file(c, tracking_uri, parent, "eval.jsonl", scratch, access) if parent else None
    if eval_file is None:
        raise ChainError(
            f"registered model {model_name!r}: the run that started the chain ({parent or 'unknown'}) holds no "
            f"{CHAIN_FOLDER}/eval.jsonl (its held-out split); the chain cannot be continued on the same split"
        )
    out = Path(dest) / "eval.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(eval_file.read_bytes())
    return keys, str(out)


@task(name="tag-batch", task_run_name="tag-batch-{version}", **IO_TASK)
def tag_version(ctx: RunContext, version: str, tags: dict[str, str]) -> None:
    """Add a continue run's batch tags to a version it registered (safe to repeat)."""
    c = tracking.client(ctx.tracking_uri)
    for key, value in tags.items():
        c.set_model_version_tag(ctx.model_name, version, key, value)


@task(name="log-lineage", task_run_name="log-lineage", **IO_TASK)
def log_lineage(ctx: RunContext) -> str:
    """The chain behind ``final`` (after this run moved it) as lineage.txt, lineage.json and
    lineage.png in the run folder and the MLflow parent run; returns the table."""
    from sdpo_core.lineage import format_lineage, lineage_plot, lineage_row
    from tasks.storage import publish

    c = tracking.client(ctx.tracking_uri)
    chain = find_chain(c, ctx.model_name) or []
    rows = [lineage_row(link) for link in chain]
    table = format_lineage(rows)
    run_dir = Path(ctx.run_dir)
    files = [
        atomic_write_text(run_dir / "lineage.txt", table + "\n"),
        atomic_write_text(run_dir / "lineage.json", json.dumps(rows, indent=2) + "\n"),
        lineage_plot(rows, run_dir / "lineage.png", f"{ctx.model_name}: held-out metrics along the chain"),
    ]
    for path in files:
        artifacts.log_artifact(c, ctx.parent_run_id, path, ctx.s3)
    publish(ctx, *files)
    get_run_logger().info("lineage of %s:\n%s", ctx.model_name, table)
    return table


def rollback_chain(
    tracking_uri: str,
    model_name: str,
    to_step: int,
    root: Path,
    storage_uri: str | None = None,
    access: S3Access | None = None,
) -> tuple[ChainLink, list[ChainLink]]:
    """Point ``final`` back to step ``to_step`` of its chain, deleting nothing.

    The versions after it are tagged ``sdpo.abandoned=true`` (and ``sdpo.abandoned_for``, the
    version final moved to), then the aliases move: step-0..step-N stay, final names step N's
    version, step-k for k > N is deleted. Holds the chain's lock. Returns (the link final names
    now, the abandoned links).

    Raises:
        ChainError: no chain, a foreign one, or no such step. ChainBusy: a continue run holds it.
    """
    c = tracking.client(tracking_uri)
    with chain_lock(root, tracking_uri, model_name, storage_uri, access):
        chain = find_chain(c, model_name)
        if chain is None:
            raise ChainError(f"registered model {model_name!r}: no final version to roll back")
        target, abandoned = rollback_plan(model_name, chain, to_step)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for link in abandoned:  # tags first: a rollback cut short leaves final where it was
            c.set_model_version_tag(model_name, link.version, ABANDONED, "true")
            c.set_model_version_tag(model_name, link.version, ABANDONED_FOR, target.version)
            c.set_model_version_tag(model_name, link.version, "sdpo.abandoned_at", stamp)
        tracking.point_aliases(c, model_name, {link.step: link.version for link in chain[: to_step + 1]})
    return target, abandoned
