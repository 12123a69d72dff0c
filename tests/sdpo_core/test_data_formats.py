"""Every preference format from its fixture in tests/data, the drop reasons, and a run's data set.

Expected pairs are written out by hand from the fixture files. Token counts use the real tokenizer
of models/stories260K (no chat template: prompts use the plain template); expected counts are worked
out here from ``encode_pair`` and the documented policy, not from the truncation code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sdpo_core.config import ModelConfig, RunConfig, SourceConfig, from_dict
from sdpo_core.data import (
    DUPLICATE,
    EMPTY_COMPLETION,
    IDENTICAL,
    IN_EVAL,
    MISSING_FIELD,
    NON_STRING_FIELD,
    PROMPT_TOO_LONG,
    REVERSED_SCORES,
    TIED_SCORES,
    UNPARSEABLE,
    DataError,
    PreferencePair,
    build_dataset,
    encode_pair,
    load_source,
)
from sdpo_core.model_io import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
MODEL = REPO / "models" / "stories260K"
STANDARD = DATA / "standard.jsonl"  # 6 pairs
EVAL_OVERLAP = DATA / "eval_overlap.jsonl"  # 3 pairs; line 1 is line 4 of standard.jsonl
CUSTOM_COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def _src(path: Path, fmt: str = "auto", **kw: Any) -> SourceConfig:
    return SourceConfig(path=str(path), name=kw.pop("name", "s"), format=fmt, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = load_tokenizer(ModelConfig(name_or_path=str(MODEL)))
    assert not getattr(tok, "chat_template", None), "the expected lengths assume the plain template"
    return tok


# ---------------------------------------------------------------------------------------------
# Each format normalises to the expected pairs


def test_standard() -> None:
    pairs, report = load_source(_src(STANDARD))
    assert report.rows == report.kept == 6 and report.dropped == {}
    assert pairs[1] == PreferencePair("Give me a synonym for happy.", "Cheerful.", "Sad.", "s")
    assert (
        pairs[2].chosen == "Red leaves drift and fall,\nthe park bench holds a small pile,\nwind hums, then is still."
    )


def test_conversational_json_array_keeps_multi_turn_prompts() -> None:
    pairs, report = load_source(_src(DATA / "conversational.json"))
    assert report.rows == report.kept == 3
    assert pairs[0] == PreferencePair(
        (system("You are a patient cooking assistant."), user("How long should I boil an egg for a runny yolk?")),
        "About six minutes in gently boiling water, then cool it in cold water for a minute.",
        "Twenty minutes, to be safe.",
        "s",
    )
    assert pairs[1].prompt == (
        user("I want to learn to play the guitar."),
        assistant("Great! Do you have an acoustic or an electric guitar?"),
        user("An acoustic one. Where should I start?"),
    )
    assert pairs[1].rejected == "Buy an electric guitar instead."


def test_implicit_hh_transcripts_gz() -> None:
    """The prompt is the dialogue up to the last 'Assistant:'; a blank line inside the last answer stays."""
    pairs, report = load_source(_src(DATA / "implicit_hh.jsonl.gz"))
    assert report.rows == report.kept == 3
    assert pairs[0] == PreferencePair(
        (
            user("What are some good ways to save money on groceries?"),
            assistant("Do you usually plan your meals for the week?"),
            user("Not really, I just buy whatever looks good."),
        ),
        "Planning meals and writing a shopping list helps a lot; buying store brands and seasonal vegetables saves more.",
        "Just eat less.",
        "s",
    )
    assert pairs[1].prompt == (user("How do I get a stain out of a white shirt?"),)
    assert pairs[2].chosen == "Why do cows wear bells? Because their horns don't work.\n\nWant another one?"
    assert pairs[2].rejected == "No."


def test_implicit_message_lists() -> None:
    pairs, report = load_source(_src(DATA / "implicit_messages.jsonl"))
    assert report.rows == report.kept == 3
    assert pairs[0] == PreferencePair(
        (
            user("Can you recommend a book for a long flight?"),
            assistant("Do you prefer fiction or non-fiction?"),
            user("Fiction, something light."),
        ),
        "Try 'The Hitchhiker's Guide to the Galaxy': it is funny and the chapters are short.",
        "War and Peace.",
        "s",
    )
    assert pairs[2] == PreferencePair(
        (system("Answer briefly."), user("Is a tomato a fruit?")),
        "Botanically, yes; in cooking it is used as a vegetable.",
        "No.",
        "s",
    )


def test_openai_preference_format() -> None:
    pairs, report = load_source(_src(DATA / "openai.jsonl"))
    assert report.rows == report.kept == 3
    assert pairs[0] == PreferencePair(
        (
            system("You are a helpful travel agent."),
            user("What should I pack for a weekend in Edinburgh in March?"),
        ),
        "Pack layers, a waterproof jacket and comfortable walking shoes: March in Edinburgh is cool and often wet.",
        "Shorts and sandals.",
        "s",
    )
    assert pairs[2].prompt == (
        user("Is it safe to look at the sun?"),
        assistant("Do you mean with the naked eye?"),
        user("Yes, during an eclipse."),
    )


def test_sharegpt() -> None:
    pairs, report = load_source(_src(DATA / "sharegpt.json"))
    assert report.rows == report.kept == 3
    assert pairs[0] == PreferencePair(
        (system("You are a friendly maths tutor."), user("What is a prime number?")),
        "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7.",
        "Any odd number.",
        "s",
    )
    assert pairs[1].prompt == (
        user("My plant's leaves are turning yellow."),
        assistant("How often do you water it?"),
        user("Every day."),
    )
    assert (pairs[2].chosen, pairs[2].rejected) == ("The bat.", "The penguin.")


def test_scored_ultrafeedback_style_ties_and_reversed_pairs_are_counted() -> None:
    """Line 3 ties (7.0 vs 7.0); line 4 scores the rejected side higher (2.0 vs 9.5). The prompt is
    taken from the completions' messages, so line 5 keeps its three turns."""
    pairs, report = load_source(_src(DATA / "scored.jsonl"))
    assert report.format == "scored"
    assert report.rows == 5 and report.kept == 3
    assert report.dropped == {TIED_SCORES: 1, REVERSED_SCORES: 1}
    assert report.bad_rows == [], "ties and reversed pairs are well-formed rows, not bad rows"
    assert pairs[0] == PreferencePair(
        (user("Suggest a name for a bakery."),), "Rise and Shine Bakery.", "Bread Shop Number 4.", "s"
    )
    assert pairs[2] == PreferencePair(
        (
            user("Can you help me plan a birthday party?"),
            assistant("Sure! How many guests, and how old is the birthday person?"),
            user("Ten kids, turning seven."),
        ),
        "Plan a two-hour party with a treasure hunt, a simple craft, cake and a short game of musical chairs.",
        "Rent a nightclub.",
        "s",
    )
    assert [p.chosen for p in pairs] == [
        "Rise and Shine Bakery.",
        "Warm up with light movement before, and stretch after, when your muscles are warm.",
        pairs[2].chosen,
    ]


