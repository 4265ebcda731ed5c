"""Dependencies of the admin routes, as `Annotated` aliases: the coordinator the app was
built for, a database session (one transaction per request), the services, and the admin
principal behind the bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ...storage.db import transaction
from ..admin import AgentAdmin
from ..app import Coordinator


@dataclass(frozen=True)
class Admin:
    """Whoever holds the admin token; `actor` is what the audit log records."""

    actor: str = "admin"


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The coordinator's admin token (FEDHL_ADMIN_TOKEN).",
)


def get_coordinator(request: Request) -> Coordinator:
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]


def require_admin(
    coordinator: CoordinatorDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Admin:
    """401 with `WWW-Authenticate: Bearer` unless the request carries the admin token."""
    given = credentials.credentials.encode() if credentials is not None else b""
    expected = coordinator.settings.admin_token.encode()
    # Compare even when nothing was given, so the timing does not tell the two cases apart.
    if not hmac.compare_digest(given, expected) or credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid admin token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Admin()


AdminDep = Annotated[Admin, Depends(require_admin)]


def get_session(coordinator: CoordinatorDep) -> Iterator[Session]:
    """One transaction for the request's reads: committed after the handler, rolled back on
    error. Routes change state only through the services, each in a transaction of its own,
    so a response is never sent for a write that has not committed."""
    with transaction(coordinator.deps.sessions, read_only=True) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_agent_admin(coordinator: CoordinatorDep) -> AgentAdmin:
    return AgentAdmin(coordinator.deps)


AgentAdminDep = Annotated[AgentAdmin, Depends(get_agent_admin)]
