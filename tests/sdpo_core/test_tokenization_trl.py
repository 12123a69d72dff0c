"""Tokenization equal to TRL 1.16's DPOTrainer: prompt + completion tokenized whole and split at
the common prefix, checked against TRL's own dataset processing, with a Llama-2-style SentencePiece
tokenizer built offline (Prepend "▁" and Replace normalizer, byte fallback, a chat template) and
with the shipped tokenizer, with and without a chat template."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from sdpo_core.config import ModelConfig, SourceConfig  # noqa: E402
from sdpo_core.data import PreferencePair, load_source  # noqa: E402
from sdpo_core.model_io import load_model, load_tokenizer  # noqa: E402
from sdpo_core.tokenization import encode_pair, render_prompt  # noqa: E402
from tests.sdpo_core.conftest import no_checkpointing  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_CFG = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def sentencepiece_tokenizer() -> Any:
    """A tiny Llama-2-style tokenizer: unigram pieces with "▁" for spaces, a "▁" prepended to the
    text, byte fallback for anything else, BOS added in front."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["Hello", "world", "the", "time", "Once", "upon", "a", "story", "INST", "tell", "me", "yes", "no"]
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{i:02X}>", -20.0) for i in range(256)]
    pieces += [("▁", -3.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzHOTI[]/.,!?"]
    pieces += [(f"▁{w}", -1.0) for w in words] + [(w, -2.0) for w in words]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


def trl_ids(tokenizer: Any, examples: list[dict[str, Any]], tmp_path: Path) -> list[tuple[list[int], ...]]:
    """(prompt_ids, chosen_ids, rejected_ids) of each example as TRL's DPOTrainer prepares them."""
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), max_length=None, bf16=False, fp16=False, use_cpu=True,
        **no_checkpointing(DPOConfig), report_to=[], precompute_ref_log_probs=False,
    )  # fmt: skip
    model = load_model(MODEL_CFG)
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
    )
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]


def ours(pair: PreferencePair, tokenizer: Any) -> tuple[list[int], ...]:
    t = encode_pair(pair, tokenizer)
    return t.prompt_ids, t.chosen_ids, t.rejected_ids


def trl_example(pair: PreferencePair, tokenizer: Any) -> dict[str, Any]:
    """The same pair as TRL's input: the conversation, or our rendered prompt text followed by the
    completion text (our plain template puts a space between them; TRL appends EOS itself)."""
    if not isinstance(pair.prompt, str) and tokenizer.chat_template:
        return {
            "prompt": list(pair.prompt),
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        }
    text, templated = render_prompt(pair.prompt, tokenizer)
    sep = "" if templated else " "
    return {"prompt": text, "chosen": sep + pair.chosen, "rejected": sep + pair.rejected}


def test_sentencepiece_tokenizer_matches_trl(tmp_path: Path) -> None:
    tok = sentencepiece_tokenizer()
    pairs = [
        PreferencePair("Hello", "world", "the time", "s"),
        PreferencePair("Once upon a time", "a story", "no", "s"),
        PreferencePair(({"role": "user", "content": "tell me a story"},), "Once upon a time", "no", "s"),
        PreferencePair(({"role": "user", "content": "Hello"},), "yes, world!", "no.", "s"),
    ]
    expected = trl_ids(tok, [trl_example(p, tok) for p in pairs[:2]], tmp_path / "plain")
    expected += trl_ids(tok, [trl_example(p, tok) for p in pairs[2:]], tmp_path / "chat")
    assert [ours(p, tok) for p in pairs] == expected
    # The check bites: a completion tokenized alone gets a stray "▁" that the joint text does not.
    alone = tok(" world", add_special_tokens=False)["input_ids"]
    assert alone != expected[0][1][:-1], "tokenized alone, the first completion would differ from TRL's"


@pytest.mark.parametrize("chat_template", [False, True], ids=["plain", "chat-template"])
def test_shipped_tokenizer_matches_trl(tmp_path: Path, chat_template: bool) -> None:
    tok = load_tokenizer(MODEL_CFG)
    if chat_template:
        tok.chat_template = LLAMA2_TEMPLATE
    pairs = []
    for name, fmt in [
        ("orca_dpo_pairs_validation_msfoundry.jsonl", "openai"),
        ("llamafactory_dpo_en_demo.json", "sharegpt"),
        ("hh-rlhf_helpful-base_test.jsonl.gz", "hh"),
    ]:
        found, _ = load_source(SourceConfig(path=str(REPO / "data" / name), format=fmt, max_pairs=3, name=fmt))
        pairs.extend(found)
    # One TRL run per kind of example (TRL's dataset preparation takes one kind at a time).
    conversational = [p for p in pairs if not isinstance(p.prompt, str) and chat_template]
    plain = [p for p in pairs if p not in conversational]
    for i, group in enumerate(g for g in (plain, conversational) if g):
        assert [ours(p, tok) for p in group] == trl_ids(tok, [trl_example(p, tok) for p in group], tmp_path / str(i))
