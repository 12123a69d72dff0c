"""Partition strategies (by_source, random, easy_to_hard, sequential), sizes, errors, M0's
accuracy per source and partition.json's record.

The partition task on the tiny real model is tested in tests/tasks/test_partition_task.py."""

from __future__ import annotations

import json

import pytest
import torch

from sdpo_core.config import DataConfig, PartitionConfig, RunConfig, SourceConfig
from sdpo_core.data import DataError, PreferencePair
from sdpo_core.partition import (
    by_source,
    chunk_sizes,
    easy_to_hard_order,
    partition_pairs,
    partition_record,
    source_accuracy,
)
from sdpo_core.records import ChunkInfo


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


def _random(pairs: list[PreferencePair], num_steps: int, seed: int) -> list:
    """The random strategy's chunks: equal ones of the pooled, shuffled pairs."""
    split = partition_pairs(pairs, PartitionConfig(strategy="random", num_steps=num_steps, seed=seed))
    assert split.unused == [], "equal chunks use every pair"
    return split.chunks


def test_random_chunks_equal_disjoint_covering() -> None:
    """12 pairs in 5 chunks: sizes 12/5 = 2.4 -> each 2 or 3, 12 in all."""
    chunks = _random(MIXED, 5, seed=3)
    sizes = [len(c.pairs) for c in chunks]
    assert sum(sizes) == 12 and max(sizes) - min(sizes) <= 1 and set(sizes) == {2, 3}
    ids = [p.id for c in chunks for p in c.pairs]
    assert len(ids) == len(set(ids)) and set(ids) == {p.id for p in MIXED}
    assert [c.label for c in chunks] == [f"random-{t}" for t in range(1, 6)]
    assert [c.step for c in chunks] == [1, 2, 3, 4, 5]
    assert all(c.m0_accuracy is None for c in chunks)


def test_random_chunks_deterministic_for_a_seed() -> None:
    a = _random(MIXED, 3, seed=7)
    b = _random(MIXED, 3, seed=7)
    c = _random(MIXED, 3, seed=8)
    assert [x.pairs for x in a] == [x.pairs for x in b]
    assert [x.pairs for x in a] != [x.pairs for x in c]
    # Pooled: with 3 chunks of 4 from a shuffled mix, chunks are not just the file order.
    assert [p for x in a for p in x.pairs] != MIXED


def test_random_chunks_too_few_pairs() -> None:
    with pytest.raises(DataError, match="2 training pairs are too few for 3 steps"):
        _random(MIXED[:2], 3, seed=0)


def test_partition_pairs_dispatch() -> None:
    chunks = partition_pairs(MIXED, PartitionConfig(strategy="random", num_steps=4, seed=0)).chunks
    assert [len(c.pairs) for c in chunks] == [3, 3, 3, 3]
    assert partition_pairs(MIXED, PartitionConfig(strategy="random")).chunks[0].label == "random-1"
    assert len(partition_pairs(MIXED, PartitionConfig(strategy="random")).chunks) == 2
    by = partition_pairs(MIXED, PartitionConfig(strategy="by_source"), {"hh": 0.9, "orca": 0.1, "mix": 0.5}).chunks
    assert [c.label for c in by] == ["hh", "mix", "orca"]
    with pytest.raises(ValueError, match="needs M0's reward accuracy"):
        partition_pairs(MIXED, PartitionConfig(strategy="by_source"), None)


# ---------------------------------------------------------------------------------------------
# The pooled strategies: order, cut, sizes, unused pairs, errors


def _ids(pairs: list[PreferencePair]) -> list[str]:
    return [p.id for p in pairs]


def test_sequential_keeps_the_given_order() -> None:
    """12 pairs in 3 steps: 4 each, consecutive in the input order."""
    split = partition_pairs(MIXED, PartitionConfig(strategy="sequential", num_steps=3))
    assert [c.pairs for c in split.chunks] == [MIXED[0:4], MIXED[4:8], MIXED[8:12]]
    assert [c.label for c in split.chunks] == ["sequential-1", "sequential-2", "sequential-3"]
    assert [c.step for c in split.chunks] == [1, 2, 3]
    assert split.unused == []
    assert all(c.m0_accuracy is None for c in split.chunks)


