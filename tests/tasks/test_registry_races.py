"""Two runs moving one registered model at the same moment: the registry calls that race."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from tasks import tracking


class RacingClient:
    """A real MLflow client whose next calls of one method fail first, as a lost race does."""

    def __init__(self, inner: MlflowClient, method: str, failures: list[MlflowException]) -> None:
        self.inner, self.method, self.failures, self.calls = inner, method, list(failures), 0

    def __getattr__(self, name: str):
        fn = getattr(self.inner, name)
        if name != self.method:
            return fn

        def racing(*args, **kwargs):
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            return fn(*args, **kwargs)

        return racing


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c.create_registered_model("m")
    run = c.create_run(c.create_experiment("e", artifact_location=str(tmp_path / "art")))
    for _ in range(2):
        c.create_model_version("m", str(tmp_path / "src"), run_id=run.info.run_id)
    return c


def unique_key_error() -> MlflowException:
    # What MLflow's SQL store raises when the other run inserted the alias row first.
    return MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed", error_code=BAD_REQUEST)


def test_set_alias_tries_again_after_losing_the_insert_race(client: MlflowClient) -> None:
    locked = MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    racing = RacingClient(client, "set_registered_model_alias", [unique_key_error(), locked])
    tracking.set_alias(racing, "m", "step-1", 2)
    assert racing.calls == 3
    assert str(client.get_model_version_by_alias("m", "step-1").version) == "2"


def test_set_alias_gives_up_after_its_attempts(client: MlflowClient) -> None:
    racing = RacingClient(client, "set_registered_model_alias", [unique_key_error()] * tracking.ALIAS_ATTEMPTS)
    with pytest.raises(MlflowException, match="UNIQUE"):
        tracking.set_alias(racing, "m", "step-1", 2)
    assert racing.calls == tracking.ALIAS_ATTEMPTS


def test_set_alias_raises_other_errors_at_once(client: MlflowClient) -> None:
    racing = RacingClient(client, "set_registered_model_alias", [])
    with pytest.raises(MlflowException) as err:
        tracking.set_alias(racing, "m", "step-1", 99)  # no such version
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert racing.calls == 1
    other = MlflowException("(sqlite3.DataError) value too long", error_code=BAD_REQUEST)
    racing = RacingClient(client, "set_registered_model_alias", [other])
    with pytest.raises(MlflowException, match="too long"):
        tracking.set_alias(racing, "m", "step-1", 2)
    assert racing.calls == 1


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
    assert (
        tracking.ensure_experiment(first, "e", str(tmp_path / "art"))
        == client.get_experiment_by_name("e").experiment_id
    )
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
