"""Two runs moving one registered model at the same moment, a registry task tried again, and
the aliases of runs that finish one after another.

A registry write that loses a race with another run's (a broken unique key, a locked database)
is not retried by a loop of our own: it fails the Prefect task, which IO_RETRIES runs again, and
the task is written so that running it again registers no second version and opens no second run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from tasks import registry, tracking
from tasks.context import RunContext
from tasks.retries import IO_RETRIES

REPO = Path(__file__).resolve().parents[2]
TRIES = IO_RETRIES["retries"] + 1


class RacingClient:
    """A real MLflow client whose next calls of one method fail first, as a lost race does.

    With ``after=True`` the call is made first and then fails: the server did the work, but the
    reply was lost (a connection cut, a proxy timing out).
    """

    def __init__(self, inner: MlflowClient, method: str, failures: list[MlflowException], after: bool = False) -> None:
        self.inner, self.method, self.failures, self.after, self.calls = inner, method, list(failures), after, 0

    def __getattr__(self, name: str):
        fn = getattr(self.inner, name)
        if name != self.method:
            return fn

        def racing(*args, **kwargs):
            self.calls += 1
            if self.failures and self.after:
                fn(*args, **kwargs)
            if self.failures:
                raise self.failures.pop(0)
            return fn(*args, **kwargs)

        return racing


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry database with model ``m`` (two versions) and experiment ``e``, made once: creating
    MLflow's tables takes seconds, so each test starts from a copy."""
    root = tmp_path_factory.mktemp("registry")
    c = tracking.client(f"sqlite:///{root / 'mlflow.db'}")
    c.create_registered_model("m")
    run = c.create_run(c.create_experiment("e", artifact_location=str(root / "art")))
    for _ in range(2):
        c.create_model_version("m", str(root / "src"), run_id=run.info.run_id)
    return root / "mlflow.db"


@pytest.fixture
def client(template: Path, tmp_path: Path) -> MlflowClient:
    shutil.copyfile(template, tmp_path / "mlflow.db")
    return tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")


def unique_key_error() -> MlflowException:
    # What MLflow's SQL store raises when the other run inserted the alias row first.
    return MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed", error_code=BAD_REQUEST)


def locked_error() -> MlflowException:
    return MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)


