"""The partition task: it writes the chunks and logs partition.json to the MLflow parent run.

The task's function runs directly (``.fn``), against a SQLite MLflow store in tmp_path with M0
registered as step-0, so no Prefect server is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "models" / "stories260K")


@pytest.mark.slow
def test_partition_task_logs_partition_json(tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger

    from sdpo_core.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, SourceConfig, TrainConfig
    from sdpo_core.data import load_source, write_pairs
    from tasks import tracking
    from tasks.context import RunContext
    from tasks.data import partition
    from tasks.registry import register_base

    orca = SourceConfig(path=str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), name="orca", max_pairs=8)
    # A RunConfig checks its values when built: it needs at least one source.
    cfg = RunConfig(
        model=ModelConfig(name_or_path=MODEL),
        data=DataConfig(sources=(orca,), max_length=96, max_prompt_length=48),
        partition=PartitionConfig(strategy="easy_to_hard", sizes=(4, 3)),
        train=TrainConfig(device="cpu"),
    )
    pairs, _ = load_source(orca)
    run_dir = tmp_path / "runs" / "r"
    write_pairs(pairs, run_dir / "data" / "train.jsonl")
    prepared = SimpleNamespace(train_path=str(run_dir / "data" / "train.jsonl"))  # the task reads only this

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(c, "exp-partition", (tmp_path / "mlartifacts").as_uri())
    parent = tracking.start_run(c, experiment_id, "parent")
    ctx = RunContext(str(tmp_path), str(run_dir), uri, experiment_id, parent, "model-partition")

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with disable_run_logger():
            m0 = register_base.fn(cfg, ctx)  # a run points its aliases only when it finishes
            chunks = partition.fn(cfg, ctx, prepared, tracking.version_uri(ctx.model_name, m0))
    finally:
        torch.set_num_threads(before)

    assert [(ch.label, ch.size) for ch in chunks] == [("easy_to_hard-1", 4), ("easy_to_hard-2", 3)]
    local = run_dir / "chunks" / "partition.json"
    assert {a.path for a in c.list_artifacts(parent)} >= {"partition.json"}
    logged = Path(c.download_artifacts(parent, "partition.json", str(tmp_path / "download")))
    record = json.loads(logged.read_text())
    assert record == json.loads(local.read_text())
    assert record["unused_pairs"] == 1 and record["train_pairs"] == 8
    assert [ch["size"] for ch in record["chunks"]] == [4, 3]
