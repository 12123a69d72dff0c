"""S3 credentials from a Prefect block (storage.credentials_block), on real servers on 127.0.0.1.

The block is saved in a real Prefect backend (the session's test server); S3 is moto's server
behind a TCP proxy that reads the ``Authorization: AWS4-HMAC-SHA256 Credential=<key id>/<date>/
<region>/s3/aws4_request`` header of every request it forwards. moto does not check signatures,
so the proxy is what shows whose key signed each request: the environment holds other credentials
(and no endpoint), and only the block's key id and region may appear.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path

import pytest

from tests.tasks.test_s3_faults import FlakyProxy

REPO = Path(__file__).resolve().parents[2]
REGION = "eu-central-1"
ENV_KEY_ID = "AKIAENVIRONMENT00001"
ENV_SECRET = "env-secret-that-must-not-sign"
SIGNATURE = re.compile(rb"Credential=([A-Za-z0-9_-]+)/\d{8}/([a-z0-9-]+)/s3/aws4_request")


class SigningProxy(FlakyProxy):
    """A TCP proxy to ``target`` noting the (key id, region) that signed each request it forwards."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.signatures: list[tuple[str, str]] = []
        self.up()

    def close(self) -> None:
        self.down(None)

    def forward(self, data: bytes, before: bytes) -> bool:
        window = before + data  # a header may straddle two reads
        for match in SIGNATURE.finditer(window):
            if match.end() > len(before):  # not already seen at the end of the last read
                self.signatures.append((match[1].decode(), match[2].decode()))
        return True


