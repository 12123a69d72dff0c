"""A run's data set: each source read into validated pairs, the held-out split, the data report.

:func:`load_source` reads one source (normalising its rows through :mod:`sdpo_core.formats`) and
counts what it dropped in a :class:`SourceReport`; :func:`build_dataset` reads every source of a
run, holds out the eval split, drops training pairs that leak into it, measures token lengths,
applies source weights and checks that the pairs can fill the planned steps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sdpo_core.config import DataConfig, SourceConfig
from sdpo_core.formats import PARSERS, BadRow, DroppedRow, check_text, detect_format, map_columns, short_repr
from sdpo_core.hashing import sha256_bytes
from sdpo_core.logprobs import TokenizedPair
from sdpo_core.pairs import (
    DUPLICATE,
    EMPTY_COMPLETION,
    IDENTICAL,
    IN_EVAL,
    MISSING_FIELD,
    OVERSIZED,
    PROMPT_IN_EVAL,
    PROMPT_TOO_LONG,
    UNPARSEABLE,
    DataError,
    Message,
    PreferencePair,
    content_hash,
)
from sdpo_core.sources import RowError, SourceError, iter_rows
from sdpo_core.tokenization import TemplateFailed, encode_pair, truncate_pair

# ---------------------------------------------------------------------------------------------
# Reading one source

MAX_PAIR_CHARS = 2_000_000
"""A pair whose prompt and completions hold more characters than this is dropped (and counted)
before tokenization: no model here reads that much, and tokenizing a 20 MB line only to
truncate it took a minute and 4 GB of memory. A message counts its role and content and
MESSAGE_CHARS more, what a template adds around it, so that a prompt of 300000 empty messages
is not rendered and tokenized either."""
MESSAGE_CHARS = 16


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


def _keys(row: dict[str, Any]) -> str:
    """A row's field names for a message (a row may have a million of them)."""
    return short_repr(sorted(map(str, row)))


def _chars(prompt: str | Sequence[Message]) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["role"]) + len(m["content"]) + MESSAGE_CHARS for m in prompt)


def load_source(
    source: SourceConfig, skip_bad_rows: bool = False, seed: int = 0, places: dict[str, str] | None = None
) -> tuple[list[PreferencePair], SourceReport]:
    """Read, normalise and validate one source.

    A row that cannot be parsed or lacks a field raises a DataError naming the file and line,
    unless ``skip_bad_rows``, when it is counted by reason. Pairs that parse but cannot teach a
    preference are dropped and counted: an empty completion, chosen identical to rejected, an
    exact duplicate of an earlier pair of the source, tied, reversed or non-finite scores.
    ``places``, when given, receives the place (file and line) of each kept pair by pair id.
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
                    row = map_columns(row, source.columns)
                if fmt == "auto":
                    fmt = detect_format(row)
                    if fmt == "unknown" and skip_bad_rows:
                        fmt = "auto"  # count this row, detect the format from the next one
                        raise BadRow(MISSING_FIELD, f"cannot tell the data format from the fields {_keys(row)}")
                    if fmt == "unknown":
                        raise DataError(
                            f"{place}: cannot tell the data format from the fields {_keys(row)}; "
                            "set the source's format, or map columns with columns: {prompt: ..., chosen: ..., rejected: ...}"
                        )
                prompt, chosen, rejected = PARSERS[fmt](row)
                check_text(prompt, chosen, rejected)
            except BadRow as exc:
                if not skip_bad_rows:
                    raise DataError(f"{place}: {exc} (format {fmt}){exc.hint}") from None
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
            if places is not None:
                places[pair.id] = place
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

    The split is by prompt: all pairs of a prompt (UltraFeedback-style data has several) land on
    the same side, and so do identical pairs. Prompts are taken in a seeded order until the held
    pairs reach the target, so a source whose prompts are all distinct is split pair by pair.
    Returns (train, eval), each in the input order.
    """
    by_source: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        by_source.setdefault(p.source, []).append(p)
    held: set[str] = set()
    for source, items in by_source.items():
        groups: dict[str, set[str]] = {}
        for p in items:
            groups.setdefault(p.prompt_key, set()).add(p.id)
        n_ids = sum(len(ids) for ids in groups.values())
        n_eval = min(cfg.eval_max_pairs, max(1, round(cfg.eval_fraction * n_ids)))
        # A prompt's place in the order: its first pair's, by the seeded hash of the pair ids.
        order = sorted(groups.values(), key=lambda ids: min(sha256_bytes(f"{cfg.seed}:{i}") for i in ids))
        taken: set[str] = set()
        for ids in order:
            if len(taken) >= n_eval:
                break
            taken |= ids
        if n_ids - len(taken) < 1:
            raise DataError(
                f"source {source!r}: {n_ids} distinct pair(s) under {len(groups)} prompt(s) are too few to "
                "hold out an eval split by prompt"
            )
        held |= taken
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
    """Remove training pairs whose content, or whose prompt, is also in the eval split (from any
    source); counts per source and reason (IN_EVAL, PROMPT_IN_EVAL)."""
    held = {p.content_key for p in evals}
    held_prompts = {p.prompt_key for p in evals}
    kept, leaked = [], {}
    for p in train:
        reason = IN_EVAL if p.content_key in held else PROMPT_IN_EVAL if p.prompt_key in held_prompts else None
        if reason is None:
            kept.append(p)
        else:
            leaked[(p.source, reason)] = leaked.get((p.source, reason), 0) + 1
    return kept, leaked


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


