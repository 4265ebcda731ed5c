"""Global checkpoints of a job: the list, and one state file (safetensors) as a download."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import StreamingResponse

from ....storage.blobs import BlobNotFound
from ....storage.db import transaction
from ....storage.repos import CheckpointRepo, JobRepo
from ..deps import CoordinatorDep, SessionDep
from ..paging import PAGE_RESPONSE, Cursor, IdPath, Limit, RoundNumberPath, offset_of, page
from ..schemas import CheckpointPublic

router = APIRouter(prefix="/jobs/{job_id}/checkpoints", tags=["checkpoints"])

_STATE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {}},
        "description": "the global state after `round_number` rounds (safetensors)",
    },
}


@router.get("", responses=PAGE_RESPONSE)
def list_checkpoints(
    job_id: IdPath, session: SessionDep, response: Response, limit: Limit = 100, cursor: Cursor = None
) -> list[CheckpointPublic]:
    JobRepo(session).get(job_id)
    start = offset_of(cursor)
    rows = page(response, CheckpointRepo(session).for_job(job_id, start, limit + 1), limit, str(start + limit))
    return [CheckpointPublic.of(c) for c in rows]


@router.get("/{round_number}/state", response_class=StreamingResponse, responses=_STATE_RESPONSE)
def download_state(job_id: IdPath, round_number: RoundNumberPath, coordinator: CoordinatorDep) -> StreamingResponse:
    # A short transaction of its own: the stream outlives the request's session.
    with transaction(coordinator.deps.sessions) as s:
        JobRepo(s).get(job_id)
        key = CheckpointRepo(s).get(job_id, round_number).state_key
    blobs = coordinator.deps.blobs
    try:
        size = blobs.size(key)
        chunks = blobs.read_chunks(key, 0, coordinator.settings.chunk_bytes)
    except BlobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the state blob of round {round_number} is missing") from None
    filename = f"{job_id}-round{round_number}.safetensors"
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size)},
    )
