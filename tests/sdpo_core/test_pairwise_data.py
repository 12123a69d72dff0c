"""Data that users have (issue 17): arena-style labelled pairs (``response_a``, ``response_b``,
``winner``), read natively or through the column mapping, ties dropped and counted; and HH-RLHF
rows whose dialogues diverge before the last assistant turn: an error that names
``data.skip_bad_rows=true``, or skipped and counted with it. Expected pairs are written out by
hand from the fixtures in tests/data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sdpo_core.config import SourceConfig
from sdpo_core.config_rules import ConfigError
from sdpo_core.data import DataError, load_source
from sdpo_core.pairs import DIVERGED, TIED_WINNER

DATA = Path(__file__).resolve().parents[1] / "data"
ARENA_COLUMNS = {"prompt": "question", "response_a": "answer_1", "response_b": "answer_2", "winner": "label"}


def _src(path: Path, fmt: str = "auto", **kw: Any) -> SourceConfig:
    return SourceConfig(path=str(path), name="s", format=fmt, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["auto", "pairwise"])
def test_winner_picks_the_chosen_response_and_ties_are_counted(fmt: str) -> None:
    pairs, report = load_source(_src(DATA / "pairwise.jsonl", fmt))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Name a colour of the sky.", "Blue.", "Loud."),  # winner a
        ("What is two plus two?", "Four.", "Five."),  # winner b: response_b is chosen
        (({"role": "user", "content": "Pick a fruit."},), "An apple.", "A stone."),  # model_b, messages
    ]
    assert report.format == "pairwise" and report.rows == 5
    assert report.dropped == {TIED_WINNER: 2}  # line 3 "tie", line 5 "tie (bothbad)"


def test_labelled_pairs_through_the_column_mapping() -> None:
    pairs, report = load_source(_src(DATA / "pairwise_columns.jsonl", columns=ARENA_COLUMNS))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Which is a mammal?", "A whale.", "A trout."),
        ("Which is warmer?", "Steam.", "Ice."),
    ]
    assert report.format == "pairwise" and report.dropped == {TIED_WINNER: 1}


def test_an_unknown_winner_names_the_file_line_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "response_a": "x", "response_b": "y", "winner": "c"}\n')
    with pytest.raises(DataError) as info:
        load_source(_src(path))
    assert str(info.value).startswith(f"{path}, line 1: field 'winner' must be one of a, b, tie")
    assert "'c'" in str(info.value)


def test_a_missing_response_is_named_even_on_a_tie(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "response_a": "x", "response_b": null, "winner": "tie"}\n')
    with pytest.raises(DataError, match=r"line 1: missing field 'response_b'"):
        load_source(_src(path))


def test_the_new_roles_are_known_to_the_config() -> None:
    # The arena roles pass the config's column check; a misspelt one is still refused.
    from sdpo_core.config import from_dict

    ok = from_dict(
        {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "x.jsonl", "columns": ARENA_COLUMNS}]}}
    )
    assert ok.data.sources[0].columns == ARENA_COLUMNS
    src = {"path": "x.jsonl", "columns": {"winer": "label"}}
    with pytest.raises(ConfigError, match=r"columns\.winer: unknown column role"):
        from_dict({"model": {"name_or_path": "m"}, "data": {"sources": [src]}})


def test_diverging_hh_dialogues_stop_the_run_naming_skip_bad_rows() -> None:
    path = DATA / "hh_diverged.jsonl"
    with pytest.raises(DataError) as info:
        load_source(_src(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 2: 'chosen' and 'rejected' do not share the dialogue")
    assert "diverge before the last assistant turn" in msg and "data.skip_bad_rows=true" in msg


def test_diverging_hh_dialogues_skipped_and_counted_with_skip_bad_rows() -> None:
    pairs, report = load_source(_src(DATA / "hh_diverged.jsonl"), skip_bad_rows=True)
    assert [p.chosen for p in pairs] == ["Hello! How can I help?", "The Nile."]
    assert report.dropped == {DIVERGED: 1}
    # The skipped row's note names the row, not the setting that is already on.
    (note,) = report.bad_rows
    assert note.startswith(f"{DATA / 'hh_diverged.jsonl'}, line 2: ") and "skip_bad_rows" not in note


def test_diverging_message_lists_name_skip_bad_rows_too(tmp_path: Path) -> None:
    path = tmp_path / "msgs.jsonl"
    user, other = {"role": "user", "content": "hi"}, {"role": "user", "content": "bye"}
    answer = {"role": "assistant", "content": "ok"}
    path.write_text(json.dumps({"chosen": [user, answer], "rejected": [other, answer]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: .*do not share the messages.*data\.skip_bad_rows=true"):
        load_source(_src(path))
