"""Row formats: one row of any supported format to a prompt, a chosen and a rejected answer.

Every row becomes a :class:`~sdpo_core.pairs.PreferencePair` (prompt, chosen, rejected,
source). The prompt is a list of chat messages (conversational; multi-turn prompts stay
multi-turn) or a plain string; chosen and rejected are the assistant completions as strings.
Formats (``format`` of a source):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``conversational``: TRL's form: ``prompt`` a list of role/content messages, ``chosen`` and
  ``rejected`` lists of assistant messages (a string completion is taken as well).
- ``implicit`` (alias ``hh``): only ``chosen`` and ``rejected``, the prompt being their shared
  start: Anthropic HH-RLHF transcripts (``"\n\nHuman: ...\n\nAssistant: ..."``; the prompt is the
  dialogue up to the last ``Assistant:`` turn) or message lists (the shared leading messages).
- ``openai``: OpenAI's preference fine-tuning format: ``input.messages``, ``preferred_output``
  and ``non_preferred_output`` (lists of assistant messages).
- ``sharegpt``: ``conversations`` [{from, value}], ``chosen`` and ``rejected`` {from, value}.
- ``scored``: UltraFeedback style: ``chosen`` and ``rejected`` (strings or message lists, with or
  without a ``prompt``) and their ratings (``score_chosen``/``score_rejected``, or
  ``chosen_rating``/``rejected_rating``, ...). Ties, pairs whose rejected side scores higher, and
  pairs with a score that is not a finite number (NaN, infinite, or beyond a float's range) are
  dropped and counted.
- ``pairwise``: arena style: ``prompt``, ``response_a``, ``response_b`` (strings or message lists)
  and ``winner``: ``a`` (or ``model_a``) makes response_a the chosen answer, ``b`` (``model_b``)
  response_b; ties (``tie``, ``tie (bothbad)``) are dropped and counted.
- any other schema through ``columns``, a mapping from the roles above to the source's columns.
"""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any

from sdpo_core.pairs import (
    DIVERGED,
    MISSING_FIELD,
    NON_FINITE_SCORE,
    NON_STRING_FIELD,
    REVERSED_SCORES,
    TIED_SCORES,
    TIED_WINNER,
    UNPARSEABLE,
    Message,
)


class BadRow(ValueError):
    """A row that does not fit its format; ``reason`` is one of the drop reasons, ``hint`` what to
    do about it, added to the error when the row stops the run (not to a skipped row's note)."""

    def __init__(self, reason: str, message: str, hint: str = "") -> None:
        self.reason = reason
        self.hint = hint
        super().__init__(message)


class DroppedRow(ValueError):
    """A well-formed row that cannot teach a preference (e.g. tied scores)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = 20
_SHORT.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr`` cut to a few lines and levels: a row's value in a message (a row may hold a 60 MB
    string or lists nested a thousand deep)."""
    return _SHORT.repr(value)


SCORE_KEYS = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
    ("chosen-rating", "rejected-rating"),
)


def _score_keys(row: dict[str, Any]) -> tuple[str, str] | None:
    return next((pair for pair in SCORE_KEYS if pair[0] in row and pair[1] in row), None)


def detect_format(row: Any) -> str:
    """The format of a row, from its keys ("unknown" when none fits)."""
    if not isinstance(row, dict):
        return "unknown"
    keys = set(row)
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"response_a", "response_b", "winner"} <= keys:
        return "pairwise"
    if {"chosen", "rejected"} <= keys and _score_keys(row):
        return "scored"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    if {"chosen", "rejected"} <= keys:
        return "implicit"
    return "unknown"


def _field(row: dict[str, Any], key: str) -> Any:
    if key not in row or row[key] is None:
        raise BadRow(MISSING_FIELD, f"missing field {key!r}")
    return row[key]


