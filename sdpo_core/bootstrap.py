"""Confidence intervals by the paired bootstrap, over seeds and items together.

An arm of an experiment gives one value per (seed, item): the item is a held-out pair or prompt,
the same items for every arm. A bootstrap replicate draws seeds and items with replacement and
takes the mean of the drawn cells; the interval is the percentile interval of the replicates
(Efron and Tibshirani, *An Introduction to the Bootstrap*, ch. 13). A difference between two
arms is paired: both arms use the same drawn seed positions and the same drawn items, so the
variation the arms share (hard items, lucky seeds) cancels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
REPLICATES = 2000


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    seeds: int
    items: int

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of zero (a difference told apart from noise)."""
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _grid(values: np.ndarray | list) -> np.ndarray:
    """Values as a (seeds, items) float array; a 1-D array is one seed."""
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim == 1:
        grid = grid[None, :]
    if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] < 1:
        raise ValueError(f"bootstrap needs a non-empty (seeds, items) array, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("bootstrap values must be finite")
    return grid


def _draws(seeds: int, items: int, replicates: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Drawn seed positions (R, S) and item positions (R, N), with replacement."""
    return rng.integers(0, seeds, size=(replicates, seeds)), rng.integers(0, items, size=(replicates, items))


def _replicate_means(grid: np.ndarray, seed_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """The mean of each replicate's drawn cells, (R,). The mean over the drawn cells of a product
    of draws is the mean over drawn items of the mean over drawn seeds, done without a (R, S, N)
    array: per replicate, the seed-averaged row at the drawn items."""
    out = np.empty(len(seed_idx))
    for r in range(len(seed_idx)):
        rows = grid[seed_idx[r]].mean(axis=0)  # (N,): the drawn seeds, averaged
        out[r] = rows[item_idx[r]].mean()
    return out


def interval(
    values: np.ndarray | list,
    *,
    replicates: int = REPLICATES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` (seeds, items) with its bootstrap interval over seeds and items."""
    grid = _grid(values)
    rng = np.random.default_rng(seed)
    seed_idx, item_idx = _draws(grid.shape[0], grid.shape[1], replicates, rng)
    return _summary(grid.mean(), _replicate_means(grid, seed_idx, item_idx), confidence, grid.shape)


def paired_difference(
    a: np.ndarray | list,
    b: np.ndarray | list,
    *,
    replicates: int = REPLICATES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) with its paired bootstrap interval: the same items, and the same drawn
    seed positions, in both arms (arms run the same seed list)."""
    ga, gb = _grid(a), _grid(b)
    if ga.shape[1] != gb.shape[1]:
        raise ValueError(f"paired arms need the same items: {ga.shape[1]} against {gb.shape[1]}")
    seeds = min(ga.shape[0], gb.shape[0])
    ga, gb = ga[:seeds], gb[:seeds]
    rng = np.random.default_rng(seed)
    seed_idx, item_idx = _draws(seeds, ga.shape[1], replicates, rng)
    diff = ga - gb  # paired cell by cell: same seed position, same item
    return _summary(diff.mean(), _replicate_means(diff, seed_idx, item_idx), confidence, diff.shape)


def _summary(mean: float, reps: np.ndarray, confidence: float, shape: tuple[int, ...]) -> Interval:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return Interval(float(mean), float(low), float(high), int(shape[0]), int(shape[1]))


def unpaired_difference(
    a: np.ndarray | list,
    b: np.ndarray | list,
    *,
    replicates: int = REPLICATES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) for two independent samples of items (say, two sources' pairs): each is
    resampled on its own."""
    ga, gb = _grid(a), _grid(b)
    rng = np.random.default_rng(seed)
    sa, ia = _draws(ga.shape[0], ga.shape[1], replicates, rng)
    sb, ib = _draws(gb.shape[0], gb.shape[1], replicates, rng)
    reps = _replicate_means(ga, sa, ia) - _replicate_means(gb, sb, ib)
    return _summary(ga.mean() - gb.mean(), reps, confidence, (min(ga.shape[0], gb.shape[0]), ga.shape[1] + gb.shape[1]))
