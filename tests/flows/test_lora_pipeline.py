"""Two-step sDPO runs with LoRA on the tiny model: registered merged (full weights) or as adapters
that load merged into their bases."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.flows.test_pipeline import REPO, registry, write_recipe


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
    assert versions[1].tags["sdpo.reference_version"] == str(versions[0].version)
    assert all(versions[t].tags["sdpo.weights"] == "full" for t in (1, 2))
    folders = [tracking.fetch_model(result.tracking_uri, f"models:/model-lora/{versions[t].version}", tmp_path / "c")[0]
               for t in (1, 2)]  # fmt: skip
    for folder in folders:
        weights = load_file(f"{folder}/model.safetensors")
        assert not any("lora_" in k for k in weights), "registered as full weights, the adapter merged"


@pytest.mark.slow
def test_two_step_adapter_run_loads_each_step_as_its_bases_plus_adapters(tmp_path, prefect_harness):
    """registered_as: adapter, with the harness on a local task: each step registers only its
    adapter, tagged with its base; step 2 loads as M0 + both adapters; the harness scores land
    on each step's run; a step whose base version is gone is refused."""
    pytest.importorskip("lm_eval")
    from flows.pipeline import sdpo_pipeline
    from sdpo_core.config import load_config
    from sdpo_core.model_io import ModelError
    from tasks import tracking
    from tests.sdpo_core.test_harness import write_task
    from tests.sdpo_core.test_lora import _delta

    tasks = write_task(tmp_path / "tasks")
    recipe = write_recipe(
        tmp_path, "adapter", evaluate__harness={"tasks": ["sdpo_tiny_choice"], "include_path": str(tasks)}
    )
    overrides = ["train.lora.r=4", "train.lora.alpha=8", "train.lora.registered_as=adapter"]
    result = sdpo_pipeline(load_config(recipe, overrides))
    assert [row["step"] for row in result.rows] == [1, 2]
    c = registry(tmp_path)
    versions = {t: c.get_model_version_by_alias("model-adapter", f"step-{t}") for t in range(3)}
    for t in (1, 2):
        tags = versions[t].tags
        assert tags["sdpo.weights"] == "adapter"
        assert tags["sdpo.adapter_base_version"] == tags["sdpo.reference_version"] == str(versions[t - 1].version)
        assert tags["sdpo.adapter_base"] == f"models:/model-adapter/{versions[t - 1].version}"
        metrics = c.get_run(versions[t].run_id).data.metrics
        assert 0 <= metrics["harness/sdpo_tiny_choice/acc"] <= 1, metrics
        assert any(k.startswith("eval/") for k in metrics), "held-out metrics of the merged model"

    # The registry's own files of steps 1 and 2: adapters only.
    stored = [tracking._download(result.tracking_uri, f"models:/model-adapter/{versions[t].version}", tmp_path / "c")[0]
              for t in (1, 2)]  # fmt: skip
    assert all(not (s / "model.safetensors").exists() and (s / "adapter_model.safetensors").is_file() for s in stored)
    step2, _ = tracking.fetch_model(result.tracking_uri, f"models:/model-adapter/{versions[2].version}", tmp_path / "c")
    m0 = load_file(str(REPO / "models" / "stories260K" / "model.safetensors"))
    got = load_file(f"{step2}/model.safetensors")
    d1, d2 = _delta(stored[0]), _delta(stored[1])
    assert d1 and d1.keys() == d2.keys()
    for key, value in m0.items():
        expected = value + d1[key] + d2[key] if key in d1 else value
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-6, msg=key)

    c.delete_model_version("model-adapter", versions[1].version)  # step 2's base
    with pytest.raises(ModelError, match=rf"models:/model-adapter/{versions[1].version}: not in the registry"):
        tracking.fetch_model(result.tracking_uri, f"models:/model-adapter/{versions[2].version}", tmp_path / "fresh")
