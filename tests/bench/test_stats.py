"""bench/stats.py: the paired statistics every benchmark table reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "stats.py"
    spec = importlib.util.spec_from_file_location("bench_stats", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_stats"] = mod
    spec.loader.exec_module(mod)
    return mod


stats = _load()


def test_paired_differences_use_common_seeds_only() -> None:
    seeds, d = stats.paired_differences({0: 1.0, 1: 2.0, 3: 5.0}, {0: 0.5, 1: 2.5, 2: 9.0})
    assert seeds == [0, 1]
    assert d == [0.5, -0.5]


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n() -> None:
    small = [0.1, -0.2, 0.3, 0.0, 0.15]
    low, high = stats.bootstrap_ci(small, seed=1)
    assert low < sum(small) / len(small) < high
    big = small * 20  # same spread, 20x the seeds: a narrower interval
    low2, high2 = stats.bootstrap_ci(big, seed=1)
    assert high2 - low2 < (high - low) / 2
    assert stats.bootstrap_ci([0.7]) == (0.7, 0.7)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([])


def test_constant_shift_gives_a_ci_excluding_zero() -> None:
    arm = {s: 1.0 + 0.01 * s for s in range(10)}
    ref = {s: 1.2 + 0.01 * s + (0.001 if s % 2 else -0.001) for s in range(10)}
    e = stats.compare(arm, ref, tie_tol=0.01, higher_is_better=False)  # arm lower = better (an error)
    assert e["n"] == 10
    assert e["paired_diff_mean"] == pytest.approx(-0.2)
    assert e["ci95_high"] < 0
    assert (e["wins"], e["ties"], e["losses"]) == (10, 0, 0)
    assert stats.verdict(e) == "better"
    e2 = stats.compare(arm, ref, tie_tol=0.01, higher_is_better=True)  # same numbers as accuracies
    assert (e2["wins"], e2["losses"]) == (0, 10)
    assert stats.verdict(e2) == "worse"


def test_win_tie_loss_tolerance_is_inclusive_for_ties() -> None:
    assert stats.win_tie_loss([0.02, 0.005, -0.005, -0.03, 0.01], tie_tol=0.01, higher_is_better=True) == (1, 3, 1)
    with pytest.raises(ValueError):
        stats.win_tie_loss([0.0], tie_tol=-1, higher_is_better=True)


def test_mean_ci_band_per_round() -> None:
    band = stats.mean_ci_band([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    assert band["mean"] == pytest.approx([1.0, 1.0])
    assert band["low"][0] < 1.0 < band["high"][0]
    assert band["low"][1] == band["high"][1] == pytest.approx(1.0)  # no spread, no band
