"""Paired comparisons for the benchmarks: per-seed differences against a reference arm, a
percentile-bootstrap 95 % CI of their mean, and win/tie/loss counts. Pure functions.

Every arm of a benchmark runs on the same seeds, and a seed fixes the data split, the
initialisation and the participation schedule, so the difference `arm − reference` at one seed
removes most of the seed-to-seed spread that swamps unpaired means.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def paired_differences(arm: Mapping[int, float], ref: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """Seeds both arms ran on, and `arm[s] − ref[s]` for each (sorted by seed)."""
    seeds = sorted(set(arm) & set(ref))
    return seeds, [float(arm[s]) - float(ref[s]) for s in seeds]


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean (resampling the values with replacement).

    One value gives a zero-width interval at that value: there is nothing to resample, and the
    reader sees `n = 1` next to it. Empty input is an error.
    """
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def win_tie_loss(diffs: Sequence[float], *, tie_tol: float, higher_is_better: bool) -> tuple[int, int, int]:
    """Counts from the arm's side: a win is a seed where the arm beats the reference by more
    than `tie_tol` (in the metric's units), a loss the reverse, a tie within ± tie_tol."""
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be non-negative, got {tie_tol}")
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(1 for d in diffs if sign * d > tie_tol)
    losses = sum(1 for d in diffs if sign * d < -tie_tol)
    return wins, len(diffs) - wins - losses, losses


def compare(
    arm: Mapping[int, float],
    ref: Mapping[int, float],
    *,
    tie_tol: float,
    higher_is_better: bool,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The summary entry for one arm against the reference: `paired_diff_mean` (arm − ref),
    `ci95_low`, `ci95_high`, `wins`, `ties`, `losses` (from the arm's side) and `n` seeds."""
    seeds, diffs = paired_differences(arm, ref)
    if not diffs:
        raise ValueError("the arm and the reference share no seed")
    low, high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    wins, ties, losses = win_tie_loss(diffs, tie_tol=tie_tol, higher_is_better=higher_is_better)
    return {
        "n": len(diffs),
        "seeds": seeds,
        "paired_diff_mean": statistics.fmean(diffs),
        "ci95_low": low,
        "ci95_high": high,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "tie_tol": tie_tol,
        "higher_is_better": higher_is_better,
    }


def verdict(entry: Mapping[str, Any]) -> str:
    """'better' / 'worse' (than the reference) when the CI excludes zero, else 'no difference shown'."""
    low, high = entry["ci95_low"], entry["ci95_high"]
    if low > 0 or high < 0:
        arm_higher = low > 0
        return "better" if arm_higher == entry["higher_is_better"] else "worse"
    return "no difference shown"


def mean_ci_band(curves: Sequence[Sequence[float]], *, n_boot: int = 2_000, seed: int = 0) -> dict[str, list[float]]:
    """Per-round mean and bootstrap 95 % CI over seeds, for plots. curves: one list per seed."""
    x = np.asarray(curves, dtype=np.float64)  # (seeds, rounds)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("curves must be a non-empty list of equal-length lists")
    mean = x.mean(axis=0)
    if x.shape[0] == 1:
        return {"mean": mean.tolist(), "low": mean.tolist(), "high": mean.tolist()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    boots = x[idx].mean(axis=1)  # (n_boot, rounds)
    low, high = np.percentile(boots, [2.5, 97.5], axis=0)
    return {"mean": mean.tolist(), "low": low.tolist(), "high": high.tolist()}