@pytest.fixture()
def signed_s3(monkeypatch):
    """moto's S3 server behind a SigningProxy and a new bucket in REGION (moto's buckets outlive its
    servers in a process); other credentials, and no endpoint, in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {
        "AWS_ACCESS_KEY_ID": ENV_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
        "AWS_SESSION_TOKEN": "env-session-token",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    # S3 clients made by earlier tests in this process must not lend their credentials: boto3's
    # default session keeps the first it found, MLflow keeps its clients by endpoint.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    with contextlib.suppress(ImportError, AttributeError):
        from mlflow.store.artifact.s3_artifact_repo import _cached_get_s3_client

        _cached_get_s3_client.cache_clear()
    admin = boto3.client(
        "s3", endpoint_url=f"http://{host}:{port}", region_name=REGION,
        aws_access_key_id="admin", aws_secret_access_key="admin",
    )  # fmt: skip
    bucket = f"sdpo-creds-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    proxy = SigningProxy((host, port))
    yield proxy, admin, bucket
    proxy.close()
    server.stop()


def save_block(name: str, endpoint: str, key_id: str, secret: str) -> str:
    from tasks.blocks import S3Credentials

    block = S3Credentials(
        aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=REGION, endpoint_url=endpoint
    )
    block.save(name, overwrite=True)
    return f"s3-credentials/{name}"


def test_block_credentials_sign_boto3_and_mlflow_requests(tmp_path, signed_s3, prefect_harness, monkeypatch):
    """With the block's S3Access, tasks/s3.py's client and MLflow's S3 store (tasks/artifacts.py)
    sign with the block's key and region, while clients without it use the environment's; the
    environment is never changed."""
    from mlflow import MlflowClient

    from tasks import artifacts
    from tasks.blocks import read_credentials
    from tasks.s3 import client, upload_file

    proxy, admin, bucket = signed_s3
    reference = save_block("sign-test", proxy.endpoint, "AKIABLOCKSIGNS000001", "block-secret-0123456789")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.endpoint)  # for the clients without the block
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(4096))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("creds", artifact_location=f"s3://{bucket}/mlflow")

    def upload(where: str, access) -> set[tuple[str, str]]:
        """Upload the model with tasks/s3.py and with MLflow; the (key id, region) that signed."""
        proxy.signatures.clear()
        upload_file(model / "weights.bin", f"s3://{bucket}/{where}/weights.bin", client(access))
        artifacts.log_artifacts(c, c.create_run(exp, run_name=where).info.run_id, model, "model", access)
        assert len(proxy.signatures) >= 3  # an upload, its check and MLflow's upload, at least
        return set(proxy.signatures)

    before = dict(os.environ)
    access = read_credentials(reference)
    assert dict(os.environ) == before, "reading the block leaves the environment alone"
    assert upload("environment", None) == {(ENV_KEY_ID, "us-west-2")}
    assert upload("block", access) == {("AKIABLOCKSIGNS000001", REGION)}
    # Clients made after the block's (boto3's default session, MLflow's cached clients) still
    # use the environment: nothing leaked from one to the other.
    assert upload("again", None) == {(ENV_KEY_ID, "us-west-2")}
    assert dict(os.environ) == before

    keys = {o["Key"] for o in admin.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "block/weights.bin" in keys
    assert sum(k.startswith("mlflow/") and k.endswith("/model/weights.bin") for k in keys) == 3
    # The secret is masked wherever the access object is shown.
    assert "block-secret" not in repr(access) and "block-secret" not in access.model_dump_json()


def test_block_reference_errors_name_the_block(prefect_harness):
    from tasks.blocks import CredentialsError, read_credentials

    with pytest.raises(CredentialsError, match=r"'s3-credentials/absent': no such block on the Prefect API"):
        read_credentials("s3-credentials/absent")
    with pytest.raises(CredentialsError, match=r"'gcs-credentials/prod': unknown block type 'gcs-credentials'"):
        read_credentials("gcs-credentials/prod")
    with pytest.raises(CredentialsError, match=r"'prod' is not <block-type-slug>/<block-name>"):
        read_credentials("prod")


def test_half_a_key_pair_is_refused(prefect_harness):
    from tasks.blocks import CredentialsError, S3Credentials, read_credentials

    S3Credentials(aws_access_key_id="AKIAHALFPAIR00000001").save("half", overwrite=True)
    with pytest.raises(CredentialsError, match="must be set together") as err:
        read_credentials("s3-credentials/half")
    assert "AKIAHALFPAIR" not in str(err.value)


def test_block_values_are_read_whole(prefect_harness):
    """The secret comes out of the block as saved (not its masked form)."""
    from tasks.blocks import S3Credentials, read_credentials

    S3Credentials(
        aws_access_key_id="AKIAWHOLE00000000001", aws_secret_access_key="whole-secret-0123", region_name="eu-west-3"
    ).save("whole", overwrite=True)
    access = read_credentials("s3-credentials/whole")
    assert access.boto3_kwargs() == {
        "aws_access_key_id": "AKIAWHOLE00000000001",
        "aws_secret_access_key": "whole-secret-0123",
        "region_name": "eu-west-3",
    }
    # A key pair without a token: boto3 is given no token, so one in the environment (which belongs
    # to another key) is not combined with this pair.
    assert access.aws_session_token is None


def test_region_only_block_keeps_the_environments_credentials(prefect_harness):
    from tasks.blocks import S3Credentials, read_credentials

    S3Credentials(region_name="ap-south-1").save("region-only", overwrite=True)
    assert read_credentials("s3-credentials/region-only").boto3_kwargs() == {"region_name": "ap-south-1"}


def test_prefect_aws_credentials_are_read_by_field_name(prefect_harness):
    """A document of prefect-aws's AwsCredentials type (``aws-credentials``), its endpoint nested
    in aws_client_parameters, read without prefect-aws installed. The class here only stands in
    for prefect-aws's, to save such a document."""
    from prefect.blocks.core import Block
    from pydantic import BaseModel, SecretStr

    from tasks.blocks import read_credentials

    class ClientParameters(BaseModel):
        endpoint_url: str | None = None

    class AwsShaped(Block):
        _block_type_name = "AWS Credentials"
        _block_type_slug = "aws-credentials"
        aws_access_key_id: str | None = None
        aws_secret_access_key: SecretStr | None = None
        aws_session_token: SecretStr | None = None
        region_name: str | None = None
        aws_client_parameters: ClientParameters = ClientParameters()

    AwsShaped(
        aws_access_key_id="AKIAPREFECTAWS000001",
        aws_secret_access_key="aws-shaped-secret",
        aws_session_token="aws-shaped-token",
        region_name="us-west-1",
        aws_client_parameters=ClientParameters(endpoint_url="http://127.0.0.1:9000"),
    ).save("aws-test", overwrite=True)
    assert read_credentials("aws-credentials/aws-test").boto3_kwargs() == {
        "aws_access_key_id": "AKIAPREFECTAWS000001",
        "aws_secret_access_key": "aws-shaped-secret",
        "aws_session_token": "aws-shaped-token",
        "region_name": "us-west-1",
        "endpoint_url": "http://127.0.0.1:9000",
    }


