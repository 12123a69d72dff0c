"""Preference data: normalise every format to one record, validate, split, tokenize.

Every row becomes a :class:`PreferencePair` (prompt, chosen, rejected, source). The prompt is a
list of chat messages (conversational; multi-turn prompts stay multi-turn) or a plain string;
chosen and rejected are the assistant completions as strings. Formats (``format`` of a source):

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
  ``chosen_rating``/``rejected_rating``, ...). Ties, and pairs whose rejected side scores higher,
  are dropped and counted.
- any other schema through ``columns``, a mapping from the roles above to the source's columns.

Conversational prompts are rendered with the tokenizer's chat template when it has one;
otherwise with the plain template of :func:`render_plain`:
``"System: ...\n\nUser: ...\n\nAssistant: ...\n\nUser: ...\n\nAssistant:"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdpo_core.config import DataConfig, SourceConfig
from sdpo_core.logprobs import TokenizedPair
from sdpo_core.sources import RowError, SourceError, iter_rows

Message = dict[str, str]


class DataError(ValueError):
    """A data problem, with the file and row it was found in."""


# Reasons a row or pair is dropped; the keys of SourceReport.dropped.
MISSING_FIELD = "missing field"
NON_STRING_FIELD = "non-string field"
UNPARSEABLE = "unparseable row"
EMPTY_COMPLETION = "empty completion"
IDENTICAL = "chosen identical to rejected"
DUPLICATE = "exact duplicate"
TIED_SCORES = "tied scores"
REVERSED_SCORES = "rejected scored higher"
PROMPT_TOO_LONG = "prompt too long"
IN_EVAL = "also in eval split"
OVERSIZED = "pair over the size limit"

MAX_PAIR_CHARS = 2_000_000
"""A pair whose prompt and completions hold more characters than this is dropped (and counted)
before tokenization: no model here reads that much, and tokenizing a 20 MB line only to
truncate it took a minute and 4 GB of memory."""


@dataclass(frozen=True)
class PreferencePair:
    """One normalised preference pair."""

    prompt: str | tuple[Message, ...]
    chosen: str
    rejected: str
    source: str

    @property
    def id(self) -> str:
        """Content id: the first 16 hex digits of the sha256 of the pair and its source."""
        blob = json.dumps([self.source, self.prompt, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def content_key(self) -> str:
        """Id of the pair's content alone (whatever its source): finds the same pair anywhere."""
        blob = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False)
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
# Formats


class BadRow(ValueError):
    """A row that does not fit its format; ``reason`` is one of the drop reasons."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class DroppedRow(ValueError):
    """A well-formed row that cannot teach a preference (e.g. tied scores)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


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


def _parse_implicit(row: dict[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    chosen_raw, rejected_raw = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        chosen_msgs, rejected_msgs = _messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected")
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise BadRow(UNPARSEABLE, "'chosen' and 'rejected' do not share the messages before the last answer")
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
        raise BadRow(UNPARSEABLE, "'chosen' and 'rejected' do not share the dialogue up to the last 'Assistant:' turn")
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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise BadRow(NON_STRING_FIELD, f"field {key!r} must be a number, got {value!r}") from None
        if math.isnan(value):
            raise BadRow(MISSING_FIELD, f"field {key!r} is NaN, not a rating")
        scores.append(float(value))
    parsed = _parse_standard(row) if "prompt" in row else _parse_implicit(row)
    if scores[0] == scores[1]:
        raise DroppedRow(TIED_SCORES)
    if scores[0] < scores[1]:
        raise DroppedRow(REVERSED_SCORES)
    return parsed


PARSERS = {
    "standard": _parse_standard,
    "conversational": _parse_standard,
    "implicit": _parse_implicit,
    "hh": _parse_implicit,
    "openai": _parse_openai,
    "sharegpt": _parse_sharegpt,
    "scored": _parse_scored,
}


def _map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row with the source's columns renamed to the roles (prompt, chosen, ...)."""
    mapped = dict(row)
    for role, column in columns.items():
        if column not in row:
            raise BadRow(MISSING_FIELD, f"missing column {column!r} (mapped to {role})")
        mapped[role] = row[column]
    return mapped


# ---------------------------------------------------------------------------------------------
# Reading one source


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


@dataclass
class SourceReport:
    """What reading and preparing a source did: rows, pairs kept, drops by reason, lengths."""

    name: str
    path: str
    format: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    bad_rows: list[str] = field(default_factory=list)
    """The first few skipped rows, each with its place and problem."""
    content_hash: str = ""
    train: int = 0
    eval: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    token_lengths: dict[str, dict[str, int]] = field(default_factory=dict)
    sample: dict[str, Any] | None = None

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _chars(prompt: str | Sequence[Message]) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["content"]) for m in prompt)


