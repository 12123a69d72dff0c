"""Partition strategies: split the training pairs into the steps D1..DT."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sdpo_core.config import PartitionConfig
from sdpo_core.data import DataError, PreferencePair, shuffled


@dataclass(frozen=True)
class Chunk:
    """The pairs of one step, and why they are there."""

    step: int
    label: str
    """The source name (by_source) or ``random-<step>``."""
    pairs: list[PreferencePair]
    m0_accuracy: float | None = None
    """M0's reward accuracy on the chunk (by_source ordering key)."""


def by_source(pairs: Sequence[PreferencePair], accuracy: dict[str, float]) -> list[Chunk]:
    """One chunk per source, easy to hard: M0's reward accuracy per source, highest first.

    This is sDPO's rule (arXiv 2403.19270, section 3.2). Ties keep the order of first appearance.
    """
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.source, []).append(p)
    missing = sorted(set(groups) - set(accuracy))
    if missing:
        raise ValueError(f"no M0 accuracy for source(s) {missing}")
    order = sorted(groups, key=lambda s: -accuracy[s])  # stable: ties keep first appearance
    return [Chunk(t, s, groups[s], accuracy[s]) for t, s in enumerate(order, start=1)]


def random_chunks(pairs: Sequence[PreferencePair], num_steps: int, seed: int) -> list[Chunk]:
    """Equal chunks of the pooled, shuffled pairs (the paper's "sDPO Rand." ablation)."""
    if len(pairs) < num_steps:
        raise DataError(f"{len(pairs)} training pairs are too few for {num_steps} steps")
    mixed = shuffled(pairs, seed)
    bounds = [round(i * len(mixed) / num_steps) for i in range(num_steps + 1)]
    return [Chunk(t + 1, f"random-{t + 1}", mixed[bounds[t] : bounds[t + 1]]) for t in range(num_steps)]


def make_chunks(
    pairs: Sequence[PreferencePair], cfg: PartitionConfig, accuracy: dict[str, float] | None
) -> list[Chunk]:
    """Chunks by the configured strategy; ``accuracy`` (per source) is needed for by_source."""
    if cfg.strategy == "by_source":
        if accuracy is None:
            raise ValueError("by_source needs M0's reward accuracy per source")
        return by_source(pairs, accuracy)
    if cfg.strategy == "random":
        return random_chunks(pairs, cfg.num_steps or 2, cfg.seed)
    raise ValueError(f"unknown partition strategy {cfg.strategy!r}")