def test_scored_with_mapped_rating_columns_from_csv(tmp_path: Path) -> None:
    """CSV cells are strings: ratings "8" and "8.0" are numbers and tie."""
    path = tmp_path / "rated.csv"
    path.write_text(
        "question,good,bad,rating_good,rating_bad\n"
        "Name a fruit.,Apple.,Chair.,9,2\n"
        "Name a colour.,Red.,Loud.,8,8.0\n"
        "Name a tree.,Gravel.,Oak.,1,7\n",
        encoding="utf-8",
    )
    columns = {
        "prompt": "question",
        "chosen": "good",
        "rejected": "bad",
        "score_chosen": "rating_good",
        "score_rejected": "rating_bad",
    }
    pairs, report = load_source(_src(path, columns=columns))
    assert report.format == "scored"
    assert pairs == [PreferencePair("Name a fruit.", "Apple.", "Chair.", "s")]
    assert report.dropped == {TIED_SCORES: 1, REVERSED_SCORES: 1}


def test_custom_schema_through_columns() -> None:
    pairs, report = load_source(_src(DATA / "custom_columns.jsonl", columns=CUSTOM_COLUMNS))
    assert report.format == "standard" and report.kept == 3
    assert pairs[0] == PreferencePair(
        "How do I reverse a list in Python?",
        "Use my_list.reverse() to reverse it in place, or my_list[::-1] to get a reversed copy.",
        "You can't; lists are fixed.",
        "s",
    )