@pytest.mark.parametrize("strategy", ["random", "sequential", "easy_to_hard"])
def test_pooled_strategies_default_to_two_equal_steps(strategy: str) -> None:
    split = partition_pairs(MIXED, PartitionConfig(strategy=strategy), gammas=GAMMAS)
    assert [c.label for c in split.chunks] == [f"{strategy}-1", f"{strategy}-2"]
    assert [len(c.pairs) for c in split.chunks] == [6, 6]
    assert sorted(_ids([p for c in split.chunks for p in c.pairs])) == sorted(_ids(MIXED))


@pytest.mark.parametrize("strategy", ["by_source", "random", "sequential", "easy_to_hard"])
def test_one_step_is_plain_dpo_for_every_strategy(strategy: str) -> None:
    """T = 1: one chunk holding every training pair (by_source: a single source)."""
    pairs = _pairs("hh", 5) if strategy == "by_source" else MIXED
    gammas = [float(i % 3) for i in range(len(pairs))]
    split = partition_pairs(pairs, PartitionConfig(strategy=strategy, num_steps=1), {"hh": 0.5}, gammas)
    assert len(split.chunks) == 1 and split.chunks[0].step == 1 and split.unused == []
    assert sorted(_ids(split.chunks[0].pairs)) == sorted(_ids(pairs))
    assert split.chunks[0].label == ("hh" if strategy == "by_source" else f"{strategy}-1")


# M0's gamma of each pair of MIXED: ties at 2.0 (positions 1, 4, 9) and -1.0 (positions 2, 7).
GAMMAS = [0.5, 2.0, -1.0, 3.0, 2.0, -0.5, 0.0, -1.0, 1.5, 2.0, -2.0, 0.25]


def test_easy_to_hard_orders_pairs_by_gamma_highest_first() -> None:
    """Sorted by gamma, descending, ties in input order:
    3.0 (3), 2.0 (1, 4, 9), 1.5 (8), 0.5 (0), 0.25 (11), 0.0 (6), -0.5 (5), -1.0 (2, 7), -2.0 (10).
    Three chunks of 4; M0's accuracy per chunk is its share of gamma > 0: 4/4, 3/4, 0/4."""
    order = [3, 1, 4, 9, 8, 0, 11, 6, 5, 2, 7, 10]
    split = partition_pairs(MIXED, PartitionConfig(strategy="easy_to_hard", num_steps=3), gammas=GAMMAS)
    assert [p for c in split.chunks for p in c.pairs] == [MIXED[i] for i in order]
    assert [c.label for c in split.chunks] == ["easy_to_hard-1", "easy_to_hard-2", "easy_to_hard-3"]
    assert [c.m0_accuracy for c in split.chunks] == [1.0, 0.75, 0.0]
    assert easy_to_hard_order(MIXED, GAMMAS) == order


def test_easy_to_hard_needs_one_finite_gamma_per_pair() -> None:
    cfg = PartitionConfig(strategy="easy_to_hard")
    with pytest.raises(ValueError, match="needs M0's gamma per pair"):
        partition_pairs(MIXED, cfg)
    with pytest.raises(ValueError, match="11 M0 gammas for 12 pairs"):
        partition_pairs(MIXED, cfg, gammas=GAMMAS[:-1])
    with pytest.raises(ValueError, match=r"NaN for pair\(s\) at position\(s\) \[2\]"):
        partition_pairs(MIXED, cfg, gammas=GAMMAS[:2] + [float("nan")] + GAMMAS[3:])