def load_source(
    source: SourceConfig, skip_bad_rows: bool = False, seed: int = 0
) -> tuple[list[PreferencePair], SourceReport]:
    """Read, normalise and validate one source.

    A row that cannot be parsed or lacks a field raises a DataError naming the file and line,
    unless ``skip_bad_rows``, when it is counted by reason. Pairs that parse but cannot teach a
    preference are dropped and counted: an empty completion, chosen identical to rejected, an
    exact duplicate of an earlier pair of the source, tied or reversed scores.
    """
    report = SourceReport(source.name, source.path, source.format)
    pairs: list[PreferencePair] = []
    seen: set[str] = set()
    fmt = source.format
    try:
        for place, row in iter_rows(source):
            report.rows += 1
            try:
                if isinstance(row, RowError):
                    raise BadRow(UNPARSEABLE, str(row).removeprefix(f"{place}: "))
                if not isinstance(row, dict):
                    raise BadRow(UNPARSEABLE, f"a row must be an object, got {type(row).__name__}")
                if source.columns:
                    row = _map_columns(row, source.columns)
                if fmt == "auto":
                    fmt = detect_format(row)
                    if fmt == "unknown" and skip_bad_rows:
                        fmt = "auto"  # count this row, detect the format from the next one
                        raise BadRow(MISSING_FIELD, f"cannot tell the data format from the fields {sorted(row)}")
                    if fmt == "unknown":
                        raise DataError(
                            f"{place}: cannot tell the data format from the fields {sorted(row)}; "
                            "set the source's format, or map columns with columns: {prompt: ..., chosen: ..., rejected: ...}"
                        )
                prompt, chosen, rejected = PARSERS[fmt](row)
            except BadRow as exc:
                if not skip_bad_rows:
                    raise DataError(f"{place}: {exc} (format {fmt})") from None
                report.drop(exc.reason)
                if len(report.bad_rows) < 5:
                    report.bad_rows.append(f"{place}: {exc}")
                continue
            except DroppedRow as exc:
                report.drop(exc.reason)
                continue
            if _chars(prompt) + len(chosen) + len(rejected) > MAX_PAIR_CHARS:
                report.drop(OVERSIZED)
                continue
            if not chosen.strip() or not rejected.strip():
                report.drop(EMPTY_COMPLETION)
                continue
            if chosen == rejected:
                report.drop(IDENTICAL)
                continue
            pair = PreferencePair(prompt, chosen, rejected, source.name)
            if pair.content_key in seen:
                report.drop(DUPLICATE)
                continue
            seen.add(pair.content_key)
            pairs.append(pair)
            if source.max_pairs is not None and len(pairs) >= source.max_pairs:
                break
    except SourceError as exc:
        raise DataError(str(exc)) from None
    report.format = fmt
    if not pairs:
        raise DataError(
            f"{source.path}: no usable pairs ({report.rows} rows read, dropped: {report.dropped or 'none'})"
        )
    if source.sample is not None and source.sample < len(pairs):
        rng = random.Random(f"sample:{seed}:{source.name}")
        keep = set(rng.sample(range(len(pairs)), source.sample))
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    report.kept = len(pairs)
    report.content_hash = content_hash(pairs)
    report.sample = pairs[0].to_json()
    return pairs, report


# ---------------------------------------------------------------------------------------------
# Splitting and mixing


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


def apply_weight(pairs: Sequence[PreferencePair], weight: float, seed: str) -> list[PreferencePair]:
    """Repeat (weight > 1) or subsample (weight < 1) a source's training pairs, seeded.

    The result has round(weight * n) pairs: whole copies of the list, then a seeded sample of
    the remainder, in the original order within each copy.
    """
    n_target = round(weight * len(pairs))
    whole, rest = divmod(n_target, len(pairs)) if pairs else (0, 0)
    keep = set(random.Random(seed).sample(range(len(pairs)), rest)) if rest else set()
    return list(pairs) * whole + [p for i, p in enumerate(pairs) if i in keep]


def drop_leaked(
    train: Sequence[PreferencePair], evals: Sequence[PreferencePair]
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Remove training pairs whose content is also in the eval split; counts per source."""
    held = {p.content_key for p in evals}
    kept, leaked = [], {}
    for p in train:
        if p.content_key in held:
            leaked[p.source] = leaked.get(p.source, 0) + 1
        else:
            kept.append(p)
    return kept, leaked


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
    return [tokenize_pair(p, tokenizer, cfg) for p in pairs]


# ---------------------------------------------------------------------------------------------
# The whole data set of a run


@dataclass
class DataReport:
    """Per-source reports and totals of a run's data; what ``sdpo data inspect`` prints."""

    sources: list[SourceReport]
    train: int
    eval: int
    num_steps: int
    tokenizer: str

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": [s.to_json() for s in self.sources],
            "train": self.train,
            "eval": self.eval,
            "num_steps": self.num_steps,
            "tokenizer": self.tokenizer,
        }


