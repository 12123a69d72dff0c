"""The gold reward (sdpo_core.gold): its definition on hand-written texts, and the win rate."""

from __future__ import annotations

import pytest

from sdpo_core.gold import NEGATIVE, POSITIVE, WORDS_PER_UNIT, gold_reward, gold_win_rate, lexicon_counts, words


def test_words_are_lower_cased_letter_runs_with_inner_apostrophes() -> None:
    assert words("Tom didn't CRY! 3 cats, 'ok'.") == ["tom", "didn't", "cry", "cats", "ok"]
    assert words("") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0.0),
        ("The dog ran to the tree.", 0.0),  # no lexicon word
        ("Lily was happy.", 1.0),
        ("Lily was HAPPY and Tom was Sad.", 0.0),  # case does not matter; one each cancels
        ("They played together with their friends, and laughed.", 4.0),  # played together friends laughed
        ("He cried. He was scared, sad and lonely.", -4.0),
        ("happy, happy, happy!", 3.0),  # every occurrence counts
        ("unhappy", -1.0),  # a whole word, not a substring: no 'happy' inside it
        ("The happyness was sadder.", 0.0),  # forms not listed do not count (no stemming)
    ],
)
def test_gold_reward_is_the_net_lexicon_count_of_a_short_text(text: str, expected: float) -> None:
    assert gold_reward(text) == expected


def test_long_texts_are_scored_per_fifty_words() -> None:
    # 100 words, two positive: 2 * 50 / 100 = 1.0 (not 2: length alone does not win).
    text = " ".join(["happy", "fun"] + ["tree"] * 98)
    assert len(words(text)) == 100
    assert gold_reward(text) == pytest.approx(1.0)
    # Exactly 50 words: the plain count.
    assert gold_reward(" ".join(["sad"] + ["tree"] * 49)) == -1.0
    # 60 words, three negative: -3 * 50 / 60.
    assert gold_reward(" ".join(["sad", "mad", "hurt"] + ["tree"] * 57)) == pytest.approx(-2.5)


def test_gold_reward_is_deterministic_and_pure() -> None:
    text = "Max loved to play with his friends, but one day he fell and cried."
    first = gold_reward(text)
    assert first == 1.0  # loved play friends - fell cried
    assert [gold_reward(text) for _ in range(5)] == [first] * 5
    assert lexicon_counts(text) == (3, 2, 14)


def test_gold_reward_refuses_a_non_string() -> None:
    with pytest.raises(TypeError, match="string"):
        gold_reward(None)  # type: ignore[arg-type]


def test_lexicons_are_disjoint_and_every_entry_can_match() -> None:
    assert not POSITIVE & NEGATIVE
    for word in POSITIVE | NEGATIVE:
        assert words(word) == [word], f"{word!r} would never be counted"
    assert WORDS_PER_UNIT == 50


def test_gold_win_rate_outcomes_per_item() -> None:
    policy = ["They were happy.", "The end.", "He cried.", "fun fun"]
    base = ["He cried.", "The end.", "They were happy.", "fun"]
    assert gold_win_rate(policy, base) == [1.0, 0.5, 0.0, 1.0]
    assert gold_win_rate([], []) == []


def test_gold_win_rate_needs_paired_lists() -> None:
    with pytest.raises(ValueError, match="2 policy against 1 base"):
        gold_win_rate(["a", "b"], ["a"])
