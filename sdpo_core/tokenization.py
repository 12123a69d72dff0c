"""Prompt rendering and tokenization of preference pairs, with the truncation policy.

Conversational prompts are rendered with the tokenizer's chat template when it has one;
otherwise with the plain template of :func:`render_plain`:
``"System: ...\n\nUser: ...\n\nAssistant: ...\n\nUser: ...\n\nAssistant:"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdpo_core.config import DataConfig
from sdpo_core.logprobs import TokenizedPair
from sdpo_core.pairs import Message, PreferencePair

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_plain(messages: Sequence[Message]) -> str:
    """The plain template for tokenizers without a chat template.

    Each message becomes ``"<Role>: <content>"`` (System, User, Assistant), messages are joined by
    a blank line, and the prompt ends with ``"\\n\\nAssistant:"``; the completion follows after a
    space.
    """
    turns = [f"{PLAIN_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def render_prompt(prompt: str | Sequence[Message], tokenizer: Any) -> tuple[str, bool]:
    """The prompt as text, and whether that text already holds the special tokens (BOS)."""
    if isinstance(prompt, str):
        return prompt, False
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return text, True
    return render_plain(prompt), False


def encode_pair(pair: PreferencePair, tokenizer: Any) -> TokenizedPair:
    """Token ids of one pair, untruncated: prompt (with BOS), completions (with EOS)."""
    text, templated = render_prompt(pair.prompt, tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sep = "" if templated else " "
    chosen = tokenizer(sep + pair.chosen, add_special_tokens=False)["input_ids"] + eos
    rejected = tokenizer(sep + pair.rejected, add_special_tokens=False)["input_ids"] + eos
    return TokenizedPair(prompt_ids, chosen, rejected)


def tokenize_pair(pair: PreferencePair, tokenizer: Any, cfg: DataConfig) -> TokenizedPair:
    """Token ids of one pair: prompt (with BOS), completions (with EOS), truncated.

    A prompt longer than ``max_prompt_length`` keeps its end; completions keep their start and
    are cut so that prompt + completion fits ``max_length``.
    """
    return truncate_pair(encode_pair(pair, tokenizer), cfg, tokenizer.bos_token_id)


def truncate_pair(full: TokenizedPair, cfg: DataConfig, bos: int | None) -> TokenizedPair:
    """Apply the truncation policy to an untruncated pair."""
    prompt_ids = full.prompt_ids
    if len(prompt_ids) > cfg.max_prompt_length:
        # Keep a leading BOS, then the end of the prompt (the most recent turns).
        head = prompt_ids[:1] if bos is not None and prompt_ids[0] == bos else []
        n_keep = cfg.max_prompt_length - len(head)
        prompt_ids = head + (prompt_ids[len(prompt_ids) - n_keep :] if n_keep > 0 else [])
    room = cfg.max_length - len(prompt_ids)
    return TokenizedPair(prompt_ids, full.chosen_ids[:room], full.rejected_ids[:room])


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, cfg: DataConfig) -> list[TokenizedPair]:
    """:func:`tokenize_pair` of each pair, in order."""
    return [tokenize_pair(p, tokenizer, cfg) for p in pairs]
