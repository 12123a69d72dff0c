"""Broken and hostile input (tests/data/hostile): one clear error or a counted skip, never a
traceback, and nothing written to the workspace or registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flows.test_pipeline import REPO, write_recipe

HOSTILE = REPO / "tests" / "data" / "hostile"

# file -> what its one-line error says (after the file's name)
BROKEN_DATA = {
    "truncated_array.json": ": not valid JSON (line 14",
    "truncated_line.jsonl": ", line 4: not valid JSON",
    "wrong_types.jsonl": ", line 4: field 'chosen'",
    "not_objects.jsonl": ", line 4: a row must be an object, got list",
    "missing_column.jsonl": ", line 1: cannot tell the data format from the fields ['chosen', 'prompt']",
    "empty.jsonl": ": the file is empty",
    "only_blank_lines.jsonl": ": the file is empty",
    "empty_array.json": ": no usable pairs (0 rows read",
    "garbage.jsonl": ": not UTF-8 text",
    "garbage.jsonl.gz": ": broken gzip file",
    "garbage.parquet": ": not a readable Parquet file",
    "invalid_utf8.jsonl": ": not UTF-8 text",
    "wrong_columns.csv": ", line 2: cannot tell the data format",
    "ragged.csv": ", line 3: expected 3 columns",
}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Path:
    ws = tmp_path / "workspace"
    monkeypatch.setenv("SDPO_HOME", str(ws))
    return ws


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    from flows.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nothing_written(tmp_path: Path, workspace: Path) -> None:
    assert not (tmp_path / "mlflow.db").exists(), "nothing may be tracked or registered"
    assert not (workspace / "runs").exists(), "no run folder may be started"
    assert not (workspace / "checkpoints").exists()


@pytest.mark.parametrize("name", sorted(BROKEN_DATA))
def test_broken_data_file_is_one_clear_error(name: str, tmp_path: Path, workspace: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, "hostile")
    path = HOSTILE / name
    code, _, err = _run(["run", "-c", str(recipe), f"data.sources=[{{path: '{path}', name: bad}}]"], capsys)
    assert code == 2, err
    assert err.startswith(f"sdpo: error: {path}{BROKEN_DATA[name]}"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    _nothing_written(tmp_path, workspace)


def test_bad_rows_are_counted_and_skipped_when_asked(tmp_path: Path, workspace: Path, capsys) -> None:
    """skip_bad_rows: the broken rows of three files are counted by reason, the good ones kept."""
    sources = ", ".join(
        f"{{path: '{HOSTILE / n}', name: {n.split('.')[0]}}}"
        for n in ("truncated_line.jsonl", "wrong_types.jsonl", "not_objects.jsonl")
    )
    code, out, err = _run(["data", "inspect", "--json", str(write_recipe(tmp_path, "skip")),
                           f"data.sources=[{sources}]", "data.skip_bad_rows=true"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    by_name = {s["name"]: s for s in report["sources"]}
    # (The three files share their three good rows, so the later ones also drop eval leaks.)
    assert by_name["truncated_line"]["dropped"]["unparseable row"] == 1
    assert by_name["wrong_types"]["dropped"]["non-string field"] == 1
    assert by_name["not_objects"]["dropped"]["unparseable row"] == 2
    assert [by_name[n]["rows"] for n in ("truncated_line", "wrong_types", "not_objects")] == [4, 4, 5]
    _nothing_written(tmp_path, workspace)


def test_huge_single_line_is_read_and_counted_not_tokenized(tmp_path: Path, workspace: Path, capsys) -> None:
    """A 20 MB line: the pair is dropped as oversized (and counted) before tokenization; a 20 MB
    line that is not JSON is one error naming line 1."""
    big = tmp_path / "huge.jsonl"
    rows = [{"prompt": "x" * (20 << 20), "chosen": "a", "rejected": "b"}]
    rows += [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(30)]
    big.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = _run(["data", "inspect", "--json", str(big)], capsys)
    assert code == 0, err
    (source,) = json.loads(out)["sources"]
    assert source["dropped"] == {"pair over the size limit": 1} and source["kept"] == 30
    broken = tmp_path / "huge-broken.jsonl"
    broken.write_text('{"prompt": "' + "x" * (20 << 20))
    recipe = write_recipe(tmp_path, "huge")
    code, _, err = _run(["run", "-c", str(recipe), f"data.sources=[{{path: '{broken}'}}]"], capsys)
    assert code == 2 and err.startswith(f"sdpo: error: {broken}, line 1: not valid JSON"), err[:300]
    _nothing_written(tmp_path, workspace)


def test_bad_config_lists_every_problem(tmp_path: Path, workspace: Path, capsys) -> None:
    code, _, err = _run(["run", "-c", str(HOSTILE / "bad_config.yaml")], capsys)
    assert code == 2
    for expected in (
        "7 problem(s) in",
        "run_name: expected a string, got int 7",
        "model.colour: unknown key",
        "data.sources.0.max_pairs: expected an integer, got str 'many'",
        "data.max_length: expected an integer, got str '256'",
        "train.learning_rate: expected a number, got str 'fast'",
        "train.epochs: expected an integer, got float 1.5",
        "loss.betta: unknown key (known here: beta,",
    ):
        assert expected in err, err
    assert "Traceback" not in err
    _nothing_written(tmp_path, workspace)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("not_a_mapping.yaml", "the top level must be a mapping, got list"), ("broken_yaml.yaml", "not valid YAML")],
)
def test_unreadable_recipe(name: str, expected: str, tmp_path: Path, workspace: Path, capsys) -> None:
    code, _, err = _run(["run", "-c", str(HOSTILE / name)], capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err
    _nothing_written(tmp_path, workspace)


@pytest.mark.parametrize(
    "override",
    ["run_name=../../outside", "run_name=/tmp/abs", "tracking.registered_model=../escape", "run_name=.hidden"],
)
def test_names_cannot_point_outside_the_workspace(override: str, tmp_path: Path, workspace: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, "paths")
    code, _, err = _run(["run", "-c", str(recipe), override], capsys)
    key = override.split("=")[0]
    assert code == 2 and f"{key}: " in err and "must be 1-100 letters, digits" in err, err
    _nothing_written(tmp_path, workspace)
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()


def test_within_refuses_paths_that_escape(tmp_path: Path) -> None:
    from tasks.workspace import within

    assert within(tmp_path, tmp_path / "runs" / "a") == (tmp_path / "runs" / "a").resolve()
    with pytest.raises(ValueError, match="outside the workspace"):
        within(tmp_path, tmp_path / "runs" / ".." / ".." / "elsewhere")
