"""Partition strategies (by_source, random, easy_to_hard, sequential), sizes, errors, and the
partition stage on the tiny real model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdpo_core import stages
from sdpo_core.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, SourceConfig, TrainConfig
from sdpo_core.data import DataError, PreferencePair, load_source, read_pairs, tokenize_pairs, write_pairs
from sdpo_core.evaluate import gamma
from sdpo_core.logprobs import score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.partition import (
    by_source,
    chunk_sizes,
    easy_to_hard_order,
    make_chunks,
    partition_pairs,
    random_chunks,
)


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
# On the tiny real model: the orders M0's scores give, and the partition stage end to end

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "models" / "stories260K")
DATA = REPO / "data"
# Pairs per source, chosen so that M0's (summed) reward accuracies differ: orca 0/4, mix 2/6, hh 2/5.
REAL_SOURCES = [
    ("orca", DATA / "orca_dpo_pairs_validation_msfoundry.jsonl", 4),
    ("mix", DATA / "llamafactory_dpo_en_demo.json", 6),
    ("hh", DATA / "hh-rlhf_helpful-base_test.jsonl.gz", 5),
]


@pytest.fixture(scope="module")
def real_pairs() -> list[PreferencePair]:
    """15 real pairs, sources in recipe order and rows in file order, as prepare_data writes them."""
    pairs: list[PreferencePair] = []
    for name, path, n in REAL_SOURCES:
        loaded, _ = load_source(SourceConfig(path=str(path), name=name, max_pairs=n))
        pairs.extend(loaded)
    return pairs


def _run_cfg(**partition) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name_or_path=MODEL),
        data=DataConfig(max_length=96, max_prompt_length=48),
        partition=PartitionConfig(**partition),
        train=TrainConfig(device="cpu", eval_batch_size=16),
    )


def _m0_scores(cfg: RunConfig, pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    """M0's scores, computed here with score_pairs directly (not through the stage's cache)."""
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    tokenized = tokenize_pairs(pairs, tokenizer, cfg.data)
    return score_pairs(model, tokenized, pad_id(tokenizer), cfg.train.eval_batch_size)


def _stage(cfg: RunConfig, pairs: list[PreferencePair], tmp_path: Path) -> tuple[list, dict]:
    """Run stages.partition on a training file of ``pairs``; (chunk infos, partition.json)."""
    train_path = tmp_path / "data" / "train.jsonl"
    write_pairs(pairs, train_path)
    # The stage reads only the training file's path from PreparedData.
    prepared = SimpleNamespace(train_path=str(train_path))
    infos = stages.partition(cfg, prepared, MODEL, tmp_path / "chunks", tmp_path / "cache")
    record = json.loads((tmp_path / "chunks" / "partition.json").read_text())
    return infos, record


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_by_source_order_from_m0_on_the_real_model(real_pairs, tmp_path: Path, form: str) -> None:
    cfg = _run_cfg(strategy="by_source", accuracy=form)
    g = gamma(_m0_scores(cfg, real_pairs), form)
    accuracy = {}
    for name, _, _ in REAL_SOURCES:
        mask = torch.tensor([p.source == name for p in real_pairs])
        accuracy[name] = float((g[mask] > 0).float().mean())
    assert len(set(accuracy.values())) == 3, f"the fixture needs distinct accuracies, got {accuracy}"
    expected = sorted(accuracy, key=lambda s: -accuracy[s])

    infos, record = _stage(cfg, real_pairs, tmp_path)
    assert [i.label for i in infos] == expected
    assert [i.m0_accuracy for i in infos] == pytest.approx([accuracy[s] for s in expected])
    assert record["m0_accuracy"] == pytest.approx(accuracy)
    assert list(record["m0_accuracy"]) == [name for name, _, _ in REAL_SOURCES], "in recipe order"
    assert record["accuracy_form"] == form
    for info, chunk in zip(infos, record["chunks"], strict=True):
        assert chunk["pair_ids"] == [p.id for p in real_pairs if p.source == info.label]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_easy_to_hard_order_from_m0_on_the_real_model(real_pairs, tmp_path: Path, form: str) -> None:
    cfg = _run_cfg(strategy="easy_to_hard", num_steps=3, accuracy=form)
    g = gamma(_m0_scores(cfg, real_pairs), form).tolist()
    expected = sorted(range(len(real_pairs)), key=lambda i: -g[i])
    ranked = [g[i] for i in expected]
    assert min(a - b for a, b in zip(ranked, ranked[1:], strict=False)) > 1e-3, "no near-ties to flip"

    infos, record = _stage(cfg, real_pairs, tmp_path)
    assert [i.label for i in infos] == ["easy_to_hard-1", "easy_to_hard-2", "easy_to_hard-3"]
    assert [i.size for i in infos] == [5, 5, 5]
    ordered = [pid for chunk in record["chunks"] for pid in chunk["pair_ids"]]
    assert ordered == [real_pairs[i].id for i in expected]
    for info, t in zip(infos, range(3), strict=True):
        assert info.m0_accuracy == pytest.approx(sum(x > 0 for x in ranked[5 * t : 5 * t + 5]) / 5)


@pytest.mark.usefixtures("one_thread")
def test_partition_stage_end_to_end(real_pairs, tmp_path: Path, monkeypatch) -> None:
    """easy_to_hard with counts (6, 5) of 15 pairs: partition.json lists each chunk's pairs in
    order and the 4 unused ones; every training pair is in exactly one of them; step 1's M0
    scores are in the cache under score_file's key, so scoring step 1's reference is a cache hit."""
    cfg = _run_cfg(strategy="easy_to_hard", sizes=(6.0, 5.0), seed=3)  # as the config holds them
    infos, record = _stage(cfg, real_pairs, tmp_path)

    assert [(i.step, i.label, i.size) for i in infos] == [(1, "easy_to_hard-1", 6), (2, "easy_to_hard-2", 5)]
    assert {k: record[k] for k in ("strategy", "seed", "num_steps", "sizes", "train_pairs", "unused_pairs")} == {
        "strategy": "easy_to_hard",
        "seed": 3,
        "num_steps": 2,
        "sizes": [6, 5],
        "train_pairs": 15,
        "unused_pairs": 4,
    }
    assert all(isinstance(n, int) for n in record["sizes"]), "counts are recorded as integers"
    assert set(record["m0_accuracy"]) == {"orca", "mix", "hh"}
    for info, chunk in zip(infos, record["chunks"], strict=True):
        on_disk = read_pairs(Path(info.path))
        assert chunk["pair_ids"] == [p.id for p in on_disk]
        assert (chunk["step"], chunk["label"], chunk["size"]) == (info.step, info.label, info.size)
        assert chunk["content_hash"] == info.content_hash == content_hash_of_file(Path(info.path))
        assert chunk["file"] == Path(info.path).name
    listed = [pid for chunk in record["chunks"] for pid in chunk["pair_ids"]] + record["unused_pair_ids"]
    assert sorted(listed) == sorted(p.id for p in real_pairs), "each training pair exactly once"

    # Step 1's reference log-probs: score_file finds them in the cache and scores nothing.
    step1 = infos[0]
    key = stages.scores_key(cfg, stages.model_fingerprint(MODEL), step1.path)
    cached = tmp_path / "cache" / f"{key}.safetensors"
    assert cached.is_file()

    def no_scoring(*args, **kwargs):
        raise AssertionError("step 1's M0 scores should come from the cache")

    monkeypatch.setattr(stages, "score_pairs", no_scoring)
    assert stages.score_file(cfg, MODEL, step1.path, tmp_path / "cache") == str(cached)
    monkeypatch.undo()
    direct = _m0_scores(cfg, read_pairs(Path(step1.path)))
    for k, v in stages.load_scores(cached).items():
        torch.testing.assert_close(v, direct[k], atol=1e-4, rtol=1e-5)


def test_random_stage_does_not_score(real_pairs, tmp_path: Path, monkeypatch) -> None:
    """random and sequential do not need M0's scores: nothing is scored, nothing cached."""

    def no_scoring(*args, **kwargs):
        raise AssertionError("random does not need M0's scores")

    monkeypatch.setattr(stages, "score_file", no_scoring)
    for strategy in ("random", "sequential"):
        infos, record = _stage(_run_cfg(strategy=strategy, num_steps=3, seed=5), real_pairs, tmp_path / strategy)
        assert [i.label for i in infos] == [f"{strategy}-{t}" for t in (1, 2, 3)]
        assert [i.m0_accuracy for i in infos] == [None, None, None]
        assert record["m0_accuracy"] is None and record["unused_pairs"] == 0
        assert not (tmp_path / strategy / "cache").exists()
    sequential = [pid for chunk in record["chunks"] for pid in chunk["pair_ids"]]
    assert sequential == [p.id for p in real_pairs], "sequential: the training file's order"


def content_hash_of_file(path: Path) -> str:
    """write_pairs' hash: the first 16 hex digits of the sha256 of the file's text."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
