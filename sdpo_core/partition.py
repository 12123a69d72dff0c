"""Partition strategies: split the training pairs into the steps D1..DT.

- ``by_source``: one chunk per source, easy to hard by M0's reward accuracy (sDPO, section 3.2).
- ``random``: the pooled pairs, shuffled with a seed, then cut (the paper's "sDPO Rand." ablation).
- ``easy_to_hard``: the pooled pairs ordered by M0's gamma, highest (easiest) first, then cut.
- ``sequential``: the pooled pairs in the order given (sources in recipe order, rows in file
  order), then cut.

The pooled strategies cut their order into T chunks: equal ones, or the configured ``sizes``
(pair counts, whose leftover pairs at the end of the order are not trained on, or fractions).
Every chunk must hold at least one pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdpo_core.config import PartitionConfig, RunConfig
from sdpo_core.data import DataError, PreferencePair, shuffled
from sdpo_core.evaluate import Scores, self_reward_accuracy
from sdpo_core.records import ChunkInfo

M0_SCORED = ("by_source", "easy_to_hard")
"""Strategies that need M0's scores of the training pairs."""


@dataclass(frozen=True)
class Chunk:
    """The pairs of one step, and why they are there."""

    step: int
    label: str
    """The source name (by_source) or ``<strategy>-<step>`` (e.g. ``random-1``)."""
    pairs: list[PreferencePair]
    m0_accuracy: float | None = None
    """M0's reward accuracy on the chunk (by_source's ordering key); None when M0 did not score it."""


@dataclass(frozen=True)
class Partition:
    """The chunks D1..DT, and the training pairs that no step trains on."""

    chunks: list[Chunk]
    unused: list[PreferencePair] = field(default_factory=list)
    """Pairs left over when explicit pair counts sum to less than the training pairs."""


def needs_m0_scores(strategy: str) -> bool:
    """Whether a strategy orders pairs by M0's scores (so M0 must score the training set)."""
    return strategy in M0_SCORED


def chunk_sizes(num_pairs: int, num_steps: int, sizes: Sequence[float] | None = None, min_pairs: int = 1) -> list[int]:
    """Pairs per step for ``num_pairs`` pooled pairs.

    ``sizes`` None: equal chunks (differing by at most one pair). Whole numbers: pair counts,
    summing to at most ``num_pairs``; the rest is left over. Otherwise fractions summing to 1,
    rounded at the cumulative boundaries so that every pair lands in exactly one chunk.

    Raises:
        DataError: too few pairs for the steps, counts above the pairs, or a chunk with fewer
            than ``min_pairs`` pairs (an empty one at least).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    need = _needs(min_pairs)
    if num_pairs < num_steps * min_pairs:
        raise DataError(f"{num_pairs} training pairs are too few for {num_steps} steps: {need}")
    if sizes is None:
        # Equal chunks: their sizes differ by at most one, so each is at least min_pairs.
        bounds = [round(i * num_pairs / num_steps) for i in range(num_steps + 1)]
        return [bounds[t + 1] - bounds[t] for t in range(num_steps)]
    if len(sizes) != num_steps:
        raise ValueError(f"{len(sizes)} sizes given for {num_steps} steps")
    if any(not x > 0 for x in sizes):
        raise ValueError(f"partition sizes must be positive, got {list(sizes)}")
    if all(float(x).is_integer() for x in sizes):
        counts = [int(x) for x in sizes]
        given: list[int] | list[float] = counts
        if sum(counts) > num_pairs:
            raise DataError(
                f"partition.sizes {counts} ask for {sum(counts)} pairs in {num_steps} steps, "
                f"but there are only {num_pairs} training pairs"
            )
    else:
        if abs(sum(sizes) - 1.0) > 1e-6:
            raise ValueError(f"partition sizes that are fractions must sum to 1, got {sum(sizes):.6g}")
        given = list(sizes)
        # Round the cumulative boundaries, not each size: the chunks then cover all pairs once.
        cumulative = [sum(sizes[:t]) for t in range(num_steps)] + [1.0]
        bounds = [min(num_pairs, round(c * num_pairs)) for c in cumulative]
        counts = [bounds[t + 1] - bounds[t] for t in range(num_steps)]
    small = [t + 1 for t, n in enumerate(counts) if n < min_pairs]
    if small:
        what = "empty" if min_pairs <= 1 else f"with fewer than {min_pairs} pairs"
        raise DataError(
            f"partition.sizes {given} of {num_pairs} training pairs leave step(s) {small} of {num_steps} "
            f"{what} (chunk sizes {counts}): {need}"
        )
    return counts


def _needs(min_pairs: int) -> str:
    return "every step needs at least one pair" if min_pairs <= 1 else f"every step needs at least {min_pairs} pairs"


def cut(ordered: Sequence[PreferencePair], counts: Sequence[int], label: str) -> Partition:
    """Consecutive chunks of ``ordered`` with the given pair counts, labelled ``<label>-<step>``.

    Pairs after the last chunk are the partition's unused pairs.
    """
    chunks = []
    start = 0
    for t, n in enumerate(counts, start=1):
        assert n >= 1, "chunk_sizes guarantees non-empty chunks"
        chunks.append(Chunk(t, f"{label}-{t}", list(ordered[start : start + n])))
        start += n
    return Partition(chunks, list(ordered[start:]))


def by_source(pairs: Sequence[PreferencePair], accuracy: dict[str, float], reverse: bool = False) -> list[Chunk]:
    """One chunk per source, easy to hard: M0's reward accuracy per source, highest first.

    This is sDPO's rule (arXiv 2403.19270, section 3.2). Ties keep the order of first appearance.
    ``reverse``: hard to easy (the control arm of an experiment).
    """
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.source, []).append(p)
    missing = sorted(set(groups) - set(accuracy))
    if missing:
        raise ValueError(f"no M0 accuracy for source(s) {missing}")
    order = sorted(groups, key=lambda s: -accuracy[s])  # stable: ties keep first appearance
    if reverse:
        order.reverse()
    return [Chunk(t, s, groups[s], accuracy[s]) for t, s in enumerate(order, start=1)]


def easy_to_hard_order(pairs: Sequence[PreferencePair], gammas: Sequence[float]) -> list[int]:
    """Indices of ``pairs`` by M0's gamma, highest (easiest) first; ties keep the input order."""
    if len(gammas) != len(pairs):
        raise ValueError(f"{len(gammas)} M0 gammas for {len(pairs)} pairs")
    bad = [i for i, g in enumerate(gammas) if math.isnan(g)]
    if bad:
        raise ValueError(f"M0's gamma is NaN for pair(s) at position(s) {bad[:10]}")
    return sorted(range(len(pairs)), key=lambda i: -gammas[i])  # sorted() is stable


