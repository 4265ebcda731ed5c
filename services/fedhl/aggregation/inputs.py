"""What one round's aggregation reads: accepted uploads, assigned ranks, the state and spectra
the round started from. Read once per aggregation task (the spec is parsed here, once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends import Deps
from ..jobspec import JobSpec
from ..storage.db import transaction
from ..storage.models import RoundState
from ..storage.repos import RoundRepo
from .validate import history_rounds


@dataclass(frozen=True)
class RoundInputs:
    round_id: int
    job_id: str
    number: int
    spec: JobSpec
    uploads: list[tuple[str, str, int]]  # (agent id, blob key, n_examples), in agent order
    rank_of: dict[str, int]
    state_key: str | None
    plan_key: str | None
    shards: int
    # the validation screen's summaries of the job's earlier rounds in its window (committed round
    # reports' `validation`, oldest first, None where there is none); empty without a window
    screened: list[dict[str, Any] | None] = field(default_factory=list)


def load_inputs(deps: Deps, round_id: int, *, aggregating_only: bool = True) -> RoundInputs | None:
    """The round's inputs, or None unless it is AGGREGATING (when `aggregating_only`)."""
    with transaction(deps.sessions, read_only=True) as s:
        rnd = RoundRepo(s).get(round_id)
        if aggregating_only and rnd.state is not RoundState.AGGREGATING:
            return None
        spec = JobSpec.model_validate(rnd.job.config)
        window = history_rounds(spec, rnd.number)
        found = RoundRepo(s).validation_summaries(rnd.job_id, window.start, window.stop - 1) if window else {}
        return RoundInputs(
            round_id=round_id,
            job_id=rnd.job_id,
            number=rnd.number,
            spec=spec,
            uploads=[(u.agent_id, u.blob_key, u.n_examples) for u in RoundRepo(s).updates(round_id)],
            rank_of={a.agent_id: a.rank for a in rnd.assignments},
            state_key=rnd.input_state_key,
            plan_key=rnd.input_plan_key,
            shards=rnd.shards,
            screened=[found.get(n) for n in window],
        )


def shard_modules(modules: list[str], shard: int, shards: int) -> list[str]:
    """Strided, so equally shaped layers spread evenly over the shards."""
    return modules[shard::shards]


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
