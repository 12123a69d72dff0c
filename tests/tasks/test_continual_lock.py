"""The chain's lock (tasks.continual.chain_lock): a file lock in one workspace, and with storage on
S3 a lease that two "machines" (two workspaces sharing one bucket, on moto's S3 server) contend
for; and the watched batches listed from an S3 prefix (tasks.batches.list_batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdpo_core.continual import ChainBusy
from tasks.continual import chain_id, chain_lock
from tests.moto_s3 import moto_s3

BUCKET = "sdpo-chain"
URI = "sqlite:////tmp/registry.db"


def test_second_run_on_the_same_chain_is_refused_then_admitted(tmp_path):
    with chain_lock(tmp_path, URI, "model-a"):
        with pytest.raises(ChainBusy, match="'model-a': another continue run or rollback holds its chain's lock"):
            with chain_lock(tmp_path, URI, "model-a"):
                pass
        with chain_lock(tmp_path, URI, "model-b"):  # another chain is not held up
            pass
        with chain_lock(tmp_path, "sqlite:////tmp/other.db", "model-a"):  # nor the same name in another registry
            pass
    with chain_lock(tmp_path, URI, "model-a"):  # released at the end of the block
        pass
    assert chain_id(URI, "model-a") != chain_id(URI, "model-b")


@pytest.fixture
def s3_store(monkeypatch):
    """moto's S3 server on 127.0.0.1 with a bucket; its endpoint and dummy credentials in the environment."""
    with moto_s3(monkeypatch, BUCKET) as s3:
        yield s3


def test_lease_holds_the_chain_across_machines(tmp_path, s3_store):
    storage = f"s3://{BUCKET}/shared"
    with chain_lock(tmp_path / "machine-a", URI, "model-a", storage):
        leases = [o["Key"] for o in s3_store.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
        assert leases == [f"shared/locks/chain-{chain_id(URI, 'model-a')}.lease"]
        holder = json.loads(s3_store.get_object(Bucket=BUCKET, Key=leases[0])["Body"].read())
        assert holder["seconds"] > 0
        # Machine b has its own workspace (its flock knows nothing of a's): only the lease refuses it.
        with pytest.raises(ChainBusy, match=f"a lease in {storage}"):
            with chain_lock(tmp_path / "machine-b", URI, "model-a", storage):
                pass
    assert "Contents" not in s3_store.list_objects_v2(Bucket=BUCKET), "the lease is released"
    with chain_lock(tmp_path / "machine-b", URI, "model-a", storage):  # now b gets it
        pass


def test_batches_listed_from_an_s3_prefix(tmp_path, s3_store):
    from tasks.batches import list_batches

    rows = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    for key in ("in/2024-01-02.jsonl", "in/2024-01-01.jsonl", "in/sub/x.csv", "in/.hidden.jsonl", "in/notes.md"):
        s3_store.put_object(Bucket=BUCKET, Key=key, Body=rows.encode())
    s3_store.put_object(Bucket=BUCKET, Key="other/2024-01-03.jsonl", Body=rows.encode())
    found = list_batches.fn(f"s3://{BUCKET}/in", str(tmp_path / "batches"))
    assert [f.name for f in found] == ["2024-01-01.jsonl", "2024-01-02.jsonl", "sub/x.csv"]
    assert found[0].origin == f"s3://{BUCKET}/in/2024-01-01.jsonl"
    assert Path(found[0].path).read_text() == rows
    assert found[0].sha256 == found[1].sha256, "identity is the content"


def test_batches_of_a_missing_folder_are_a_clear_error(tmp_path):
    from sdpo_core.data import DataError
    from tasks.batches import list_batches

    with pytest.raises(DataError, match="data.watch '.*nowhere' does not exist"):
        list_batches.fn(str(tmp_path / "nowhere"), str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    assert list_batches.fn(str(tmp_path / "empty"), str(tmp_path / "b")) == []
