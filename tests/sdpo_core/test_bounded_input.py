"""Reading hostile data is bounded: long lines, gzip bombs, deep nesting, huge numbers, non-finite
scores and chat templates that raise or loop end in one clear error naming the place (or a counted
drop), never in a raw traceback, a hang or a memory blow-up."""

from __future__ import annotations

import copy
import gzip
import json
import math
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from sdpo_core import sources, tokenization
from sdpo_core.config import ModelConfig, SourceConfig
from sdpo_core.data import (
    NON_FINITE_SCORE,
    TIED_SCORES,
    UNPARSEABLE,
    DataError,
    PreferencePair,
    encode_pair,
    load_source,
)
from sdpo_core.model_io import load_tokenizer
from sdpo_core.sources import SourceError, iter_rows
from sdpo_core.time_limit import TimeLimitExceeded, call_with_time_limit
from sdpo_core.tokenization import TemplateFailed

REPO = Path(__file__).resolve().parents[2]
GOOD = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(3)]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _src(path: Path, **kw: Any) -> SourceConfig:
    return SourceConfig(path=str(path), name="s", **kw)


def _good() -> list[str]:
    return [json.dumps(r) for r in GOOD]


def write_gzip_with_huge_line(path: Path, gigabytes: float = 1.5) -> Path:
    """A gzip file whose line 2 decompresses to ``gigabytes`` of 'x', about 1 MB per GB on disk:
    one 64 MiB deflate member of 'x', compressed once and repeated (gzip allows many members)."""
    member = gzip.compress(b"x" * (64 << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "', mtime=0))
        for _ in range(round(gigabytes * (1 << 30) / (64 << 20))):
            fh.write(member)
        fh.write(gzip.compress(b'", "chosen": "b", "rejected": "c"}\n', mtime=0))
    return path


# ---------------------------------------------------------------------------------------------
# Line length, decompressed size, document size


def test_gzip_holding_a_huge_line_fails_fast_in_bounded_memory(tmp_path: Path) -> None:
    """A 1.5 MB gzip file holding a 1.5 GB line: one DataError naming the file and line 2, in
    seconds and a few hundred MB (it was a MemoryError at 3.4 GB resident)."""
    path = write_gzip_with_huge_line(tmp_path / "huge.jsonl.gz")
    assert path.stat().st_size < 2_000_000
    start = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_source(_src(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(f"{path}, line 2: a line longer than {sources.MAX_LINE_CHARS} characters")
    assert time.monotonic() - start < 20
    assert peak < 4 * sources.MAX_LINE_CHARS + (64 << 20), f"{peak / 2**20:.0f} MiB"


def test_long_line_is_a_bad_row_that_can_be_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_CHARS", 1000)
    path = _jsonl(tmp_path / "long.jsonl", [_good()[0], json.dumps({"prompt": "x" * 5000}), *_good()[1:]])
    with pytest.raises(DataError, match=rf"^{path}, line 2: a line longer than 1000 characters"):
        load_source(_src(path))
    pairs, report = load_source(_src(path), skip_bad_rows=True)
    assert [p.chosen for p in pairs] == ["Answer 0.", "Answer 1.", "Answer 2."]
    assert report.rows == 4 and report.dropped == {UNPARSEABLE: 1}
    # The rest of the long line is skipped, not taken for rows: the next rows keep their lines.
    places = [place for place, _ in iter_rows(_src(path))]
    assert places == [f"{path}, line {n}" for n in (1, 2, 3, 4)]
    # A line of exactly the limit is read.
    exact = json.dumps({"prompt": "y" * 900, "chosen": "a", "rejected": "b"})
    exact = exact[:-1] + " " * (1000 - len(exact)) + "}"
    assert len(exact) == 1000
    ((_, row),) = iter_rows(_src(_jsonl(tmp_path / "exact.jsonl", [exact])))
    assert row["prompt"] == "y" * 900


def test_long_csv_line_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_CHARS", 1000)
    path = tmp_path / "long.csv"
    path.write_text("prompt,chosen,rejected\nHi?,Hello.,Go.\n" + "x" * 2000 + ",a,b\n")
    with pytest.raises(DataError, match=rf"^{path}, line 3: a line longer than 1000 characters"):
        load_source(_src(path), skip_bad_rows=True)


def test_csv_field_over_the_csv_limit_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text('prompt,chosen,rejected\nHi?,Hello.,Go.\n"' + "x" * (10 << 20) + '",a,b\n')
    with pytest.raises(SourceError, match=rf"^{path}, line 3: not valid CSV: field larger than field limit"):
        list(iter_rows(_src(path)))


def test_gzip_bomb_stops_at_the_decompressed_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many short rows (each a duplicate) that decompress to over GZIP_MAX_RATIO times the file."""
    monkeypatch.setattr(sources, "GZIP_MIN_BYTES", 1 << 20)
    line = (json.dumps(GOOD[0]) + "\n").encode()
    path = tmp_path / "bomb.jsonl.gz"
    text = line * ((32 << 20) // len(line))
    path.write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
    limit = sources.gzip_limit(path.stat().st_size)
    assert limit < len(text)
    with pytest.raises(DataError, match=rf"^{path}, line \d+: decompresses to more than {limit} bytes"):
        load_source(_src(path), skip_bad_rows=True)
    # Real data is far from the limit: the shipped HH file decompresses 4.3 times.
    hh = REPO / "data" / "hh-rlhf_helpful-base_test.jsonl.gz"
    assert len(gzip.decompress(hh.read_bytes())) < hh.stat().st_size * sources.GZIP_MAX_RATIO / 40


def test_gzip_with_a_huge_line_and_skip_bad_rows_stops_at_the_decompressed_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_CHARS", 1 << 20)
    path = write_gzip_with_huge_line(tmp_path / "huge.jsonl.gz", gigabytes=0.5)
    with pytest.raises(DataError, match=rf"^{path}, line 2: decompresses to more than"):
        load_source(_src(path), skip_bad_rows=True)


def test_invalid_utf8_early_in_a_gzip_bomb_is_found_without_decompressing_it_all(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl.gz"
    member = gzip.compress(b"\n" * (64 << 20), compresslevel=9, mtime=0)
    path.write_bytes(gzip.compress(b'{"prompt": "caf\xe9"}\n', mtime=0) + member * 48)  # 3 GB of newlines
    start = time.monotonic()
    with pytest.raises(SourceError, match=rf"^{path}: not UTF-8 text \(invalid continuation byte at byte 15\)$"):
        list(iter_rows(_src(path)))
    assert time.monotonic() - start < 20


def test_json_document_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_JSON_DOCUMENT_CHARS", 200)
    text = json.dumps(GOOD * 3)
    assert len(text) > 200
    for path in (tmp_path / "big.json", tmp_path / "big.json.gz"):
        path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
        with pytest.raises(SourceError, match=rf"^{path}: a single JSON document over 200 characters"):
            list(iter_rows(_src(path)))
    small = tmp_path / "small.json"
    small.write_text(json.dumps(GOOD[:1]))
    assert [row for _, row in iter_rows(_src(small))] == GOOD[:1]


def test_whitespace_only_file_is_empty_and_read_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text(" \n" * (1 << 20))
    with pytest.raises(SourceError, match=rf"^{path}: the file is empty$"):
        list(iter_rows(_src(path)))


# ---------------------------------------------------------------------------------------------
# Nesting and numbers


def _nested(depth: int) -> str:
    return json.dumps({"prompt": "__", "chosen": "a", "rejected": "b"}).replace('"__"', "[" * depth + "]" * depth)


def test_deeply_nested_row_is_a_bad_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "deep.jsonl", [_good()[0], _nested(100_000), *_good()[1:]])
    with pytest.raises(DataError, match=rf"^{path}, line 2: JSON nested too deeply"):
        load_source(_src(path))
    pairs, report = load_source(_src(path), skip_bad_rows=True)
    assert len(pairs) == 3 and report.dropped == {UNPARSEABLE: 1}
    assert report.bad_rows == [f"{path}, line 2: JSON nested too deeply (lists or objects inside each other)"]


def test_deeply_nested_document_and_csv_cell(tmp_path: Path) -> None:
    doc = tmp_path / "deep.json"
    doc.write_text("[" + _nested(100_000) + "]")
    with pytest.raises(SourceError, match=rf"^{doc}: JSON nested too deeply"):
        list(iter_rows(_src(doc)))
    csv_path = tmp_path / "deep.csv"
    csv_path.write_text("prompt,chosen,rejected\n" + "[" * 50_000 + ",a,b\n")
    ((_, row),) = iter_rows(_src(csv_path))
    assert row["prompt"] == "[" * 50_000, "a cell that does not decode stays text"


def test_integer_over_the_digit_limit_is_a_bad_row(tmp_path: Path) -> None:
    big = json.dumps({**GOOD[0], "prompt": "Count?", "id": 0}).replace('"id": 0', '"id": ' + "7" * 5000)
    path = _jsonl(tmp_path / "bigint.jsonl", [*_good(), big])
    with pytest.raises(DataError, match=rf"^{path}, line 4: a JSON integer too long to read \(Exceeds the limit"):
        load_source(_src(path))
    assert "set_int_max_str_digits" not in str(pytest.raises(DataError, load_source, _src(path)).value)
    pairs, report = load_source(_src(path), skip_bad_rows=True)
    assert len(pairs) == 3 and report.dropped == {UNPARSEABLE: 1}


def test_non_finite_scores_are_dropped_and_counted(tmp_path: Path) -> None:
    def scored(i: int, chosen: str, rejected: str = "2") -> str:
        return (
            f'{{"prompt": "Q{i}?", "chosen": "good {i}", "rejected": "bad {i}", '
            f'"score_chosen": {chosen}, "score_rejected": {rejected}}}'
        )

    lines = [
        scored(0, "9"),
        scored(1, "NaN"),
        scored(2, "Infinity"),
        scored(3, "1e999"),
        scored(4, "9" * 400),  # an int beyond a float's range
        scored(5, '"nan"'),
        scored(6, "8", "-Infinity"),
        scored(7, "3", "3"),
        scored(8, "7"),
    ]
    path = _jsonl(tmp_path / "scored.jsonl", lines)
    pairs, report = load_source(_src(path))  # no error without skip_bad_rows: these are drops
    assert [p.chosen for p in pairs] == ["good 0", "good 8"]
    assert report.dropped == {NON_FINITE_SCORE: 6, TIED_SCORES: 1}


def test_score_that_is_not_a_number_names_it_briefly(tmp_path: Path) -> None:
    row = {**GOOD[0], "score_chosen": ["x" * 10_000], "score_rejected": 1}
    path = _jsonl(tmp_path / "s.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=r"line 1: field 'score_chosen' must be a number, got \['xxx") as info:
        load_source(_src(path))
    assert len(str(info.value)) < 300


# ---------------------------------------------------------------------------------------------
# Other hostile rows


def test_lone_surrogate_is_a_bad_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "s.jsonl", [*_good(), '{"prompt": "Caf\\udce9?", "chosen": "Oui.", "rejected": "Non."}'])
    with pytest.raises(DataError, match=rf"^{path}, line 4: text holds a lone surrogate \('\\udce9' at 3\)"):
        load_source(_src(path))
    pairs, report = load_source(_src(path), skip_bad_rows=True)
    assert len(pairs) == 3 and report.dropped == {UNPARSEABLE: 1}


def test_row_with_a_million_fields_gives_a_short_message(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "wide.jsonl", [json.dumps({f"field{i}": 1 for i in range(200_000)})])
    with pytest.raises(DataError, match=r"line 1: cannot tell the data format from the fields \['field0',") as info:
        load_source(_src(path))
    assert len(str(info.value)) < 1000


def test_prompt_of_many_empty_messages_is_oversized(tmp_path: Path) -> None:
    row = {"prompt": [{"role": "user", "content": ""}] * 300_000, "chosen": "a", "rejected": "b"}
    path = _jsonl(tmp_path / "many.jsonl", [json.dumps(row), *_good()])
    pairs, report = load_source(_src(path))
    assert len(pairs) == 3 and report.dropped == {"pair over the size limit": 1}


# ---------------------------------------------------------------------------------------------
# Chat templates


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(ModelConfig(name_or_path=str(REPO / "models" / "stories260K")))


PAIR = PreferencePair(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}), "A.", "B.", "s")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ raise_exception('System role not supported') }}", "failed: TemplateError: System role not supported"),
        ("{% for %}", "failed: TemplateSyntaxError: Expected an expression"),
        ("{{ messages[7].content }}", "failed: UndefinedError: list object has no element 7"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "failed: RecursionError"),
        ("{% for i in range(10**12) %}x{% endfor %}", "failed: OverflowError: Range too big"),
    ],
)
def test_template_that_raises_is_one_clear_error(tokenizer: Any, template: str, expected: str) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(TemplateFailed, match=rf"^the chat template of {tok.name_or_path} {expected}"):
        encode_pair(PAIR, tok)


def test_template_that_loops_is_stopped_by_the_time_limit(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenization, "CHAT_TEMPLATE_TIME_LIMIT_S", 0.5)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(TemplateFailed, match=r"did not finish within 0\.5 s"):
        encode_pair(PAIR, tok)
    assert time.monotonic() - start < 5
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert encode_pair(PAIR, tok).prompt_ids, "the next rendering works"


# ---------------------------------------------------------------------------------------------
# The time limit itself


def _spin() -> None:
    while True:
        pass


def test_time_limit_returns_raises_and_stops_a_loop() -> None:
    assert call_with_time_limit(lambda: 6 * 7, 5) == 42
    with pytest.raises(ZeroDivisionError):
        call_with_time_limit(lambda: 1 / 0, 5)
    before = threading.active_count()
    start = time.monotonic()
    with pytest.raises(TimeLimitExceeded, match=r"did not finish within 0\.2 s"):
        call_with_time_limit(_spin, 0.2)
    assert time.monotonic() - start < 2
    deadline = time.monotonic() + 5
    while threading.active_count() >= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() < before, "the stuck helper thread was stopped"
    assert call_with_time_limit(lambda: "again", 5) == "again"


def test_time_limit_works_outside_the_main_thread() -> None:
    results: list[Any] = []

    def worker() -> None:
        try:
            call_with_time_limit(_spin, 0.2)
        except TimeLimitExceeded as exc:
            results.append(exc)
        results.append(call_with_time_limit(lambda: math.pi, 5))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and isinstance(results[0], TimeLimitExceeded) and results[1] == math.pi