def test_custom_schema_without_columns_cannot_be_detected() -> None:
    path = DATA / "custom_columns.jsonl"
    with pytest.raises(DataError) as info:
        load_source(_src(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 1: cannot tell the data format")
    assert "['qid', 'question', 'response_j', 'response_k']" in msg


def test_missing_mapped_column() -> None:
    path = DATA / "custom_columns.jsonl"
    columns = {**CUSTOM_COLUMNS, "rejected": "response_x"}
    with pytest.raises(DataError) as info:
        load_source(_src(path, columns=columns))
    assert str(info.value).startswith(f"{path}, line 1: missing column 'response_x' (mapped to rejected)")
    with pytest.raises(DataError, match=r"no usable pairs \(3 rows read, dropped: \{'missing field': 3\}"):
        load_source(_src(path, columns=columns), skip_bad_rows=True)


def test_csv_with_a_json_messages_cell() -> None:
    pairs, report = load_source(_src(DATA / "pairs.csv"))
    assert report.format == "standard" and report.rows == report.kept == 4
    assert pairs[1] == PreferencePair(
        (system("Reply in one word."), user("What colour is a ripe banana?")), "Yellow.", "Blue.", "s"
    )
    assert pairs[2].chosen == "Soft rain on the roof,\na lullaby for the town."
    gz, _ = load_source(_src(DATA / "pairs.csv.gz"))
    assert gz == pairs


def test_folder_of_mixed_files() -> None:
    pairs, report = load_source(_src(DATA / "mixed"))
    assert report.rows == report.kept == 5
    assert [p.chosen for p in pairs] == [
        "The Pacific Ocean.",
        "N-E-C-E-S-S-A-R-Y.",
        "Try 'Patchwork': it is quick to learn and made for two.",
        "Seven.",
        "Carbon dioxide.",
    ]
    assert pairs[2].prompt == (user("Recommend a board game for two players."),)
    assert pairs[3].prompt == "How many continents are there?"


def test_parquet_conversational(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": [system("Be concise."), user("Name a string instrument.")],
            "chosen": [assistant("The violin.")],
            "rejected": [assistant("The trumpet.")],
        },
        {
            "prompt": [user("What is the tallest mountain on Earth?")],
            "chosen": [assistant("Mount Everest.")],
            "rejected": [assistant("Mont Blanc.")],
        },
    ]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    pairs, report = load_source(_src(path))
    assert report.format == "conversational"
    assert pairs == [
        PreferencePair((system("Be concise."), user("Name a string instrument.")), "The violin.", "The trumpet.", "s"),
        PreferencePair((user("What is the tallest mountain on Earth?"),), "Mount Everest.", "Mont Blanc.", "s"),
    ]


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in STANDARD.read_text(encoding="utf-8").splitlines()]
    folder = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(rows[:4]), "test": Dataset.from_list(rows[4:])}).save_to_disk(str(folder))
    test, report = load_source(_src(folder, split="test"))
    assert report.format == "standard" and report.rows == 2
    assert [p.prompt for p in test] == [rows[4]["prompt"], rows[5]["prompt"]]
    train, _ = load_source(_src(folder))
    assert [p.chosen for p in train] == [r["chosen"] for r in rows[:4]]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        load_source(_src(folder, split="validation"))


@pytest.mark.parametrize(
    ("name", "fmt", "kw"),
    [
        ("standard.jsonl", "standard", {}),
        ("conversational.json", "conversational", {}),
        ("implicit_hh.jsonl.gz", "implicit", {}),
        ("implicit_messages.jsonl", "implicit", {}),
        ("openai.jsonl", "openai", {}),
        ("sharegpt.json", "sharegpt", {}),
        ("scored.jsonl", "scored", {}),
        ("custom_columns.jsonl", "standard", {"columns": CUSTOM_COLUMNS}),
        ("pairs.csv", "standard", {}),
        ("pairs.csv.gz", "standard", {}),
        ("mixed", "standard", {}),
        ("dirty.jsonl", "standard", {}),
    ],
)
def test_auto_detection_names_the_format(name: str, fmt: str, kw: dict[str, Any]) -> None:
    auto, report = load_source(_src(DATA / name, **kw), skip_bad_rows=True)
    assert report.format == fmt
    explicit, explicit_report = load_source(_src(DATA / name, fmt, **kw), skip_bad_rows=True)
    assert explicit == auto and explicit_report.format == fmt


