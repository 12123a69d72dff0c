"""A lease in S3 on a train step: one trainer per step across every machine that shares a store.

The checkpoint lock (sdpo_core.checkpoint, a ``flock``) holds among the processes of one machine.
Two machines whose runs share one storage.uri and one run name would both train the same step
and write the same checkpoints; with storage on S3 the step also takes this lease there.

The lease is one small JSON object beside the step's checkpoints (``<checkpoints>.lease``) naming
its holder and how long it lasts. It is created with a conditional write (``If-None-Match: *``:
only if no such object exists), renewed while the step trains and deleted at the end, both
conditional on its ETag (``If-Match``), so that a holder never overwrites or deletes a lease it
has lost. A lease not renewed within its time (the holder died) is stale: another trainer may
take it over, again with ``If-Match`` on the stale lease's ETag, so only one of several can. A
lease's age is read on the store's clock (the object's Last-Modified against the Date of the
response), so the machines' clocks need not agree.

A store that ignores conditional writes (an older S3-compatible server) cannot give this
guarantee: it is detected with a probe object and the step is refused with a clear error
(:class:`LeaseUnsupported`) rather than trained without one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import os
import socket
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo_core.checkpoint import CheckpointBusy
from tasks.context import RunContext

LEASE_SECONDS = 600.0
"""How long a lease lasts unless renewed; a dead holder's step waits this long for another trainer."""
_RENEWALS_PER_LEASE = 4  # a lease survives three renewals in a row that the store does not answer
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_UNSUPPORTED_CODES = {"NotImplemented", "501"}


class LeaseError(CheckpointBusy):
    """The step's lease in S3 could not be held."""


class LeaseHeld(LeaseError):
    """Another trainer holds the step's lease."""


class LeaseUnsupported(LeaseError):
    """The S3 store ignores conditional writes, so no lease can hold across machines."""


class LeaseLost(LeaseError):
    """Another trainer took the lease over while this one trained (it was not renewed in time)."""


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@dataclass
class StepLease:
    """The lease on train step ``step`` at ``s3://bucket/key``, held by ``owner`` once acquired."""

    s3: Any
    bucket: str
    key: str
    step: int
    seconds: float = LEASE_SECONDS
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}")
    etag: str | None = None
    lost: bool = False

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _body(self) -> bytes:
        now = dt.datetime.now(dt.UTC)
        expires = now + dt.timedelta(seconds=self.seconds)
        return json.dumps(
            {
                "owner": self.owner,
                "step": self.step,
                "seconds": self.seconds,
                "written": now.isoformat(timespec="seconds"),
                "expires": expires.isoformat(timespec="seconds"),  # for people; staleness uses the store's clock
            }
        ).encode()

    def _put(self, **condition: str) -> None:
        self.etag = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]

    def acquire(self) -> None:
        """Create the lease, or take over a stale one.

        Raises:
            LeaseHeld: naming the step, the holder and when its lease ends.
            LeaseUnsupported: the store does not honour conditional writes.
        """
        from botocore.exceptions import ClientError

        self.check_conditional_writes()
        for _ in range(3):  # the lease may vanish or change between a refused write and the read
            try:
                self._put(IfNoneMatch="*")
                return
            except ClientError as exc:
                if _code(exc) not in _CONFLICT_CODES:
                    raise
            current = self.read()
            if current is None:
                continue  # released in between: try to create it again
            holder, etag, stale = current
            if not stale:
                raise LeaseHeld(
                    f"train step {self.step}: another trainer holds its lease {self.uri} "
                    f"({holder.get('owner', '?')}, until {holder.get('expires', '?')}); wait for it to finish, "
                    "or give this run another run_name"
                )
            try:
                self._put(IfMatch=etag)  # only one of several trainers can replace that version
            except ClientError as exc:
                if _code(exc) not in _CONFLICT_CODES | _MISSING_CODES:
                    raise
                continue
            warnings.warn(
                f"train step {self.step}: took over the stale lease {self.uri} of {holder.get('owner', '?')} "
                f"(not renewed since {holder.get('written', '?')})",
                stacklevel=2,
            )
            return
        raise LeaseHeld(f"train step {self.step}: its lease {self.uri} keeps changing hands; try again later")

    def read(self) -> tuple[dict[str, Any], str, bool] | None:
        """The lease's content, ETag and whether it is stale (on the store's clock); None if absent."""
        from botocore.exceptions import ClientError

        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise
        try:
            holder = json.loads(got["Body"].read())
            seconds = float(holder["seconds"])
        except (ValueError, KeyError, TypeError):
            holder, seconds = {"owner": "unreadable lease"}, 0.0  # not ours to keep: stale at once
        date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date) if date else dt.datetime.now(dt.UTC)
        stale = now >= got["LastModified"] + dt.timedelta(seconds=seconds)
        return holder, got["ETag"], stale

    def renew(self) -> bool:
        """Write the lease again (its time starts over); False once another trainer has it."""
        from botocore.exceptions import ClientError

        if self.lost or self.etag is None:
            return False
        try:
            self._put(IfMatch=self.etag)
        except ClientError as exc:
            if _code(exc) in _CONFLICT_CODES | _MISSING_CODES:
                self.lost = True
                return False
            raise
        return True

    def release(self) -> None:
        """Delete the lease if it is still this holder's (a lost one is left to its new holder)."""
        from botocore.exceptions import ClientError

        if self.lost or self.etag is None:
            return
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as exc:
            if _code(exc) in _UNSUPPORTED_CODES:  # conditional deletes are newer than conditional writes
                current = self.read()
                if current is not None and current[1] == self.etag:
                    self.s3.delete_object(Bucket=self.bucket, Key=self.key)
            elif _code(exc) not in _CONFLICT_CODES | _MISSING_CODES:
                raise
        self.etag = None

    def check_conditional_writes(self) -> None:
        """Refuse a store that ignores ``If-None-Match`` (it would let two trainers both "create"
        the lease): a probe object is written twice with it, and the second write must fail."""
        from botocore.exceptions import ClientError

        probe = f"{self.key}.probe-{uuid.uuid4().hex}"
        unsupported = LeaseUnsupported(
            f"train step {self.step}: the S3 store of {self.uri} does not support conditional writes "
            "(If-None-Match), so it cannot make sure that only one machine trains this step; use a store "
            "that does (AWS S3, MinIO), or one machine per run name"
        )
        try:
            self.s3.put_object(Bucket=self.bucket, Key=probe, Body=b"probe", IfNoneMatch="*")
            try:
                self.s3.put_object(Bucket=self.bucket, Key=probe, Body=b"probe", IfNoneMatch="*")
            except ClientError as exc:
                if _code(exc) in _CONFLICT_CODES:
                    return
                if _code(exc) in _UNSUPPORTED_CODES:
                    raise unsupported from None
                raise
            raise unsupported
        except ClientError as exc:
            if _code(exc) in _UNSUPPORTED_CODES:
                raise unsupported from None
            raise
        finally:
            with contextlib.suppress(ClientError):
                self.s3.delete_object(Bucket=self.bucket, Key=probe)


