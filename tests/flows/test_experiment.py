"""`sdpo experiment` end to end on the tiny model: arms x seeds as pipeline subflows on one data
preparation and one M0, nested MLflow runs, equal budgets, init_base from M0, the comparison
files, and a rerun that reuses every finished arm."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.flows.test_pipeline import CallCounter, registry, write_recipe

REPO = Path(__file__).resolve().parents[2]


def write_experiment(tmp_path: Path) -> Path:
    pipeline = tmp_path / "pipeline.yaml"
    recipe = yaml.safe_load(write_recipe(tmp_path, "pipe").read_text())
    # The gold task's plain-text prompts, so the KL and gold-reward samples are drawn too.
    recipe["data"]["sources"] = [
        {"name": name, "path": str(REPO / "data" / "gold" / f"{name}.jsonl"), "format": "scored", "max_pairs": 20}
        for name in ("gold-easy", "gold-hard")
    ]
    pipeline.write_text(yaml.safe_dump(recipe))
    exp = {
        "name": "tiny",
        "pipeline_recipe": str(pipeline),
        "seeds": [0],
        "arms": [
            {"name": "sdpo"},
            {"name": "dpo", "set": {"partition.strategy": "sequential", "partition.num_steps": 1}},
            {"name": "init_base", "set": {"train.init": "base"}},
            {"name": "multi_ref", "set": {"loss.reference": "mean"}},
        ],
        "evaluation": {
            "replicates": 200,
            "kl_prompts": 3,
            "kl_samples": 1,
            "max_new_tokens": 6,
            "gold_prompts": str(REPO / "data" / "gold" / "eval_prompts.jsonl"),
            "gold_samples": 1,
        },
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_experiment_runs_compares_and_reuses(tmp_path, prefect_harness, monkeypatch, capsys):
    from prefect.settings import get_current_settings

    import sdpo_core.step
    import tasks.data
    from flows.cli import main

    workspace = tmp_path / "ws"
    monkeypatch.setenv("SDPO_HOME", str(workspace))
    monkeypatch.setenv("PREFECT_API_URL", get_current_settings().api.url)
    counter = CallCounter(monkeypatch)
    counter.wrap(tasks.data, "prepare")
    counter.wrap(sdpo_core.step, "run_step", record=lambda spec, *a, **kw: spec.config.run_name)
    recipe = write_experiment(tmp_path)

    assert main(["experiment", "-c", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "# Experiment 'tiny'" in out and "| init_base |" in out
    # One data preparation (the CLI's early check) for every arm.
    assert len(counter.calls["prepare"]) == 1
    assert sorted(counter.calls["run_step"]) == sorted(
        ["tiny-dpo-s0"] + [f"tiny-{arm}-s0" for arm in ("sdpo", "init_base", "multi_ref") for _ in range(2)]
    )

    c = registry(tmp_path)
    name = "model-pipe"
    versions = c.search_model_versions(f"name = '{name}'")
    # One M0 for every arm.
    assert [v.tags["sdpo.step"] for v in versions].count("0") == 1
    m0 = next(v for v in versions if v.tags["sdpo.step"] == "0")

    # Runs: the experiment's parent, each arm's parent nested under it, each step under its arm.
    runs = c.search_runs([c.get_experiment_by_name("exp-pipe").experiment_id], max_results=200)
    by_id = {r.info.run_id: r for r in runs}
    top = [r for r in runs if r.data.tags.get("sdpo.experiment") == "tiny"]
    assert len(top) == 1 and "mlflow.parentRunId" not in top[0].data.tags
    arms = {
        r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == top[0].info.run_id
    }
    assert set(arms) == {"tiny-sdpo-s0", "tiny-dpo-s0", "tiny-init_base-s0", "tiny-multi_ref-s0"}
    for v in versions:
        if v.tags["sdpo.step"] != "0":
            step_run = by_id[v.run_id]
            assert by_id[step_run.data.tags["mlflow.parentRunId"]].data.tags["mlflow.runName"] in arms

    comparison_dir = next((workspace / "runs").glob("tiny-*/comparison"))
    record = json.loads((comparison_dir / "comparison.json").read_text())
    # Equal budgets: the same pairs; optimizer steps differ only by partial batches (at most T - 1).
    b = record["budgets"]
    assert b["sdpo"]["pairs"] == b["dpo"]["pairs"] and b["sdpo"]["steps"] == 2 and b["dpo"]["steps"] == 1
    assert 0 <= b["sdpo"]["optimizer_steps"] - b["dpo"]["optimizer_steps"] <= 1
    arms_metrics = record["comparison"]["arms"]
    for metric in (
        "reward_accuracy_vs_m0",
        "reference_free_accuracy",
        "chosen_logp_drift",
        "kl_vs_m0",
        "gold_win_rate",
    ):
        assert all(metric in arms_metrics[a] for a in ("sdpo", "dpo", "init_base")), metric
    assert set(record["comparison"]["differences"]) == {"dpo", "init_base", "multi_ref"}
    assert set(record["gamma_matrix"]) == {
        "M0", "sdpo M1", "sdpo M2", "dpo M1", "init_base M1", "init_base M2", "multi_ref M1", "multi_ref M2"
    }  # fmt: skip
    # The multi-reference arm's step 2 trained against the mean of M0's and M1's log-probs.
    assert list((workspace / "runs").glob("tiny-multi_ref-s0-*/references/step-2-mean.safetensors"))
    for png in ("arms.png", "gamma_matrix.png", "step2_loss.png", "gold_win_rate.png"):
        assert (comparison_dir / png).read_bytes()[:4] == b"\x89PNG", png
    logged = {a.path for a in c.list_artifacts(top[0].info.run_id)}
    assert {"comparison.json", "comparison.md", "arms.png", "experiment.yaml"} <= logged

    # init_base's step 2 started from M0's weights, sdpo's from its M1's.
    def meta(run: str, step: int) -> dict:
        folder = next((workspace / "runs").glob(f"{run}-*/models/step-{step}"))
        return json.loads((folder / "meta.json").read_text())

    assert meta("tiny-init_base-s0", 2)["init_sha256"] == m0.tags["sdpo.weights_sha256"]
    assert meta("tiny-sdpo-s0", 2)["init_sha256"] == meta("tiny-sdpo-s0", 1)["weights_sha256"]
    assert meta("tiny-sdpo-s0", 2)["init_sha256"] != m0.tags["sdpo.weights_sha256"]

    # A rerun reuses every finished arm: nothing trained, nothing registered.
    counter.calls["run_step"].clear()
    assert main(["experiment", "-c", str(recipe)]) == 0
    assert counter.calls["run_step"] == []
    assert len(c.search_model_versions(f"name = '{name}'")) == len(versions)
