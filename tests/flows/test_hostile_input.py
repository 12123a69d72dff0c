"""Broken and hostile input (tests/data/hostile): one clear error or a counted skip, never a
traceback, and nothing written to the workspace or registered."""

from __future__ import annotations

import gzip
import json
import shutil
import time
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
    "deeply_nested.jsonl": ", line 3: JSON nested too deeply",
    "deeply_nested.json": ": JSON nested too deeply",
    "huge_integer.jsonl": ", line 3: a JSON integer too long to read (Exceeds the limit (4300 digits)",
    "nonfinite_scores.jsonl": ": no usable pairs (6 rows read, dropped: {'score not a finite number': 6})",
    "lone_surrogate.jsonl": ", line 4: text holds a lone surrogate ('\\udce9' at 3)",
    "nul_byte.jsonl": ", line 3: not valid JSON: Invalid control character at column 14",
    "prompt_dict.jsonl": ", line 1: field 'prompt' must be a non-empty list of messages",
    "bom_only.jsonl": ": the file is empty",
    "empty.csv": ": the file is empty",
    "scalar.json": ", line 1: a row must be an object, got str",
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


def _fails_cleanly(tmp_path: Path, workspace: Path, capsys, expected: str, *overrides: str) -> str:
    """`sdpo run --dry-run` (then `sdpo run`) with the overrides: exit 2 and one line starting with
    ``expected``, nothing written; returns the message."""
    recipe = write_recipe(tmp_path, "hostile")
    for dry in (["--dry-run"], []):
        code, _, err = _run(["run", *dry, "-c", str(recipe), *overrides], capsys)
        assert code == 2 and err.startswith(f"sdpo: error: {expected}"), err[:500]
        assert err.count("\n") == 1 and "Traceback" not in err, err[:500]
        _nothing_written(tmp_path, workspace)
    return err


def test_gzip_holding_a_huge_line_fails_fast(tmp_path: Path, workspace: Path, capsys) -> None:
    """1.5 MB on disk, a 1.5 GB line inside: a MemoryError at 3.4 GB before; now one message naming
    the line, in seconds."""
    from tests.sdpo_core.test_bounded_input import write_gzip_with_huge_line

    path = write_gzip_with_huge_line(tmp_path / "huge.jsonl.gz")
    start = time.monotonic()
    _fails_cleanly(
        tmp_path, workspace, capsys, f"{path}, line 2: a line longer than", f"data.sources=[{{path: '{path}'}}]"
    )
    assert time.monotonic() - start < 60


def test_gzip_bomb_of_short_rows(tmp_path: Path, workspace: Path, capsys, monkeypatch) -> None:
    from sdpo_core import sources

    monkeypatch.setattr(sources, "GZIP_MIN_BYTES", 1 << 20)  # (the limit: 1 MiB, this file's 20 MB hold 300000 rows)
    monkeypatch.setattr(sources, "GZIP_MAX_RATIO", 10)
    path = tmp_path / "bomb.jsonl.gz"
    row = json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}) + "\n"
    path.write_bytes(gzip.compress(row.encode() * 300_000, mtime=0))
    _fails_cleanly(
        tmp_path, workspace, capsys, f"{path}, line ", f"data.sources=[{{path: '{path}'}}]", "data.skip_bad_rows=true"
    )


def test_csv_with_a_10_mb_field(tmp_path: Path, workspace: Path, capsys) -> None:
    path = tmp_path / "wide.csv"
    path.write_text('prompt,chosen,rejected\n"' + "x" * (10 << 20) + '",a,b\n')
    expected = f"{path}, line 2: not valid CSV: field larger than field limit (131072)"
    _fails_cleanly(tmp_path, workspace, capsys, expected, f"data.sources=[{{path: '{path}'}}]")


def test_row_with_200000_fields_is_a_short_message(tmp_path: Path, workspace: Path, capsys) -> None:
    path = tmp_path / "wide.jsonl"
    path.write_text(json.dumps({f"field{i}": i for i in range(200_000)}) + "\n")
    expected = f"{path}, line 1: cannot tell the data format from the fields ['field0', "
    err = _fails_cleanly(tmp_path, workspace, capsys, expected, f"data.sources=[{{path: '{path}'}}]")
    assert len(err) < 1000


def _model_with_template(tmp_path: Path, template: str) -> Path:
    model = tmp_path / "templated-model"
    shutil.copytree(REPO / "models" / "stories260K", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return model


def _conversational(tmp_path: Path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": f"Answer {i}.", "rejected": "No."}
            for i in range(30)]  # fmt: skip
    rows.insert(3, {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                    "chosen": "Hello.", "rejected": "Go."})  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "line 4: the chat template of {model} failed: TemplateError: System role not supported",
            id="raises",
        ),
        pytest.param(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "line 1: the chat template of {model} did not finish within 1 s (does it loop?)",
            id="loops",
        ),
    ],
)
def test_chat_template_that_raises_or_loops(
    template: str, expected: str, tmp_path: Path, workspace: Path, capsys, monkeypatch
) -> None:
    """Caught at --dry-run (prepare tokenizes every pair), naming the row and the template."""
    from sdpo_core import tokenization

    monkeypatch.setattr(tokenization, "CHAT_TEMPLATE_TIME_LIMIT_S", 1.0)
    model, data = _model_with_template(tmp_path, template), _conversational(tmp_path)
    overrides = (f"model.name_or_path={model}", f"data.sources=[{{path: '{data}', name: chat}}]")
    _fails_cleanly(tmp_path, workspace, capsys, f"{data}, " + expected.format(model=model), *overrides)


def test_hostile_rows_are_counted_when_skipped(tmp_path: Path, workspace: Path, capsys) -> None:
    """Deep nesting, a huge integer and a lone surrogate are bad rows that skip_bad_rows counts;
    non-finite scores are always dropped and counted, and shown where drops are shown."""
    names = ("deeply_nested.jsonl", "huge_integer.jsonl", "lone_surrogate.jsonl")
    sources = ", ".join(f"{{path: '{HOSTILE / n}', name: {n.split('.')[0]}}}" for n in names)
    scored = tmp_path / "scored.jsonl"
    scored.write_text(
        (HOSTILE / "nonfinite_scores.jsonl").read_text()
        + "".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No.", "score_chosen": 5,
                              "score_rejected": 1}) + "\n" for i in range(10))
    )  # fmt: skip
    sources += f", {{path: '{scored}', name: scored}}"
    args = [
        "data",
        "inspect",
        str(write_recipe(tmp_path, "skip")),
        f"data.sources=[{sources}]",
        "data.skip_bad_rows=true",
    ]
    code, out, err = _run([*args[:2], "--json", *args[2:]], capsys)
    assert code == 0, err
    by_name = {s["name"]: s for s in json.loads(out)["sources"]}
    assert by_name["deeply_nested"]["dropped"]["unparseable row"] == 1
    assert by_name["huge_integer"]["dropped"]["unparseable row"] == 1
    assert by_name["lone_surrogate"]["dropped"]["unparseable row"] == 1
    assert by_name["scored"]["dropped"] == {"score not a finite number": 6}
    assert by_name["scored"]["rows"] == 16 and by_name["scored"]["train"] + by_name["scored"]["eval"] == 10
    code, out, _ = _run(args, capsys)
    assert code == 0 and "score not a finite number 6" in out
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
