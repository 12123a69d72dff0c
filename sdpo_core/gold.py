"""A programmatic gold reward for children's stories, and the win rate it defines.

At the scale of the shipped model (stories260K, 260 thousand parameters) benchmark scores sit at
chance, so "DPO made the model better" needs a truth we can compute. The gold reward here is a
sentiment-lexicon score:

    gold(text) = (positive words - negative words) * 50 / max(words, 50)

- ``words`` are the text's words: runs of ASCII letters (with an inner apostrophe, as in
  "didn't"), lower-cased. Nothing else (punctuation, digits, case) counts.
- A word is positive if it is in :data:`POSITIVE`, negative if in :data:`NEGATIVE`. The lists
  spell every inflection out (no stemming), so the score depends only on the listed strings.
- For a text of up to 50 words the score is the plain net count, an integer; a longer text is
  scored per 50 words, so that a longer story does not win by length alone.

Why this reward:

- **Learnable by the tiny model.** TinyStories-trained models already write these words often
  ("happy", "friends", "play", "loved", "sad", "cried", "scared"), so the preference needs no new
  vocabulary, only a shift of probability between words the model knows. The positive list holds
  the frequent warm words of the genre; the negative list its frequent distress words.
- **Spread on M0's own samples.** Among 48-token samples of stories260K the net count ranges
  over several values (measured in data/PROVENANCE.md, section "gold"), so pairs of samples of one
  prompt differ in reward often, by one word (a small margin) or by several (a large one).
- **Known, simple, deterministic.** A pure function of the text, with no model and no randomness,
  so any completion of any model can be scored and the result reproduced by hand.

:func:`gold_win_rate` compares two sets of completions item by item (1 win, 0.5 tie, 0 loss), for
an experiment to average and bootstrap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Every listed form counts; lower case, as words are lower-cased before the look-up.
POSITIVE: frozenset[str] = frozenset(
    """
    happy happily happier happiest glad joy joyful cheerful excited
    love loved loves loving lovely
    fun funny friend friends friendly together
    kind kindly nice good great best wonderful beautiful pretty
    smile smiled smiles smiling laugh laughed laughs laughing giggle giggled
    hug hugged hugs share shared sharing help helped helping
    play played playing plays enjoy enjoyed proud thank thanks yummy safe
    """.split()
)
NEGATIVE: frozenset[str] = frozenset(
    """
    sad sadly unhappy cry cried cries crying tears
    angry mad upset grumpy mean naughty bad
    scared scary afraid frightened fear worried nervous
    hurt hurts pain sick ouch broke broken
    lonely alone lost sorry fell
    frown frowned hate hated
    """.split()
)
WORDS_PER_UNIT = 50
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """The words of a text as the gold reward counts them (lower-cased letter runs).

    Args:
        text: Any string.

    Returns:
        The words in order, e.g. ``"Tom didn't cry!"`` -> ``["tom", "didn't", "cry"]``.
    """
    return _WORD.findall(text.lower())


def lexicon_counts(text: str) -> tuple[int, int, int]:
    """(positive words, negative words, all words) of a text."""
    found = words(text)
    return sum(w in POSITIVE for w in found), sum(w in NEGATIVE for w in found), len(found)


def gold_reward(text: str) -> float:
    """The gold reward of one completion: net positive words, per 50 words beyond 50 words.

    Args:
        text: The completion (the prompt is not part of it).

    Returns:
        ``(positive - negative) * 50 / max(words, 50)``; 0.0 for a text with no lexicon word.

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"gold_reward takes a string, got {type(text).__name__}")
    positive, negative, total = lexicon_counts(text)
    return (positive - negative) * WORDS_PER_UNIT / max(total, WORDS_PER_UNIT)


def gold_win_rate(policy_texts: Sequence[str], base_texts: Sequence[str]) -> list[float]:
    """Per-item outcomes of a policy's completions against a base model's, by gold reward.

    Items are paired by position: the i-th policy completion against the i-th base completion
    (the same prompt and sample seed). The mean of the outcomes is the win rate; an experiment
    bootstraps over them.

    Args:
        policy_texts: Completions of the model under test.
        base_texts: Completions of the base model (M0), as many, in the same order.

    Returns:
        One outcome per item: 1.0 when the policy's gold reward is higher, 0.5 when equal, 0.0
        when lower.

    Raises:
        ValueError: The two lists differ in length.
    """
    if len(policy_texts) != len(base_texts):
        raise ValueError(
            f"gold_win_rate needs paired completions: {len(policy_texts)} policy against {len(base_texts)} base"
        )
    outcomes = []
    for policy, base in zip(policy_texts, base_texts, strict=True):
        a, b = gold_reward(policy), gold_reward(base)
        outcomes.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return outcomes
