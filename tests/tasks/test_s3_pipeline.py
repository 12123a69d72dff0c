"""Artifacts on S3: a real S3-compatible HTTP server on loopback (moto's server), boto3 and MLflow.

A two-step pipeline whose MLflow artifacts live only in the bucket: every registry version's
source is an ``s3://`` URI, the models were verified there before registration, and each step's
reference was downloaded from the registry (so from S3). A corrupted object fails verification.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="sdpo-test")
    yield s3
    server.stop()


def test_verify_upload_catches_size_and_checksum(tmp_path, s3_server):
    from tasks.s3 import UploadError, verify_upload

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x" * 1000)
    (folder / "meta.json").write_text("{}")
    for f in folder.iterdir():
        s3_server.upload_file(str(f), "sdpo-test", f"m/{f.name}")
    assert verify_upload(folder, "s3://sdpo-test/m", s3_server) == 2
    s3_server.put_object(Bucket="sdpo-test", Key="m/a.bin", Body=b"y" * 1000)  # same size, other bytes
    with pytest.raises(UploadError, match="checksum"):
        verify_upload(folder, "s3://sdpo-test/m", s3_server)
    s3_server.put_object(Bucket="sdpo-test", Key="m/a.bin", Body=b"x" * 999)
    with pytest.raises(UploadError, match="999 bytes"):
        verify_upload(folder, "s3://sdpo-test/m", s3_server)
    s3_server.delete_object(Bucket="sdpo-test", Key="m/a.bin")
    with pytest.raises(UploadError, match="not found"):
        verify_upload(folder, "s3://sdpo-test/m", s3_server)


def test_multipart_etag_is_verified(tmp_path, s3_server):
    from boto3.s3.transfer import TransferConfig

    from tasks.s3 import verify_upload

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(os.urandom(9 * (1 << 20)))  # over boto3's 8 MiB threshold
    s3_server.upload_file(
        str(folder / "weights.safetensors"),
        "sdpo-test",
        "big/weights.safetensors",
        Config=TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20),
    )
    etag = s3_server.head_object(Bucket="sdpo-test", Key="big/weights.safetensors")["ETag"]
    assert etag.strip('"').endswith("-2")
    assert verify_upload(folder, "s3://sdpo-test/big", s3_server) == 1


@pytest.mark.slow
def test_pipeline_with_artifacts_on_s3(tmp_path, s3_server, prefect_harness):
    from mlflow import MlflowClient

    from flows.pipeline import sdpo_pipeline
    from sdpo_core.config import load_config
    from tests.flows.test_pipeline import write_recipe

    orca, mix = "data/orca_dpo_pairs_validation_msfoundry.jsonl", "data/llamafactory_dpo_en_demo.json"
    path = write_recipe(
        tmp_path,
        "s3",
        data__sources=[
            {"name": "orca", "path": str(REPO / orca), "max_pairs": 16},
            {"name": "mix", "path": str(REPO / mix), "max_pairs": 16},
        ],
        data__eval_fraction=0.25,
        data__max_length=64,
        data__max_prompt_length=32,
        train__grad_accum_steps=1,
        train__learning_rate=5e-4,
        tracking__experiment="s3-exp",
        tracking__registered_model="s3-model",
        tracking__artifact_location="s3://sdpo-test/mlflow",
        storage__uri="s3://sdpo-test/sdpo",
    )
    result = sdpo_pipeline(load_config(path))
    assert len(result.rows) == 2

    c = MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    for alias in ("step-0", "step-1", "step-2", "final"):
        mv = c.get_model_version_by_alias("s3-model", alias)
        assert mv.source.startswith("s3://sdpo-test/mlflow/"), mv.source
        bucket_key = mv.source.removeprefix("s3://sdpo-test/") + "/model.safetensors"
        assert s3_server.head_object(Bucket="sdpo-test", Key=bucket_key)["ContentLength"] > 0
    # Every file one stage hands to another is in the bucket, relative to the workspace.
    run = Path(result.run_dir).relative_to(Path(os.environ["SDPO_HOME"]).resolve()).as_posix()
    listed = s3_server.list_objects_v2(Bucket="sdpo-test", Prefix="sdpo/")
    keys = {o["Key"] for o in listed.get("Contents", [])}
    for name in (
        "data/train.jsonl",
        "data/eval.jsonl",
        "data/data_report.json",
        "chunks/partition.json",
        "chunks/step-1.jsonl",
        "chunks/step-2.jsonl",
        "report.txt",
        "report.json",
    ):
        assert f"sdpo/{run}/{name}" in keys, name
    assert sum(k.startswith("sdpo/cache/logps/") for k in keys) >= 4  # M0 train+eval, chunks, step evals
    # The step models were downloaded from the registry (S3) to serve as references.
    step1 = c.get_model_version_by_alias("s3-model", "step-1")
    cached = Path(os.environ["SDPO_HOME"]) / "cache" / "models"
    assert list(cached.glob(f"*/s3-model/{step1.version}-{step1.run_id}/model.safetensors"))


def test_a_stage_fetches_missing_inputs_from_storage(tmp_path, s3_server):
    """A worker that lacks a file the last stage wrote downloads it; absent everywhere is an error."""
    from tasks.context import RunContext
    from tasks.storage import publish, require

    root = tmp_path / "ws"
    ctx = RunContext(str(root), str(root / "runs" / "r"), "sqlite://", "0", "p", "m", "s3://sdpo-test/store")
    chunk = root / "runs" / "r" / "chunks" / "step-1.jsonl"
    chunk.parent.mkdir(parents=True)
    chunk.write_text('{"a": 1}\n')
    assert publish(ctx, chunk) == ["s3://sdpo-test/store/runs/r/chunks/step-1.jsonl"]
    chunk.unlink()
    require(ctx, chunk)
    assert chunk.read_text() == '{"a": 1}\n'
    with pytest.raises(FileNotFoundError, match="step-2.jsonl"):
        require(ctx, chunk.with_name("step-2.jsonl"))


def test_checkpoints_travel_through_storage(tmp_path, s3_server):
    """With storage.uri a step's checkpoint is uploaded (files, then the latest pointer) and a
    machine without it fetches and verifies it before resuming."""
    import shutil

    import torch

    from sdpo_core.config import load_config
    from sdpo_core.records import ChunkInfo
    from tasks.context import RunContext
    from tasks.training import clear_checkpoints, step_checkpoints

    cfg = load_config(REPO / "recipes" / "default.yaml")
    ctx = RunContext(str(tmp_path / "ws"), str(tmp_path / "ws" / "runs" / "r"), "", "", "", "m", "s3://sdpo-test/sdpo")
    chunk = ChunkInfo(step=1, label="orca", path=str(tmp_path / "chunk.jsonl"), size=4, content_hash="abc")
    ref_dir = str(REPO / "models" / "stories260K")

    def trainable():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    model, optimizer, scheduler = trainable()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    saved = step_checkpoints(cfg, ctx, chunk, ref_dir).save(1, model, optimizer, scheduler, [{"loss": 0.5}])
    relative = saved.relative_to(tmp_path / "ws").as_posix()
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket="sdpo-test", Prefix="sdpo/checkpoints/")["Contents"]}
    assert f"sdpo/{relative}/state.json" in keys and f"sdpo/{relative}/model.safetensors" in keys
    assert f"sdpo/{saved.parent.relative_to(tmp_path / 'ws').as_posix()}/latest" in keys

    shutil.rmtree(tmp_path / "ws" / "checkpoints")  # another machine: nothing local
    fresh, fresh_opt, fresh_sched = trainable()
    resumed = step_checkpoints(cfg, ctx, chunk, ref_dir).restore(fresh, fresh_opt, fresh_sched)
    assert resumed is not None and resumed.step == 1 and resumed.history == [{"loss": 0.5}]
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])

    # The next checkpoint replaces this one in the store too; clearing removes the step's folder.
    ckpt = step_checkpoints(cfg, ctx, chunk, ref_dir)
    newer = ckpt.save(2, fresh, fresh_opt, fresh_sched, [{"loss": 0.5}, {"loss": 0.4}])
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket="sdpo-test", Prefix="sdpo/checkpoints/")["Contents"]}
    assert f"sdpo/{relative}/state.json" not in keys
    assert f"sdpo/{newer.relative_to(tmp_path / 'ws').as_posix()}/state.json" in keys
    clear_checkpoints(ctx, str(ckpt.root))
    assert "Contents" not in s3_server.list_objects_v2(Bucket="sdpo-test", Prefix="sdpo/checkpoints/")
    assert not ckpt.root.exists()
