"""``sdpo data inspect`` and ``sdpo run --dry-run`` on the fixtures in tests/data.

The commands run in the repository root, as users run them, so the default model
(models/stories260K) is found; no Prefect server is started.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from flows.cli import EXIT_BAD_INPUT, main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
STANDARD = DATA / "standard.jsonl"
DIRTY = DATA / "dirty.jsonl"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _inspect_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["data", "inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run a command that must fail on its input; return its one-line message."""
    assert main(argv) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    assert err.startswith("sdpo: error: ")
    return err.strip()


def test_inspect_prints_counts_of_a_clean_file(capsys: pytest.CaptureFixture[str]) -> None:
    """6 pairs, eval_fraction 0.1: max(1, round(0.6)) = 1 held out."""
    assert main(["data", "inspect", str(STANDARD)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"source standard: {STANDARD}"
    assert "  format      standard" in lines
    assert any(line.startswith("  rows        6 read, 6 kept (train 5, eval 1), content ") for line in lines)
    assert "  dropped     none" in lines
    assert lines[-1].startswith("total: 5 training pairs, 1 eval pairs, 1 step(s) planned (by_source)")


def test_inspect_dirty_file_counts_every_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(DIRTY), "data.skip_bad_rows=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  rows        11 read, 4 kept (train 3, eval 1), content ") for line in lines)
    assert (
        "  dropped     chosen identical to rejected 1, empty completion 1, exact duplicate 1, "
        "missing field 1, non-string field 1, unparseable row 2"
    ) in lines
    places = [line.strip().split(": ")[0] for line in lines if line.strip().startswith(f"{DIRTY}, line ")]
    assert places == [f"{DIRTY}, line {n}" for n in (3, 6, 7, 11)]


def test_inspect_dirty_file_stops_at_line_3(capsys: pytest.CaptureFixture[str]) -> None:
    msg = _error(capsys, ["data", "inspect", str(DIRTY)])
    assert msg == f"sdpo: error: {DIRTY}, line 3: missing field 'chosen' (format standard)"


def test_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    report = _inspect_json(capsys, str(DIRTY), "data.skip_bad_rows=true")
    (source,) = report["sources"]
    assert (source["name"], source["path"], source["format"]) == ("dirty", str(DIRTY), "standard")
    assert (source["rows"], source["kept"], source["train"], source["eval"]) == (11, 4, 3, 1)
    assert source["dropped"] == {
        "empty completion": 1,
        "missing field": 1,
        "non-string field": 1,
        "unparseable row": 2,
        "chosen identical to rejected": 1,
        "exact duplicate": 1,
    }
    assert len(source["bad_rows"]) == 4
    assert set(source["token_lengths"]) == {"prompt", "chosen", "rejected"}
    assert source["sample"]["chosen"] == "100 degrees Celsius, or 212 degrees Fahrenheit."
    assert (report["train"], report["eval"], report["num_steps"]) == (3, 1, 1)
    assert report["tokenizer"] == "models/stories260K"


def test_inspect_format_option(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "implicit_hh.jsonl.gz"
    assert _inspect_json(capsys, str(path))["sources"][0]["format"] == "implicit"
    (source,) = _inspect_json(capsys, str(path), "--format", "hh")["sources"]
    assert (source["format"], source["rows"], source["kept"]) == ("hh", 3, 3)
    msg = _error(capsys, ["data", "inspect", str(STANDARD), "--format", "sharegpt"])
    assert msg == f"sdpo: error: {STANDARD}, line 1: missing field 'conversations' (format sharegpt)"


def test_inspect_column_option(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "custom_columns.jsonl"
    msg = _error(capsys, ["data", "inspect", str(path)])
    assert msg.startswith(f"sdpo: error: {path}, line 1: cannot tell the data format")
    columns = ["--column", "prompt=question", "--column", "chosen=response_j", "--column", "rejected=response_k"]
    (source,) = _inspect_json(capsys, str(path), *columns)["sources"]
    assert (source["format"], source["rows"], source["kept"], source["dropped"]) == ("standard", 3, 3, {})
    assert source["sample"]["prompt"] == "How do I reverse a list in Python?"


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("prompt", "'prompt': expected ROLE=COLUMN"),
        ("question=prompt", "data.sources.0.columns.question: unknown column role"),
    ],
)
def test_inspect_bad_column_option(capsys: pytest.CaptureFixture[str], column: str, expected: str) -> None:
    assert main(["data", "inspect", str(DATA / "custom_columns.jsonl"), "--column", column]) == EXIT_BAD_INPUT
    assert expected in capsys.readouterr().err


