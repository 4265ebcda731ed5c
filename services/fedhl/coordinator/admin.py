"""Admin operations on agents and enrolment tokens, independent of the transport (the REST
edge decodes, calls these, and maps `ServiceError` / `NotFound` to a status). Each call is
one transaction that also records an audit event."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import timedelta

from ..backends import AGENT_REVOKED, TASK_EVENTS, Deps
from ..storage.db import transaction
from ..storage.models import Agent, EnrolmentToken, utcnow
from ..storage.repos import AgentRepo, AuditRepo, RoundRepo
from .errors import Code, ServiceError

log = logging.getLogger(__name__)

MAX_TOKEN_USES = 10_000


def announce_revoked(deps: Deps, agent_ids: Sequence[str]) -> None:
    """After the revocation committed: this process forgets the agents' credentials at once,
    every replica when the AGENT_REVOKED event reaches it; a lost event is bounded by the auth
    cache's TTL (`auth_cache_ttl_s`)."""
    for hook in deps.on_revoked:
        hook(agent_ids)
    try:
        deps.coordination.events.publish(TASK_EVENTS, {"type": AGENT_REVOKED, "agents": list(agent_ids)})
    except Exception as e:  # committed already; other replicas re-check within the TTL
        log.warning("revocation of %s not announced to other replicas (%s)", list(agent_ids), e)


class AgentAdmin:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def create_enrolment_token(
        self, label: str, uses: int, expires_in_s: float | None, actor: str = "admin"
    ) -> tuple[str, EnrolmentToken]:
        """A new enrolment token; the plaintext is returned here only, the table keeps a hash."""
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise ServiceError(Code.INVALID_ARGUMENT, f"uses must be in [1, {MAX_TOKEN_USES}]")
        if expires_in_s is not None and not (expires_in_s > 0 and math.isfinite(expires_in_s)):
            raise ServiceError(Code.INVALID_ARGUMENT, "expires_in_s must be positive and finite")
        expires_at = None if expires_in_s is None else utcnow() + timedelta(seconds=expires_in_s)
        with transaction(self.deps.sessions) as s:
            token, row = AgentRepo(s).create_token(label, uses, expires_at)
            AuditRepo(s).record(actor, "enrolment_token_created", token_id=row.id, label=label, uses=uses)
        return token, row

    def revoke_enrolment_token(self, token_id: str, actor: str = "admin") -> EnrolmentToken:
        """Idempotent: revoking a revoked token changes nothing and records nothing."""
        with transaction(self.deps.sessions) as s:
            row, changed = AgentRepo(s).revoke_token(token_id)  # NotFound → 404
            if changed:
                AuditRepo(s).record(actor, "enrolment_token_revoked", token_id=token_id)
        return row

    def revoke_agent(self, agent_id: str, actor: str = "admin") -> Agent:
        """The agent's credential stops working at once (idempotent)."""
        with transaction(self.deps.sessions) as s:
            agents = AgentRepo(s)
            if agents.revoke(agent_id):  # NotFound → 404
                # its open tasks will never report: cancel them so rounds close without waiting
                cancelled = RoundRepo(s).cancel_open_assignments(agent_id)
                AuditRepo(s).record(actor, "agent_revoked", agent_id=agent_id, cancelled_tasks=cancelled)
                # an accepted upload not yet merged must not move the model after revocation
                for job_id, number, round_id in RoundRepo(s).withdraw_unmerged_updates(agent_id):
                    AuditRepo(s).record(
                        actor, "upload_withdrawn", job_id, agent_id=agent_id, round=number, round_id=round_id
                    )
            agent = agents.get(agent_id)
        announce_revoked(self.deps, [agent_id])  # also when already revoked: a lost event is re-sent
        return agent

    def clear_quarantine(self, agent_id: str, actor: str = "admin") -> Agent:
        """Lift the agent's quarantine and forget its strikes (idempotent)."""
        with transaction(self.deps.sessions) as s:
            agents = AgentRepo(s)
            strikes, rounds = agents.clear_quarantine(agent_id)  # NotFound → 404
            if strikes or rounds:
                AuditRepo(s).record(
                    actor, "agent_quarantine_cleared", agent_id=agent_id, strikes=strikes, rounds_left=rounds
                )
            agent = agents.get(agent_id)
        return agent

    def set_rank_override(self, agent_id: str, rank: int | None, actor: str = "admin") -> Agent:
        """Pin the agent's rank (snapped to each job's nearest allowed rank), or clear it."""
        if rank is not None and rank < 1:
            raise ServiceError(Code.INVALID_ARGUMENT, "rank must be positive")
        with transaction(self.deps.sessions) as s:
            agents = AgentRepo(s)
            previous = agents.set_rank_override(agent_id, rank)  # NotFound → 404
            agent = agents.get(agent_id)
            AuditRepo(s).record(actor, "agent_rank_override", agent_id=agent_id, rank=rank, previous=previous)
        return agent
