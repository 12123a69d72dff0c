"""Preference data: read sources, normalise every format to one record, split, tokenize.

Every row becomes a :class:`PreferencePair` (prompt, chosen, rejected, source). The prompt is a
list of chat messages (conversational) or a plain string; chosen and rejected are the assistant
completions as strings. Formats:

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings, or TRL's conversational form
  (``prompt`` a list of role/content messages, ``chosen``/``rejected`` lists of assistant messages).
- ``hh``: Anthropic HH-RLHF, ``chosen``/``rejected`` whole transcripts
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``); the prompt is the shared dialogue up to the last
  ``Assistant:`` turn, kept as multi-turn messages.
- ``openai``: OpenAI's preference fine-tuning format, ``input.messages``, ``preferred_output`` and
  ``non_preferred_output`` (lists of assistant messages).
- ``sharegpt``: ``conversations`` [{from, value}], ``chosen`` and ``rejected`` {from, value}.

Conversational prompts are rendered with the tokenizer's chat template when it has one;
otherwise with the plain template of :func:`render_plain`:
``"System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant:"``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdpo_core.config import DataConfig, SourceConfig
from sdpo_core.logprobs import TokenizedPair

Message = dict[str, str]


class DataError(ValueError):
    """A data problem, with the file and row it was found in."""


@dataclass(frozen=True)
class PreferencePair:
    """One normalised preference pair."""

    prompt: str | tuple[Message, ...]
    chosen: str
    rejected: str
    source: str

    @property
    def id(self) -> str:
        """Content id: the first 16 hex digits of the sha256 of the pair."""
        blob = json.dumps([self.source, self.prompt, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt"] = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreferencePair:
        prompt = d["prompt"] if isinstance(d["prompt"], str) else tuple(d["prompt"])
        return cls(prompt, d["chosen"], d["rejected"], d["source"])


# ---------------------------------------------------------------------------------------------
# Reading files


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """("line N" or "item N", parsed row) of a JSON array or JSON-lines file, optionally gzip."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            head = fh.read(1)
            while head and head.isspace():
                head = fh.read(1)
            if not head:
                raise DataError(f"{path}: the file is empty")
            if head == "[":
                fh.seek(0)
                try:
                    items = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
                    ) from None
                for i, item in enumerate(items):
                    yield f"item {i}", item
                return
            fh.seek(0)
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {lineno}: not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DataError(f"{path}: data file not found") from None
        raise DataError(f"{path}: cannot read: {exc}") from None


def detect_format(row: Any) -> str:
    """The format of a row, from its keys."""
    if not isinstance(row, dict):
        return "unknown"
    keys = set(row)
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "standard"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return "unknown"


