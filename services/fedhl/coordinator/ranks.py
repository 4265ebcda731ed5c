"""Rank assignment policies (pure): which LoRA rank each selected agent trains this round.

Because FedHL keeps the global update full-rank, an agent's rank may change from round to
round without biasing the merge.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..jobspec import RankPolicy

BYTES_PER_LORA_VALUE = 16  # fp32 value + gradient + two Adam moments


@dataclass(frozen=True)
class AgentInfo:
    id: str
    name: str
    resources: Mapping[str, Any]
    rank_override: int | None = None


def memory_budget(resources: Mapping[str, Any]) -> int:
    """The smaller of the device memory and the operator's budget (0 = unknown)."""
    dev = int(resources.get("device_memory_bytes") or 0)
    cap = int(resources.get("memory_budget_bytes") or 0)
    return min(dev, cap) if dev and cap else (dev or cap)


def capacity_rank(
    resources: Mapping[str, Any], rank_set: Sequence[int], policy: RankPolicy, values_per_rank: int
) -> int:
    """Largest rank whose training memory fits the agent's budget and whose step cost its
    throughput allows; the smallest rank when nothing fits or nothing is known."""
    budget = memory_budget(resources)
    fits = []
    for r in sorted(rank_set):
        need = policy.base_model_bytes + policy.activation_bytes + BYTES_PER_LORA_VALUE * r * values_per_rank
        if budget and need > budget:
            continue
        sps = float(resources.get("steps_per_second") or 0.0)
        if policy.rank_per_step_per_s is not None and sps > 0 and r > policy.rank_per_step_per_s * sps:
            continue
        fits.append(r)
    return max(fits) if fits else min(rank_set)


def nearest_allowed(rank: int, rank_set: Sequence[int]) -> int:
    """The largest rank of the job's set not above `rank` (an override set for another job)."""
    below = [r for r in rank_set if r <= rank]
    return max(below) if below else min(rank_set)


def assign_ranks(
    agents: Sequence[AgentInfo],
    rank_set: Sequence[int],
    policy: RankPolicy,
    values_per_rank: int,
    round_number: int,
) -> dict[str, int]:
    """agent id -> rank. Admin overrides win over every policy."""
    out: dict[str, int] = {}
    rng = random.Random(f"{policy.seed}:{round_number}")
    for a in sorted(agents, key=lambda a: a.id):
        if a.rank_override is not None:
            out[a.id] = nearest_allowed(a.rank_override, rank_set)
        elif policy.kind == "fixed":
            r = policy.fixed.get(a.id, policy.fixed.get(a.name, policy.default_rank))
            out[a.id] = r if r is not None else min(rank_set)
        elif policy.kind == "random":
            out[a.id] = rng.choice(sorted(rank_set))
        else:
            out[a.id] = capacity_rank(a.resources, rank_set, policy, values_per_rank)
    return out
