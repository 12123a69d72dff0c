"""Continual sDPO with everything on moto's S3 server: the watched batches are an S3 prefix, the
run files go to storage.uri and MLflow's artifacts to the bucket. The first run starts the chain
from the batch in the prefix, a continue run trains a batch put there later as step 2 (its model
verified in the bucket and its reference step 1's version), and the chain's lease on S3 refuses a
continue run while another machine holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.flows.test_continual import pairs, registry
from tests.moto_s3 import moto_s3

REPO = Path(__file__).resolve().parents[2]
BUCKET = "sdpo-chain"


def put_batch(s3, key: str, rows: list[dict]) -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.mark.slow
def test_chain_on_s3_watched_prefix_storage_and_lease(tmp_path, monkeypatch, prefect_harness):
    from prefect.settings import get_current_settings

    from flows.continual import sdpo_continue
    from sdpo_core.config import load_config
    from sdpo_core.continual import ChainBusy
    from tasks.continual import chain_lock, find_chain

    monkeypatch.setenv("SDPO_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("PREFECT_API_URL", get_current_settings().api.url)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in pairs("owl", 4)))
    watch = f"s3://{BUCKET}/incoming/"
    name = "model-s3chain"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = {
        "run_name": "s3chain",
        "model": {"name_or_path": str(REPO / "models" / "stories260K")},
        "data": {
            "sources": [
                {"name": "heldout", "path": str(heldout), "use": "eval"},
                {"name": "incoming", "path": watch, "use": "train"},  # read from its downloaded copy
            ],
            "watch": watch,
            "max_length": 48,
            "max_prompt_length": 24,
        },
        "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 0.002},
        "tracking": {
            "tracking_uri": uri,
            "experiment": "exp-s3chain",
            "registered_model": name,
            "artifact_location": f"s3://{BUCKET}/mlflow",
        },
        "storage": {"uri": f"s3://{BUCKET}/sdpo"},
    }
    path = tmp_path / "s3chain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    c = registry(tmp_path)

    with moto_s3(monkeypatch, BUCKET) as s3:
        put_batch(s3, "incoming/batch-1.jsonl", pairs("cat", 5))
        put_batch(s3, "incoming/notes/.hidden.jsonl", pairs("bee", 3))  # hidden: no batch

        # 1. The first run starts the chain from the prefix's one batch.
        first = sdpo_continue(config=load_config(path))
        assert [r["step"] for r in first.rows] == [1]
        step1 = c.get_model_version_by_alias(name, "final")
        assert step1.tags["sdpo.step"] == "1" and step1.source.startswith(f"s3://{BUCKET}/mlflow/")

        # 2. A new object under the prefix is the next step, referenced to step 1's version.
        put_batch(s3, "incoming/batch-2.jsonl", pairs("dog", 4) + pairs("cat", 1))
        second = sdpo_continue(config=load_config(path))
        assert [r["step"] for r in second.rows] == [2]
        v2 = c.get_model_version_by_alias(name, "final")
        assert v2.tags["sdpo.batch.file"] == "batch-2.jsonl" and v2.tags["sdpo.batch.pairs"] == "4"
        assert v2.tags["sdpo.batch.overlap_dropped"] == "1"
        assert v2.tags["sdpo.reference_version"] == str(step1.version)
        assert v2.source.startswith(f"s3://{BUCKET}/mlflow/")
        head = s3.head_object(Bucket=BUCKET, Key=v2.source.removeprefix(f"s3://{BUCKET}/") + "/model.safetensors")
        assert head["ContentLength"] > 0
        run = Path(second.run_dir).relative_to((tmp_path / "ws").resolve()).as_posix()
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="sdpo/")["Contents"]}
        assert {f"sdpo/{run}/chunks/step-2.jsonl", f"sdpo/{run}/lineage.txt"} <= keys
        assert [link.step for link in find_chain(c, name)] == [0, 1, 2]

        # 3. Another machine (its own workspace, so its own file lock) holds the chain's lease on
        # S3: a continue run here is refused and registers nothing.
        put_batch(s3, "incoming/batch-3.jsonl", pairs("fox", 4))
        before = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
        with chain_lock(tmp_path / "other-machine", uri, name, f"s3://{BUCKET}/sdpo"):
            lease = [k for k in {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]} if "locks/" in k]
            assert lease, "the lease is an object in the bucket"
            with pytest.raises(ChainBusy, match="a lease in s3://"):
                sdpo_continue(config=load_config(path))
        assert sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'")) == before

        # Released: the next run trains batch-3 as step 3.
        third = sdpo_continue(config=load_config(path))
        assert [r["step"] for r in third.rows] == [3]
        assert c.get_model_version_by_alias(name, "final").tags["sdpo.reference_version"] == str(v2.version)
