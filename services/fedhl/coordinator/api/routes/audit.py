"""The audit log, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ....storage.repos import AuditRepo
from ..deps import SessionDep
from ..schemas import AuditEventPublic

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("")
def list_audit_events(
    session: SessionDep,
    job_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[AuditEventPublic]:
    return [AuditEventPublic.of(e) for e in AuditRepo(session).list(job_id, limit)]
