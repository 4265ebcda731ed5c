"""Jobs: create from a validated `JobSpec`, list, get, pause, resume, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from ....jobspec import JobSpec
from ....storage.models import JobStatus
from ....storage.repos import JobRepo
from ..deps import AdminDep, CoordinatorDep, SessionDep
from ..paging import PAGE_RESPONSE, Cursor, IdPath, Limit, offset_of, page
from ..schemas import JobPublic

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_job(spec: JobSpec, coordinator: CoordinatorDep, admin: AdminDep) -> JobPublic:
    """Validate the spec (422 names the offending field), publish the round-0 artifacts and
    start the job; the scheduler opens its first round."""
    return JobPublic.of(coordinator.jobs.create(spec, actor=admin.actor))


@router.get("", responses=PAGE_RESPONSE)
def list_jobs(
    session: SessionDep, response: Response, status: JobStatus | None = None, limit: Limit = 100, cursor: Cursor = None
) -> list[JobPublic]:
    start = offset_of(cursor)
    rows = page(response, JobRepo(session).list(status, start, limit + 1), limit, str(start + limit))
    return [JobPublic.of(j) for j in rows]


@router.get("/{job_id}")
def get_job(job_id: IdPath, session: SessionDep) -> JobPublic:
    return JobPublic.of(JobRepo(session).get(job_id))


@router.post("/{job_id}/pause")
def pause_job(job_id: IdPath, coordinator: CoordinatorDep, admin: AdminDep, session: SessionDep) -> JobPublic:
    """RUNNING → PAUSED: no new rounds open; 409 from any other status."""
    coordinator.jobs.pause(job_id, actor=admin.actor)
    return JobPublic.of(JobRepo(session).get(job_id))


@router.post("/{job_id}/resume")
def resume_job(job_id: IdPath, coordinator: CoordinatorDep, admin: AdminDep, session: SessionDep) -> JobPublic:
    """PAUSED → RUNNING; 409 from any other status."""
    coordinator.jobs.resume(job_id, actor=admin.actor)
    return JobPublic.of(JobRepo(session).get(job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: IdPath, coordinator: CoordinatorDep, admin: AdminDep, session: SessionDep) -> JobPublic:
    """End the job and fail its open round; 409 if it has already ended."""
    coordinator.jobs.cancel(job_id, actor=admin.actor)
    return JobPublic.of(JobRepo(session).get(job_id))
