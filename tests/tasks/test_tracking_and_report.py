"""MLflow helpers that need no server: config flattening, secret masking, the report table."""

from __future__ import annotations

from sdpo_core.config import DataConfig, RunConfig, SourceConfig
from tasks.report import format_table
from tasks.tracking import flatten, model_uri, redact_userinfo


def test_flatten_names_every_leaf_and_indexes_lists():
    cfg = RunConfig(data=DataConfig(sources=(SourceConfig(path="a.jsonl", name="a"),)))
    params = flatten(cfg.to_dict())
    assert params["data.sources.0.path"] == "a.jsonl"
    assert params["loss.beta"] == "0.1"
    assert params["train.adam_betas"] == "[0.9, 0.999]"
    assert params["model.trust_remote_code"] == "false"


def test_secrets_are_masked():
    params = flatten({"tracking": {"tracking_uri": "https://alice:hunter2@mlflow.example/", "aws_secret": "xyz"}})
    assert "hunter2" not in params["tracking.tracking_uri"]
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example/"
    assert params["tracking.aws_secret"] == "***"
    assert redact_userinfo("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_model_uri_names_the_step_alias():
    assert model_uri("m", 3) == "models:/m@step-3"


def test_report_table_formats_rows_and_missing_values():
    rows = [
        {
            "step": 1,
            "chunk": "orca",
            "pairs": 10,
            "m0_accuracy": 0.5,
            "chunk/ref_gamma": -3.14159,
            "eval/reward_accuracy_vs_m0": 0.75,
            "eval/reward_margin_vs_m0": 0.1234,
            "eval/gamma": 2.0,
            "train_loss": 0.6931,
            "model_uri": "models:/m@step-1",
        },
        {"step": 2, "chunk": "random-2", "pairs": 12, "m0_accuracy": None, "model_uri": "models:/m@step-2"},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["step", "chunk"]
    assert set(lines[1]) <= {"-", " "}
    assert (
        "-3.14" in lines[2] and "0.750" in lines[2] and "0.6931" in lines[2] and lines[2].endswith("models:/m@step-1")
    )
    assert lines[3].split()[:4] == ["2", "random-2", "12", "-"]