def _require_str(row: dict[str, Any], key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise BadRow(NON_STRING_FIELD, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise BadRow(NON_STRING_FIELD, f"field {key!r} must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(NON_STRING_FIELD, f"field {key!r}: every message needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _completion(value: Any, key: str) -> tuple[tuple[Message, ...], str]:
    """(messages before the answer, the answer) of a string or a list of messages."""
    if isinstance(value, str):
        return (), value
    msgs = _messages(value, key)
    if msgs[-1]["role"] != "assistant":
        raise BadRow(NON_STRING_FIELD, f"field {key!r}: the last message must be the assistant's")
    return msgs[:-1], msgs[-1]["content"]


_HH_TURN = {"Human": "user", "Assistant": "assistant"}


def _split_hh(text: str) -> list[Message]:
    """'\n\nHuman: a\n\nAssistant: b' -> [{'role': 'user', ...}, {'role': 'assistant', ...}]."""
    msgs: list[Message] = []
    for part in text.split("\n\n"):
        for speaker, role in _HH_TURN.items():
            if part.startswith(speaker + ":"):
                msgs.append({"role": role, "content": part[len(speaker) + 1 :].strip()})
                break
        else:
            if not msgs:
                if part.strip():
                    raise BadRow(UNPARSEABLE, "transcript does not start with a 'Human:' turn")
                continue
            # A paragraph break inside a turn.
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n\n" + part).strip()
    return msgs


# Dialogues that part before the last answer are two conversations, not one preference: no single
# prompt fits both (the shipped HH-RLHF helpful-base test file has 2 in 2,354 rows). They stay an
# error by default, as every other row that does not parse, and the error says how to skip them.
_SKIP_HINT = (
    ": the dialogues diverge before the last assistant turn, so the row is not one preference;"
    " set data.skip_bad_rows=true to skip such rows (counted as 'dialogues diverge before the last turn')"
)


def _parse_implicit(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    chosen_raw, rejected_raw = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        chosen_msgs, rejected_msgs = _messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected")
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise BadRow(
                DIVERGED, "'chosen' and 'rejected' do not share the messages before the last answer", _SKIP_HINT
            )
        prompt, chosen = _completion(list(chosen_msgs), "chosen")
        _, rejected = _completion(list(rejected_msgs), "rejected")
        if not prompt:
            raise BadRow(UNPARSEABLE, "no prompt messages before the answers")
        return prompt, chosen, rejected
    chosen, rejected = _require_str(row, "chosen"), _require_str(row, "rejected")
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0:
        raise BadRow(UNPARSEABLE, "'chosen' has no 'Assistant:' turn")
    prefix = chosen[: cut + len(marker)]
    if not rejected.startswith(prefix):
        raise BadRow(
            DIVERGED, "'chosen' and 'rejected' do not share the dialogue up to the last 'Assistant:' turn", _SKIP_HINT
        )
    prompt = tuple(_split_hh(chosen[:cut]))
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow(UNPARSEABLE, "the prompt must end with a 'Human:' turn")
    return prompt, chosen[cut + len(marker) :].strip(), rejected[cut + len(marker) :].strip()


_SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _parse_sharegpt(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    conv = _field(row, "conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRow(NON_STRING_FIELD, "field 'conversations' must be a non-empty list")
    prompt = []
    for turn in conv:
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in _SHAREGPT_ROLE
            or not isinstance(turn.get("value"), str)
        ):
            raise BadRow(
                NON_STRING_FIELD,
                "field 'conversations': every turn needs 'from' (human, gpt, system) and a string 'value'",
            )
        prompt.append({"role": _SHAREGPT_ROLE[turn["from"]], "content": turn["value"]})
    out = []
    for key in ("chosen", "rejected"):
        value = _field(row, key)
        if isinstance(value, dict) and isinstance(value.get("value"), str):
            out.append(value["value"])
        elif isinstance(value, str):
            out.append(value)
        else:
            raise BadRow(NON_STRING_FIELD, f"field {key!r} must be {{from, value}} or a string")
    return tuple(prompt), out[0], out[1]


def _parse_openai(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    inp = _field(row, "input")
    if not isinstance(inp, dict):
        raise BadRow(NON_STRING_FIELD, "field 'input' must be an object with 'messages'")
    prompt = _messages(inp.get("messages"), "input.messages")
    _, chosen = _completion(_field(row, "preferred_output"), "preferred_output")
    _, rejected = _completion(_field(row, "non_preferred_output"), "non_preferred_output")
    return prompt, chosen, rejected


def _parse_standard(row: dict[str, Any]) -> tuple[str | tuple[Message, ...], str, str]:
    raw = _field(row, "prompt")
    prompt: str | tuple[Message, ...] = raw if isinstance(raw, str) else _messages(raw, "prompt")
    before_c, chosen = _completion(_field(row, "chosen"), "chosen")
    before_r, rejected = _completion(_field(row, "rejected"), "rejected")
    # Some sets (UltraFeedback binarized) repeat the prompt inside the completions' messages:
    # keep those turns, so a multi-turn prompt stays multi-turn.
    if before_c and before_c == before_r and not isinstance(prompt, str) and len(before_c) > len(prompt):
        prompt = before_c
    elif before_c and before_c == before_r and isinstance(prompt, str):
        prompt = before_c
    return prompt, chosen, rejected


def _parse_scored(row: dict[str, Any]) -> tuple[str | tuple[Message, ...], str, str]:
    keys = _score_keys(row)
    if keys is None:
        raise BadRow(MISSING_FIELD, "missing ratings (score_chosen/score_rejected or chosen_rating/rejected_rating)")
    scores = []
    for key in keys:
        value = row[key]
        try:
            scores.append(float(value))
        except OverflowError:  # an integer beyond a float's range: not a finite score
            scores.append(math.inf)
        except (TypeError, ValueError):
            raise BadRow(NON_STRING_FIELD, f"field {key!r} must be a number, got {short_repr(value)}") from None
    parsed = _parse_standard(row) if "prompt" in row else _parse_implicit(row)
    # NaN and infinite scores (JSON's NaN and Infinity, 1e999, "nan") order nothing: such a pair is
    # dropped and counted, never trained on.
    if not all(math.isfinite(s) for s in scores):
        raise DroppedRow(NON_FINITE_SCORE)
    if scores[0] == scores[1]:
        raise DroppedRow(TIED_SCORES)
    if scores[0] < scores[1]:
        raise DroppedRow(REVERSED_SCORES)
    return parsed


# Winner labels of arena-style data (LMSYS Chatbot Arena writes model_a, model_b, tie, tie (bothbad)).
_WINNER = {"a": "a", "model_a": "a", "b": "b", "model_b": "b", "tie": "tie", "tie (bothbad)": "tie"}


def _parse_pairwise(row: dict[str, Any]) -> tuple[str | tuple[Message, ...], str, str]:
    """A labelled pair: the winner's response is chosen, the other rejected; a tie teaches nothing."""
    label = _field(row, "winner")
    winner = _WINNER.get(label.strip().lower()) if isinstance(label, str) else None
    if winner is None:
        raise BadRow(
            NON_STRING_FIELD, f"field 'winner' must be one of a, b, tie (or model_a, model_b), got {short_repr(label)}"
        )
    raw = _field(row, "prompt")
    prompt: str | tuple[Message, ...] = raw if isinstance(raw, str) else _messages(raw, "prompt")
    # Parsed before the tie check, so a malformed tie is reported as malformed, not as a tie.
    _, a = _completion(_field(row, "response_a"), "response_a")
    _, b = _completion(_field(row, "response_b"), "response_b")
    if winner == "tie":
        raise DroppedRow(TIED_WINNER)
    return (prompt, a, b) if winner == "a" else (prompt, b, a)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(prompt: str | tuple[Message, ...], chosen: str, rejected: str) -> None:
    """Refuse text that is not Unicode: JSON's ``\\ud800`` escapes give lone surrogates, which no
    tokenizer or UTF-8 file takes."""
    texts = [prompt] if isinstance(prompt, str) else [t for m in prompt for t in (m["role"], m["content"])]
    for text in (*texts, chosen, rejected):
        if (found := _SURROGATE.search(text)) is not None:
            raise BadRow(
                UNPARSEABLE, f"text holds a lone surrogate ({found.group()!a} at {found.start()}), not Unicode"
            )


PARSERS = {
    "standard": _parse_standard,
    "conversational": _parse_standard,
    "implicit": _parse_implicit,
    "hh": _parse_implicit,
    "openai": _parse_openai,
    "sharegpt": _parse_sharegpt,
    "scored": _parse_scored,
    "pairwise": _parse_pairwise,
}


def map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row with the source's columns renamed to the roles (prompt, chosen, ...)."""
    mapped = dict(row)
    for role, column in columns.items():
        if column not in row:
            raise BadRow(MISSING_FIELD, f"missing column {column!r} (mapped to {role})")
        mapped[role] = row[column]
    return mapped