def test_cli_missing_block_is_one_clear_error(tmp_path, capsys, prefect_harness, monkeypatch):
    """`sdpo run` naming a block the Prefect server does not have stops before the flow starts:
    one line naming the block, exit code 2, nothing tracked."""
    from prefect.settings import get_current_settings

    from tests.flows.test_pipeline import registered_names, run_cli, write_recipe

    monkeypatch.setenv("PREFECT_API_URL", get_current_settings().api.url)  # the test server
    recipe = write_recipe(tmp_path, "cli-block", storage__credentials_block="s3-credentials/not-saved")
    code, err = run_cli(["run", "-c", str(recipe)], capsys)
    assert code == 2
    assert err.startswith("sdpo: error: storage.credentials_block 's3-credentials/not-saved': no such block")
    assert err.count("\n") == 1, err
    assert registered_names(tmp_path) == [] and not (tmp_path / "mlflow.db").exists()


def test_cli_unreachable_prefect_api_names_the_block(tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.flows.test_pipeline import run_cli, write_recipe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    api = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("PREFECT_API_URL", api)
    recipe = write_recipe(tmp_path, "cli-noapi", storage__credentials_block="s3-credentials/prod")
    with temporary_settings({PREFECT_API_URL: api}):
        code, err = run_cli(["run", "-c", str(recipe)], capsys)
    assert code == 2
    assert err.startswith(
        f"sdpo: error: storage.credentials_block 's3-credentials/prod': cannot read it from the Prefect API at {api}"
    )
    assert err.count("\n") == 1, err
    assert not (tmp_path / "mlflow.db").exists()


def test_flow_with_missing_block_registers_nothing(tmp_path, prefect_harness):
    """Run as a deployment, the pipeline flow itself fails on the block, before anything is tracked."""
    from flows.pipeline import sdpo_pipeline
    from sdpo_core.config import load_config
    from tasks.blocks import CredentialsError
    from tests.flows.test_pipeline import write_recipe

    recipe = write_recipe(tmp_path, "flow-block", storage__credentials_block="s3-credentials/not-saved")
    with pytest.raises(CredentialsError, match="'s3-credentials/not-saved'"):
        sdpo_pipeline(load_config(recipe))
    assert not (tmp_path / "mlflow.db").exists()


def test_train_step_flow_uses_the_block(tmp_path, signed_s3, prefect_harness, monkeypatch):
    """The train-step flow (what a GPU worker runs) reads the block itself: what it publishes is
    signed by the block's key, though its parameters hold only the block's name."""
    import flows.train_step
    from sdpo_core.config import load_config
    from sdpo_core.records import ChunkInfo, TrainStepResult, TrainStepSpec
    from tasks.context import RunLocation

    proxy, admin, bucket = signed_s3
    reference = save_block("train-step-test", proxy.endpoint, "AKIABLOCKTRAINSTEP01", "block-secret-train")
    root = tmp_path / "ws"
    monkeypatch.setenv("SDPO_HOME", str(root))  # the worker's workspace
    ctx = RunLocation(str(root), str(root / "runs" / "r"), "", "", "", "m", f"s3://{bucket}/sdpo")
    seen: dict[str, str | None] = {}

    def fake_train_step(ctx, spec):
        seen["key_id"] = ctx.s3.aws_access_key_id if ctx.s3 else None
        seen["env_key_id"] = os.environ.get("AWS_ACCESS_KEY_ID")
        model_dir = Path(ctx.run_dir) / "models" / "step-1"
        model_dir.mkdir(parents=True)
        (model_dir / "model.safetensors").write_bytes(b"weights")
        return TrainStepResult(step=1, model_dir=str(model_dir), optimizer_steps=1, final_loss=0.5, run_id="run-1")

    monkeypatch.setattr(flows.train_step, "train_step", fake_train_step)
    cfg = load_config(
        REPO / "recipes" / "default.yaml", [f"storage.uri=s3://{bucket}/sdpo", f"storage.credentials_block={reference}"]
    )
    chunk = ChunkInfo(
        step=1, label="orca", path=str(root / "runs" / "r" / "chunks" / "step-1.jsonl"), size=4, content_hash="abc"
    )
    spec = TrainStepSpec(
        config=cfg, chunk=chunk, ref_uri="models:/m/1", ref_scores=str(root / "cache" / "ref.safetensors")
    )
    flows.train_step.sdpo_train_step(spec=spec, context=ctx)
    assert seen == {"key_id": "AKIABLOCKTRAINSTEP01", "env_key_id": ENV_KEY_ID}, "given, not put in the environment"
    keys = {o["Key"] for o in admin.list_objects_v2(Bucket=bucket, Prefix="sdpo/")["Contents"]}
    assert keys == {"sdpo/runs/r/models/step-1/model.safetensors", "sdpo/runs/r/models/step-1.trained.json"}
    assert proxy.signatures and set(proxy.signatures) == {("AKIABLOCKTRAINSTEP01", REGION)}


@pytest.mark.slow
def test_pipeline_with_block_credentials_keeps_the_secret_out(tmp_path, signed_s3, prefect_harness, caplog, capfd):
    """A one-step pipeline with its artifacts and files on S3, credentials from a block: every
    request is signed by the block's key; its secret is in no MLflow param, tag or version tag, no
    log (captured here or sent to Prefect), no file the run wrote, and the environment is untouched."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import sdpo_pipeline
    from sdpo_core.config import load_config
    from tests.flows.test_pipeline import write_recipe

    proxy, admin, bucket = signed_s3
    secret = "block-secret-sdpo-pipeline-271828"
    reference = save_block("pipeline-test", proxy.endpoint, "AKIABLOCKPIPELINE001", secret)
    recipe = write_recipe(
        tmp_path,
        "blockcreds",
        data__sources=[
            {"name": "orca", "path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), "max_pairs": 16}
        ],
        data__eval_fraction=0.25,
        data__max_length=64,
        data__max_prompt_length=32,
        train__grad_accum_steps=1,
        tracking__artifact_location=f"s3://{bucket}/mlflow",
        storage__uri=f"s3://{bucket}/sdpo",
        storage__credentials_block=reference,
    )
    caplog.set_level(logging.DEBUG)

    def s3_environment() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_"))}

    before = s3_environment()
    result = sdpo_pipeline(load_config(recipe))
    assert len(result.rows) == 1
    assert s3_environment() == before

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    final = c.get_model_version_by_alias("model-blockcreds", "final")
    assert final.source.startswith(f"s3://{bucket}/mlflow/")
    assert len(proxy.signatures) >= 10
    assert set(proxy.signatures) == {("AKIABLOCKPIPELINE001", REGION)}

    runs = c.search_runs([c.get_experiment_by_name("exp-blockcreds").experiment_id])
    assert len(runs) >= 3  # the parent, M0's and the step's
    tracked = [json.dumps(r.data.params) + json.dumps(r.data.tags) for r in runs]
    tracked += [json.dumps(v.tags) for v in c.search_model_versions("name = 'model-blockcreds'")]
    assert all(secret not in text and "AKIABLOCKPIPELINE001" not in text for text in tracked)
    APILogHandler().flush()  # the logs still queued for the API
    prefect_logs, offset = "", 0
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=offset):
            prefect_logs += "\n".join(log.message for log in page) + "\n"
            offset += len(page)
    assert "sdpo-blockcreds" in prefect_logs  # the run's logs did reach Prefect
    out, err = capfd.readouterr()
    for text in (caplog.text, prefect_logs, out, err):
        assert secret not in text
    for path in [*tmp_path.rglob("*"), *Path(os.environ["SDPO_HOME"]).rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
