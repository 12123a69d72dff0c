"""The train step's lease in S3 (tasks.lease), on moto's S3 server over real HTTP.

Two "machines" here are two workspaces that share one bucket: their local locks (flock) know
nothing of each other, so only the lease keeps them from training the same step at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sdpo_core.checkpoint import CheckpointBusy
from tasks.context import RunContext
from tasks.lease import LeaseHeld, LeaseLost, LeaseUnsupported, StepLease, lease_key, step_lease
from tests.moto_s3 import moto_s3

REPO = Path(__file__).resolve().parents[2]
BUCKET = "sdpo-lease"


@pytest.fixture
def s3_store(monkeypatch):
    """moto's S3 server on 127.0.0.1 with a bucket; its endpoint and dummy credentials in the environment."""
    with moto_s3(monkeypatch, BUCKET) as s3:
        yield s3
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for o in page.get("Contents", []):
                s3.delete_object(Bucket=BUCKET, Key=o["Key"])


def machine(tmp_path: Path, name: str) -> RunContext:
    root = tmp_path / name
    return RunContext(str(root), str(root / "runs" / "r"), "", "", "", "m", f"s3://{BUCKET}/shared")


def lease(s3, step: int = 1, seconds: float = 60.0) -> StepLease:
    return StepLease(s3, BUCKET, "shared/checkpoints/r-step-1-abc.lease", step, seconds)


def keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_a_second_holder_is_refused_naming_the_step_and_the_holder(s3_store) -> None:
    first, second = lease(s3_store, step=2), lease(s3_store, step=2)
    first.acquire()
    with pytest.raises(LeaseHeld, match=r"train step 2: another trainer holds its lease s3://sdpo-lease/") as caught:
        second.acquire()
    assert first.owner in str(caught.value) and "until" in str(caught.value)
    assert isinstance(caught.value, CheckpointBusy)  # the CLI's "busy" error, exit 1
    assert keys(s3_store) == ["shared/checkpoints/r-step-1-abc.lease"], "the probe object is gone"
    holder = json.loads(s3_store.get_object(Bucket=BUCKET, Key=first.key)["Body"].read())
    assert holder["owner"] == first.owner and holder["step"] == 2


def test_release_frees_the_step(s3_store) -> None:
    first = lease(s3_store)
    first.acquire()
    first.release()
    assert keys(s3_store) == []
    second = lease(s3_store)
    second.acquire()
    assert second.etag is not None


def test_a_stale_lease_is_taken_over_and_its_old_holder_cannot_touch_it(s3_store) -> None:
    """The first holder died (never renewed): past its time, the next trainer takes the lease
    over. Should the first come back, it finds the lease lost and neither renews nor deletes it."""
    dead = lease(s3_store, seconds=0)
    dead.acquire()
    successor = lease(s3_store)
    with pytest.warns(UserWarning, match=f"took over the stale lease .* of {dead.owner}"):
        successor.acquire()
    holder = json.loads(s3_store.get_object(Bucket=BUCKET, Key=successor.key)["Body"].read())
    assert holder["owner"] == successor.owner
    assert dead.renew() is False and dead.lost
    dead.release()  # a lost lease is left to its new holder
    assert json.loads(s3_store.get_object(Bucket=BUCKET, Key=successor.key)["Body"].read())["owner"] == successor.owner
    with pytest.raises(LeaseHeld):
        lease(s3_store).acquire()  # the successor's lease is fresh


def test_a_held_lease_is_renewed_while_the_step_trains(tmp_path, s3_store) -> None:
    """A 2-second lease held for 4 seconds stays held (renewed every half second): a contender is
    refused throughout, and the lease is gone at the end."""
    ctx = machine(tmp_path, "a")
    ckpt = Path(ctx.root) / "checkpoints" / "r-step-1-abc"
    bucket, key = lease_key(ctx, ckpt)
    assert (bucket, key) == (BUCKET, "shared/checkpoints/r-step-1-abc.lease")
    with step_lease(ctx, ckpt, step=1, seconds=2):
        for _ in range(4):
            time.sleep(1)
            with pytest.raises(LeaseHeld):
                StepLease(s3_store, bucket, key, 1).acquire()
    assert keys(s3_store) == []


def test_a_lease_lost_while_training_fails_the_step(tmp_path, s3_store) -> None:
    ctx = machine(tmp_path, "a")
    ckpt = Path(ctx.root) / "checkpoints" / "r-step-1-abc"
    bucket, key = lease_key(ctx, ckpt)
    with pytest.raises(LeaseLost, match="train step 1: its lease .* was taken over"):  # noqa: PT012
        with step_lease(ctx, ckpt, step=1, seconds=0.4):
            # Another trainer overwrote it (as after a takeover): the next renewal finds it changed.
            s3_store.put_object(Bucket=bucket, Key=key, Body=b'{"owner": "other", "seconds": 600}')
            time.sleep(0.5)
    assert json.loads(s3_store.get_object(Bucket=bucket, Key=key)["Body"].read())["owner"] == "other"


class IgnoresConditions:
    """An S3 client for a store that ignores If-None-Match and If-Match (as older S3-compatible
    servers do): every write succeeds."""

    def __init__(self, s3) -> None:
        self.s3 = s3

    def put_object(self, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return self.s3.put_object(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self.s3, name)


def test_a_store_without_conditional_writes_is_refused(s3_store) -> None:
    first = lease(IgnoresConditions(s3_store))
    with pytest.raises(LeaseUnsupported, match="does not support conditional writes"):
        first.acquire()
    assert keys(s3_store) == [], "no lease and no probe left behind"


def test_two_machines_cannot_train_the_same_step(tmp_path, s3_store) -> None:
    """The train task's checkpoints (tasks.training.step_checkpoints) take the lease with their
    lock: the second machine, with its own workspace and flock, is refused by the lease."""
    from sdpo_core.config import load_config
    from sdpo_core.records import ChunkInfo
    from tasks.training import step_checkpoints

    cfg = load_config(REPO / "recipes" / "default.yaml", ["run_name=r"])
    chunk = ChunkInfo(step=1, label="orca", path="chunk.jsonl", size=4, content_hash="abc")
    ref_dir = str(REPO / "models" / "stories260K")
    a = step_checkpoints(cfg, machine(tmp_path, "a"), chunk, ref_dir)
    b = step_checkpoints(cfg, machine(tmp_path, "b"), chunk, ref_dir)
    with a.exclusive():
        with pytest.raises(LeaseHeld, match="train step 1: another trainer holds its lease"), b.exclusive():
            pass
    with b.exclusive():  # released: the other machine may go on
        pass
    assert keys(s3_store) == []
