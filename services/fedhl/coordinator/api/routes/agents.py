"""Agents and their enrolment tokens. Every change is audited (actor: the admin)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from ....storage.repos import AgentRepo
from ..deps import AdminDep, AgentAdminDep, CoordinatorDep, SessionDep
from ..paging import PAGE_RESPONSE, Cursor, IdPath, Limit, offset_of, page
from ..schemas import (
    AgentPublic,
    EnrolmentTokenCreate,
    EnrolmentTokenCreated,
    EnrolmentTokenPublic,
    RankOverride,
)

router = APIRouter(prefix="/agents", tags=["agents"])

# The token routes come first: `/agents/enrolment-tokens` must not match `/agents/{agent_id}`.


@router.post("/enrolment-tokens", status_code=status.HTTP_201_CREATED)
def create_enrolment_token(
    body: EnrolmentTokenCreate, service: AgentAdminDep, admin: AdminDep
) -> EnrolmentTokenCreated:
    """The token is in this response only: store it now, it cannot be shown again."""
    token, row = service.create_enrolment_token(body.label, body.uses, body.expires_in_s, actor=admin.actor)
    return EnrolmentTokenCreated.of(token, row)


@router.get("/enrolment-tokens", responses=PAGE_RESPONSE)
def list_enrolment_tokens(
    session: SessionDep, response: Response, limit: Limit = 100, cursor: Cursor = None
) -> list[EnrolmentTokenPublic]:
    start = offset_of(cursor)
    rows = page(response, AgentRepo(session).list_tokens(start, limit + 1), limit, str(start + limit))
    return [EnrolmentTokenPublic.of(t) for t in rows]


@router.delete("/enrolment-tokens/{token_id}")
def revoke_enrolment_token(token_id: IdPath, service: AgentAdminDep, admin: AdminDep) -> EnrolmentTokenPublic:
    """Agents already enrolled with it keep their credentials (revoke those one by one)."""
    return EnrolmentTokenPublic.of(service.revoke_enrolment_token(token_id, actor=admin.actor))


@router.get("", responses=PAGE_RESPONSE)
def list_agents(
    session: SessionDep, coordinator: CoordinatorDep, response: Response, limit: Limit = 100, cursor: Cursor = None
) -> list[AgentPublic]:
    start = offset_of(cursor)
    agents = page(response, AgentRepo(session).list(start, limit + 1), limit, str(start + limit))
    alive = coordinator.deps.coordination.liveness.alive(a.id for a in agents)
    return [AgentPublic.of(a, alive=a.id in alive) for a in agents]


@router.get("/{agent_id}")
def get_agent(agent_id: IdPath, session: SessionDep, coordinator: CoordinatorDep) -> AgentPublic:
    agent = AgentRepo(session).get(agent_id)
    return AgentPublic.of(agent, alive=bool(coordinator.deps.coordination.liveness.alive([agent.id])))


@router.post("/{agent_id}/revoke")
def revoke_agent(agent_id: IdPath, service: AgentAdminDep, admin: AdminDep, coordinator: CoordinatorDep) -> AgentPublic:
    """Its credential is refused from now on (idempotent)."""
    agent = service.revoke_agent(agent_id, actor=admin.actor)
    return AgentPublic.of(agent, alive=bool(coordinator.deps.coordination.liveness.alive([agent.id])))


@router.post("/{agent_id}/clear-quarantine")
def clear_quarantine(
    agent_id: str, service: AgentAdminDep, admin: AdminDep, coordinator: CoordinatorDep
) -> AgentPublic:
    """Let a quarantined agent be selected again and reset its strike count."""
    agent = service.clear_quarantine(agent_id, actor=admin.actor)
    return AgentPublic.of(agent, alive=bool(coordinator.deps.coordination.liveness.alive([agent.id])))


@router.put("/{agent_id}/rank-override")
def set_rank_override(
    agent_id: IdPath, body: RankOverride, service: AgentAdminDep, admin: AdminDep, coordinator: CoordinatorDep
) -> AgentPublic:
    """Pin the rank this agent trains at (snapped to each job's rank set), or clear the pin
    with `{"rank": null}`; applies from the next round it is assigned."""
    agent = service.set_rank_override(agent_id, body.rank, actor=admin.actor)
    return AgentPublic.of(agent, alive=bool(coordinator.deps.coordination.liveness.alive([agent.id])))