def partition_pairs(
    pairs: Sequence[PreferencePair],
    cfg: PartitionConfig,
    accuracy: dict[str, float] | None = None,
    gammas: Sequence[float] | None = None,
    min_pairs: int = 1,
) -> Partition:
    """The partition of the training pairs by the configured strategy.

    Args:
        pairs: the training pairs, in the order prepare_data wrote them.
        cfg: strategy, num_steps, sizes and seed.
        accuracy: M0's reward accuracy per source; needed by by_source.
        gammas: M0's gamma per pair (N,), aligned with ``pairs``, in the form ``cfg.accuracy``;
            needed by easy_to_hard, which also records each chunk's share of gamma > 0.
        min_pairs: fewest pairs a chunk may hold.

    Raises:
        DataError: too few pairs for the steps, or a chunk with fewer than ``min_pairs``.
    """
    if cfg.strategy == "by_source":
        if accuracy is None:
            raise ValueError("by_source needs M0's reward accuracy per source")
        if not pairs:
            raise DataError(f"0 training pairs are too few for {cfg.num_steps or 1} step(s): {_needs(min_pairs)}")
        chunks = by_source(pairs, accuracy, reverse=cfg.order == "hard_to_easy")
        if cfg.num_steps is not None and cfg.num_steps != len(chunks):
            raise DataError(
                f"by_source makes one step per source: the {len(pairs)} training pairs come from "
                f"{len(chunks)} source(s), but num_steps is {cfg.num_steps}"
            )
        small = {c.label: len(c.pairs) for c in chunks if len(c.pairs) < min_pairs}
        if small:
            raise DataError(
                f"by_source: {len(pairs)} training pairs in {len(chunks)} steps (one per source) "
                f"leave too few pairs for source(s) {small}: {_needs(min_pairs)}"
            )
        return Partition(chunks)
    num_steps = cfg.pooled_num_steps()
    counts = chunk_sizes(len(pairs), num_steps, cfg.sizes, min_pairs)
    if cfg.strategy == "random":
        return cut(shuffled(pairs, cfg.seed), counts, "random")
    if cfg.strategy == "sequential":
        return cut(pairs, counts, "sequential")
    if cfg.strategy == "easy_to_hard":
        if gammas is None:
            raise ValueError("easy_to_hard needs M0's gamma per pair")
        order = easy_to_hard_order(pairs, gammas)
        if cfg.order == "hard_to_easy":
            order.reverse()
        split = cut([pairs[i] for i in order], counts, cfg.order)
        start, chunks = 0, []
        for chunk in split.chunks:
            g = [gammas[i] for i in order[start : start + len(chunk.pairs)]]
            start += len(chunk.pairs)
            chunks.append(Chunk(chunk.step, chunk.label, chunk.pairs, sum(x > 0 for x in g) / len(g)))
        return Partition(chunks, split.unused)
    raise ValueError(f"unknown partition strategy {cfg.strategy!r}")


def source_accuracy(pairs: Sequence[PreferencePair], scores: Scores, form: str) -> dict[str, float]:
    """M0's reward accuracy (share of gamma > 0) per source, in order of first appearance.

    ``scores`` holds M0's scores of ``pairs``, row for row.
    """
    rows: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        rows.setdefault(pair.source, []).append(i)
    return {
        source: self_reward_accuracy({k: v[torch.tensor(idx)] for k, v in scores.items()}, form)
        for source, idx in rows.items()
    }


PARTITION_FILE = "partition.json"
"""The partition's record, in the chunks folder beside the step-<t>.jsonl files."""


def partition_record(
    cfg: RunConfig, infos: list[ChunkInfo], split: Partition, accuracy: dict[str, float] | None, num_train: int
) -> dict:
    """What partition.json holds: the settings, M0's accuracy per source (when computed), each
    chunk's step, label, size, content hash and pair ids in order, and the unused pairs."""
    p = cfg.partition
    return {
        "strategy": p.strategy,
        "seed": p.seed,
        "order": p.order,
        "num_steps": len(infos),
        # Whole numbers are pair counts: record them as integers.
        "sizes": [int(x) if float(x).is_integer() else x for x in p.sizes] if p.sizes is not None else None,
        "accuracy_form": p.accuracy,
        "m0_accuracy": accuracy,
        "train_pairs": num_train,
        "unused_pairs": len(split.unused),
        "unused_pair_ids": [pair.id for pair in split.unused],
        "chunks": [
            {
                "step": info.step,
                "label": info.label,
                "size": info.size,
                "content_hash": info.content_hash,
                "m0_accuracy": info.m0_accuracy,
                "file": Path(info.path).name,
                "pair_ids": [pair.id for pair in chunk.pairs],
            }
            for info, chunk in zip(infos, split.chunks, strict=True)
        ],
    }
