"""Partition strategies: by_source (easy to hard) and random equal chunks."""

from __future__ import annotations

import pytest

from sdpo_core.config import PartitionConfig
from sdpo_core.data import DataError, PreferencePair
from sdpo_core.partition import by_source, make_chunks, random_chunks


def _pairs(source: str, n: int) -> list[PreferencePair]:
    return [PreferencePair(f"{source} prompt {i}", f"good {i}", f"bad {i}", source) for i in range(n)]


MIXED = _pairs("hh", 5) + _pairs("orca", 3) + _pairs("mix", 4)
MIXED = [MIXED[i] for i in (0, 5, 8, 1, 9, 6, 2, 10, 7, 3, 11, 4)]  # sources interleaved


def test_by_source_orders_by_accuracy_highest_first() -> None:
    accuracy = {"hh": 0.55, "orca": 0.72, "mix": 0.61}
    chunks = by_source(MIXED, accuracy)
    assert [c.label for c in chunks] == ["orca", "mix", "hh"]
    assert [c.step for c in chunks] == [1, 2, 3]
    assert [c.m0_accuracy for c in chunks] == [0.72, 0.61, 0.55]
    for c in chunks:
        assert {p.source for p in c.pairs} == {c.label}
        assert c.pairs == [p for p in MIXED if p.source == c.label], "a chunk keeps the input order"
    assert sum(len(c.pairs) for c in chunks) == len(MIXED)


def test_by_source_ties_keep_first_appearance() -> None:
    """MIXED's sources first appear in the order hh, orca, mix."""
    chunks = by_source(MIXED, {"hh": 0.5, "orca": 0.5, "mix": 0.9})
    assert [c.label for c in chunks] == ["mix", "hh", "orca"]


def test_by_source_needs_every_accuracy() -> None:
    with pytest.raises(ValueError, match=r"no M0 accuracy for source\(s\) \['orca'\]"):
        by_source(MIXED, {"hh": 0.5, "mix": 0.6})


def test_random_chunks_equal_disjoint_covering() -> None:
    """12 pairs in 5 chunks: sizes 12/5 = 2.4 -> each 2 or 3, 12 in all."""
    chunks = random_chunks(MIXED, 5, seed=3)
    sizes = [len(c.pairs) for c in chunks]
    assert sum(sizes) == 12 and max(sizes) - min(sizes) <= 1 and set(sizes) == {2, 3}
    ids = [p.id for c in chunks for p in c.pairs]
    assert len(ids) == len(set(ids)) and set(ids) == {p.id for p in MIXED}
    assert [c.label for c in chunks] == [f"random-{t}" for t in range(1, 6)]
    assert [c.step for c in chunks] == [1, 2, 3, 4, 5]
    assert all(c.m0_accuracy is None for c in chunks)


def test_random_chunks_deterministic_for_a_seed() -> None:
    a = random_chunks(MIXED, 3, seed=7)
    b = random_chunks(MIXED, 3, seed=7)
    c = random_chunks(MIXED, 3, seed=8)
    assert [x.pairs for x in a] == [x.pairs for x in b]
    assert [x.pairs for x in a] != [x.pairs for x in c]
    # Pooled: with 3 chunks of 4 from a shuffled mix, chunks are not just the file order.
    assert [p for x in a for p in x.pairs] != MIXED


def test_random_chunks_too_few_pairs() -> None:
    with pytest.raises(DataError, match="2 training pairs are too few for 3 steps"):
        random_chunks(MIXED[:2], 3, seed=0)


def test_make_chunks_dispatch() -> None:
    chunks = make_chunks(MIXED, PartitionConfig(strategy="random", num_steps=4, seed=0), None)
    assert [len(c.pairs) for c in chunks] == [3, 3, 3, 3]
    assert make_chunks(MIXED, PartitionConfig(strategy="random"), None)[0].label == "random-1"
    assert len(make_chunks(MIXED, PartitionConfig(strategy="random"), None)) == 2
    by = make_chunks(MIXED, PartitionConfig(strategy="by_source"), {"hh": 0.9, "orca": 0.1, "mix": 0.5})
    assert [c.label for c in by] == ["hh", "mix", "orca"]
    with pytest.raises(ValueError, match="needs M0's reward accuracy"):
        make_chunks(MIXED, PartitionConfig(strategy="by_source"), None)