def test_hh_alias_keeps_its_name_in_the_report() -> None:
    pairs, report = load_source(_src(DATA / "implicit_hh.jsonl.gz", "hh"))
    assert report.format == "hh" and len(pairs) == 3


def test_wrong_explicit_format_names_the_first_row() -> None:
    with pytest.raises(DataError) as info:
        load_source(_src(STANDARD, "openai"))
    assert str(info.value) == f"{STANDARD}, line 1: missing field 'input' (format openai)"


# ---------------------------------------------------------------------------------------------
# The dirty fixture: every drop reason, at known lines

DIRTY = DATA / "dirty.jsonl"
DIRTY_DROPPED = {
    EMPTY_COMPLETION: 1,  # line 2
    MISSING_FIELD: 1,  # line 3
    NON_STRING_FIELD: 1,  # line 6 (line 5 is blank)
    UNPARSEABLE: 2,  # line 7 (invalid JSON), line 11 (a list, not an object)
    IDENTICAL: 1,  # line 8
    DUPLICATE: 1,  # line 9 repeats line 1
}


@pytest.mark.parametrize("fmt", ["auto", "standard"])
def test_dirty_first_bad_row_stops_with_file_and_line(fmt: str) -> None:
    """Line 2's empty completion is dropped, not an error; line 3 lacks 'chosen' and stops the read."""
    with pytest.raises(DataError) as info:
        load_source(_src(DIRTY, fmt))
    assert str(info.value) == f"{DIRTY}, line 3: missing field 'chosen' (format standard)"


def test_dirty_skipped_rows_counted_by_reason() -> None:
    pairs, report = load_source(_src(DIRTY), skip_bad_rows=True)
    assert report.rows == 11  # 12 lines, one blank
    assert report.dropped == DIRTY_DROPPED
    assert report.kept == len(pairs) == 4 == report.rows - sum(DIRTY_DROPPED.values())
    assert [p.chosen for p in pairs] == [
        "100 degrees Celsius, or 212 degrees Fahrenheit.",
        "Sixty.",
        "Honey.",
        "Au.",
    ]
    assert report.bad_rows == [
        f"{DIRTY}, line 3: missing field 'chosen'",
        f"{DIRTY}, line 6: field 'rejected' must be a non-empty list of messages",
        f"{DIRTY}, line 7: not valid JSON: Expecting ',' delimiter",
        f"{DIRTY}, line 11: a row must be an object, got list",
    ]


