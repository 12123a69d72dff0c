"""The preference pair record, the reasons a pair is dropped, and pairs as JSON lines.

A :class:`PreferencePair` is what every row format is normalised to (see
:mod:`sdpo_core.formats`); :func:`write_pairs` and :func:`read_pairs` store a list of them, one
JSON object a line, as the prepared data of a run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdpo_core.files import atomic_write_text
from sdpo_core.hashing import sha256_bytes

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
NON_FINITE_SCORE = "score not a finite number"
PROMPT_TOO_LONG = "prompt too long"
IN_EVAL = "also in eval split"
PROMPT_IN_EVAL = "prompt also in eval split"
OVERSIZED = "pair over the size limit"
DIVERGED = "dialogues diverge before the last turn"
TIED_WINNER = "tie (no winner)"


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
        return sha256_bytes(blob)[:16]

    @property
    def content_key(self) -> str:
        """Id of the pair's content alone (whatever its source): finds the same pair anywhere."""
        blob = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False)
        return sha256_bytes(blob)[:16]

    @property
    def completions(self) -> tuple[str, str]:
        """(chosen, rejected)."""
        return self.chosen, self.rejected

    @property
    def prompt_key(self) -> str:
        """Id of the prompt alone: the pairs of one prompt share it, whatever their completions."""
        return sha256_bytes(json.dumps(self.prompt, ensure_ascii=False))[:16]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt"] = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PreferencePair:
        prompt = d["prompt"] if isinstance(d["prompt"], str) else tuple(d["prompt"])
        return cls(prompt, d["chosen"], d["rejected"], d["source"])


def write_pairs(pairs: Sequence[PreferencePair], path: Path) -> str:
    """Write pairs as JSON lines (atomically); return the content hash of the file."""
    text = "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs)
    atomic_write_text(path, text)
    return sha256_bytes(text)[:16]


def read_pairs(path: Path) -> list[PreferencePair]:
    """Read pairs written by :func:`write_pairs`."""
    with open(path, encoding="utf-8") as fh:
        return [PreferencePair.from_json(json.loads(line)) for line in fh if line.strip()]


def content_hash(pairs: Sequence[PreferencePair]) -> str:
    """Order-sensitive hash of a list of pairs: the sha256 of their ids, one after the other."""
    return sha256_bytes("".join(p.id for p in pairs))[:16]


def shuffled(pairs: Sequence[PreferencePair], seed: int) -> list[PreferencePair]:
    """The pairs in a seeded random order (the input is left as it was)."""
    out = list(pairs)
    random.Random(seed).shuffle(out)
    return out