def test_inspect_save_to_disk_split(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in STANDARD.read_text(encoding="utf-8").splitlines()]
    folder = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:3])}).save_to_disk(str(folder))
    assert _inspect_json(capsys, str(folder))["sources"][0]["rows"] == 6
    assert _inspect_json(capsys, str(folder), "--split", "test")["sources"][0]["rows"] == 3
    msg = _error(capsys, ["data", "inspect", str(folder), "--split", "validation"])
    assert msg == f"sdpo: error: {folder}: no split 'validation' (splits: train, test)"


def _recipe(tmp_path: Path, *extra: str) -> Path:
    recipe = tmp_path / "two_sources.yaml"
    recipe.write_text(
        "\n".join(
            [
                "run_name: inspect-test",
                "data:",
                "  sources:",
                f"    - {{name: std, path: {json.dumps(str(STANDARD))}}}",
                f"    - {{name: conv, path: {json.dumps(str(DATA / 'conversational.json'))}}}",
                "  max_length: 96",
                "  max_prompt_length: 64",
                *extra,
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return recipe


def test_inspect_a_recipe_with_two_sources(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """std: 6 pairs -> 5 train, 1 eval; conv: 3 pairs -> 2 train, 1 eval; by_source: 2 steps."""
    recipe = _recipe(tmp_path)
    assert main(["data", "inspect", str(recipe)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("source ")] == [
        f"source std: {STANDARD}",
        f"source conv: {DATA / 'conversational.json'}",
    ]
    rows = [line for line in lines if line.startswith("  rows ")]
    assert rows[0].startswith("  rows        6 read, 6 kept (train 5, eval 1)")
    assert rows[1].startswith("  rows        3 read, 3 kept (train 2, eval 1)")
    assert any("(over 64 tokens, end kept)" in line for line in lines)
    assert lines[-1].startswith("total: 7 training pairs, 2 eval pairs, 2 step(s) planned (by_source)")
    # Overrides apply to a recipe too.
    report = _inspect_json(capsys, str(recipe), "data.sources.1.weight=2")
    assert [s["train"] for s in report["sources"]] == [5, 4] and report["train"] == 9


def test_inspect_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "prefs_v2.jsonl"
    assert _error(capsys, ["data", "inspect", str(missing)]) == f"sdpo: error: {missing}: data file not found"


def test_inspect_missing_recipe(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["data", "inspect", str(missing)]) == EXIT_BAD_INPUT
    assert f"recipe file not found: {missing}" in capsys.readouterr().err


def test_inspect_corrupted_gzip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import gzip

    text = "".join(json.dumps({"prompt": f"p{i} " * 40, "chosen": "c", "rejected": "r"}) + "\n" for i in range(200))
    data = bytearray(gzip.compress(text.encode(), mtime=0))
    for i in range(40, 60):
        data[i] ^= 0xFF
    path = tmp_path / "prefs.jsonl.gz"
    path.write_bytes(bytes(data))
    assert _error(capsys, ["data", "inspect", str(path)]).startswith(f"sdpo: error: {path}: broken gzip file")


# ---------------------------------------------------------------------------------------------
# sdpo run


def test_run_dry_run_prints_config_and_data_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    assert main(["run", "-c", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run_name: inspect-test\n")
    assert "max_prompt_length: 64" in out
    assert f"source std: {STANDARD}" in out and f"source conv: {DATA / 'conversational.json'}" in out
    assert "  rows        6 read, 6 kept (train 5, eval 1)" in out
    assert out.rstrip().splitlines()[-1].startswith("total: 7 training pairs, 2 eval pairs, 2 step(s) planned")


def test_run_with_too_little_data_stops_before_the_pipeline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    fake = types.ModuleType("flows.pipeline")
    fake.sdpo_pipeline = lambda **kw: calls.append(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flows.pipeline", fake)
    recipe = _recipe(tmp_path, "  min_pairs_per_step: 3")
    msg = _error(capsys, ["run", "-c", str(recipe)])
    assert msg == "sdpo: error: not enough data: source 'conv' leaves 2 training pair(s); its step needs 3"
    assert calls == []
