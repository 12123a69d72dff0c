"""Sample generations (sdpo_core.generations): which eval prompts, how a conversation is rendered
for generation, seeded continuations on the tiny real model, and the side-by-side table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdpo_core.config import ModelConfig
from sdpo_core.generations import continue_prompts, eval_prompts, generations_table, prompt_text
from sdpo_core.model_io import load_model, load_tokenizer
from sdpo_core.pairs import PreferencePair
from sdpo_core.sampling import sample_completions

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "stories260K")
CHAT = ({"role": "user", "content": "Tell a story."},)


@pytest.fixture(scope="module")
def tiny(one_thread) -> tuple[Any, Any]:
    cfg = ModelConfig(name_or_path=MODEL)
    return load_model(cfg).eval(), load_tokenizer(cfg)


def _pair(prompt: Any, chosen: str = "a") -> PreferencePair:
    return PreferencePair(prompt, chosen, "b", "s")


def test_eval_prompts_are_the_first_distinct_ones_in_order() -> None:
    pairs = [_pair("One day"), _pair("One day", "c"), _pair(CHAT), _pair("Lily went"), _pair("Tom")]
    assert eval_prompts(pairs, 3) == ["One day", CHAT, "Lily went"]
    assert eval_prompts(pairs, 10) == ["One day", CHAT, "Lily went", "Tom"]
    assert eval_prompts(pairs, 0) == []


def test_a_conversation_is_rendered_as_training_renders_it(tiny) -> None:
    _, tokenizer = tiny
    assert prompt_text("Once upon a time", tokenizer) == "Once upon a time"
    # No chat template: the plain template, ending where the assistant's answer begins.
    assert prompt_text(CHAT, tokenizer) == "User: Tell a story.\n\nAssistant:"


def test_a_chat_template_s_leading_bos_is_not_doubled(tiny) -> None:
    _, base = tiny
    tokenizer = load_tokenizer(ModelConfig(name_or_path=MODEL))
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    text = prompt_text(CHAT, tokenizer)
    assert text == "[user] Tell a story.\n[assistant]"
    # Tokenized as sample_completions does (with special tokens): one BOS, at the start.
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert base.chat_template is None  # the fixture's tokenizer is untouched


def test_continuations_are_seeded_and_follow_sample_completions(tiny) -> None:
    model, tokenizer = tiny
    prompts = ["Once upon a time", CHAT]
    first = continue_prompts(model, tokenizer, prompts, max_new_tokens=12, seed=3)
    assert first == continue_prompts(model, tokenizer, prompts, max_new_tokens=12, seed=3)
    texts = ["Once upon a time", "User: Tell a story.\n\nAssistant:"]
    expected = sample_completions(model, tokenizer, texts, n=1, max_new_tokens=12, seed=3)
    assert first == [s[0] for s in expected] and all(first)
    assert first != continue_prompts(model, tokenizer, prompts, max_new_tokens=12, seed=4)


def test_generations_table_has_a_prompt_column_then_one_per_model() -> None:
    table = generations_table(["p1", "p2"], {"M0": ["a", "b"], "step-1": ["c", "d"]})
    assert list(table) == ["prompt", "M0", "step-1"] and table["step-1"] == ["c", "d"]
    with pytest.raises(ValueError, match=r"column 'step-1' has 1 texts for 2 prompts"):
        generations_table(["p1", "p2"], {"M0": ["a", "b"], "step-1": ["c"]})
    with pytest.raises(ValueError, match="may not be named 'prompt'"):
        generations_table(["p1"], {"prompt": ["x"]})


def test_the_settings_are_checked_and_named() -> None:
    from sdpo_core.config import ConfigError, from_dict

    base = {"model": {"name_or_path": MODEL}, "data": {"sources": [{"path": "x.jsonl"}]}}
    cfg = from_dict(base)
    assert (cfg.evaluate.samples, cfg.evaluate.sample_tokens) == (8, 32)
    assert from_dict(base | {"evaluate": {"samples": 0}}).evaluate.samples == 0  # off
    with pytest.raises(ConfigError) as info:
        from_dict(base | {"evaluate": {"samples": -1, "sample_tokens": 0}})
    assert "evaluate.samples: must be 0 (off) or more, got -1" in str(info.value)
    assert "evaluate.sample_tokens: must be at least 1, got 0" in str(info.value)
