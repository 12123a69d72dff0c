"""Preference data: the public names of the modules that do the work, gathered in one place.

Callers may import from here or from the module itself; each can be read alone:

- :mod:`sdpo_core.pairs`: the :class:`PreferencePair` record, the drop reasons, :class:`DataError`,
  and pairs as JSON lines (:func:`write_pairs`, :func:`read_pairs`).
- :mod:`sdpo_core.formats`: every supported row format (standard, conversational, implicit/HH,
  OpenAI, ShareGPT, scored) normalised to a prompt, a chosen and a rejected answer.
- :mod:`sdpo_core.tokenization`: prompt rendering (chat template or the plain one), tokenization
  and the truncation policy.
- :mod:`sdpo_core.dataset`: one source read and validated (:func:`load_source`), and a run's whole
  data set (:func:`build_dataset`): the held-out split, leak removal, weights, the data report.
"""

from __future__ import annotations

from sdpo_core.dataset import (
    MAX_PAIR_CHARS,
    DataReport,
    SourceReport,
    apply_weight,
    build_dataset,
    drop_leaked,
    load_source,
    split_eval,
)
from sdpo_core.formats import PARSERS, SCORE_KEYS, BadRow, DroppedRow, detect_format
from sdpo_core.pairs import (
    DUPLICATE,
    EMPTY_COMPLETION,
    IDENTICAL,
    IN_EVAL,
    MISSING_FIELD,
    NON_FINITE_SCORE,
    NON_STRING_FIELD,
    OVERSIZED,
    PROMPT_IN_EVAL,
    PROMPT_TOO_LONG,
    REVERSED_SCORES,
    TIED_SCORES,
    UNPARSEABLE,
    DataError,
    Message,
    PreferencePair,
    content_hash,
    read_pairs,
    shuffled,
    write_pairs,
)
from sdpo_core.tokenization import (
    PLAIN_ROLES,
    encode_pair,
    render_plain,
    render_prompt,
    tokenize_pair,
    tokenize_pairs,
    truncate_pair,
)

__all__ = [
    "DUPLICATE",
    "EMPTY_COMPLETION",
    "IDENTICAL",
    "IN_EVAL",
    "PROMPT_IN_EVAL",
    "MAX_PAIR_CHARS",
    "MISSING_FIELD",
    "NON_FINITE_SCORE",
    "NON_STRING_FIELD",
    "OVERSIZED",
    "PARSERS",
    "PLAIN_ROLES",
    "PROMPT_TOO_LONG",
    "REVERSED_SCORES",
    "SCORE_KEYS",
    "TIED_SCORES",
    "UNPARSEABLE",
    "BadRow",
    "DataError",
    "DataReport",
    "DroppedRow",
    "Message",
    "PreferencePair",
    "SourceReport",
    "apply_weight",
    "build_dataset",
    "content_hash",
    "detect_format",
    "drop_leaked",
    "encode_pair",
    "load_source",
    "read_pairs",
    "render_plain",
    "render_prompt",
    "shuffled",
    "split_eval",
    "tokenize_pair",
    "tokenize_pairs",
    "truncate_pair",
    "write_pairs",
]
