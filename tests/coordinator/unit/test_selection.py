"""Client selection, table-driven with hand-computed expectations: the target (count,
fraction, everyone), over-selection, min_clients, the quorum, and determinism."""

from __future__ import annotations

from typing import Any

import pytest

from fedhl.coordinator.selection import quorum, select, target_count
from fedhl.jobspec import SelectionConfig

AGENTS = [f"agent-{i}" for i in range(10)]


def cfg(**kw: Any) -> SelectionConfig:
    return SelectionConfig.model_validate(kw)


@pytest.mark.parametrize(
    ("config", "available", "expected"),
    [
        ({"count": 3}, 10, 3),  # a count is taken as is (capped by `select`, not here)
        ({"count": 3}, 2, 3),
        ({"fraction": 0.5}, 5, 3),  # ceil(2.5)
        ({"fraction": 0.25}, 8, 2),  # exactly 2
        ({"fraction": 0.1, "min_clients": 2}, 5, 2),  # ceil(0.5) = 1, raised to min_clients
        ({}, 7, 7),  # neither: every available agent
        ({"min_clients": 4}, 2, 4),  # never below min_clients
    ],
)
def test_target_count(config: dict[str, Any], available: int, expected: int) -> None:
    assert target_count(cfg(**config), available) == expected


@pytest.mark.parametrize(
    ("config", "available", "selected", "target"),
    [
        ({"min_clients": 2}, 1, None, None),  # fewer than min_clients: wait
        ({"min_clients": 3, "count": 3}, 2, None, None),
        ({"count": 3}, 2, 2, 2),  # the count is capped by what is available
        ({"count": 2}, 5, 2, 2),
        ({"count": 2, "over_selection": 1.5}, 5, 3, 2),  # ceil(2 × 1.5) = 3 issued, closes at 2
        ({"count": 2, "over_selection": 1.4}, 5, 3, 2),  # ceil(2.8) = 3
        ({"count": 4, "over_selection": 2.0}, 5, 5, 4),  # 8 wanted, 5 available
        ({"fraction": 0.5, "over_selection": 2.0}, 4, 4, 2),
        ({"fraction": 1.0, "min_clients": 3}, 3, 3, 3),
        ({"min_clients": 2}, 2, 2, 2),
    ],
)
def test_select_sizes(config: dict[str, Any], available: int, selected: int | None, target: int | None) -> None:
    got = select(cfg(**config), AGENTS[:available], seed="s")
    if selected is None:
        assert got is None
        return
    assert got is not None
    ids, t = got
    assert (len(ids), t) == (selected, target)
    assert ids == sorted(set(ids)) and set(ids) <= set(AGENTS[:available])


def test_select_is_a_deterministic_function_of_the_seed_and_the_set() -> None:
    c = cfg(count=3)
    first = select(c, AGENTS, seed="job:0:0")
    assert first == select(c, list(reversed(AGENTS)), seed="job:0:0")  # input order does not matter
    draws = {tuple(got[0]) for seed in range(20) if (got := select(c, AGENTS, seed=f"job:{seed}:0"))}
    assert len(draws) > 1  # the seed changes the draw (20 seeds, 120 possible subsets)


@pytest.mark.parametrize(
    ("config", "target", "expected"),
    [
        ({"quorum": 0.5}, 3, 2),  # ceil(1.5)
        ({"quorum": 0.5, "min_clients": 3}, 4, 3),  # min_clients wins over ceil(2)
        ({"quorum": 1.0}, 5, 5),
        ({"quorum": 0.1}, 5, 1),  # ceil(0.5)
        ({"quorum": 0.25}, 8, 2),
    ],
)
def test_quorum(config: dict[str, Any], target: int, expected: int) -> None:
    assert quorum(cfg(**config), target) == expected
