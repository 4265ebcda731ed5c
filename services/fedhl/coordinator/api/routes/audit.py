"""The audit log, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from ....storage.repos import AuditRepo
from ..deps import SessionDep
from ..paging import MAX_PAGE, PAGE_RESPONSE, Cursor, IdQuery, page
from ..schemas import AuditEventPublic

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", responses=PAGE_RESPONSE)
def list_audit_events(
    session: SessionDep,
    response: Response,
    job_id: IdQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 200,
    cursor: Cursor = None,
) -> list[AuditEventPublic]:
    """Newest first; the cursor is the id of the oldest event seen."""
    before = int(cursor) if cursor else None
    rows = AuditRepo(session).list(job_id, limit + 1, before)
    last = rows[min(limit, len(rows)) - 1].id if rows else 0
    return [AuditEventPublic.of(e) for e in page(response, rows, limit, str(last))]