def test_skip_bad_rows_also_skips_a_bad_first_row(tmp_path: Path) -> None:
    path = tmp_path / "first_bad.jsonl"
    lines = [
        {"prompt": "Who wrote Hamlet?", "rejected": "Charles Dickens."},
        {"prompt": "What do bees make?", "chosen": "Honey.", "rejected": "Milk."},
        {"prompt": "What is 7 times 8?", "chosen": "56.", "rejected": "54."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    pairs, report = load_source(_src(path), skip_bad_rows=True)
    assert report.format == "standard" and [p.chosen for p in pairs] == ["Honey.", "56."]
    assert report.dropped == {MISSING_FIELD: 1}


def test_scored_nan_rating_is_not_a_preference(tmp_path: Path) -> None:
    path = tmp_path / "nan.jsonl"
    rows = [
        {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Chair.", "score_chosen": 9, "score_rejected": 2},
        {
            "prompt": "Name a tree.",
            "chosen": "Oak.",
            "rejected": "Gravel.",
            "score_chosen": float("nan"),
            "score_rejected": 2,
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert "NaN" in path.read_text(encoding="utf-8")
    pairs, report = load_source(_src(path), skip_bad_rows=True)
    assert [p.chosen for p in pairs] == ["Apple."]
    assert sum(report.dropped.values()) == 1


def test_bad_rows_lists_the_first_five(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": "ok", "chosen": "yes", "rejected": "no"})]
    lines += [json.dumps({"prompt": f"p{i}", "rejected": "no"}) for i in range(7)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _, report = load_source(_src(path), skip_bad_rows=True)
    assert report.dropped == {MISSING_FIELD: 7}
    assert report.bad_rows == [f"{path}, line {n}: missing field 'chosen'" for n in range(2, 7)]


def test_max_pairs_and_sample(tmp_path: Path) -> None:
    first, _ = load_source(_src(STANDARD, max_pairs=2))
    full, _ = load_source(_src(STANDARD))
    assert first == full[:2]
    sampled, report = load_source(_src(STANDARD, sample=4))
    assert report.kept == len(sampled) == 4
    assert [p for p in full if p in sampled] == sampled, "a sample keeps file order"
    again, _ = load_source(_src(STANDARD, sample=4))
    assert again == sampled
    whole, _ = load_source(_src(STANDARD, sample=10))
    assert whole == full


# ---------------------------------------------------------------------------------------------
# A run's data set: build_dataset on a RunConfig


def _cfg(sources: list[dict[str, Any]], data: dict[str, Any] | None = None, **sections: Any) -> RunConfig:
    return from_dict(
        {
            "model": {"name_or_path": str(MODEL)},
            "data": {"sources": sources, **(data or {})},
            **sections,
        }
    )


def _short_eval(tmp_path: Path) -> dict[str, Any]:
    """An eval-only source of two pairs with short prompts."""
    path = tmp_path / "short_eval.jsonl"
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
        {"prompt": "Yes?", "chosen": "Yes.", "rejected": "No."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"path": str(path), "name": "short", "use": "eval"}


def test_uses_and_the_leakage_check(tokenizer: Any) -> None:
    """std (use=train) holds the spider pair that held (use=eval) holds too: it leaves training and is
    counted under 'also in eval split'. conv (use=split, 3 pairs) holds out max(1, round(0.3)) = 1."""
    cfg = _cfg(
        [
            {"path": str(STANDARD), "name": "std", "use": "train"},
            {"path": str(DATA / "conversational.json"), "name": "conv", "use": "split"},
            {"path": str(EVAL_OVERLAP), "name": "held", "use": "eval"},
        ]
    )
    train, evals, report = build_dataset(cfg, tokenizer)
    by = {r.name: r for r in report.sources}
    assert by["std"].dropped == {IN_EVAL: 1}
    assert (by["std"].rows, by["std"].kept, by["std"].train, by["std"].eval) == (6, 5, 5, 0)
    assert (by["conv"].kept, by["conv"].train, by["conv"].eval) == (3, 2, 1)
    assert (by["held"].kept, by["held"].train, by["held"].eval) == (3, 0, 3)
    assert by["conv"].dropped == by["held"].dropped == {}
    assert (report.train, report.eval, report.num_steps) == (7, 4, 2)
    assert len(train) == 7 and len(evals) == 4
    spider = PreferencePair(
        "How many legs does a spider have?", "A spider has eight legs.", "Six, like all insects.", "std"
    )
    assert spider not in train
    assert spider.content_key in {p.content_key for p in evals}
    assert not {p.content_key for p in train} & {p.content_key for p in evals}
    assert [p.source for p in train] == ["std"] * 5 + ["conv"] * 2, "recipe order, then file order"


def test_without_the_eval_source_nothing_leaks(tokenizer: Any, tmp_path: Path) -> None:
    cfg = _cfg([{"path": str(STANDARD), "name": "std", "use": "train"}, _short_eval(tmp_path)])
    train, _, report = build_dataset(cfg, tokenizer)
    assert report.sources[0].dropped == {} and report.sources[0].train == len(train) == 6


def _expected_lengths(path: Path, tokenizer: Any) -> list[tuple[int, int, int]]:
    pairs, _ = load_source(_src(path, name="std"))
    out = []
    for p in pairs:
        full = encode_pair(p, tokenizer)
        out.append((len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)))
    return out


MAX_PROMPT, MAX_LEN = 24, 48


def _truncated_completions(lengths: list[tuple[int, int, int]]) -> int:
    """Pairs whose completions do not fit after the (possibly truncated) prompt."""
    return sum(1 for p, c, r in lengths if max(c, r) > MAX_LEN - min(p, MAX_PROMPT))


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_prompts_and_truncated_completions(tokenizer: Any, tmp_path: Path, policy: str) -> None:
    lengths = _expected_lengths(STANDARD, tokenizer)
    long = [x for x in lengths if x[0] > MAX_PROMPT]
    short = [x for x in lengths if x[0] <= MAX_PROMPT]
    assert 0 < len(long) < len(lengths), "the fixture must have prompts on both sides of the limit"
    cfg = _cfg(
        [{"path": str(STANDARD), "name": "std", "use": "train"}, _short_eval(tmp_path)],
        {"max_prompt_length": MAX_PROMPT, "max_length": MAX_LEN, "long_prompts": policy},
    )
    train, evals, report = build_dataset(cfg, tokenizer)
    std, short_eval = report.sources
    assert short_eval.truncated_prompts == short_eval.truncated_completions == 0 and short_eval.dropped == {}
    if policy == "drop":
        assert std.dropped == {PROMPT_TOO_LONG: len(long)}
        assert std.truncated_prompts == 0
        assert std.kept == std.train == len(train) == len(short)
        assert std.truncated_completions == _truncated_completions(short)
        assert all(len(encode_pair(p, tokenizer).prompt_ids) <= MAX_PROMPT for p in train)
    else:
        assert std.dropped == {}
        assert std.truncated_prompts == len(long)
        assert std.kept == std.train == len(train) == 6
        assert std.truncated_completions == _truncated_completions(lengths)
    assert std.truncated_completions > 0
    assert len(evals) == 2


def test_token_length_percentiles(tokenizer: Any, tmp_path: Path) -> None:
    lengths = _expected_lengths(STANDARD, tokenizer)
    cfg = _cfg([{"path": str(STANDARD), "name": "std", "use": "train"}, _short_eval(tmp_path)])
    _, _, report = build_dataset(cfg, tokenizer)
    for r in report.sources:
        assert set(r.token_lengths) == {"prompt", "chosen", "rejected"}
        for stats in r.token_lengths.values():
            assert set(stats) == {"p50", "p90", "p99", "max"}
            assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    std = report.sources[0].token_lengths
    for i, part in enumerate(("prompt", "chosen", "rejected")):
        values = sorted(x[i] for x in lengths)
        assert std[part]["max"] == values[-1]
        # 6 values: p50 is the nearest rank round(0.5 * 5) = index 3 (rounding half up)
        assert std[part]["p50"] == values[3]
        assert std[part]["p99"] == values[-1]


def test_sample_in_a_run(tokenizer: Any, tmp_path: Path) -> None:
    cfg = _cfg([{"path": str(STANDARD), "name": "std", "use": "train", "sample": 4}, _short_eval(tmp_path)])
    train, _, report = build_dataset(cfg, tokenizer)
    full, _ = load_source(_src(STANDARD, name="std"))
    assert report.sources[0].kept == report.sources[0].train == len(train) == 4
    assert set(train) < set(full)
    again, _, _ = build_dataset(cfg, tokenizer)
    assert again == train


def test_sample_follows_data_seed(tokenizer: Any, tmp_path: Path) -> None:
    samples = set()
    for seed in range(5):
        cfg = _cfg(
            [{"path": str(STANDARD), "name": "std", "use": "train", "sample": 3}, _short_eval(tmp_path)],
            {"seed": seed},
        )
        train, _, _ = build_dataset(cfg, tokenizer)
        samples.add(tuple(p.prompt for p in train))
    # 20 possible samples of 3 out of 6: five seeds drawing the same one means the seed is ignored.
    assert len(samples) > 1


@pytest.mark.parametrize(("weight", "n_train"), [(2.0, 12), (0.5, 3), (1.5, 9)])
def test_weight(tokenizer: Any, tmp_path: Path, weight: float, n_train: int) -> None:
    """6 training pairs: 2.0 repeats each twice; 0.5 keeps a seeded 3; 1.5 = all once + a seeded 3."""
    cfg = _cfg([{"path": str(STANDARD), "name": "std", "use": "train", "weight": weight}, _short_eval(tmp_path)])
    train, _, report = build_dataset(cfg, tokenizer)
    full, _ = load_source(_src(STANDARD, name="std"))
    assert report.sources[0].train == len(train) == report.train == n_train
    assert report.sources[0].kept == 6, "kept counts distinct pairs, before weighting"
    counts = {p: train.count(p) for p in full}
    if weight == 2.0:
        assert train == full + full
    elif weight == 0.5:
        assert sorted(counts.values()) == [0, 0, 0, 1, 1, 1]
        assert [p for p in full if counts[p]] == train, "a subsample keeps file order"
    else:
        assert sorted(counts.values()) == [1, 1, 1, 2, 2, 2]
        assert train[:6] == full
    again, _, _ = build_dataset(cfg, tokenizer)
    assert again == train


def test_weight_subsample_follows_data_seed(tokenizer: Any, tmp_path: Path) -> None:
    picks = set()
    for seed in range(5):
        cfg = _cfg(
            [{"path": str(STANDARD), "name": "std", "use": "train", "weight": 0.5}, _short_eval(tmp_path)],
            {"seed": seed},
        )
        train, _, _ = build_dataset(cfg, tokenizer)
        picks.add(tuple(p.prompt for p in train))
    assert len(picks) > 1


@pytest.mark.parametrize(
    ("partition", "data", "numbers"),
    [
        (
            {"strategy": "sequential", "num_steps": 8},
            {},
            "6 training pair(s) cannot fill 8 step(s) of at least 1 pair(s)",
        ),
        (
            {"strategy": "random", "num_steps": 2},
            {"min_pairs_per_step": 4},
            "6 training pair(s) cannot fill 2 step(s) of at least 4 pair(s)",
        ),
    ],
)
def test_too_few_pairs_for_the_steps(
    tokenizer: Any, tmp_path: Path, partition: dict[str, Any], data: dict[str, Any], numbers: str
) -> None:
    cfg = _cfg(
        [{"path": str(STANDARD), "name": "std", "use": "train"}, _short_eval(tmp_path)], data, partition=partition
    )
    with pytest.raises(DataError) as info:
        build_dataset(cfg, tokenizer)
    assert str(info.value) == f"not enough data: {numbers}"


def test_by_source_with_a_source_too_small(tokenizer: Any, tmp_path: Path) -> None:
    """tiny: 2 pairs, use=split -> 1 held out, 1 to train; each step needs 2."""
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(
        json.dumps({"prompt": "Red?", "chosen": "Yes.", "rejected": "No."})
        + "\n"
        + json.dumps({"prompt": "Blue?", "chosen": "Yes.", "rejected": "No."})
        + "\n",
        encoding="utf-8",
    )
    cfg = _cfg(
        [{"path": str(STANDARD), "name": "std", "use": "train"}, {"path": str(tiny), "name": "tiny"}],
        {"min_pairs_per_step": 2},
    )
    with pytest.raises(DataError) as info:
        build_dataset(cfg, tokenizer)
    assert str(info.value) == "not enough data: source 'tiny' leaves 1 training pair(s); its step needs 2"


def test_no_eval_pairs_at_all(tokenizer: Any) -> None:
    cfg = _cfg([{"path": str(STANDARD), "name": "std", "use": "train"}])
    with pytest.raises(DataError, match=r"^not enough data: no held-out eval pairs"):
        build_dataset(cfg, tokenizer)


def test_dirty_source_in_a_run(tokenizer: Any, tmp_path: Path) -> None:
    sources = [{"path": str(DIRTY), "name": "dirty", "use": "train"}, _short_eval(tmp_path)]
    with pytest.raises(DataError, match=rf"^{DIRTY}, line 3: missing field 'chosen'"):
        build_dataset(_cfg(sources), tokenizer)
    train, _, report = build_dataset(_cfg(sources, {"skip_bad_rows": True}), tokenizer)
    assert report.sources[0].dropped == DIRTY_DROPPED
    assert report.sources[0].train == len(train) == 4
