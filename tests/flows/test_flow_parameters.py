"""The flows' parameters are typed records: the Prefect UI's form is the run config itself."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from prefect.utilities.callables import parameter_schema

from flows.pipeline import sdpo_pipeline
from flows.train_step import sdpo_train_step
from sdpo_core.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_parameter_is_the_typed_config() -> None:
    schema = parameter_schema(sdpo_pipeline).model_dump_for_openapi()
    assert schema["required"] == ["config"]
    defs = schema["definitions"]
    beta = defs["LossConfig"]["properties"]["beta"]
    assert beta["default"] == 0.1 and "inverse temperature" in beta["description"].lower()
    assert defs["LossConfig"]["additionalProperties"] is False, "unknown keys are refused by the form too"
    strategies = defs["PartitionConfig"]["properties"]["strategy"]["enum"]
    assert strategies == ["by_source", "random", "easy_to_hard", "sequential"]
    assert "sources" in defs["DataConfig"]["properties"]


def test_train_step_parameter_is_the_step_record() -> None:
    schema = parameter_schema(sdpo_train_step).model_dump_for_openapi()
    assert set(schema["required"]) == {"spec", "context"}
    spec = schema["definitions"]["TrainStepSpec"]["properties"]
    assert {"config", "chunk", "ref_uri", "ref_scores"} <= set(spec)
    # No credentials in the form: the worker reads the block itself.
    assert "S3Access" not in schema["definitions"]
    assert "secret" not in json.dumps(schema).lower()


def test_deployment_defaults_are_the_default_recipe() -> None:
    """deployments/prefect.yaml repeats recipes/default.yaml as the form's values: keep them equal."""
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    pipeline = next(d for d in spec["deployments"] if d["name"] == "sdpo-pipeline")
    from_deployment = RunConfig.model_validate(pipeline["parameters"]["config"])
    assert from_deployment == load_config(REPO / "recipes" / "default.yaml")


def test_a_form_with_a_bad_value_is_refused_with_its_key() -> None:
    """Validation of a run started from the UI: value rules run too, not only types."""
    import pytest
    from pydantic import ValidationError

    data = load_config(REPO / "recipes" / "default.yaml").to_dict()
    data["loss"]["beta"] = -1.0
    with pytest.raises(ValidationError, match=r"loss\.beta: must be positive"):
        RunConfig.model_validate(data)


def test_prepared_data_of_another_config_is_refused(tmp_path) -> None:
    """A run started with `prepared` from another config (through the API or UI) stops before
    anything is tracked, instead of training on data that does not match its config."""
    import pytest

    from flows.pipeline import run_pipeline
    from sdpo_core.config import ConfigError
    from sdpo_core.records import PreparedData

    cfg = load_config(REPO / "recipes" / "default.yaml")
    other = load_config(REPO / "recipes" / "default.yaml", ["data.seed=1"])
    run_dir = tmp_path / "runs" / "x"
    prepared = PreparedData(
        train_path=str(run_dir / "data" / "train.jsonl"),
        eval_path=str(run_dir / "data" / "eval.jsonl"),
        train_hash="t",
        eval_hash="e",
        counts={},
        config_hash=other.data_hash(),
    )
    with pytest.raises(ConfigError, match="prepared for config"):
        run_pipeline(cfg, tmp_path, prepared)
    assert not (tmp_path / "mlflow.db").exists() and not run_dir.exists()
