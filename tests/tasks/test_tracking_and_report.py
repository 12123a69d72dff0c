"""MLflow helpers that need no server: config flattening, secret masking, the report table."""

from __future__ import annotations

import logging

import pytest

from sdpo_core.config import DataConfig, RunConfig, SourceConfig
from sdpo_core.redact import RedactingFilter, is_secret_name, redact, redact_mapping
from tasks.report import format_table
from tasks.tracking import flatten, model_uri


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
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://bob:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("failed: could not reach s3+https://k:s@minio:9000/b (timeout)", "failed: could not reach s3+https://***@minio:9000/b (timeout)"),
        ("https://h/a?X-Amz-Signature=SIG1&n=1&X-Amz-Credential=AK%2F1", "https://h/a?X-Amz-Signature=***&n=1&X-Amz-Credential=***"),
        ("https://h/a?x-amz-security-token=T1", "https://h/a?x-amz-security-token=***"),
        ("blob?sv=1&sig=AbC%3D&se=2", "blob?sv=1&sig=***&se=2"),
        ("u?access_token=a&token=b&signature=c&api_key=d&Password=e&SECRET=f", "u?access_token=***&token=***&signature=***&api_key=***&Password=***&SECRET=***"),
        ("header Authorization: Bearer abcdef0123456789", "header Authorization: Bearer ***"),
        # No false masks: names that only contain a secret word stay as they are.
        ("train.max_pass_tokens=4096 data.max_length=512 tokens=3 keyword=x", "train.max_pass_tokens=4096 data.max_length=512 tokens=3 keyword=x"),
        ("sqlite:////tmp/ws/mlflow.db", "sqlite:////tmp/ws/mlflow.db"),
        ("s3://bucket/prefix/step-1", "s3://bucket/prefix/step-1"),
    ],
)  # fmt: skip
def test_redact_masks_userinfo_and_token_parameters_only(text, expected):
    assert redact(text) == expected


def test_secret_names_are_whole_segments():
    for name in ("access_token", "X-Amz-Security-Token", "api_key", "apiKey", "aws_secret", "hf_token", "password",
                 "aws_secret_access_key", "client_secret", "sig", "X-Amz-Signature", "X-Amz-Credential"):  # fmt: skip
        assert is_secret_name(name), name
    for name in ("max_pass_tokens", "max_length", "tokens", "key", "credentials_block", "keyword", "token_budget"):
        assert not is_secret_name(name), name


def test_flatten_masks_no_setting_by_mistake():
    """`train.max_pass_tokens` used to be masked because its name contains "token"."""
    cfg = RunConfig.model_validate({"data": {"sources": [{"path": "a.jsonl"}]}, "train": {"max_pass_tokens": 4096}})
    params = flatten(cfg.to_dict())
    assert "***" not in params.values(), [k for k, v in params.items() if v == "***"]
    assert params["train.max_pass_tokens"] == "4096"
    masked = flatten({"a": {"hf_token": "x", "url": "https://h/f?token=abc", "empty_password": ""}})
    assert masked == {"a.hf_token": "***", "a.url": "https://h/f?token=***", "a.empty_password": ""}


def test_redact_mapping_walks_lists_and_keeps_other_values():
    data = {"sources": [{"path": "https://u:p@h/x.jsonl", "name": "a"}], "secret": "s", "n": 3, "none": None}
    assert redact_mapping(data) == {"sources": [{"path": "https://***@h/x.jsonl", "name": "a"}], "secret": "***",
                                    "n": 3, "none": None}  # fmt: skip


def test_log_lines_and_tracebacks_are_redacted():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("sdpo.test.redact")
    logger.addHandler(handler)
    try:
        logger.warning("uploading to %s", "https://h/o?X-Amz-Signature=LOGSECRET1")
        try:
            raise RuntimeError("endpoint http://k:EXCSECRET2@minio:9000 refused")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert "X-Amz-Signature=***" in text and "http://***@minio:9000" in text
    assert "LOGSECRET1" not in text and "EXCSECRET2" not in text


def test_model_uri_names_the_step_alias():
    assert model_uri("m", 3) == "models:/m@step-3"


def test_report_table_formats_rows_and_missing_values():
    rows = [
        {
            "step": 1,
            "chunk": "orca",
            "pairs": 10,
            "m0_accuracy": 0.5,
            "eval/ref_gamma": -3.14159,
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