def lease_key(ctx: RunContext, checkpoint_root: Path) -> tuple[str, str]:
    """(bucket, key) of the lease of the step whose checkpoints are ``checkpoint_root``: beside the
    checkpoints' place in storage, so removing them (a prefix delete) leaves the lease alone."""
    from tasks.s3 import object_key, split_uri

    bucket, prefix = split_uri(ctx.storage_uri or "")
    relative = Path(checkpoint_root).resolve().relative_to(Path(ctx.root).resolve()).as_posix()
    return bucket, object_key(prefix, f"{relative}.lease")


@contextlib.contextmanager
def step_lease(ctx: RunContext, checkpoint_root: Path, step: int, seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold train step ``step``'s lease in the run's storage while the block runs; renewed in the
    background every quarter of ``seconds`` and released at the end.

    Raises:
        LeaseHeld: another trainer holds it (at once, before the block runs).
        LeaseUnsupported: the store ignores conditional writes.
        LeaseLost: the lease was taken over while the block ran (it was not renewed in time);
            the block's result must not be used.
    """
    from tasks.s3 import client

    bucket, key = lease_key(ctx, checkpoint_root)
    lease = StepLease(client(ctx.s3), bucket, key, step, seconds)
    lease.acquire()
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(seconds / _RENEWALS_PER_LEASE):
            try:
                if not lease.renew():
                    return
            except Exception as exc:  # the store is away for a moment: the lease outlives a few misses
                warnings.warn(f"train step {step}: lease {lease.uri} not renewed: {exc}", stacklevel=1)

    renewer = threading.Thread(target=keep, name=f"lease-step-{step}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        lease.release()
    if lease.lost:
        raise LeaseLost(
            f"train step {step}: its lease {lease.uri} was taken over by another trainer while this one "
            f"trained (not renewed within {seconds:g} s); this result is not used"
        )
