"""A two-step sDPO run with LoRA on the tiny model registers both steps as full models."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.flows.test_pipeline import registry, write_recipe


@pytest.mark.slow
def test_two_step_lora_run_registers_both_steps(tmp_path, prefect_harness):
    from flows.pipeline import sdpo_pipeline
    from sdpo_core.config import load_config
    from tasks import tracking

    recipe = write_recipe(tmp_path, "lora")
    result = sdpo_pipeline(load_config(recipe, ["train.lora.r=4", "train.lora.alpha=8"]))
    assert [row["step"] for row in result.rows] == [1, 2]
    c = registry(tmp_path)
    versions = {t: c.get_model_version_by_alias("model-lora", f"step-{t}") for t in range(3)}
    assert len({v.version for v in versions.values()}) == 3
    assert versions[2].tags["sdpo.reference_version"] == str(versions[1].version)
    folders = [tracking.fetch_model(result.tracking_uri, f"models:/model-lora/{versions[t].version}", tmp_path / "c")[0]
               for t in (1, 2)]  # fmt: skip
    for folder in folders:
        weights = load_file(f"{folder}/model.safetensors")
        assert not any("lora_" in k for k in weights), "registered as full weights, the adapter merged"
