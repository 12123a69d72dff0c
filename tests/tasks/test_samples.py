"""The sample generations task (tasks/samples.py) on the tiny real model and MLflow on SQLite: one
table on the parent run with a prompt column and a column per model (M0, step-1, ...), the same
texts as the core function gives, generations.json in the run folder, no second copy on a retry,
and nothing at all when evaluate.samples is 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prefect.logging import disable_run_logger

from sdpo_core.config import DataConfig, EvaluateConfig, ModelConfig, RunConfig, SourceConfig, TrainConfig
from sdpo_core.generations import continue_prompts
from sdpo_core.model_io import load_model, load_tokenizer
from sdpo_core.pairs import PreferencePair, write_pairs
from tasks import tracking
from tasks.context import RunContext
from tasks.samples import TABLE_FILE, sample_generations

pytestmark = pytest.mark.integration  # MLflow's tracking store and registry on SQLite

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "stories260K")
CHAT = ({"role": "user", "content": "Tell a story."},)
EVAL = [
    PreferencePair("Once upon a time", "a", "b", "s"),
    PreferencePair("Once upon a time", "c", "d", "s"),  # the same prompt: sampled once
    PreferencePair(CHAT, "e", "f", "s"),
    PreferencePair("Lily had a dog", "g", "h", "s"),
]


def _cfg(samples: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name_or_path=MODEL),
        data=DataConfig(sources=(SourceConfig(path="data/x.jsonl"),)),
        train=TrainConfig(device="cpu", seed=5),
        evaluate=EvaluateConfig(samples=samples, sample_tokens=10),
    )


@pytest.fixture
def registry(tmp_path: Path):
    """A parent run and two registered versions: M0 (the tiny model) and a perturbed copy."""
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    experiment = c.create_experiment("samples", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = c.create_run(experiment).info.run_id
    model = load_model(ModelConfig(name_or_path=MODEL))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    step_dir = tmp_path / "step-1"
    model.save_pretrained(step_dir)
    load_tokenizer(ModelConfig(name_or_path=MODEL)).save_pretrained(step_dir)
    versions = {}
    for step, folder in ((0, MODEL), (1, str(step_dir))):
        run = c.create_run(experiment).info.run_id
        versions[step] = tracking.register(c, "m", run, folder, {"step": str(step)})
    ctx = RunContext(str(tmp_path), str(tmp_path / "runs" / "r"), uri, experiment, parent, "m")
    eval_path = Path(ctx.run_dir) / "data" / "eval.jsonl"
    write_pairs(EVAL, eval_path)
    return c, ctx, str(eval_path), versions, step_dir


def _table(c, run_id: str, dst: Path) -> dict:
    return json.loads(Path(c.download_artifacts(run_id, TABLE_FILE, str(dst))).read_text())


def test_one_table_with_a_column_per_model(registry, tmp_path: Path) -> None:
    c, ctx, eval_path, versions, step_dir = registry
    with disable_run_logger():
        path = sample_generations.fn(_cfg(8), ctx, eval_path, versions)
    local = json.loads(Path(path).read_text())
    assert list(local) == ["prompt", "M0", "step-1"]
    assert local["prompt"] == ["Once upon a time", "User: Tell a story.\n\nAssistant:", "Lily had a dog"]
    # The texts are the core function's, for each model, with the run seed.
    prompts = ["Once upon a time", CHAT, "Lily had a dog"]
    for column, folder in (("M0", MODEL), ("step-1", str(step_dir))):
        cfg = ModelConfig(name_or_path=folder)
        expected = continue_prompts(load_model(cfg).eval(), load_tokenizer(cfg), prompts, 10, 5)
        assert local[column] == expected
    assert local["M0"] != local["step-1"]  # the perturbed model writes something else

    table = _table(c, ctx.parent_run_id, tmp_path / "dl1")
    assert table["columns"] == ["prompt", "M0", "step-1"]
    assert table["data"] == [list(row) for row in zip(local["prompt"], local["M0"], local["step-1"], strict=True)]
    logged = json.loads(c.get_run(ctx.parent_run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": TABLE_FILE, "type": "table"} in logged

    # A retry (Prefect's) logs nothing twice: MLflow's log_table would append the rows again.
    with disable_run_logger():
        sample_generations.fn(_cfg(8), ctx, eval_path, versions)
    assert len(_table(c, ctx.parent_run_id, tmp_path / "dl2")["data"]) == 3


def test_fewer_prompts_and_off(registry, tmp_path: Path) -> None:
    c, ctx, eval_path, versions, _ = registry
    with disable_run_logger():
        assert sample_generations.fn(_cfg(0), ctx, eval_path, versions) is None
    assert c.list_artifacts(ctx.parent_run_id, "samples") == []
    assert not (Path(ctx.run_dir) / "generations.json").exists()
    with disable_run_logger():
        sample_generations.fn(_cfg(1), ctx, eval_path, {0: versions[0]})
    assert _table(c, ctx.parent_run_id, tmp_path / "dl") == {
        "columns": ["prompt", "M0"],
        "data": [["Once upon a time", json.loads(Path(ctx.run_dir, "generations.json").read_text())["M0"][0]]],
    }