@pytest.fixture
def step(client: MlflowClient, tmp_path: Path) -> dict:
    """What register_step needs: a config, the run's context, a chunk, a model folder, a step run."""
    from sdpo_core.config import RunConfig, SourceConfig
    from sdpo_core.records import ChunkInfo

    cfg = RunConfig.model_validate({"data": {"sources": [SourceConfig(path="a.jsonl", name="a")]}})
    experiment_id = client.get_experiment_by_name("e").experiment_id
    parent = tracking.start_run(client, experiment_id, "parent")
    ctx = RunContext(
        str(tmp_path), str(tmp_path / "run"), f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_id, parent, "m"
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run_id = tracking.start_run(client, experiment_id, "step-1-a", parent_id=parent)
    from sdpo_core.pairs import PreferencePair, write_pairs

    # The step's chunk on disk: registering records the content keys of the pairs it trained.
    chunk_path = tmp_path / "run" / "chunks" / "step-1.jsonl"
    write_pairs([PreferencePair(f"p{i}", "good", "bad", "a") for i in range(2)], chunk_path)
    chunk = ChunkInfo(step=1, label="a", path=str(chunk_path), size=2, content_hash="abc", m0_accuracy=None)
    return {"cfg": cfg, "ctx": ctx, "chunk": chunk, "model_dir": str(model), "run_id": run_id}


def run_register_step(step: dict, monkeypatch, c) -> str:
    """register_step as the pipeline runs it (a Prefect task with IO_RETRIES), with the MLflow
    client ``c``; retried at once rather than after IO_RETRIES' delays."""
    monkeypatch.setattr(tracking, "client", lambda uri: c)
    quick = registry.register_step.with_options(retry_delay_seconds=0)
    return quick(
        step["cfg"], step["ctx"], step["chunk"], step["model_dir"], step["run_id"], "1", {"eval/x": 0.5}, 0.6, 2
    )


def run_point_aliases(step: dict, monkeypatch, c, versions: dict[int, str]) -> None:
    """The point-aliases task as the pipeline runs it, with the MLflow client ``c``."""
    monkeypatch.setattr(tracking, "client", lambda uri: c)
    registry.point_aliases.with_options(retry_delay_seconds=0)(step["ctx"], versions)


def versions_of(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(
        (str(v.version) for v in client.search_model_versions(f"name = 'm' and run_id = '{run_id}'")), key=int
    )


def test_registering_a_step_moves_no_alias(client, step, monkeypatch, prefect_harness) -> None:
    """A step's version is found by its number and tags while the run goes on; only a finished
    run moves the aliases (test_aliases_never_mix_runs)."""
    version = run_register_step(step, monkeypatch, client)
    assert client.get_registered_model("m").aliases == {}
    tags = client.get_model_version("m", version).tags
    assert tags["sdpo.parent_run_id"] == step["ctx"].parent_run_id and tags["sdpo.step"] == "1"
    assert client.get_run(step["run_id"]).info.status == "FINISHED"


def test_alias_race_lost_twice_is_retried_by_the_task(client, step, monkeypatch, prefect_harness) -> None:
    racing = RacingClient(client, "set_registered_model_alias", [unique_key_error(), locked_error()])
    run_point_aliases(step, monkeypatch, racing, {0: "1", 1: "2"})
    assert racing.calls == 2 + 3, "two lost races, then step-0, step-1 and final set"
    assert client.get_registered_model("m").aliases == {"step-0": 1, "step-1": 2, "final": 2}


def test_alias_race_lost_on_every_try_fails_the_task(client, step, monkeypatch, prefect_harness) -> None:
    racing = RacingClient(client, "set_registered_model_alias", [unique_key_error()] * TRIES)
    with pytest.raises(MlflowException, match="UNIQUE"):
        run_point_aliases(step, monkeypatch, racing, {0: "1", 1: "2"})
    assert racing.calls == TRIES


def test_other_registry_errors_fail_the_task_at_once(client, step, monkeypatch, prefect_harness) -> None:
    other = MlflowException("(sqlite3.DataError) value too long", error_code=BAD_REQUEST)
    racing = RacingClient(client, "set_registered_model_alias", [other])
    with pytest.raises(MlflowException, match="too long"):
        run_point_aliases(step, monkeypatch, racing, {0: "1", 1: "2"})
    assert racing.calls == 1
    # Another step run, so that registering is not skipped for the version made just above.
    fresh = step | {"run_id": tracking.start_run(client, step["ctx"].experiment_id, "step-1-b")}
    racing = RacingClient(
        client, "create_model_version", [MlflowException("absent", error_code=RESOURCE_DOES_NOT_EXIST)]
    )
    with pytest.raises(MlflowException, match="absent"):
        run_register_step(fresh, monkeypatch, racing)
    assert racing.calls == 1
    assert versions_of(client, fresh["run_id"]) == []


def test_version_created_but_its_reply_lost_is_reused_by_the_retry(client, step, monkeypatch, prefect_harness) -> None:
    racing = RacingClient(client, "create_model_version", [locked_error()], after=True)
    version = run_register_step(step, monkeypatch, racing)
    assert racing.calls == 1, "the retry found the version and did not create another"
    assert versions_of(client, step["run_id"]) == [version]


def test_register_again_returns_the_same_version(client, step) -> None:
    """register is idempotent per run and tags: a second call (a retried task) adds no version;
    a different model from the same run (other tags) is a new version."""
    args = (client, "m", step["run_id"], step["model_dir"])
    before = len(client.search_model_versions("name = 'm'"))
    first = tracking.register(*args, {"sdpo.step": "1", "q": "it's"})
    again = tracking.register(*args, {"sdpo.step": "1", "q": "it's"})
    assert again == first
    assert len(client.search_model_versions("name = 'm'")) == before + 1
    other = tracking.register(*args, {"sdpo.step": "1", "q": "other"})
    assert other != first
    assert versions_of(client, step["run_id"]) == sorted([first, other], key=int)


def test_a_retried_task_finds_the_run_its_first_try_opened(client) -> None:
    experiment_id = client.get_experiment_by_name("e").experiment_id
    assert tracking.find_run(client, experiment_id, None) is None
    assert tracking.find_run(client, experiment_id, "task-run-1") is None
    run_id = tracking.start_run(client, experiment_id, "step-0-M0", key="task-run-1")
    tracking.start_run(client, experiment_id, "step-0-M0", key="task-run-2")
    assert tracking.find_run(client, experiment_id, "task-run-1") == run_id
    client.set_terminated(run_id, "FAILED")
    assert tracking.find_run(client, experiment_id, "task-run-1") == run_id
    assert client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_register_base_retried_opens_no_second_run(client, tmp_path, monkeypatch, prefect_harness) -> None:
    """The first try opens the step-0 run and fails in the middle of logging M0 to it; the retry
    goes on in that run and registers one version."""
    from sdpo_core.config import RunConfig

    cfg = RunConfig.model_validate(
        {"model": {"name_or_path": str(REPO / "models" / "stories260K")}, "data": {"sources": [{"path": "a.jsonl"}]}}
    )
    experiment_id = client.get_experiment_by_name("e").experiment_id
    parent = tracking.start_run(client, experiment_id, "parent")
    ctx = RunContext(
        str(tmp_path), str(tmp_path / "run"), f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_id, parent, "m0"
    )
    racing = RacingClient(client, "log_artifacts", [locked_error()])
    monkeypatch.setattr(tracking, "client", lambda uri: racing)
    version = registry.register_base.with_options(retry_delay_seconds=0)(cfg, ctx)
    assert racing.calls == 2
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in runs] == ["step-0-M0"]
    assert runs[0].info.status == "FINISHED"
    assert [str(v.version) for v in client.search_model_versions("name = 'm0'")] == [version]


def test_registered_model_created_by_another_run_in_between(client: MlflowClient) -> None:
    """The check says absent, then the other run creates it: creating it again is not an error."""
    racing = RacingClient(
        client, "get_registered_model", [MlflowException("absent", error_code=RESOURCE_DOES_NOT_EXIST)]
    )
    tracking.ensure_registered_model(racing, "m")
    assert racing.calls == 1
    assert client.get_registered_model("m").name == "m"
    tracking.ensure_registered_model(client, "fresh")
    assert client.get_registered_model("fresh").name == "fresh"


def test_registered_model_other_errors_are_raised(client: MlflowClient) -> None:
    racing = RacingClient(client, "create_registered_model", [MlflowException("no", error_code=BAD_REQUEST)])
    with pytest.raises(MlflowException, match="no"):
        tracking.ensure_registered_model(racing, "other")


def test_experiment_created_by_another_run_in_between(client: MlflowClient, tmp_path: Path) -> None:
    first = RacingLookup(client)
    experiment = client.get_experiment_by_name("e")
    assert tracking.ensure_experiment(first, "e", experiment.artifact_location) == experiment.experiment_id
    assert first.lookups == 2
    with pytest.raises(ValueError, match="keeps its artifacts"):
        tracking.ensure_experiment(RacingLookup(client), "e", str(tmp_path / "elsewhere"))


class RacingLookup:
    """The first lookup misses the experiment the other run is creating; later ones see it."""

    def __init__(self, inner: MlflowClient) -> None:
        self.inner, self.lookups = inner, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def get_experiment_by_name(self, name: str):
        self.lookups += 1
        return None if self.lookups == 1 else self.inner.get_experiment_by_name(name)


@pytest.mark.slow
def test_m0_is_its_weights_and_its_tokenizer(client, tmp_path, prefect_harness) -> None:
    """The same weights registered again are reused; the same weights under a new chat template
    are another M0 (a new version, whose tokenizer carries the template)."""
    import json
    import shutil

    from sdpo_core.config import RunConfig

    folder = tmp_path / "m0"
    shutil.copytree(REPO / "models" / "stories260K", folder, ignore=shutil.ignore_patterns("source"))
    cfg = RunConfig.model_validate({"model": {"name_or_path": str(folder)}, "data": {"sources": [{"path": "a.jsonl"}]}})
    experiment_id = client.get_experiment_by_name("e").experiment_id

    def register(run: str) -> str:
        parent = tracking.start_run(client, experiment_id, run)
        ctx = RunContext(
            str(tmp_path), str(tmp_path / run), f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_id, parent, "m0"
        )
        return registry.register_base(cfg, ctx)

    first = register("first")
    assert register("again") == first, "the same M0 is reused"
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    config_path.write_text(json.dumps(tokenizer_config))
    second = register("templated")
    assert second != first
    tags = client.get_model_version("m0", second).tags
    assert tags["sdpo.weights_sha256"] == client.get_model_version("m0", first).tags["sdpo.weights_sha256"]
    saved = json.loads((tmp_path / "templated" / "models" / "step-0" / "tokenizer_config.json").read_text())
    assert (
        "<|{{ m['role'] }}|>" in saved.get("chat_template", "")
        or (tmp_path / "templated" / "models" / "step-0" / "chat_template.jinja").is_file()
    )


def test_aliases_never_mix_runs(client, step, monkeypatch, prefect_harness) -> None:
    """Run A (two steps), then runs B and C (one step each) into one registered model: the aliases
    name run C's chain only (step-2 of run A is gone, not left beside C's step-1). A run that
    fails before its end (D) moves no alias."""
    from dataclasses import replace

    monkeypatch.setattr(tracking, "client", lambda uri: client)
    experiment_id = step["ctx"].experiment_id

    def pipeline_run(name: str, steps: int, finish: bool = True) -> tuple[str, dict[int, str]]:
        parent = tracking.start_run(client, experiment_id, name)
        ctx = replace(step["ctx"], parent_run_id=parent)
        versions = {0: "1"}  # M0, shared by the runs (the same weights are reused)
        for t in range(1, steps + 1):
            run_id = tracking.start_run(client, experiment_id, f"{name}-step-{t}", parent_id=parent)
            chunk = step["chunk"].model_copy(update={"step": t, "content_hash": f"{name}{t}"})
            versions[t] = registry.register_step(
                step["cfg"], ctx, chunk, step["model_dir"], run_id, versions[t - 1], {"eval/x": 0.5}, 0.6, 2
            )
        if finish:
            registry.point_aliases(ctx, versions)
        return parent, versions

    def aliases() -> dict[str, str]:
        return {alias: str(v) for alias, v in client.get_registered_model("m").aliases.items()}

    _, a = pipeline_run("A", 2)
    assert aliases() == {"step-0": "1", "step-1": a[1], "step-2": a[2], "final": a[2]}
    pipeline_run("B", 1)
    run_c, c = pipeline_run("C", 1)
    assert aliases() == {"step-0": "1", "step-1": c[1], "final": c[1]}
    for alias, version in aliases().items():
        if alias != "step-0":
            assert client.get_model_version("m", version).tags["sdpo.parent_run_id"] == run_c, alias
    pipeline_run("D", 2, finish=False)
    assert aliases() == {"step-0": "1", "step-1": c[1], "final": c[1]}, "an unfinished run moves no alias"
