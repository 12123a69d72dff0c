"""Reading, normalising, splitting and tokenizing preference data (shipped files and small written ones)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from sdpo_core.config import DataConfig, ModelConfig, SourceConfig
from sdpo_core.data import (
    DataError,
    PreferencePair,
    detect_format,
    load_source,
    read_pairs,
    render_plain,
    render_prompt,
    split_eval,
    tokenize_pair,
    write_pairs,
)
from sdpo_core.model_io import load_tokenizer
from sdpo_core.sources import iter_rows

REPO = Path(__file__).resolve().parents[2]
HH = REPO / "data" / "hh-rlhf_helpful-base_test.jsonl.gz"
ORCA = REPO / "data" / "orca_dpo_pairs_validation_msfoundry.jsonl"
SHAREGPT = REPO / "data" / "llamafactory_dpo_en_demo.json"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path=str(REPO / "models" / "stories260K")))


def _jsonl(tmp_path: Path, rows: list[Any], name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _src(path: Path, fmt: str = "auto", **kw: Any) -> SourceConfig:
    return SourceConfig(path=str(path), name=kw.pop("name", "s"), format=fmt, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Shipped formats


def test_hh_multi_turn_row() -> None:
    """Row 2 of the HH file has three Human turns; the prompt keeps the dialogue up to the last
    'Assistant:' as messages, the completions are the two final assistant texts."""
    pairs, report = load_source(_src(HH, "hh", name="hh", max_pairs=2))
    assert report.format == "hh" and report.kept == 2
    p = pairs[1]
    assert p.prompt == (
        {"role": "user", "content": "How can I find out what types of butterflies are in my area?"},
        {"role": "assistant", "content": "Which location are you in?"},
        {"role": "user", "content": "I am in Oregon."},
        {
            "role": "assistant",
            "content": "There are about 175 species of butterflies in Oregon, of which 100 are long-distance "
            "migrants from southern California.  Also, some of the common butterflies in Oregon",
        },
        {"role": "user", "content": "Great. What are some common species then?"},
    )
    assert p.chosen.startswith("About 150 species of butterflies live in Oregon")
    assert p.chosen.endswith("skippers, gossamer wings, and red admirals.")
    assert p.rejected.startswith("Are you interested in just the common butterflies?")
    assert p.rejected.endswith("because you have children?")
    assert "Human:" not in p.chosen and "Assistant:" not in p.rejected
    assert p.source == "hh"


def test_hh_single_turn_and_paragraphs(tmp_path: Path) -> None:
    """A blank line inside a turn stays in that turn; the completions are stripped."""
    row = {
        "chosen": "\n\nHuman: Hi.\n\nMore of my question.\n\nAssistant: Hello!\n\nSecond paragraph.",
        "rejected": "\n\nHuman: Hi.\n\nMore of my question.\n\nAssistant:  Go away.",
    }
    (p,), _ = load_source(_src(_jsonl(tmp_path, [row]), "hh"))
    assert p.prompt == ({"role": "user", "content": "Hi.\n\nMore of my question."},)
    assert p.chosen == "Hello!\n\nSecond paragraph."
    assert p.rejected == "Go away."


def test_hh_rows_that_do_not_share_the_dialogue(tmp_path: Path) -> None:
    row = {"chosen": "\n\nHuman: A?\n\nAssistant: yes", "rejected": "\n\nHuman: B?\n\nAssistant: no"}
    path = _jsonl(tmp_path, [row])
    with pytest.raises(DataError, match=r"line 1: .*do not share the dialogue"):
        load_source(_src(path, "hh"))


def test_openai_row() -> None:
    (p,), report = load_source(_src(ORCA, "openai", max_pairs=1))
    assert report.format == "openai"
    assert [m["role"] for m in p.prompt] == ["system", "user"]
    assert p.prompt[0]["content"].startswith("You are an AI assistant. User will you give you a task.")
    assert p.prompt[1]["content"].startswith("MM. Georges Colombier, Samad Seyidov")
    assert p.prompt[1]["content"].endswith("Translate to English")
    assert p.chosen.startswith("Step 1: Identify the names and phrases in the given text.")
    assert p.rejected.startswith("Sure, I'd be happy to help!")


def test_sharegpt_rows() -> None:
    """Item 0 is one human turn; item 1 is system + human; roles map human->user, gpt->assistant."""
    raw = json.loads(SHAREGPT.read_text(encoding="utf-8"))
    pairs, report = load_source(_src(SHAREGPT, "sharegpt"))
    assert report.format == "sharegpt" and report.rows == len(raw) == 300
    first = pairs[0]
    assert first.prompt == (
        {
            "role": "user",
            "content": "Hi! I'd like to create a new language game simulating the first person perspective "
            "of a character named Angela.",
        },
    )
    assert first.chosen.startswith("That sounds like a fun and engaging idea! Here are some tips")
    assert first.chosen == raw[0]["chosen"]["value"] and first.rejected == raw[0]["rejected"]["value"]
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user"]
    assert pairs[1].prompt[0]["content"].startswith("You are a teacher. Given a task, you explain in simple steps")
    multi = next(p for p in pairs if len(p.prompt) == 5)
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize(("path", "fmt"), [(HH, "implicit"), (ORCA, "openai"), (SHAREGPT, "sharegpt")])
def test_auto_detection_of_shipped_files(path: Path, fmt: str) -> None:
    _, first = next(iter_rows(_src(path, "auto")))
    assert detect_format(first) == fmt
    auto, report = load_source(_src(path, "auto", max_pairs=3))
    assert report.format == fmt
    explicit, _ = load_source(_src(path, fmt, max_pairs=3))
    assert auto == explicit and len(auto) == 3


def test_detect_format_keys() -> None:
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}) == "standard"
    assert detect_format({"chosen": "", "rejected": ""}) == "implicit"
    assert detect_format({"prompt": [], "chosen": [], "rejected": []}) == "conversational"
    assert (
        detect_format({"prompt": "", "chosen": "", "rejected": "", "score_chosen": 8, "score_rejected": 5}) == "scored"
    )
    assert detect_format({"conversations": [], "chosen": {}, "rejected": {}}) == "sharegpt"
    assert detect_format({"input": {}, "preferred_output": [], "non_preferred_output": []}) == "openai"
    assert detect_format({"text": ""}) == "unknown"
    assert detect_format([1, 2]) == "unknown"


# ---------------------------------------------------------------------------------------------
# The standard format, written here


def test_standard_string_and_conversational_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "Hello there."}],
            "rejected": [{"role": "assistant", "content": "Whatever."}],
        },
    ]
    pairs, report = load_source(_src(_jsonl(tmp_path, rows), name="mine"))
    assert report.format == "standard" and report.rows == 2 and report.kept == 2
    assert pairs[0] == PreferencePair("Say hi.", "Hi!", "No.", "mine")
    assert pairs[1] == PreferencePair(
        ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}),
        "Hello there.",
        "Whatever.",
        "mine",
    )


def test_json_array_and_gzip_files(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    zipped = tmp_path / "pairs.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    a, _ = load_source(_src(array))
    z, _ = load_source(_src(zipped))
    assert [p.chosen for p in a] == [p.chosen for p in z] == ["c0", "c1", "c2"]


def test_max_pairs_takes_the_first(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    pairs, report = load_source(_src(_jsonl(tmp_path, rows), max_pairs=2))
    assert [p.prompt for p in pairs] == ["p0", "p1"] and report.kept == 2


def test_empty_and_identical_completions_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "chosen": "yes", "rejected": "no"},
        {"prompt": "b", "chosen": "   ", "rejected": "no"},
        {"prompt": "c", "chosen": "yes", "rejected": ""},
        {"prompt": "d", "chosen": "same", "rejected": "same"},
        {"prompt": "e", "chosen": "ok", "rejected": "bad"},
    ]
    pairs, report = load_source(_src(_jsonl(tmp_path, rows)))
    assert [p.prompt for p in pairs] == ["a", "e"]
    assert report.rows == 5 and report.kept == 2
    assert report.dropped == {"empty completion": 2, "chosen identical to rejected": 1}


def test_no_usable_pairs(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "chosen": "", "rejected": "x"}])
    with pytest.raises(DataError, match=r"no usable pairs \(1 rows read"):
        load_source(_src(path))


# ---------------------------------------------------------------------------------------------
# Errors name the file and the row


@pytest.mark.parametrize("fmt", ["auto", "standard"])
def test_row_without_chosen_names_file_and_line(tmp_path: Path, fmt: str) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "rejected": "y"}])
    with pytest.raises(DataError) as info:
        load_source(_src(path, fmt))
    msg = str(info.value)
    assert f"{path}, line 2" in msg and "'chosen'" in msg


def test_first_row_of_unknown_shape(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "rejected": "y"}])
    with pytest.raises(DataError, match=r"line 1: cannot tell the data format.*\['prompt', 'rejected'\]"):
        load_source(_src(path))


def test_invalid_json_names_line_3(tmp_path: Path) -> None:
    """Blank lines count: the bad row is on physical line 3."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}, line 3: not valid JSON"):
        load_source(_src(path))


