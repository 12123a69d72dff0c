"""Prompt rendering and tokenization of preference pairs, with the truncation policy.

Conversational prompts are rendered with the tokenizer's chat template when it has one;
otherwise with the plain template of :func:`render_plain`:
``"System: ...\n\nUser: ...\n\nAssistant: ...\n\nUser: ...\n\nAssistant:"``.

A chat template is code that comes with the model: each rendering runs under a time limit
(:data:`CHAT_TEMPLATE_TIME_LIMIT_S`), and a template that raises or runs past it is a
:class:`TemplateFailed` naming the tokenizer (a DataError; the caller adds the row).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from sdpo_core.config import DataConfig
from sdpo_core.files import atomic_path
from sdpo_core.hashing import sha256_bytes, sha256_file, sha256_json
from sdpo_core.logprobs import TokenizedPair
from sdpo_core.pairs import DataError, Message, PreferencePair, read_pairs
from sdpo_core.time_limit import TimeLimitExceeded, call_with_time_limit

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

CHAT_TEMPLATE_TIME_LIMIT_S = 30.0
"""The longest one rendering (and tokenization) of a prompt with a chat template may take. A real
template renders in well under a millisecond and the longest prompt kept (dataset.MAX_PAIR_CHARS)
tokenizes in seconds; a template that runs longer is looping (nested loops, jinja's sandbox caps
only a single range), and would otherwise hang the run."""


class TemplateFailed(DataError):
    """A chat template that raised, or ran past its time limit, on a prompt."""


def _apply_chat_template(tokenizer: Any, messages: list[Any], **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template`` under the time limit, its failures as TemplateFailed."""
    name = f"the chat template of {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}"
    try:
        return call_with_time_limit(
            lambda: tokenizer.apply_chat_template(messages, **kwargs), CHAT_TEMPLATE_TIME_LIMIT_S
        )
    except TimeLimitExceeded:
        raise TemplateFailed(f"{name} did not finish within {CHAT_TEMPLATE_TIME_LIMIT_S:g} s (does it loop?)") from None
    except Exception as exc:  # jinja's TemplateError, or anything the template's code raised
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise TemplateFailed(f"{name} failed: {type(exc).__name__}: {detail}") from None


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
        text = _apply_chat_template(tokenizer, list(prompt), tokenize=False, add_generation_prompt=True)
        return text, True
    return render_plain(prompt), False


def encode_pair(pair: PreferencePair, tokenizer: Any) -> TokenizedPair:
    """Token ids of one pair, untruncated: prompt (with BOS), completions (ending with EOS).

    As TRL 1.16's DPOTrainer does it: the prompt and each prompt + completion are tokenized whole,
    and a completion is what follows their common prefix (the shorter one of the two completions).
    SentencePiece tokenizers merge or mark the boundary differently when a completion is tokenized
    alone (a stray "▁", another first token). A conversational prompt under a chat template is
    rendered with the completion as the assistant's turn, so the completion ends with the template's
    own end of turn; otherwise the prompt text is followed by a space, the completion and EOS.
    """
    if not isinstance(pair.prompt, str) and getattr(tokenizer, "chat_template", None):
        messages = list(pair.prompt)
        prompt_ids = _chat_ids(tokenizer, messages, add_generation_prompt=True)
        joint = [_chat_ids(tokenizer, [*messages, {"role": "assistant", "content": c}]) for c in pair.completions]
        eos: list[int] = []
    else:
        text, templated = render_prompt(pair.prompt, tokenizer)
        special = not templated
        sep = "" if templated else " "
        prompt_ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        joint = [tokenizer(text + sep + c, add_special_tokens=special)["input_ids"] for c in pair.completions]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n = min(_common_prefix(prompt_ids, ids) for ids in joint)
    return TokenizedPair(prompt_ids[:n], joint[0][n:] + eos, joint[1][n:] + eos)


def _chat_ids(tokenizer: Any, messages: list[Any], add_generation_prompt: bool = False) -> list[int]:
    out = _apply_chat_template(
        tokenizer, messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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


# Token ids beside a pairs file: ``<file>.tokens.safetensors`` holds each pair's truncated ids (the
# three parts flattened, with offsets), row for row, and in its metadata what they depend on: the
# pairs file's sha256, the tokenizer and the length limits. A stage that finds a matching sidecar
# reads the ids instead of tokenizing again; a stale or missing one is ignored.
PARTS = ("prompt", "chosen", "rejected")
TOKENIZATION = "joint-1"
"""How :func:`encode_pair` splits a pair (joint, as TRL 1.16): a sidecar of another method is stale."""


def tokens_path(pairs_path: str | Path) -> Path:
    return Path(f"{pairs_path}.tokens.safetensors")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content id of a tokenizer's behaviour: its full pipeline (fast tokenizers) or vocabulary,
    special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return sha256_json(
        {
            "class": type(tokenizer).__name__,
            "body": sha256_bytes(body),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)],
        }
    )


def _sidecar_meta(pairs_path: str | Path, tokenizer: Any, cfg: DataConfig) -> dict[str, str]:
    return {
        "pairs_sha256": sha256_file(pairs_path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": str(cfg.max_length),
        "max_prompt_length": str(cfg.max_prompt_length),
        "method": TOKENIZATION,
    }


def save_tokens(pairs_path: str | Path, tokenized: Sequence[TokenizedPair], tokenizer: Any, cfg: DataConfig) -> Path:
    """Write the sidecar of a pairs file; ``tokenized`` follows the file row for row."""
    tensors: dict[str, torch.Tensor] = {}
    for part in PARTS:
        rows = [getattr(t, f"{part}_ids") for t in tokenized]
        lengths = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int64)
        tensors[f"{part}_offsets"] = lengths.cumsum(0)
        tensors[f"{part}_ids"] = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    with atomic_path(tokens_path(pairs_path)) as tmp:
        save_file(tensors, str(tmp), metadata=_sidecar_meta(pairs_path, tokenizer, cfg))
    return tokens_path(pairs_path)


def load_tokens(pairs_path: str | Path, tokenizer: Any, cfg: DataConfig) -> list[TokenizedPair] | None:
    """The sidecar's ids when it matches the file, the tokenizer and the limits; else None."""
    path = tokens_path(pairs_path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != _sidecar_meta(pairs_path, tokenizer, cfg):
                return None
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        return None
    parts = {}
    for part in PARTS:
        ids, offsets = tensors[f"{part}_ids"].tolist(), tensors[f"{part}_offsets"].tolist()
        parts[part] = [ids[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    return [TokenizedPair(p, c, r) for p, c, r in zip(parts["prompt"], parts["chosen"], parts["rejected"], strict=True)]


def tokenized_file(pairs_path: str | Path, tokenizer: Any, cfg: DataConfig) -> list[TokenizedPair]:
    """The token ids of every pair of a JSON-lines file: from its sidecar when that matches,
    else by tokenizing the file."""
    found = load_tokens(pairs_path, tokenizer, cfg)
    if found is not None:
        return found
    return tokenize_pairs(read_pairs(Path(pairs_path)), tokenizer, cfg)