def build_dataset(
    cfg: Any, tokenizer: Any, tokens: dict[str, TokenizedPair] | None = None
) -> tuple[list[PreferencePair], list[PreferencePair], DataReport]:
    """Read every source of a RunConfig; validate, split, drop leaks, measure, weight.

    Returns the training pairs (weighted, in recipe order then file order), the eval pairs and
    the report. Raises DataError before any training when the data cannot fill the steps.
    ``tokens``, when given, receives each kept pair's truncated token ids by pair id: the
    tokenization this function does anyway, kept so that no later stage tokenizes again.
    """
    d = cfg.data
    loaded: list[tuple[SourceConfig, list[PreferencePair], SourceReport]] = []
    places: dict[str, str] = {}
    for source in d.sources:
        pairs, report = load_source(source, d.skip_bad_rows, d.seed, places)
        loaded.append((source, pairs, report))
    to_split = [p for s, pairs, _ in loaded if s.use == "split" for p in pairs]
    split_train, split_eval_pairs = split_eval(to_split, d) if to_split else ([], [])
    train = split_train + [p for s, pairs, _ in loaded if s.use == "train" for p in pairs]
    evals = split_eval_pairs + [p for s, pairs, _ in loaded if s.use == "eval" for p in pairs]
    train, leaked = drop_leaked(train, evals)
    reports = {r.name: r for _, _, r in loaded}
    for (name, reason), n in leaked.items():
        reports[name].drop(reason, n)

    # Token lengths under the run's tokenizer, and the prompt policy.
    lengths: dict[str, dict[str, list[int]]] = {n: {"prompt": [], "chosen": [], "rejected": []} for n in reports}
    eval_ids = {p.id for p in evals}
    kept_train, kept_eval = [], []
    for p in train + evals:
        try:
            full = encode_pair(p, tokenizer)
        except TemplateFailed as exc:
            raise DataError(f"{places.get(p.id, f'source {p.source!r}, pair {p.id}')}: {exc}") from None
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
        if tokens is not None:
            tokens[p.id] = cut

    weighted: list[PreferencePair] = []
    for source, _, report in loaded:
        own = apply_weight(
            [p for p in kept_train if p.source == source.name], source.weight, f"weight:{d.seed}:{source.name}"
        )
        weighted.extend(own)
        report.train = len(own)
        report.eval = sum(1 for p in kept_eval if p.source == source.name)
        report.token_lengths = {k: _percentiles(v) for k, v in lengths[source.name].items()}
        report.kept -= sum(report.dropped.get(r, 0) for r in (IN_EVAL, PROMPT_IN_EVAL, PROMPT_TOO_LONG))

    steps = cfg.planned_steps()
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