def test_bad_item_in_json_array(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(
        json.dumps([{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": 3, "rejected": "y"}])
    )
    with pytest.raises(DataError, match=rf"{path}, item 1: field 'chosen' must be"):
        load_source(_src(path, "standard"))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=rf"{missing}: data file not found"):
        load_source(_src(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{empty}: the file is empty"):
        load_source(_src(empty))


# ---------------------------------------------------------------------------------------------
# Split and storage


def _pairs(source: str, n: int) -> list[PreferencePair]:
    return [PreferencePair(f"{source} prompt {i}", f"good {i}", f"bad {i}", source) for i in range(n)]


def test_split_eval_sizes_sides_and_determinism() -> None:
    """Source a: 30 distinct pairs (+3 duplicates), eval_fraction 0.2 -> round(6.0) = 6 held-out ids;
    source b: 10 distinct -> 2."""
    a, b = _pairs("a", 30), _pairs("b", 10)
    pairs = a + b[:5] + [a[0], a[7], a[7]] + b[5:]
    cfg = DataConfig(eval_fraction=0.2, eval_max_pairs=64, seed=0)
    train, evals = split_eval(pairs, cfg)
    assert len(train) + len(evals) == len(pairs)
    train_ids, eval_ids = {p.id for p in train}, {p.id for p in evals}
    assert not train_ids & eval_ids
    assert len({p.id for p in evals if p.source == "a"}) == 6
    assert len({p.id for p in evals if p.source == "b"}) == 2
    assert [p for p in pairs if p.id in eval_ids] == evals, "each side keeps the input order"
    assert [p for p in pairs if p.id in train_ids] == train
    assert split_eval(pairs, cfg) == (train, evals)
    _, other = split_eval(pairs, DataConfig(eval_fraction=0.2, eval_max_pairs=64, seed=1))
    assert {p.id for p in other} != eval_ids
    _, capped = split_eval(pairs, DataConfig(eval_fraction=0.2, eval_max_pairs=3, seed=0))
    assert len({p.id for p in capped if p.source == "a"}) == 3


def test_split_eval_too_few_pairs() -> None:
    one = _pairs("tiny", 1)
    with pytest.raises(DataError, match="'tiny': 1 distinct pair"):
        split_eval(one * 3 + _pairs("b", 10), DataConfig())


def test_pair_id_is_content_based() -> None:
    p = PreferencePair("x", "y", "z", "s")
    assert p.id == PreferencePair("x", "y", "z", "s").id
    assert len({p.id, PreferencePair("x", "y", "z", "t").id, PreferencePair("x", "z", "y", "s").id}) == 3


def test_write_and_read_pairs_round_trip(tmp_path: Path) -> None:
    pairs = [
        PreferencePair("plain", "a", "b", "s"),
        PreferencePair(({"role": "user", "content": "héllo"},), "c", "d", "t"),
    ]
    h = write_pairs(pairs, tmp_path / "sub" / "pairs.jsonl")
    assert read_pairs(tmp_path / "sub" / "pairs.jsonl") == pairs
    assert h == write_pairs(list(pairs), tmp_path / "again.jsonl")
    assert h != write_pairs(pairs[::-1], tmp_path / "reversed.jsonl")


# ---------------------------------------------------------------------------------------------
# Rendering and tokenization


def test_render_plain() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert render_plain(msgs) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"


def test_tokenize_pair_plain(tokenizer) -> None:
    """No chat template: the plain rendering with BOS, completions after a space and ending with EOS."""
    pair = PreferencePair(({"role": "user", "content": "Where is the ball?"},), "It is red.", "No.", "s")
    tp = tokenize_pair(pair, tokenizer, DataConfig(max_length=128, max_prompt_length=64))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (bos, eos) == (1, 2)
    assert tp.prompt_ids == tokenizer("User: Where is the ball?\n\nAssistant:")["input_ids"]
    assert tp.prompt_ids[0] == bos and tp.prompt_ids.count(bos) == 1
    assert tp.chosen_ids == tokenizer(" It is red.", add_special_tokens=False)["input_ids"] + [eos]
    assert tp.rejected_ids == tokenizer(" No.", add_special_tokens=False)["input_ids"] + [eos]
    assert tokenizer.decode(tp.chosen_ids, skip_special_tokens=True).strip() == "It is red."


def test_tokenize_pair_truncation(tokenizer) -> None:
    """max_prompt_length 16: BOS + the last 15 prompt tokens; max_length 48: the long completion keeps
    its first 48 - 16 = 32 tokens (and so loses its EOS); the short one is whole, with EOS."""
    prompt = " ".join(f"step {i}" for i in range(60)) + " the end"
    long = " ".join(f"word{i}" for i in range(80))
    pair = PreferencePair(prompt, long, "Short.", "s")
    tp = tokenize_pair(pair, tokenizer, DataConfig(max_length=48, max_prompt_length=16))
    full_prompt = tokenizer(prompt)["input_ids"]
    full_long = tokenizer(" " + long, add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 16 and len(full_long) > 32
    assert tp.prompt_ids == [tokenizer.bos_token_id] + full_prompt[-15:]
    assert tokenizer.decode(tp.prompt_ids[1:]).endswith("the end")
    assert tp.chosen_ids == full_long[:32]
    assert len(tp.prompt_ids) + len(tp.chosen_ids) == 48
    assert tp.rejected_ids == tokenizer(" Short.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_tokenize_pair_prompt_length_one(tokenizer) -> None:
    pair = PreferencePair("a long prompt of several tokens", "yes", "no", "s")
    tp = tokenize_pair(pair, tokenizer, DataConfig(max_length=8, max_prompt_length=1))
    assert tp.prompt_ids == [tokenizer.bos_token_id]


class RecordingTokenizer:
    """Delegates to a real tokenizer and records the texts it is asked to tokenize.

    stories260K's normaliser drops leading spaces, so the ids alone cannot show the space that
    separates a plain prompt from its completion; the recorded texts can.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, bool]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, text: str, add_special_tokens: bool = True):
        self.calls.append((text, add_special_tokens))
        return self.inner(text, add_special_tokens=add_special_tokens)


def test_tokenize_pair_texts(tokenizer) -> None:
    """Plain: the rendered prompt, then the prompt + " " + each completion, all tokenized whole with
    special tokens (as TRL: the completion is what follows their common prefix)."""
    msgs = ({"role": "user", "content": "Hi"},)
    pair = PreferencePair(msgs, "Yes.", "No.", "s")
    rec = RecordingTokenizer(tokenizer)
    tokenize_pair(pair, rec, DataConfig())
    assert rec.calls == [
        ("User: Hi\n\nAssistant:", True),
        ("User: Hi\n\nAssistant: Yes.", True),
        ("User: Hi\n\nAssistant: No.", True),
    ]


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_tokenize_pair_uses_the_chat_template(tokenizer) -> None:
    """With a chat template the prompt is the template's text (its BOS, none added twice) and the
    completion follows with no extra space."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    msgs = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"})
    text, templated = render_prompt(msgs, tok)
    assert templated and text == "<s><|system|>Be brief.\n<|user|>Hi there\n<|assistant|>"
    tp = tokenize_pair(
        PreferencePair(msgs, "Hello.", "Go.", "s"), tok, DataConfig(max_length=128, max_prompt_length=96)
    )
    assert tp.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tp.prompt_ids[0] == tok.bos_token_id and tp.prompt_ids.count(tok.bos_token_id) == 1
    # The completion is the assistant's turn as the template renders the whole conversation (as
    # TRL does): its text and the template's end of turn, with no EOS of our own.
    whole = tok.apply_chat_template([*msgs, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert whole == text + "Hello.\n"
    assert tp.chosen_ids == tok(whole, add_special_tokens=False)["input_ids"][len(tp.prompt_ids) :]
    assert tok.decode(tp.chosen_ids) == "Hello.\n"
    plain = tokenize_pair(PreferencePair(msgs, "Hello.", "Go.", "s"), tokenizer, DataConfig())
    assert plain.prompt_ids != tp.prompt_ids
    # A plain-string prompt is not templated.
    assert render_prompt("Just text", tok) == ("Just text", False)


def _grouped(source: str, prompts: int, per_prompt: int) -> list[PreferencePair]:
    """UltraFeedback-style data: several pairs (different completions) under each prompt."""
    return [
        PreferencePair(f"{source} prompt {i}", f"good {i}.{j}", f"bad {i}.{j}", source)
        for i in range(prompts)
        for j in range(per_prompt)
    ]


def test_split_eval_keeps_each_prompt_on_one_side() -> None:
    pairs = _grouped("uf", 20, 3)  # 60 pairs, 20 prompts
    for seed in range(5):
        train, evals = split_eval(pairs, DataConfig(eval_fraction=0.2, seed=seed))
        assert not {p.prompt_key for p in train} & {p.prompt_key for p in evals}, seed
        assert len(evals) == 12, "0.2 of 60 pairs: 4 whole prompts of 3 pairs"
        assert len(train) + len(evals) == 60


def test_split_eval_of_distinct_prompts_is_pair_by_pair() -> None:
    """Each prompt once: the same split as by pair (the shipped data's split did not change)."""
    from sdpo_core.hashing import sha256_bytes

    pairs = _grouped("s", 30, 1)
    _, evals = split_eval(pairs, DataConfig(eval_fraction=0.2, seed=3))
    by_hash = sorted(pairs, key=lambda p: sha256_bytes(f"3:{p.id}"))[:6]
    assert {p.id for p in evals} == {p.id for p in by_hash}


def test_split_eval_one_prompt_cannot_be_split() -> None:
    with pytest.raises(DataError, match=r"'one': 4 distinct pair\(s\) under 1 prompt\(s\) are too few"):
        split_eval(_grouped("one", 1, 4), DataConfig())


def test_the_leakage_check_drops_training_pairs_whose_prompt_is_held_out(tokenizer, tmp_path) -> None:
    """A prompt of the eval-only source appears, with other completions, in a training source:
    those training pairs are dropped and counted under 'prompt also in eval split'."""
    from sdpo_core.config import RunConfig
    from sdpo_core.data import PROMPT_IN_EVAL, build_dataset

    train_rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
    eval_rows = [{"prompt": "q1", "chosen": "other yes", "rejected": "other no"}]
    for name, rows in (("t", train_rows), ("e", eval_rows)):
        _jsonl(tmp_path, rows, f"{name}.jsonl")
    cfg = RunConfig(
        data=DataConfig(
            sources=(
                SourceConfig(path=str(tmp_path / "t.jsonl"), name="t", format="standard", use="train"),
                SourceConfig(path=str(tmp_path / "e.jsonl"), name="e", format="standard", use="eval"),
            )
        ),
        partition={"strategy": "sequential", "num_steps": 1},
    )
    train, evals, report = build_dataset(cfg, tokenizer)
    assert [p.prompt for p in evals] == ["q1"]
    assert sorted(p.prompt for p in train) == ["q0", "q2", "q3", "q4", "q5"]
    assert {r.name: r.dropped for r in report.sources}["t"] == {PROMPT_IN_EVAL: 1}