def _require_str(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {key!r} must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"field {key!r}: every message needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _assistant_text(value: Any, key: str) -> str:
    """The completion text of a string or a list of (assistant) messages."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, key)
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"field {key!r}: the last message must be the assistant's")
    return msgs[-1]["content"]


_HH_TURN = {"Human": "user", "Assistant": "assistant"}


def _split_hh(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', ...}, {'role': 'assistant', ...}]."""
    msgs: list[Message] = []
    for part in text.split("\n\n"):
        for speaker, role in _HH_TURN.items():
            if part.startswith(speaker + ":"):
                msgs.append({"role": role, "content": part[len(speaker) + 1 :].strip()})
                break
        else:
            if not msgs:
                if part.strip():
                    raise ValueError("transcript does not start with a 'Human:' turn")
                continue
            # A paragraph break inside a turn.
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n\n" + part).strip()
    return msgs


def _parse_hh(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    chosen, rejected = _require_str(row, "chosen"), _require_str(row, "rejected")
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0:
        raise ValueError("'chosen' has no 'Assistant:' turn")
    prefix = chosen[: cut + len(marker)]
    if not rejected.startswith(prefix):
        raise ValueError("'chosen' and 'rejected' do not share the dialogue up to the last 'Assistant:' turn")
    prompt = tuple(_split_hh(chosen[:cut]))
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a 'Human:' turn")
    return prompt, chosen[cut + len(marker) :].strip(), rejected[cut + len(marker) :].strip()


_SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _parse_sharegpt(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("field 'conversations' must be a non-empty list")
    prompt = []
    for turn in conv:
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in _SHAREGPT_ROLE
            or not isinstance(turn.get("value"), str)
        ):
            raise ValueError("field 'conversations': every turn needs 'from' (human, gpt, system) and a string 'value'")
        prompt.append({"role": _SHAREGPT_ROLE[turn["from"]], "content": turn["value"]})
    out = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, dict) and isinstance(value.get("value"), str):
            out.append(value["value"])
        elif isinstance(value, str):
            out.append(value)
        else:
            raise ValueError(f"missing field {key!r}" if value is None else f"field {key!r} must be {{from, value}}")
    return tuple(prompt), out[0], out[1]


def _parse_openai(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    inp = row.get("input")
    if not isinstance(inp, dict):
        raise ValueError("field 'input' must be an object with 'messages'")
    prompt = _messages(inp.get("messages"), "input.messages")
    for key in ("preferred_output", "non_preferred_output"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
    return (
        prompt,
        _assistant_text(row["preferred_output"], "preferred_output"),
        _assistant_text(row["non_preferred_output"], "non_preferred_output"),
    )


def _parse_standard(row: dict[str, Any]) -> tuple[str | tuple[Message, ...], str, str]:
    if "prompt" not in row:
        raise ValueError("missing field 'prompt'")
    prompt = row["prompt"] if isinstance(row["prompt"], str) else _messages(row["prompt"], "prompt")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
    return prompt, _assistant_text(row["chosen"], "chosen"), _assistant_text(row["rejected"], "rejected")


PARSERS = {"standard": _parse_standard, "hh": _parse_hh, "openai": _parse_openai, "sharegpt": _parse_sharegpt}


@dataclass
class SourceReport:
    """What reading a source did: rows read, pairs kept, rows dropped by reason."""

    name: str
    path: str
    format: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def load_source(source: SourceConfig) -> tuple[list[PreferencePair], SourceReport]:
    """Read and normalise one source.

    A malformed row (not parseable, a field missing or of the wrong type) raises a DataError
    naming the file and line. Pairs that parse but cannot teach a preference are dropped and
    counted: an empty completion, or chosen identical to rejected.
    """
    path = Path(source.path)
    pairs: list[PreferencePair] = []
    fmt = source.format
    report = SourceReport(source.name, str(path), fmt)
    for where, row in iter_rows(path):
        place = f"{path}, {where}"
        if fmt == "auto":
            fmt = detect_format(row)
            if fmt == "unknown":
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{place}: cannot tell the data format from the fields {keys}; set format")
        if not isinstance(row, dict):
            raise DataError(f"{place}: a row must be a JSON object, got {type(row).__name__}")
        try:
            prompt, chosen, rejected = PARSERS[fmt](row)
        except ValueError as exc:
            raise DataError(f"{place}: {exc} (format {fmt})") from None
        report.rows += 1
        if not chosen.strip() or not rejected.strip():
            report.drop("empty completion")
            continue
        if chosen == rejected:
            report.drop("chosen identical to rejected")
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, source.name))
        if source.max_pairs is not None and len(pairs) >= source.max_pairs:
            break
    if not pairs:
        raise DataError(f"{path}: no usable pairs ({report.rows} rows read, dropped: {report.dropped})")
    report.format = fmt
    report.kept = len(pairs)
    return pairs, report


def split_eval(pairs: Sequence[PreferencePair], cfg: DataConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out ``eval_fraction`` of each source (at most ``eval_max_pairs``), chosen by seed.

    Identical pairs (same id) land on the same side, so nothing held out is trained on.
    Returns (train, eval), each in the input order.
    """
    by_source: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        by_source.setdefault(p.source, []).append(p)
    held: set[str] = set()
    for source, items in by_source.items():
        ids = sorted({p.id for p in items}, key=lambda i: hashlib.sha256(f"{cfg.seed}:{i}".encode()).hexdigest())
        n_eval = min(cfg.eval_max_pairs, max(1, round(cfg.eval_fraction * len(ids))))
        if len(ids) - n_eval < 1:
            raise DataError(f"source {source!r}: {len(ids)} distinct pair(s) are too few to hold out an eval split")
        held.update(ids[:n_eval])
    train = [p for p in pairs if p.id not in held]
    evals = [p for p in pairs if p.id in held]
    return train, evals


def write_pairs(pairs: Sequence[PreferencePair], path: Path) -> str:
    """Write pairs as JSON lines (atomically); return the content hash of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_pairs(path: Path) -> list[PreferencePair]:
    """Read pairs written by :func:`write_pairs`."""
    with open(path, encoding="utf-8") as fh:
        return [PreferencePair.from_json(json.loads(line)) for line in fh if line.strip()]


def content_hash(pairs: Sequence[PreferencePair]) -> str:
    """Order-sensitive hash of a list of pairs."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.id.encode())
    return h.hexdigest()[:16]


def shuffled(pairs: Sequence[PreferencePair], seed: int) -> list[PreferencePair]:
    out = list(pairs)
    random.Random(seed).shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------
# Prompt rendering and tokenization

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


def tokenize_pair(pair: PreferencePair, tokenizer: Any, cfg: DataConfig) -> TokenizedPair:
    """Token ids of one pair: prompt (with BOS), completions (with EOS), truncated.

    A prompt longer than ``max_prompt_length`` keeps its end; completions keep their start and
    are cut so that prompt + completion fits ``max_length``.
    """
    text, templated = render_prompt(pair.prompt, tokenizer)
    prompt_ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if len(prompt_ids) > cfg.max_prompt_length:
        # Keep a leading BOS, then the end of the prompt (the most recent turns).
        bos = tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[0] == bos else []
        n_keep = cfg.max_prompt_length - len(head)
        prompt_ids = head + (prompt_ids[len(prompt_ids) - n_keep :] if n_keep > 0 else [])
    room = cfg.max_length - len(prompt_ids)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sep = "" if templated else " "

    def completion(text: str) -> list[int]:
        ids = tokenizer(sep + text, add_special_tokens=False)["input_ids"] + eos
        return ids[:room]

    return TokenizedPair(prompt_ids, completion(pair.chosen), completion(pair.rejected))


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, cfg: DataConfig) -> list[TokenizedPair]:
    return [tokenize_pair(p, tokenizer, cfg) for p in pairs]
