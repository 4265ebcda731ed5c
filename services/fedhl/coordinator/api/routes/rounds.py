"""Rounds of a job: the list (with each round's aggregation report) and one round's detail
(assignments and accepted updates)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ....storage.repos import JobRepo, NotFound, RoundRepo
from ..deps import SessionDep
from ..paging import PAGE_RESPONSE, Cursor, IdPath, Limit, RoundIdPath, offset_of, page
from ..schemas import RoundDetail, RoundPublic

router = APIRouter(prefix="/jobs/{job_id}/rounds", tags=["rounds"])


@router.get("", responses=PAGE_RESPONSE)
def list_rounds(
    job_id: IdPath, session: SessionDep, response: Response, limit: Limit = 100, cursor: Cursor = None
) -> list[RoundPublic]:
    JobRepo(session).get(job_id)  # 404 for an unknown job rather than an empty list
    start = offset_of(cursor)
    rows = page(response, RoundRepo(session).for_job(job_id, start, limit + 1), limit, str(start + limit))
    return [RoundPublic.of(r) for r in rows]


@router.get("/{round_id}")
def get_round(job_id: IdPath, round_id: RoundIdPath, session: SessionDep) -> RoundDetail:
    rounds = RoundRepo(session)
    rnd = rounds.get(round_id)
    if rnd.job_id != job_id:
        raise NotFound(f"job {job_id} has no round {round_id}")
    return RoundDetail.detail(rnd, list(rounds.updates(round_id)))
