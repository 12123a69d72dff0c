"""Token ids beside a pairs file: written once, read instead of tokenizing, ignored when stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdpo_core import tokenization
from sdpo_core.config import DataConfig, ModelConfig
from sdpo_core.data import PreferencePair, read_pairs, write_pairs
from sdpo_core.model_io import load_tokenizer
from sdpo_core.tokenization import load_tokens, save_tokens, tokenize_pairs, tokenized_file, tokens_path

REPO = Path(__file__).resolve().parents[2]
CFG = DataConfig(max_length=48, max_prompt_length=16)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path=str(REPO / "models" / "stories260K")))


def _file(tmp_path: Path) -> Path:
    pairs = [
        PreferencePair(f"Once upon a time {i} " * (i + 1), f"good end {i}", f"bad end {i} " * 9, "s") for i in range(6)
    ]
    path = tmp_path / "pairs.jsonl"
    write_pairs(pairs, path)
    return path


def test_round_trip_equals_tokenizing(tmp_path, tokenizer) -> None:
    path = _file(tmp_path)
    expected = tokenize_pairs(read_pairs(path), tokenizer, CFG)
    assert any(len(t.prompt_ids) == CFG.max_prompt_length for t in expected), "truncation is exercised"
    save_tokens(path, expected, tokenizer, CFG)
    assert load_tokens(path, tokenizer, CFG) == expected


def test_a_matching_sidecar_is_read_instead_of_tokenizing(tmp_path, tokenizer, monkeypatch) -> None:
    path = _file(tmp_path)
    expected = tokenize_pairs(read_pairs(path), tokenizer, CFG)
    save_tokens(path, expected, tokenizer, CFG)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the sidecar should have been read")

    monkeypatch.setattr(tokenization, "tokenize_pairs", no_tokenizing)
    assert tokenized_file(path, tokenizer, CFG) == expected


def test_a_stale_sidecar_is_ignored(tmp_path, tokenizer) -> None:
    path = _file(tmp_path)
    tokenized = tokenize_pairs(read_pairs(path), tokenizer, CFG)
    save_tokens(path, tokenized, tokenizer, CFG)
    # Other length limits: the ids would differ.
    assert load_tokens(path, tokenizer, DataConfig(max_length=64, max_prompt_length=16)) is None
    # Another tokenizer (here: the same one with a chat template).
    templated = load_tokenizer(ModelConfig(name_or_path=str(REPO / "models" / "stories260K")))
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokens(path, templated, CFG) is None
    # The pairs file changed after the sidecar was written.
    path.write_text(path.read_text().replace("good end 0", "good end 9"))
    assert load_tokens(path, tokenizer, CFG) is None
    fresh = tokenized_file(path, tokenizer, CFG)
    assert fresh == tokenize_pairs(read_pairs(path), tokenizer, CFG) and fresh != tokenized


def test_a_corrupt_sidecar_is_ignored(tmp_path, tokenizer) -> None:
    path = _file(tmp_path)
    tokens_path(path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert load_tokens(path, tokenizer, CFG) is None
    assert tokenized_file(path, tokenizer, CFG) == tokenize_pairs(read_pairs(path), tokenizer, CFG)