def planned_steps(cfg: Any) -> int:
    """T for a RunConfig: one per training source for by_source, else num_steps, len(sizes) or 2."""
    p = cfg.partition
    if p.strategy == "by_source":
        return sum(1 for s in cfg.data.sources if s.use != "eval")
    if p.num_steps is not None:
        return p.num_steps
    return len(p.sizes) if p.sizes else 2


def build_dataset(cfg: Any, tokenizer: Any) -> tuple[list[PreferencePair], list[PreferencePair], DataReport]:
    """Read every source of a RunConfig; validate, split, drop leaks, measure, weight.

    Returns the training pairs (weighted, in recipe order then file order), the eval pairs and
    the report. Raises DataError before any training when the data cannot fill the steps.
    """
    d = cfg.data
    loaded: list[tuple[SourceConfig, list[PreferencePair], SourceReport]] = []
    for source in d.sources:
        pairs, report = load_source(source, d.skip_bad_rows, d.seed)
        loaded.append((source, pairs, report))
    to_split = [p for s, pairs, _ in loaded if s.use == "split" for p in pairs]
    split_train, split_eval_pairs = split_eval(to_split, d) if to_split else ([], [])
    train = split_train + [p for s, pairs, _ in loaded if s.use == "train" for p in pairs]
    evals = split_eval_pairs + [p for s, pairs, _ in loaded if s.use == "eval" for p in pairs]
    train, leaked = drop_leaked(train, evals)
    reports = {r.name: r for _, _, r in loaded}
    for name, n in leaked.items():
        reports[name].drop(IN_EVAL, n)

    # Token lengths under the run's tokenizer, and the prompt policy.
    lengths: dict[str, dict[str, list[int]]] = {n: {"prompt": [], "chosen": [], "rejected": []} for n in reports}
    eval_ids = {p.id for p in evals}
    kept_train, kept_eval = [], []
    for p in train + evals:
        full = encode_pair(p, tokenizer)
        report = reports[p.source]
        for key, ids in (("prompt", full.prompt_ids), ("chosen", full.chosen_ids), ("rejected", full.rejected_ids)):
            lengths[p.source][key].append(len(ids))
        if len(full.prompt_ids) > d.max_prompt_length:
            if d.long_prompts == "drop":
                report.drop(PROMPT_TOO_LONG)
                continue
            report.truncated_prompts += 1
        cut = truncate_pair(full, d, tokenizer.bos_token_id)
        if len(cut.chosen_ids) < len(full.chosen_ids) or len(cut.rejected_ids) < len(full.rejected_ids):
            report.truncated_completions += 1
        (kept_eval if p.id in eval_ids else kept_train).append(p)

    weighted: list[PreferencePair] = []
    for source, _, report in loaded:
        own = apply_weight(
            [p for p in kept_train if p.source == source.name], source.weight, f"weight:{d.seed}:{source.name}"
        )
        weighted.extend(own)
        report.train = len(own)
        report.eval = sum(1 for p in kept_eval if p.source == source.name)
        report.token_lengths = {k: _percentiles(v) for k, v in lengths[source.name].items()}
        report.kept = report.kept - report.dropped.get(IN_EVAL, 0) - report.dropped.get(PROMPT_TOO_LONG, 0)

    steps = planned_steps(cfg)
    result = DataReport(
        list(reports.values()), len(weighted), len(kept_eval), steps, getattr(tokenizer, "name_or_path", "")
    )
    _check_enough(cfg, result)
    return weighted, kept_eval, result


def _check_enough(cfg: Any, report: DataReport) -> None:
    """Stop before training when the kept pairs cannot fill the planned steps."""
    need = cfg.data.min_pairs_per_step
    problems = []
    if report.eval == 0:
        problems.append("no held-out eval pairs (every source has use=train, or all were dropped)")
    if cfg.partition.strategy == "by_source":
        for r in report.sources:
            source = next(s for s in cfg.data.sources if s.name == r.name)
            if source.use != "eval" and r.train < need:
                problems.append(f"source {r.name!r} leaves {r.train} training pair(s); its step needs {need}")
    elif report.train < report.num_steps * need:
        problems.append(
            f"{report.train} training pair(s) cannot fill {report.num_steps} step(s) of at least {need} pair(s)"
        )
    if problems:
        raise DataError("not enough data: " + "; ".join(problems))
