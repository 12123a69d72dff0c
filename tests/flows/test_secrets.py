"""Secrets never reach what a run stores: the config (a Prefect flow parameter) refuses them, and
storage errors and CLI messages pass through the one redaction (sdpo_core.redact).

Whole runs that grep every file they write, both databases included, for planted secrets:
tests/flows/test_pipeline.py::test_cli_run_writes_only_to_workspace_and_no_secret (environment
secrets and a refused tokenized override) and tests/tasks/test_s3_credentials.py (a block's).
"""

from __future__ import annotations

import pytest

from tests.flows.test_pipeline import run_cli, write_recipe

PLANTED = "SECRETVALUE123"


@pytest.mark.parametrize(
    "override",
    [
        f"data.sources.0.path=/data/orca.jsonl?X-Amz-Signature={PLANTED}",
        f"tracking.tracking_uri=https://mlflow.example/?access_token={PLANTED}",
        f"tracking.artifact_location=s3://bucket/mlflow?sig={PLANTED}",
        f"model.name_or_path=https://user:{PLANTED}@hub.example/model",
    ],
)
def test_a_secret_in_any_config_value_is_refused_without_showing_it(tmp_path, capsys, override):
    """The config is the flow run's parameter, stored as is by Prefect: a value holding a secret
    is refused before anything starts (exit 2), the message names the key and not the secret."""
    recipe = write_recipe(tmp_path, "planted")
    code, err = run_cli(["run", "-c", str(recipe), override], capsys)
    assert code == 2, err
    assert "must not hold credentials" in err and override.split("=", 1)[0] in err
    assert PLANTED not in err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_config_without_secrets_is_not_refused_for_its_names():
    """No false refusal: settings whose names only contain a secret word load as they are."""
    from sdpo_core.config import load_config
    from tests.flows.test_pipeline import REPO

    cfg = load_config(REPO / "recipes" / "default.yaml", ["train.max_pass_tokens=4096"])
    assert cfg.train.max_pass_tokens == 4096


def test_storage_errors_are_redacted():
    """botocore quotes the endpoint URL in its messages; an endpoint with user info or a token
    must not reach the error a run stores in Prefect and prints."""
    from botocore.exceptions import EndpointConnectionError

    from tasks.artifacts import _storage_errors
    from tasks.s3 import UploadError

    endpoint = f"http://minio:{PLANTED}@127.0.0.1:9/?X-Amz-Security-Token={PLANTED}"
    with pytest.raises(UploadError) as err, _storage_errors("s3://b/run/model: upload of /tmp/model"):
        raise EndpointConnectionError(endpoint_url=endpoint)
    message = str(err.value)
    assert PLANTED not in message and err.value.__cause__ is None
    assert message.startswith("s3://b/run/model: upload of /tmp/model failed: EndpointConnectionError")
    assert "http://***@127.0.0.1:9/?X-Amz-Security-Token=***" in message


def test_an_upload_error_is_redacted(tmp_path, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    from tasks import s3

    class DownClient:
        def upload_file(self, *args, **kwargs):
            raise EndpointConnectionError(endpoint_url=f"https://k:{PLANTED}@s3.example")

    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    with pytest.raises(s3.UploadError) as err:
        s3.upload_file(path, "s3://b/k", DownClient())
    assert PLANTED not in str(err.value) and "https://***@s3.example" in str(err.value)