def test_sizes_as_counts_leave_the_rest_unused() -> None:
    """sizes (3, 5) of 12 pairs: chunks of 3 and 5; the last 4 pairs of the order are unused."""
    seq = partition_pairs(MIXED, PartitionConfig(strategy="sequential", sizes=(3, 5)))
    assert [c.pairs for c in seq.chunks] == [MIXED[0:3], MIXED[3:8]]
    assert seq.unused == MIXED[8:]
    e2h = partition_pairs(MIXED, PartitionConfig(strategy="easy_to_hard", sizes=(3.0, 5.0)), gammas=GAMMAS)
    assert [len(c.pairs) for c in e2h.chunks] == [3, 5]
    assert e2h.unused == [MIXED[i] for i in (5, 2, 7, 10)], "the hardest pairs are left over"
    rnd = partition_pairs(MIXED, PartitionConfig(strategy="random", sizes=(3, 5), seed=1))
    used = [p for c in rnd.chunks for p in c.pairs]
    assert len(rnd.unused) == 4 and sorted(_ids(used + rnd.unused)) == sorted(_ids(MIXED))
    # Counts that use every pair leave nothing over.
    assert partition_pairs(MIXED, PartitionConfig(strategy="sequential", sizes=(7, 5))).unused == []


@pytest.mark.parametrize(
    ("sizes", "num_pairs", "expected"),
    [
        ((0.25, 0.75), 12, [3, 9]),  # bounds 0, 3, 12
        ((0.5, 0.5), 5, [2, 3]),  # bounds 0, round(2.5) = 2 (half to even), 5
        ((0.3, 0.3, 0.4), 10, [3, 3, 4]),  # bounds 0, 3, 6, 10 (0.3 + 0.3 is 0.6000000000000001)
        ((0.2, 0.2, 0.2, 0.2, 0.2), 7, [1, 2, 1, 2, 1]),  # bounds 0, 1.4, 2.8, 4.2, 5.6 -> 0, 1, 3, 4, 6, 7
        ((1 / 3, 2 / 3), 1000, [333, 667]),
    ],
)
def test_sizes_as_fractions_place_every_pair_once(sizes, num_pairs: int, expected: list[int]) -> None:
    assert chunk_sizes(num_pairs, len(sizes), sizes) == expected
    pairs = _pairs("p", num_pairs)
    split = partition_pairs(pairs, PartitionConfig(strategy="sequential", sizes=sizes))
    assert [len(c.pairs) for c in split.chunks] == expected and split.unused == []
    assert [p for c in split.chunks for p in c.pairs] == pairs


def test_equal_chunks_differ_by_at_most_one() -> None:
    """12 pairs in 5 steps: bounds round(12 i / 5) = 0, 2, 5, 7, 10, 12 (2.4 -> 2, 4.8 -> 5, 7.2 -> 7, 9.6 -> 10)."""
    assert chunk_sizes(12, 5) == [2, 3, 2, 3, 2]
    assert chunk_sizes(3, 3) == [1, 1, 1]


@pytest.mark.parametrize(
    ("cfg", "num_pairs", "message"),
    [
        (PartitionConfig(strategy="sequential", num_steps=4), 3, "3 training pairs are too few for 4 steps"),
        (PartitionConfig(strategy="easy_to_hard"), 1, "1 training pairs are too few for 2 steps"),
        (PartitionConfig(strategy="random", num_steps=2), 0, "0 training pairs are too few for 2 steps"),
        (
            PartitionConfig(strategy="sequential", sizes=(5, 8)),
            12,
            r"partition.sizes \[5, 8\] ask for 13 pairs in 2 steps, but there are only 12 training pairs",
        ),
        (
            PartitionConfig(strategy="random", sizes=(0.02, 0.98)),
            12,
            r"partition.sizes \[0.02, 0.98\] of 12 training pairs leave step\(s\) \[1\] of 2 empty "
            r"\(chunk sizes \[0, 12\]\): every step needs at least one pair",
        ),
        (
            PartitionConfig(strategy="sequential", sizes=(0.5, 0.02, 0.48)),
            12,
            r"leave step\(s\) \[2\] of 3 empty \(chunk sizes \[6, 0, 6\]\)",
        ),
    ],
)
def test_too_few_pairs_or_an_empty_chunk_is_a_data_error(cfg: PartitionConfig, num_pairs: int, message: str) -> None:
    pairs = _pairs("p", num_pairs)
    with pytest.raises(DataError, match=message):
        partition_pairs(pairs, cfg, gammas=[0.0] * num_pairs)


