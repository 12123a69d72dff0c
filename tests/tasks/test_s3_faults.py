"""The S3 endpoint going away: during an upload (and coming back), and for good; and who retries.

moto's server keeps its objects in memory, so stopping and restarting it would also empty the
bucket. Instead the endpoint the code talks to is a TCP proxy in front of the server, which the
test takes down (listener closed, open connections cut) and brings back up on the same port.

Retries happen at two levels only: botocore repeats a single request (``AWS_MAX_ATTEMPTS``
attempts in all), and the Prefect task around an upload repeats the whole of it (IO_RETRIES).
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retries import IO_RETRIES


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
            # shutdown() first: a thread blocked in accept() would otherwise take one more connection.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
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
        "AWS_MAX_ATTEMPTS": "2",  # botocore's per-request attempts; the task is retried above them
    }.items():
        monkeypatch.setenv(key, value)
    from tasks.s3 import client

    client().create_bucket(Bucket="sdpo-test")
    yield proxy
    proxy.down(None)
    server.stop()


def _big_file(tmp_path: Path, mib: int = 20) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * (mib << 12))  # mib MiB, three 8 MiB parts for 20
    return path


@task(name="upload-file", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def upload_task(path: Path, uri: str, tries: list[float]) -> str:
    """An I/O task as the pipeline's are: one upload, retried by Prefect (IO_RETRIES) as a whole."""
    from tasks.s3 import upload_file

    tries.append(time.monotonic())
    return upload_file(path, uri)


def test_upload_cut_midway_is_retried_by_the_task_and_arrives_whole(
    tmp_path: Path, flaky_s3: FlakyProxy, prefect_harness
) -> None:
    from tasks.s3 import client, verify_file

    path = _big_file(tmp_path)
    # After 5 MiB of the upload, the endpoint goes down for 1.5 s, longer than botocore's two
    # attempts of a request take; it is back before Prefect's first retry, 2 s later.
    flaky_s3.cut_after_bytes, flaky_s3.down_seconds = 5 << 20, 1.5
    tries: list[float] = []
    start = time.monotonic()
    uri = "s3://sdpo-test/run/model.safetensors"
    assert upload_task(path, uri, tries) == uri
    assert flaky_s3.cuts == 1, "the endpoint went down during the upload"
    assert len(tries) == 2, "the first try failed and Prefect's retry uploaded the file again"
    assert tries[1] - start >= 1.5, "the retry ran after the endpoint came back"
    verify_file(path, "sdpo-test", "run/model.safetensors", client())  # whole: size and ETag


def test_endpoint_down_for_good_is_one_clear_error(tmp_path: Path, flaky_s3: FlakyProxy) -> None:
    from tasks.s3 import UploadError, upload_file

    path = _big_file(tmp_path, 1)
    flaky_s3.down(None)
    with pytest.raises(UploadError) as err:
        upload_file(path, "s3://sdpo-test/run/model.safetensors")
    message = str(err.value)
    assert message.startswith(f"s3://sdpo-test/run/model.safetensors: upload of {path} failed: ")
    assert "Could not connect to the endpoint URL" in message


class FailingS3(http.server.ThreadingHTTPServer):
    """An S3 endpoint on loopback that answers every request 500 InternalError (which botocore
    retries), counting the PUTs it got."""

    def __init__(self) -> None:
        self.puts = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FailingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FailingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FailingS3

    def do_PUT(self) -> None:
        with self.server.lock:
            self.server.puts += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def failing_s3(monkeypatch):
    server = FailingS3()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_S3_ENDPOINT_URL": server.endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("max_attempts", "expected"), [(None, 5), ("3", 3)])
def test_a_failing_put_is_sent_exactly_botocores_max_attempts(
    tmp_path: Path, failing_s3: FailingS3, monkeypatch, max_attempts: str | None, expected: int
) -> None:
    """No loop of our own around botocore's: a PUT that keeps failing is sent ``AWS_MAX_ATTEMPTS``
    times (5 unless set), then the upload fails with one error."""
    from tasks.s3 import UploadError, client, upload_file

    if max_attempts:
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", max_attempts)
    assert client().meta.config.retries == {"mode": "standard", "total_max_attempts": expected}
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(UploadError, match="InternalError"):
        upload_file(path, "s3://sdpo-test/small.bin")
    assert failing_s3.puts == expected


def test_the_task_retry_multiplies_botocores_attempts_and_nothing_else(
    tmp_path: Path, failing_s3: FailingS3, monkeypatch, prefect_harness
) -> None:
    """Two levels in all: Prefect's tries of the task, each making botocore's attempts of the PUT."""
    from tasks.s3 import UploadError

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 1000)
    tries: list[float] = []
    quick = upload_task.with_options(retry_delay_seconds=0)  # IO_RETRIES' count and condition, no wait
    with pytest.raises(UploadError):
        quick(path, "s3://sdpo-test/small.bin", tries)
    assert len(tries) == IO_RETRIES["retries"] + 1
    assert failing_s3.puts == 3 * (IO_RETRIES["retries"] + 1)


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
        tracking.register(c, "faulty-model", run_id, str(model), {})
    assert c.search_model_versions("name = 'faulty-model'") == []
