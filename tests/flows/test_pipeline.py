"""The whole pipeline on the tiny real model under a temporary Prefect server.

A two-step by_source run must leave a registry whose versions carry aliases step-0, step-1,
step-2 and final, each naming the version before it as its reference; bad input must stop the
run with one clear error and register nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_recipe(tmp_path: Path, name: str, **changes) -> Path:
    """A small two-source recipe on the shipped data and model, tracked in tmp_path."""
    recipe = {
        "run_name": name,
        "model": {"name_or_path": str(REPO / "models" / "stories260K")},
        "data": {
            "sources": [
                {"name": "orca", "path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), "max_pairs": 20},
                {"name": "mix", "path": str(REPO / "data/llamafactory_dpo_en_demo.json"), "max_pairs": 20},
            ],
            "eval_fraction": 0.2,
            "max_length": 96,
            "max_prompt_length": 48,
        },
        "train": {"micro_batch_size": 4, "grad_accum_steps": 2, "learning_rate": 0.002},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": f"exp-{name}",
            "registered_model": f"model-{name}",
        },
    }
    for key, value in changes.items():
        section, field = key.split("__")
        recipe.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli_process(recipe: Path, workspace: Path, extra_env: dict[str, str], *overrides: str):
    """`python -m flows.cli run` in its own process, with a clean Prefect/MLflow environment."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HF_"))}
    env.update(extra_env, SDPO_HOME=str(workspace), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "-c", str(recipe), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def registry(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registered_names(tmp_path: Path) -> list[str]:
    if not (tmp_path / "mlflow.db").exists():
        return []
    return [m.name for m in registry(tmp_path).search_registered_models()]


class CallCounter:
    """Wraps functions (looked up by module attribute at call time) and counts their calls."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls: dict[str, list] = {}
        self.results: dict[str, list] = {}

    def wrap(self, module, name: str, *, record=lambda *a, **kw: None) -> None:
        """Count the calls of ``module.name``; ``record`` picks what each call notes. Wrapping one
        function under several names counts a call through any of them once (each wrapper calls
        the function itself, not another wrapper)."""
        real = getattr(module, name)
        calls, results = self.calls.setdefault(name, []), self.results.setdefault(name, [])

        def counted(*args, **kwargs):
            calls.append(record(*args, **kwargs))
            results.append(real(*args, **kwargs))
            return results[-1]

        self.monkeypatch.setattr(module, name, counted)

    def count(self, name: str) -> int:
        return len(self.calls[name])


@pytest.mark.slow
def test_two_step_pipeline_registers_lineage(tmp_path, prefect_harness, monkeypatch, capsys):
    """`sdpo run` in this process, in a workspace of its own: the config is parsed once and the
    data read and validated once (by the CLI's early check, whose prepared data the flow is
    handed), and the two steps are registered with their lineage."""
    from prefect.settings import get_current_settings

    import flows.pipeline
    import sdpo_core.config
    import sdpo_core.data
    import sdpo_core.dataset
    import sdpo_core.tokenization
    import tasks.data
    from flows.cli import main

    workspace = tmp_path / "ws"
    monkeypatch.setenv("SDPO_HOME", str(workspace))
    monkeypatch.setenv("PREFECT_API_URL", get_current_settings().api.url)  # the session's test server
    counter = CallCounter(monkeypatch)
    counter.wrap(sdpo_core.config, "from_dict")
    counter.wrap(sdpo_core.config, "load_config")
    counter.wrap(sdpo_core.config.RunConfig, "model_validate", record=lambda data, *a, **kw: type(data).__name__)
    for module in (sdpo_core.data, sdpo_core.dataset):  # the same functions under both names
        counter.wrap(module, "build_dataset")
        counter.wrap(module, "load_source", record=lambda source, *a, **kw: source.name)
    counter.wrap(tasks.data, "prepare")
    counter.wrap(sdpo_core.dataset, "encode_pair")
    counter.wrap(sdpo_core.tokenization, "tokenize_pairs")
    runs: list[dict] = []
    real_flow = flows.pipeline.sdpo_pipeline

    def flow(*args, **kwargs):
        runs.append(kwargs)
        runs[-1]["result"] = real_flow(*args, **kwargs)
        return runs[-1]["result"]

    monkeypatch.setattr(flows.pipeline, "sdpo_pipeline", flow)
    assert main(["run", "-c", str(write_recipe(tmp_path, "two"))]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out

    assert counter.count("load_config") == 1 and counter.count("from_dict") == 1, "the config is parsed once"
    assert counter.calls["model_validate"] == ["dict"], "and validated from its YAML data once"
    assert counter.count("prepare") == 1 and counter.count("build_dataset") == 1, "the data is prepared once"
    assert sorted(counter.calls["load_source"]) == ["mix", "orca"], "each source is read once"
    (run,) = runs
    result, prepared = run["result"], run["prepared"]
    assert run["config"] is counter.results["from_dict"][0], "the flow is handed the parsed config"
    assert prepared is counter.results["prepare"][0][0], "and the prepared data"
    assert [p.name for p in (workspace / "runs").iterdir()] == [Path(result.run_dir).name], "one run folder"
    assert Path(prepared.train_path) == Path(result.run_dir) / "data" / "train.jsonl"
    # Tokenized once: prepare encodes each pair; scoring and training read the kept token ids.
    prepared_pairs = sum(1 for f in (prepared.train_path, prepared.eval_path) for _ in open(f))
    assert counter.count("encode_pair") == prepared_pairs
    assert counter.count("tokenize_pairs") == 0, "no stage tokenizes a pairs file again"
    assert f"sDPO run 'two': 2 step(s), files in {result.run_dir}" in out
    assert "Registered model 'model-two': aliases step-0 .. step-2 and final." in out

    assert [row["step"] for row in result.rows] == [1, 2]
    assert {row["chunk"] for row in result.rows} == {"orca", "mix"}

    c = registry(tmp_path)
    name = "model-two"
    by_alias = {alias: c.get_model_version_by_alias(name, alias) for alias in ("step-0", "step-1", "step-2", "final")}
    assert by_alias["final"].version == by_alias["step-2"].version
    assert len({by_alias[f"step-{t}"].version for t in range(3)}) == 3
    for t in (1, 2):
        mv = by_alias[f"step-{t}"]
        assert mv.tags["sdpo.step"] == str(t)
        assert mv.tags["sdpo.reference"] == f"models:/{name}@step-{t - 1}"
        assert mv.tags["sdpo.reference_version"] == str(by_alias[f"step-{t - 1}"].version)
        assert mv.tags["sdpo.chunk.source"] == result.rows[t - 1]["chunk"]
        assert int(mv.tags["sdpo.chunk.size"]) == result.rows[t - 1]["pairs"]
        assert len(mv.tags["sdpo.chunk.content_hash"]) == 16
    assert by_alias["step-0"].tags["sdpo.reference"] == "none"

    # The step model records the registry version it was trained from and against.
    meta = json.loads((Path(result.run_dir) / "models" / "step-2" / "meta.json").read_text())
    assert meta["reference_version"] == str(by_alias["step-1"].version)

    # Parent run: resolved config as params and YAML; nested step runs with per-step metrics.
    parent = c.get_run(result.parent_run_id)
    assert parent.data.params["loss.name"] == "sigmoid"
    assert parent.data.params["data.max_length"] == "96"
    assert {a.path for a in c.list_artifacts(result.parent_run_id)} >= {"config.yaml", "report.txt", "data_report.json"}
    # Sample generations (tasks/samples.py): one table on the parent run, a column per step model.
    generations = json.loads(
        Path(c.download_artifacts(result.parent_run_id, "samples/generations.json", str(tmp_path))).read_text()
    )
    assert generations["columns"] == ["prompt", "M0", "step-1", "step-2"] and len(generations["data"]) >= 1
    assert sorted(d.dataset.name for d in parent.inputs.dataset_inputs) == ["mix", "orca"]
    step_run = c.get_run(by_alias["step-1"].run_id)
    assert step_run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    history = c.get_metric_history(step_run.info.run_id, "train/loss")
    assert len(history) >= 2 and sorted(m.step for m in history) == list(range(1, len(history) + 1))
    assert "eval/reward_accuracy_vs_m0" in step_run.data.metrics
    assert 0.0 <= result.rows[0]["eval/reward_accuracy_vs_m0"] <= 1.0

    # The same pipeline run again (the flow itself, as a deployment run calls it) registers
    # nothing new: every step, M0 included, is reused. (Folded in here: a whole run is slow.)
    recipe = tmp_path / "two.yaml"
    before = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
    assert before == [1, 2, 3]
    again = real_flow(sdpo_core.config.load_config(recipe))
    assert sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'")) == before
    assert [r["reused"] for r in result.rows] == [False, False]
    assert [r["reused"] for r in again.rows] == [True, True]
    for a, b in zip(result.rows, again.rows, strict=True):
        assert b["version"] == a["version"] and b["chunk"] == a["chunk"]
        assert b["train_loss"] == a["train_loss"]
        assert b["eval/reward_accuracy_vs_m0"] == pytest.approx(a["eval/reward_accuracy_vs_m0"])
    assert str(c.get_model_version_by_alias(name, "final").version) == "3"
    # A changed config is a different pipeline: its steps train again.
    third = real_flow(sdpo_core.config.load_config(recipe, ["loss.beta=0.2"]))
    assert [r["reused"] for r in third.rows] == [False, False]
    assert len(c.search_model_versions(f"name = '{name}'")) == 5  # M0 reused, two new steps


@pytest.mark.slow
def test_flow_with_missing_data_registers_nothing(tmp_path, prefect_harness):
    from flows.pipeline import sdpo_pipeline
    from sdpo_core.config import load_config
    from sdpo_core.data import DataError

    recipe = write_recipe(tmp_path, "missing")
    data = yaml.safe_load(recipe.read_text())
    data["data"]["sources"][1]["path"] = str(tmp_path / "nope.jsonl")
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match="nope.jsonl"):
        sdpo_pipeline(load_config(recipe))
    assert registered_names(tmp_path) == []


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from flows.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_cli_missing_data_file(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "cli-missing")
    code, err = run_cli(["run", "-c", str(recipe), f"data.sources.0.path={tmp_path / 'absent.jsonl'}"], capsys)
    assert code == 2
    assert "absent.jsonl" in err and "not found" in err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert registered_names(tmp_path) == []


def test_cli_row_without_chosen(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}] * 2 + [{"prompt": "Hi", "rejected": "No."}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path, "cli-row")
    code, err = run_cli(["run", "-c", str(recipe), f"data.sources.0.path={bad}"], capsys)
    assert code == 2
    assert "bad.jsonl, line 3" in err and "'chosen'" in err
    assert registered_names(tmp_path) == []


def test_cli_unknown_config_key(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "cli-key")
    code, err = run_cli(["run", "-c", str(recipe), "train.learning_rat=0.1", "lossy.beta=1"], capsys)
    assert code == 2
    assert "train.learning_rat: unknown key" in err
    assert "lossy: unknown key" in err
    assert registered_names(tmp_path) == []


def test_cli_pickle_only_model(tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((REPO / "models/stories260K/config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    recipe = write_recipe(tmp_path, "cli-pickle")
    code, err = run_cli(["run", "-c", str(recipe), f"model.name_or_path={folder}"], capsys)
    assert code == 2
    assert str(folder) in err and "pickle" in err and "pytorch_model.bin" in err
    assert registered_names(tmp_path) == []


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    from flows.cli import main

    recipe = write_recipe(tmp_path, "cli-dry")
    assert main(["run", "-c", str(recipe), "--dry-run", "loss.beta=0.25"]) == 0
    out = capsys.readouterr().out
    assert "beta: 0.25" in out
    assert "source orca: 20 rows" in out or "source orca:" in out


@pytest.mark.slow
def test_cli_run_writes_only_to_workspace_and_no_secret(tmp_path):
    """`sdpo run` with no Prefect server configured: Prefect's temporary server, MLflow on
    SQLite, everything under SDPO_HOME, and nothing in the home folder. With secret-looking
    credentials in the environment, nothing the run writes or prints holds them. (One run checks
    both: each whole CLI run costs about a minute here.)"""

    secrets = {
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-sdpo-secret-0123456789",
        "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLE-sdpo-token-987",
        "HF_TOKEN": "hf_sdpoSecretTokenValue42",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-sdpo-31415",
        "MLFLOW_TRACKING_TOKEN": "mlflow-token-sdpo-27182",
    }
    home, workspace = tmp_path / "home", tmp_path / "ws"
    home.mkdir()
    recipe = write_recipe(tmp_path, "cli-e2e")
    data = yaml.safe_load(recipe.read_text())
    del data["tracking"]["tracking_uri"]  # the workspace default
    recipe.write_text(yaml.safe_dump(data))
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), **secrets}
    proc = run_cli_process(
        recipe, workspace, {**env, "AWS_ACCESS_KEY_ID": "AKIASDPOTESTKEY0001"},
        "partition.strategy=random", "partition.num_steps=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "models:/model-cli-e2e@step-2" in proc.stdout
    assert "random-1" in proc.stdout and "random-2" in proc.stdout
    assert (workspace / "mlflow.db").is_file()
    assert (workspace / "prefect" / "prefect.db").is_file()
    assert any((workspace / "mlartifacts").rglob("model.safetensors"))
    assert list(home.rglob("*")) == []
    # The same workspace, an override carrying a query token: refused (exit 2), and its value
    # is in no file of the workspace afterwards, both databases included (checked below).
    planted = "SECRETVALUE123"
    refused = run_cli_process(recipe, workspace, env, f"data.sources.0.path=/data/x.jsonl?X-Amz-Signature={planted}")
    assert refused.returncode == 2 and "must not hold credentials" in refused.stderr, refused.stderr[-2000:]

    written = [p for p in [*workspace.rglob("*"), *tmp_path.glob("*.db")] if p.is_file()]
    assert {workspace / "mlflow.db", workspace / "prefect" / "prefect.db"} <= set(written)
    for value in [*secrets.values(), "AKIASDPOTESTKEY0001", planted]:
        assert value not in proc.stdout and value not in proc.stderr
        for path in written:
            assert value.encode() not in path.read_bytes(), f"{value} found in {path}"


def test_cli_unreachable_tracking_server(tmp_path, capsys):
    """An MLflow server that does not answer stops the run before anything starts, naming it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    recipe = write_recipe(tmp_path, "cli-mlflow")
    uri = f"http://127.0.0.1:{port}"
    code, err = run_cli(["run", "-c", str(recipe), f"tracking.tracking_uri={uri}"], capsys)
    assert code == 2
    assert f"MLflow tracking server http://127.0.0.1:{port} does not answer" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_credentials_in_a_uri_are_refused(tmp_path, capsys):
    """The config is the flow run's parameter, stored and shown by Prefect: a password in a URI is
    refused before anything starts, and the message shows the URI without it."""
    recipe = write_recipe(tmp_path, "cli-userinfo")
    uri = "http://alice:hunter2@127.0.0.1:5000"
    code, err = run_cli(["run", "-c", str(recipe), f"tracking.tracking_uri={uri}"], capsys)
    assert code == 2
    assert "tracking.tracking_uri: must not hold credentials" in err and "http://***@127.0.0.1:5000" in err
    assert "hunter2" not in err and "alice" not in err
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_storage_failure_is_a_clear_message_with_how_to_resume(tmp_path, capsys, monkeypatch):
    """An upload that fails for good (the S3 endpoint stays down) ends the run with its cause
    and how to continue, not a traceback."""
    import flows.pipeline
    from tasks.s3 import UploadError

    def fail(**_):
        raise UploadError("s3://bucket/x/model.safetensors: upload of /w/model.safetensors failed after 4 attempts")

    monkeypatch.setattr(flows.pipeline, "sdpo_pipeline", fail)
    code, err = run_cli(["run", "-c", str(write_recipe(tmp_path, "cli-s3"))], capsys)
    assert code == 1
    assert err.splitlines() == [
        "sdpo: storage failed: s3://bucket/x/model.safetensors: upload of /w/model.safetensors failed after 4 attempts",
        "sdpo: finished steps are registered and the unfinished step's checkpoints are kept: "
        "run the same command again to continue",
    ]