def test_min_pairs_per_step() -> None:
    with pytest.raises(DataError, match="12 training pairs are too few for 3 steps: every step needs at least 5 pairs"):
        partition_pairs(MIXED, PartitionConfig(strategy="sequential", num_steps=3), min_pairs=5)
    with pytest.raises(DataError, match=r"leave step\(s\) \[1\] of 2 with fewer than 4 pairs \(chunk sizes \[3, 9\]\)"):
        partition_pairs(MIXED, PartitionConfig(strategy="sequential", sizes=(0.25, 0.75)), min_pairs=4)
    with pytest.raises(
        DataError, match=r"leave too few pairs for source\(s\) \{'orca': 3\}: every step needs at least 4"
    ):
        partition_pairs(MIXED, PartitionConfig(strategy="by_source"), {"hh": 0.1, "orca": 0.2, "mix": 0.3}, min_pairs=4)
    assert len(partition_pairs(MIXED, PartitionConfig(strategy="sequential", num_steps=3), min_pairs=4).chunks) == 3


def test_by_source_step_count_must_match_the_sources() -> None:
    accuracy = {"hh": 0.1, "orca": 0.2, "mix": 0.3}
    with pytest.raises(DataError, match=r"the 12 training pairs come from 3 source\(s\), but num_steps is 2"):
        partition_pairs(MIXED, PartitionConfig(strategy="by_source", num_steps=2), accuracy)
    with pytest.raises(DataError, match="0 training pairs are too few"):
        partition_pairs([], PartitionConfig(strategy="by_source"), accuracy)


@pytest.mark.parametrize("strategy", ["random", "sequential", "easy_to_hard"])
def test_deterministic_for_a_seed(strategy: str) -> None:
    cfg = PartitionConfig(strategy=strategy, sizes=(0.5, 0.25, 0.25), seed=11)
    a = partition_pairs(MIXED, cfg, gammas=GAMMAS)
    b = partition_pairs(list(MIXED), cfg, gammas=list(GAMMAS))
    assert [c.pairs for c in a.chunks] == [c.pairs for c in b.chunks]
    other = partition_pairs(MIXED, PartitionConfig(strategy=strategy, sizes=(0.5, 0.25, 0.25), seed=12), gammas=GAMMAS)
    same_order = [c.pairs for c in other.chunks] == [c.pairs for c in a.chunks]
    assert same_order == (strategy != "random"), "only random depends on the seed"


# ---------------------------------------------------------------------------------------------
# M0's accuracy per source, and what partition.json records


def _scores_with_gamma(gammas: list[float]) -> dict[str, torch.Tensor]:
    """Scores whose summed gamma is ``gammas``; with 1 chosen and 10 rejected tokens, their mean
    (length-normalised) gamma is -9 + gamma / 10, below 0 for every gamma here."""
    g = torch.tensor(gammas)
    return {
        "chosen": torch.full_like(g, -10.0),
        "rejected": -10.0 - g,
        "chosen_tokens": torch.ones_like(g),
        "rejected_tokens": torch.full_like(g, 10.0),
    }


def test_source_accuracy_per_source_in_first_appearance_order() -> None:
    """MIXED's positions by source: hh 0, 3, 6, 9, 11; orca 1, 5, 8; mix 2, 4, 7, 10. GAMMAS is
    above 0 at 0, 1, 3, 4, 8, 9, 11 (0.0 at 6 is not): hh 4/5, orca 2/3, mix 1/4."""
    scores = _scores_with_gamma(GAMMAS)
    accuracy = source_accuracy(MIXED, scores, "sum")
    assert list(accuracy) == ["hh", "orca", "mix"]
    assert accuracy == pytest.approx({"hh": 4 / 5, "orca": 2 / 3, "mix": 1 / 4})
    assert source_accuracy(MIXED, scores, "mean") == {"hh": 0.0, "orca": 0.0, "mix": 0.0}, "the form is used"
    assert [c.label for c in by_source(MIXED, accuracy)] == ["hh", "orca", "mix"]


def _run_cfg(**partition) -> RunConfig:
    # A RunConfig checks its values when built: it needs at least one source.
    return RunConfig(
        data=DataConfig(sources=(SourceConfig(path="data/x.jsonl"),)), partition=PartitionConfig(**partition)
    )


