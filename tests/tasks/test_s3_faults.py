"""The S3 endpoint going away: during an upload (and coming back), and for good.

moto's server keeps its objects in memory, so stopping and restarting it would also empty the
bucket. Instead the endpoint the code talks to is a TCP proxy in front of the server, which the
test takes down (listener closed, open connections cut) and brings back up on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest


class FlakyProxy:
    """A TCP proxy to ``target`` that can go down and come back on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.cuts = 0
        self.refused_while_down = 0
        self.cut_after_bytes: int | None = None
        self.down_seconds: float | None = None
        self._forwarded = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self, seconds: float | None) -> None:
        """Close the listener and cut every open connection; back up after ``seconds`` (None: never)."""
        with self._lock:
            self.cuts += 1
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        if seconds is not None:
            threading.Timer(seconds, self.up).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def forward(self, data: bytes, before: bytes) -> bool:
        """Whether to pass on ``data``, the next bytes a client sends (``before``: the up to 200
        bytes it sent just before, on the same connection). Here: False, and the proxy goes down
        for ``down_seconds``, once ``cut_after_bytes`` have been forwarded."""
        if self.cut_after_bytes is None:
            return True
        with self._lock:
            self._forwarded += len(data)
            trip = self._forwarded > self.cut_after_bytes
        if trip:
            self.cut_after_bytes = None
            self.down(self.down_seconds)
        return not trip

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        before = b""
        try:
            while data := src.recv(1 << 16):
                if outbound:
                    if not self.forward(data, before):
                        return
                    before = (before + data)[-200:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture()
def flaky_s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    proxy = FlakyProxy(server.get_host_and_port())
    proxy.up()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_S3_ENDPOINT_URL": proxy.endpoint,
        "AWS_MAX_ATTEMPTS": "2",  # botocore's per-request retries; the file is retried above them
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("tasks.s3.UPLOAD_BACKOFF_SECONDS", 0.5)
    from tasks.s3 import client

    client().create_bucket(Bucket="sdpo-test")
    yield proxy
    proxy.down(None)
    server.stop()


def _big_file(tmp_path: Path, mib: int = 20) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * (mib << 12))  # mib MiB, three 8 MiB parts for 20
    return path


def test_upload_cut_midway_is_retried_and_arrives_whole(tmp_path: Path, flaky_s3: FlakyProxy) -> None:
    from tasks.s3 import client, upload_file, verify_file

    path = _big_file(tmp_path)
    # After 5 MiB of the upload, the endpoint goes down for 3 s, then comes back.
    flaky_s3.cut_after_bytes, flaky_s3.down_seconds = 5 << 20, 3.0
    start = time.monotonic()
    assert upload_file(path, "s3://sdpo-test/run/model.safetensors") == "s3://sdpo-test/run/model.safetensors"
    assert flaky_s3.cuts == 1, "the endpoint went down during the upload"
    assert time.monotonic() - start >= 3.0, "the upload finished only after the endpoint came back"
    verify_file(path, "sdpo-test", "run/model.safetensors", client())  # whole: size and ETag


def test_endpoint_down_for_good_is_one_clear_error(tmp_path: Path, flaky_s3: FlakyProxy) -> None:
    from tasks.s3 import UPLOAD_ATTEMPTS, UploadError, upload_file

    path = _big_file(tmp_path, 1)
    flaky_s3.down(None)
    with pytest.raises(UploadError) as err:
        upload_file(path, "s3://sdpo-test/run/model.safetensors")
    message = str(err.value)
    assert message.startswith(f"s3://sdpo-test/run/model.safetensors: upload of {path} failed after {UPLOAD_ATTEMPTS}")
    assert "Could not connect to the endpoint URL" in message


def test_no_version_registered_when_the_store_is_down(tmp_path: Path, flaky_s3: FlakyProxy) -> None:
    """The model's upload fails (MLflow writes its artifacts to the bucket through the same
    endpoint): the registry gets no version that could point to a missing or partial model."""
    from mlflow import MlflowClient

    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("faults", artifact_location="s3://sdpo-test/mlflow")
    run_id = c.create_run(exp).info.run_id
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _big_file(model, 1)
    flaky_s3.down(None)
    with pytest.raises(Exception, match="(?i)connect|endpoint"):
        tracking.register(c, "faulty-model", run_id, str(model), 1, {}, final=True)
    assert c.search_model_versions("name = 'faulty-model'") == []
