"""Continual sDPO end to end (flows/continual.py) on the tiny real model under Prefect's test
server: batch files dropped into a watched folder become steps 1, 2, 3 of one chain; a run with
nothing new registers nothing; overlap with trained pairs and with the held-out split is dropped
and counted; the held-out split stays the chain's; rollback then continue trains from the right
version; the lineage command prints the chain; the guards refuse a changed tokenizer, a chain
whose lock is held and a final this pipeline did not register.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def pairs(tag: str, n: int, start: int = 0) -> list[dict]:
    """``n`` distinct standard pairs whose prompts and answers name ``tag``."""
    return [
        {
            "prompt": f"Tell a story about the {tag} number {i}.",
            "chosen": f"Once upon a time the {tag} {i} was happy and kind.",
            "rejected": f"No. {tag} {i} bad.",
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, name: str, model: Path | None = None, file: str = "") -> Path:
    """A chain recipe: a held-out source (use: eval) and the watched folder (use: train)."""
    data = {
        "run_name": name,
        "model": {"name_or_path": str(model or REPO / "models" / "stories260K")},
        "data": {
            "sources": [
                {"name": "heldout", "path": str(tmp_path / "heldout.jsonl"), "use": "eval"},
                {"name": "incoming", "path": str(tmp_path / "incoming"), "use": "train"},
            ],
            "watch": str(tmp_path / "incoming"),
            "max_length": 48,
            "max_prompt_length": 24,
        },
        "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 0.002},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": f"exp-{name}",
            "registered_model": f"model-{name}",
        },
    }
    path = tmp_path / (file or f"{name}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def registry(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(c, name: str) -> list[int]:
    return sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))


@pytest.fixture
def workspace(tmp_path, monkeypatch, prefect_harness):
    from prefect.settings import get_current_settings

    monkeypatch.setenv("SDPO_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("PREFECT_API_URL", get_current_settings().api.url)  # the session's test server
    return tmp_path / "ws"


@pytest.mark.slow
def test_chain_grows_by_batch_files_rolls_back_and_guards(tmp_path, workspace, capsys):
    from flows.cli import main
    from flows.continual import sdpo_continue
    from sdpo_core.config import load_config
    from sdpo_core.continual import ABANDONED, ChainBusy
    from tasks.continual import chain_lock, find_chain

    heldout = pairs("owl", 5)
    write_jsonl(tmp_path / "heldout.jsonl", heldout)
    incoming = tmp_path / "incoming"
    write_jsonl(incoming / "batch-1.jsonl", pairs("cat", 6))
    path = recipe(tmp_path, "chain")
    name = "model-chain"
    c = registry(tmp_path)

    # 1. No chain yet: the first continue run is the recipe's pipeline (M0 and step 1 = batch-1).
    first = sdpo_continue(config=load_config(path))
    assert [r["step"] for r in first.rows] == [1]
    chain = find_chain(c, name)
    assert [link.step for link in chain] == [0, 1]

    # 2. batch-2: 4 new pairs, 2 pairs of batch-1 again (overlap) and 1 held-out pair.
    write_jsonl(incoming / "batch-2.jsonl", pairs("dog", 4) + pairs("cat", 2) + heldout[:1])
    second = sdpo_continue(config=load_config(path))
    assert [r["step"] for r in second.rows] == [2]
    v2 = c.get_model_version_by_alias(name, "final")
    assert v2.tags["sdpo.step"] == "2" and v2.tags["sdpo.batch.file"] == "batch-2.jsonl"
    assert v2.tags["sdpo.batch.pairs"] == "4" and v2.tags["sdpo.chunk.size"] == "4"
    assert v2.tags["sdpo.batch.overlap_dropped"] == "2", "the pairs batch-1 trained are dropped and counted"
    assert v2.tags["sdpo.batch.eval_dropped"] == "1", "a held-out pair is never trained"
    assert v2.tags["sdpo.reference_version"] == chain[1].version
    assert v2.tags["sdpo.reference"] == f"models:/{name}@step-1"
    chunk = [json.loads(line) for line in open(Path(second.run_dir) / "chunks" / "step-2.jsonl")]
    assert sorted(p["chosen"] for p in chunk) == sorted(p["chosen"] for p in pairs("dog", 4))

    # The held-out split is the chain's: the same file (hash) as the first run's, every step.
    first_eval = (Path(first.run_dir) / "data" / "eval.jsonl").read_bytes()
    assert (Path(second.run_dir) / "data" / "eval.jsonl").read_bytes() == first_eval
    from sdpo_core.hashing import sha256_bytes

    assert v2.tags["sdpo.eval_hash"] == sha256_bytes(first_eval)[:16]

    # 3. batch-3: step 3, referenced to step 2's version.
    write_jsonl(incoming / "batch-3.jsonl", pairs("fox", 4))
    third = sdpo_continue(config=load_config(path))
    assert [r["step"] for r in third.rows] == [3]
    v3 = c.get_model_version_by_alias(name, "final")
    assert (
        v3.tags["sdpo.reference_version"] == str(v2.version) and v3.tags["sdpo.eval_hash"] == v2.tags["sdpo.eval_hash"]
    )
    assert {a.path for a in c.list_artifacts(v3.tags["sdpo.parent_run_id"])} >= {
        "lineage.txt",
        "lineage.json",
        "lineage.png",
    }
    assert [str(c.get_model_version_by_alias(name, f"step-{t}").version) for t in range(4)] == [
        link.version for link in find_chain(c, name)
    ]

    # 4. Nothing new: the CLI exits 0 at once, registers and tracks nothing.
    before = versions(c, name)
    runs_before = len(c.search_runs([c.get_experiment_by_name("exp-chain").experiment_id]))
    capsys.readouterr()
    assert main(["run", "-c", str(path), "--continue"]) == 0
    out = capsys.readouterr().out
    assert "nothing new in" in out and f"final stays version {v3.version}" in out
    assert versions(c, name) == before
    assert len(c.search_runs([c.get_experiment_by_name("exp-chain").experiment_id])) == runs_before

    # 5. Guards, each refused before anything is registered.
    write_jsonl(incoming / "batch-4.jsonl", pairs("hen", 4))
    with chain_lock(workspace, f"sqlite:///{tmp_path / 'mlflow.db'}", name):
        with pytest.raises(ChainBusy, match="holds its chain's lock"):
            sdpo_continue(config=load_config(path))
    other_model = tmp_path / "other-model"
    shutil.copytree(REPO / "models" / "stories260K", other_model)
    tok_config = other_model / "tokenizer_config.json"
    settings = json.loads(tok_config.read_text())
    settings["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tok_config.write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(["run", "-c", str(recipe(tmp_path, "chain", model=other_model, file="other.yaml")), "--continue"]) == 2
    assert "tokenizer or chat template differs" in capsys.readouterr().err
    assert versions(c, name) == before
    (incoming / "batch-4.jsonl").unlink()

    # 6. Rollback to step 1: final moves back, nothing is deleted, steps 2 and 3 are tagged.
    assert main(["rollback", "-c", str(path), "--to", "step-1"]) == 0
    assert "batch-2.jsonl, batch-3.jsonl" in capsys.readouterr().out
    assert str(c.get_model_version_by_alias(name, "final").version) == chain[1].version
    assert versions(c, name) == before
    for v in (v2, v3):
        assert c.get_model_version(name, v.version).tags[ABANDONED] == "true"
    assert "step-2" not in c.get_registered_model(name).aliases

    # 7. Continue after the rollback, batch-3 removed: batch-2 trains again from step 1's version,
    # as a new version (the abandoned one is not reused).
    (incoming / "batch-3.jsonl").unlink()
    again = sdpo_continue(config=load_config(path))
    assert [r["step"] for r in again.rows] == [2]
    new2 = c.get_model_version_by_alias(name, "final")
    assert new2.version not in (v2.version, v3.version) and new2.version > v3.version
    assert new2.tags["sdpo.reference_version"] == chain[1].version
    assert new2.tags["sdpo.batch.file"] == "batch-2.jsonl"

    # 8. The lineage command prints the chain: versions, batch, reference.
    capsys.readouterr()
    assert main(["lineage", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"final: version {new2.version}" in out
    lines = [line.split() for line in out.splitlines()]
    step2 = next(line for line in lines if line[:2] == ["2", str(new2.version)])
    assert "batch-2.jsonl" in step2 and "4" in step2 and chain[1].version in step2
    assert f"version {v3.version} (step 3, rolled back to version {chain[1].version})" in out


@pytest.mark.slow
def test_foreign_final_is_refused(tmp_path, workspace, capsys):
    """A final that this pipeline did not register (no sdpo tags) is not continued."""
    from flows.cli import main

    path = recipe(tmp_path, "foreign")
    write_jsonl(tmp_path / "heldout.jsonl", pairs("owl", 3))
    write_jsonl(tmp_path / "incoming" / "batch-1.jsonl", pairs("cat", 3))
    c = registry(tmp_path)
    c.create_registered_model("model-foreign")
    mv = c.create_model_version("model-foreign", str(REPO / "models" / "stories260K"))
    c.set_registered_model_alias("model-foreign", "final", mv.version)
    assert main(["run", "-c", str(path), "--continue"]) == 2
    err = capsys.readouterr().err
    assert "its final version was not registered by the sDPO pipeline" in err
    assert versions(c, "model-foreign") == [1]


def test_continue_deployment_is_the_continual_recipe_scheduled_off():
    """deployments/prefect.yaml's sdpo-continue repeats recipes/continual.yaml, with a schedule
    that is off until turned on."""
    from sdpo_core.config import RunConfig, load_config

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    entry = next(d for d in spec["deployments"] if d["name"] == "sdpo-continue")
    assert entry["entrypoint"] == "flows/continual.py:sdpo_continue"
    assert RunConfig.model_validate(entry["parameters"]["config"]) == load_config(REPO / "recipes" / "continual.yaml")
    assert [s.get("active") for s in entry["schedules"]] == [False]