def _infos(split, folder: str = "/runs/r/chunks") -> list[ChunkInfo]:
    return [
        ChunkInfo(
            step=c.step,
            label=c.label,
            path=f"{folder}/step-{c.step}.jsonl",
            size=len(c.pairs),
            content_hash=f"hash-{c.step}",
            m0_accuracy=c.m0_accuracy,
        )
        for c in split.chunks
    ]


def test_partition_record_lists_settings_chunks_and_unused_pairs() -> None:
    cfg = _run_cfg(strategy="easy_to_hard", sizes=(3.0, 5.0), seed=4, accuracy="mean")
    split = partition_pairs(MIXED, cfg.partition, gammas=GAMMAS)
    accuracy = {"hh": 0.8, "orca": 0.5, "mix": 0.25}
    record = partition_record(cfg, _infos(split), split, accuracy, len(MIXED))
    assert json.loads(json.dumps(record)) == record, "plain JSON"
    assert {k: v for k, v in record.items() if k != "chunks"} == {
        "strategy": "easy_to_hard",
        "order": "easy_to_hard",
        "seed": 4,
        "num_steps": 2,
        "sizes": [3, 5],
        "accuracy_form": "mean",
        "m0_accuracy": accuracy,
        "train_pairs": 12,
        "unused_pairs": 4,
        "unused_pair_ids": [MIXED[i].id for i in (5, 2, 7, 10)],
    }
    assert all(isinstance(n, int) for n in record["sizes"]), "counts are recorded as integers"
    assert record["chunks"] == [
        {
            "step": 1,
            "label": "easy_to_hard-1",
            "size": 3,
            "content_hash": "hash-1",
            "m0_accuracy": 1.0,
            "file": "step-1.jsonl",
            "pair_ids": [MIXED[i].id for i in (3, 1, 4)],
        },
        {
            "step": 2,
            "label": "easy_to_hard-2",
            "size": 5,
            "content_hash": "hash-2",
            "m0_accuracy": 0.8,
            "file": "step-2.jsonl",
            "pair_ids": [MIXED[i].id for i in (9, 8, 0, 11, 6)],
        },
    ]


def test_partition_record_keeps_fractions_and_no_accuracy() -> None:
    cfg = _run_cfg(strategy="random", sizes=(0.25, 0.75), seed=2)
    split = partition_pairs(MIXED, cfg.partition)
    record = partition_record(cfg, _infos(split), split, None, len(MIXED))
    assert record["sizes"] == [0.25, 0.75] and record["m0_accuracy"] is None
    assert record["unused_pairs"] == 0 and record["unused_pair_ids"] == []
    assert [c["pair_ids"] for c in record["chunks"]] == [[p.id for p in c.pairs] for c in split.chunks]
    assert [c["m0_accuracy"] for c in record["chunks"]] == [None, None]
    with pytest.raises(ValueError):
        partition_record(cfg, _infos(split)[:1], split, None, len(MIXED))  # one info per chunk


def test_hard_to_easy_reverses_by_source_and_easy_to_hard() -> None:
    accuracy = {"hh": 0.8, "orca": 0.5, "mix": 0.25}
    forward = partition_pairs(MIXED, _run_cfg(strategy="by_source").partition, accuracy)
    backward = partition_pairs(MIXED, _run_cfg(strategy="by_source", order="hard_to_easy").partition, accuracy)
    assert [c.label for c in forward.chunks] == ["hh", "orca", "mix"]
    assert [c.label for c in backward.chunks] == ["mix", "orca", "hh"]
    assert [len(c.pairs) for c in backward.chunks] == [len(c.pairs) for c in reversed(forward.chunks)]
    easy = partition_pairs(MIXED, _run_cfg(strategy="easy_to_hard", num_steps=2).partition, gammas=GAMMAS)
    hard = partition_pairs(
        MIXED, _run_cfg(strategy="easy_to_hard", num_steps=2, order="hard_to_easy").partition, gammas=GAMMAS
    )
    easy_order = [p.id for c in easy.chunks for p in c.pairs]
    hard_order = [p.id for c in hard.chunks for p in c.pairs]
    assert hard_order == easy_order[::-1]
    assert hard.chunks[0].m0_accuracy <= easy.chunks[0].m0_accuracy
