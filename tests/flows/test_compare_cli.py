"""``sdpo compare RUN_A RUN_B`` (flows/compare_cli.py): two runs' per-step tables side by side,
named by run folder, folder name or MLflow parent run id; ``--json``; an unknown run or a broken
report is one clear error and exit 2. The rows are hand-written report.json files in the form
tasks/report.py writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import EXIT_BAD_INPUT, main


def _row(step: int, chunk: str, acc: float, loss: float) -> dict:
    return {
        "step": step,
        "chunk": chunk,
        "pairs": 40,
        "m0_accuracy": 0.5,
        "eval/ref_gamma": -1.25,
        "eval/reward_accuracy_vs_m0": acc,
        "eval/reward_margin_vs_m0": 0.1 * step,
        "eval/gamma": 0.5,
        "train_loss": loss,
        "model_uri": f"models:/sdpo/{step + 1}",
        "version": str(step + 1),
        "optimizer_steps": 5,
    }


RUN_A = [_row(1, "easy", 0.6, 0.69), _row(2, "hard", 0.65, 0.68)]
RUN_B = [_row(1, "easy", 0.7, 0.60), _row(2, "hard", 0.75, 0.50), _row(3, "extra", 0.8, 0.4)]


def _run_folder(root: Path, name: str, rows: list[dict]) -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("SDPO_HOME", str(tmp_path))
    return _run_folder(tmp_path, "base-1", RUN_A), _run_folder(tmp_path, "tuned-2", RUN_B)


def test_side_by_side_table(runs, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"A: base-1 ({a / 'report.json'}), 2 step(s)"
    assert out[1] == f"B: tuned-2 ({b / 'report.json'}), 3 step(s)"
    table = [line.split() for line in out[3:]]
    assert table[0][:3] == ["step", "run", "chunk"]
    # Step 1: A's row, B's row, then B - A of each number (reward accuracy +0.1, loss -0.09).
    assert table[2][:3] == ["1", "A", "easy"] and "0.600" in table[2] and "0.6900" in table[2]
    assert table[3][:2] == ["B", "easy"] and "0.700" in table[3]
    assert table[4][0] == "B-A" and "+0.1" in table[4] and "-0.09" in table[4]
    # Step 3 is only in B: A's cells show '-', and there is no difference to print.
    assert table[8][:3] == ["3", "A", "-"] and table[9][:2] == ["B", "extra"] and table[10] == ["B-A"]


def test_folder_names_under_the_workspace_and_json(runs, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "base-1", "tuned-2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"]["a"]["name"] == "base-1" and out["runs"]["b"]["name"] == "tuned-2"
    assert [s["step"] for s in out["steps"]] == [1, 2, 3]
    first = out["steps"][0]
    assert first["a"] == RUN_A[0] and first["b"] == RUN_B[0]
    assert first["b_minus_a"]["eval/reward_accuracy_vs_m0"] == pytest.approx(0.1)
    assert first["b_minus_a"]["train_loss"] == pytest.approx(-0.09)
    assert "chunk" not in first["b_minus_a"] and "step" not in first["b_minus_a"]
    assert out["steps"][2]["a"] is None and out["steps"][2]["b_minus_a"] == {}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("nope", "no run 'nope': not a run folder"),
        ("empty", "a folder without report.json"),
        ("broken", "not an sdpo report"),
        ("notrows", "not an sdpo report (expected a list of per-step objects"),
    ],
)
def test_an_unknown_or_broken_run_is_one_error_exit_2(
    runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, expected: str
) -> None:
    (tmp_path / "runs" / "empty").mkdir()
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "report.json").write_text("{not json")
    _run_folder(tmp_path, "notrows", [{"chunk": "x"}])
    assert main(["compare", "base-1", name]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdpo: error: ") and expected in err[0]


@pytest.mark.integration
def test_an_mlflow_parent_run_id_reads_its_report(runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.tracking import client

    a, _ = runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    experiment = c.create_experiment("compare", artifact_location=(tmp_path / "artifacts").as_uri())
    run = c.create_run(experiment, run_name="sdpo-tuned")
    c.log_artifact(run.info.run_id, str(tmp_path / "runs" / "tuned-2" / "report.json"))
    bare = c.create_run(experiment, run_name="no-report").info.run_id

    assert main(["compare", str(a), run.info.run_id, "--tracking-uri", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"]["b"] == {"name": "sdpo-tuned", "source": f"MLflow run {run.info.run_id}"}
    assert [s["b"]["chunk"] for s in out["steps"]] == ["easy", "hard", "extra"]

    assert main(["compare", str(a), bare, "--tracking-uri", uri]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"MLflow run {bare}" in err and "has no report.json" in err
    missing = "0" * 32
    assert main(["compare", str(a), missing, "--tracking-uri", uri]) == EXIT_BAD_INPUT
    assert f"no run '{missing}'" in capsys.readouterr().err
