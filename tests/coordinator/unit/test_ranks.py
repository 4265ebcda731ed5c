"""Rank policies, table-driven with hand-computed expectations: fixed (by id, by name,
default), capacity (memory and throughput bounds), random (reproducible, within the set),
and admin overrides, which win over every policy and snap to the job's rank set."""

from __future__ import annotations

from typing import Any

import pytest

from fedhl.coordinator.ranks import AgentInfo, assign_ranks, capacity_rank, memory_budget, nearest_allowed
from fedhl.jobspec import RankPolicy

RANKS = [2, 4, 8]
# one 16×16 module: 32 values per rank, 16 B each → 512 B per rank; with 1000 B of base model
# the need is 2024 B at rank 2, 3048 B at rank 4 and 5096 B at rank 8
VALUES_PER_RANK = 32
BASE = 1000


def policy(**kw: Any) -> RankPolicy:
    return RankPolicy.model_validate(kw)


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({}, 0),
        ({"device_memory_bytes": 4000}, 4000),
        ({"memory_budget_bytes": 3000}, 3000),
        ({"device_memory_bytes": 6000, "memory_budget_bytes": 3000}, 3000),
        ({"device_memory_bytes": 2000, "memory_budget_bytes": 3000}, 2000),
    ],
)
def test_memory_budget_is_the_smaller_known_bound(resources: dict[str, Any], expected: int) -> None:
    assert memory_budget(resources) == expected


@pytest.mark.parametrize(
    ("resources", "rank_per_step_per_s", "expected"),
    [
        ({}, None, 8),  # nothing known: the largest rank
        ({"device_memory_bytes": 4000}, None, 4),  # 5096 > 4000 ≥ 3048
        ({"device_memory_bytes": 6000, "memory_budget_bytes": 3000}, None, 2),  # 3000 < 3048
        ({"memory_budget_bytes": 5096}, None, 8),  # exactly enough fits
        ({"memory_budget_bytes": 5095}, None, 4),
        ({"device_memory_bytes": 1000}, None, 2),  # nothing fits: the smallest rank
        ({"steps_per_second": 3.0}, 2.0, 4),  # throughput caps the rank at 2 × 3 = 6
        ({"steps_per_second": 0.5}, 2.0, 2),  # cap 1: nothing allowed, the smallest rank
        ({"steps_per_second": 0.0}, 2.0, 8),  # unknown throughput: no cap
        ({"steps_per_second": 4.0, "device_memory_bytes": 4000}, 2.0, 4),  # both bounds: 8 allowed, 4 fits
    ],
)
def test_capacity_rank(resources: dict[str, Any], rank_per_step_per_s: float | None, expected: int) -> None:
    p = policy(kind="capacity", base_model_bytes=BASE, rank_per_step_per_s=rank_per_step_per_s)
    assert capacity_rank(resources, RANKS, p, VALUES_PER_RANK) == expected


def test_capacity_counts_activation_memory() -> None:
    p = policy(kind="capacity", base_model_bytes=BASE, activation_bytes=1000)  # needs 3024 / 4048 / 6096
    assert capacity_rank({"device_memory_bytes": 4000}, RANKS, p, VALUES_PER_RANK) == 2


@pytest.mark.parametrize(("override", "expected"), [(4, 4), (6, 4), (1, 2), (16, 8), (2, 2)])
def test_nearest_allowed_snaps_down_into_the_set(override: int, expected: int) -> None:
    assert nearest_allowed(override, RANKS) == expected


@pytest.mark.parametrize(
    ("fixed", "default_rank", "expected"),
    [
        ({"id-a": 8, "name-b": 4}, None, {"id-a": 8, "id-b": 4, "id-c": 2}),  # by id, by name, else the smallest
        ({"id-a": 8}, 4, {"id-a": 8, "id-b": 4, "id-c": 4}),  # default_rank for the unnamed
        ({"id-a": 2, "name-a": 8}, None, {"id-a": 2, "id-b": 2, "id-c": 2}),  # the id wins over the name
    ],
)
def test_fixed_policy(fixed: dict[str, int], default_rank: int | None, expected: dict[str, int]) -> None:
    agents = [AgentInfo(f"id-{x}", f"name-{x}", {}) for x in "abc"]
    assert assign_ranks(agents, RANKS, policy(kind="fixed", fixed=fixed, default_rank=default_rank), 32, 0) == expected


@pytest.mark.parametrize("kind", ["fixed", "capacity", "random"])
def test_overrides_win_over_every_policy(kind: str) -> None:
    agents = [
        AgentInfo("a", "a", {"device_memory_bytes": 1}, rank_override=6),  # snaps to 4
        AgentInfo("b", "b", {}, rank_override=1),  # below the set: the smallest
        AgentInfo("c", "c", {}, rank_override=8),
    ]
    p = policy(kind=kind, fixed={"a": 8, "b": 8, "c": 2}, base_model_bytes=BASE)
    assert assign_ranks(agents, RANKS, p, VALUES_PER_RANK, 3) == {"a": 4, "b": 2, "c": 8}


def test_capacity_policy_per_agent() -> None:
    agents = [
        AgentInfo("big", "big", {"device_memory_bytes": 10_000}),
        AgentInfo("mid", "mid", {"device_memory_bytes": 4_000}),
        AgentInfo("small", "small", {"memory_budget_bytes": 2_500}),
    ]
    got = assign_ranks(agents, RANKS, policy(kind="capacity", base_model_bytes=BASE), VALUES_PER_RANK, 0)
    assert got == {"big": 8, "mid": 4, "small": 2}


def test_random_policy_is_reproducible_within_the_set_and_varies_by_round() -> None:
    agents = [AgentInfo(f"a{i}", "", {}) for i in range(6)]
    p = policy(kind="random", seed=7)
    by_round = [assign_ranks(agents, RANKS, p, VALUES_PER_RANK, r) for r in range(8)]
    assert by_round == [assign_ranks(list(reversed(agents)), RANKS, p, VALUES_PER_RANK, r) for r in range(8)]
    assert all(set(ranks) == {a.id for a in agents} and set(ranks.values()) <= set(RANKS) for ranks in by_round)
    assert len({tuple(sorted(r.items())) for r in by_round}) > 1  # 8 rounds of 6 draws from 3 ranks
    assert assign_ranks(agents, RANKS, policy(kind="random", seed=8), VALUES_PER_RANK, 0) != by_round[0] or (
        assign_ranks(agents, RANKS, policy(kind="random", seed=9), VALUES_PER_RANK, 0) != by_round[0]
    )
