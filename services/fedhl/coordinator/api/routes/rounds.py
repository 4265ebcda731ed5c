"""Rounds of a job: the list (with each round's aggregation report) and one round's detail
(assignments and accepted updates)."""

from __future__ import annotations

from fastapi import APIRouter

from ....storage.repos import JobRepo, NotFound, RoundRepo
from ..deps import SessionDep
from ..schemas import RoundDetail, RoundPublic

router = APIRouter(prefix="/jobs/{job_id}/rounds", tags=["rounds"])


@router.get("")
def list_rounds(job_id: str, session: SessionDep) -> list[RoundPublic]:
    JobRepo(session).get(job_id)  # 404 for an unknown job rather than an empty list
    return [RoundPublic.of(r) for r in RoundRepo(session).for_job(job_id)]


@router.get("/{round_id}")
def get_round(job_id: str, round_id: int, session: SessionDep) -> RoundDetail:
    rounds = RoundRepo(session)
    rnd = rounds.get(round_id)
    if rnd.job_id != job_id:
        raise NotFound(f"job {job_id} has no round {round_id}")
    return RoundDetail.detail(rnd, list(rounds.updates(round_id)))
