"""Request and response bodies of the admin API.

`*Create` models are what a client sends; `*Public` models are what leaves the service, built
field by field from the ORM rows, so secrets (token and credential hashes, blob keys of agent
uploads) are never serialised by accident. The one plaintext secret in a response is the
enrolment token in `EnrolmentTokenCreated`, shown once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...storage.models import (
    Agent,
    AgentStatus,
    Assignment,
    AssignmentState,
    AuditEvent,
    Checkpoint,
    EnrolmentToken,
    Job,
    JobStatus,
    Round,
    RoundState,
    Update,
)
from ..admin import MAX_TOKEN_USES


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- jobs -----------------------------------------------------------------------------


class JobPublic(_Public):
    id: str
    name: str
    status: JobStatus
    strategy: str
    current_round: int = Field(description="rounds committed so far")
    rounds: int = Field(description="rounds the job runs in total")
    config: dict[str, Any] = Field(description="the validated job spec, as created")
    error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id,
            name=job.name,
            status=job.status,
            strategy=job.strategy,
            current_round=job.current_round,
            rounds=int(job.config["rounds"]),
            config=job.config,
            error=job.error,
            created_at=job.created_at,
            updated_at=job.updated_at,
        )


# -- rounds ---------------------------------------------------------------------------


class RoundPublic(_Public):
    id: int
    job_id: str
    number: int = Field(description="the global state version this round starts from")
    attempt: int
    state: RoundState
    deadline: datetime
    target: int
    quorum: int
    report: dict[str, Any] | None = Field(
        description="what the round's merge did, once it commits: `RoundReport.to_dict()` (fedhl.round_report), "
        "served as stored"
    )
    metrics: dict[str, Any]
    error: str | None
    created_at: datetime
    closed_at: datetime | None
    committed_at: datetime | None
    defence: dict[str, int] = Field(
        default_factory=dict,
        description="uploads the defences bounded in this round: `dropped` and `clipped` (per upload and module; "
        "the validation screen's leave-outs are in `dropped` once per upload, module `*`), "
        "`sizes_bounded` (reported sizes counted as size_k × the median), and `agents` named by any; "
        "details in `report.dropped` / `report.clipped` / `report.sizes_bounded`",
    )

    @classmethod
    def of(cls, rnd: Round) -> RoundPublic:
        out = cls.model_validate(rnd)
        report = rnd.report or {}
        dropped, clipped = report.get("dropped", []), report.get("clipped", [])
        sizes = report.get("sizes_bounded", [])
        named = {d.get("client") for d in dropped} | {c.get("client") for c in clipped}
        named |= {r.get("client") for r in sizes}
        out.defence = {
            "dropped": len(dropped),
            "clipped": len(clipped),
            "sizes_bounded": len(sizes),
            "agents": len(named),
        }
        return out


class AssignmentPublic(_Public):
    task_id: str
    agent_id: str
    rank: int
    state: AssignmentState

    @classmethod
    def of(cls, a: Assignment) -> AssignmentPublic:
        return cls(task_id=a.id, agent_id=a.agent_id, rank=a.rank, state=a.state)


class UpdatePublic(_Public):
    agent_id: str
    n_examples: int
    size: int
    weight: float | None
    metrics: dict[str, Any]

    @classmethod
    def of(cls, u: Update) -> UpdatePublic:
        return cls.model_validate(u)


class RoundDetail(RoundPublic):
    assignments: list[AssignmentPublic]
    updates: list[UpdatePublic]

    @classmethod
    def detail(cls, rnd: Round, updates: list[Update]) -> RoundDetail:
        return cls(
            **RoundPublic.of(rnd).model_dump(),
            assignments=[AssignmentPublic.of(a) for a in rnd.assignments],
            updates=[UpdatePublic.of(u) for u in updates],
        )


# -- agents ---------------------------------------------------------------------------


class AgentPublic(_Public):
    id: str
    name: str
    status: AgentStatus
    resources: dict[str, Any]
    rank_override: int | None
    alive: bool = Field(description="its heartbeat has not expired")
    created_at: datetime
    last_seen_at: datetime | None
    strikes: int = Field(
        description="strikes since its last round without one: refused uploads, dropped unsound ones, and "
        "updates above defence.reject_k × the round's median (clips below that do not count)"
    )
    quarantine_rounds: int = Field(description="rounds it is still left out of selection for (0: selectable)")
    quarantine_until: datetime | None = Field(
        description="the quarantine ends at this time at the latest, rounds left or not (null: not quarantined)"
    )

    @classmethod
    def of(cls, agent: Agent, *, alive: bool) -> AgentPublic:
        return cls(
            id=agent.id,
            name=agent.name,
            status=agent.status,
            resources=agent.resources,
            rank_override=agent.rank_override,
            alive=alive,
            created_at=agent.created_at,
            last_seen_at=agent.last_seen_at,
            strikes=agent.strikes,
            quarantine_rounds=agent.quarantine_rounds,
            quarantine_until=agent.quarantine_until,
        )


class RankOverride(_Request):
    rank: int | None = Field(ge=1, le=65536, description="pinned rank (snapped to each job's rank set); null clears")


class EnrolmentTokenCreate(_Request):
    label: str = Field(default="", max_length=200)
    uses: int = Field(default=1, ge=1, le=MAX_TOKEN_USES, description="agents it can enrol")
    expires_in_s: float | None = Field(default=None, gt=0, le=365 * 86400)


class EnrolmentTokenCreated(BaseModel):
    id: str
    token: str = Field(description="the enrolment token; shown only in this response")
    label: str
    uses_left: int
    expires_at: datetime | None

    @classmethod
    def of(cls, token: str, row: EnrolmentToken) -> EnrolmentTokenCreated:
        return cls(id=row.id, token=token, label=row.label, uses_left=row.uses_left, expires_at=row.expires_at)


class EnrolmentTokenPublic(_Public):
    id: str
    label: str
    uses_left: int
    expires_at: datetime | None
    revoked: bool
    created_at: datetime

    @classmethod
    def of(cls, row: EnrolmentToken) -> EnrolmentTokenPublic:
        return cls(
            id=row.id,
            label=row.label,
            uses_left=row.uses_left,
            expires_at=row.expires_at,
            revoked=row.revoked,
            created_at=row.created_at,
        )


# -- checkpoints, audit, health -------------------------------------------------------


class CheckpointPublic(_Public):
    round_number: int = Field(description="the state version: rounds committed before it")
    state_key: str
    created_at: datetime

    @classmethod
    def of(cls, c: Checkpoint) -> CheckpointPublic:
        return cls.model_validate(c)


class AuditEventPublic(_Public):
    id: int
    at: datetime
    actor: str
    action: str
    job_id: str | None
    details: dict[str, Any]

    @classmethod
    def of(cls, e: AuditEvent) -> AuditEventPublic:
        return cls.model_validate(e)


class Health(BaseModel):
    """Readiness: every check by name ("ok" or why it fails) and the failing ones."""

    status: Literal["ok", "unavailable"]
    role: Literal["leader", "standby"]  # this replica's scheduler
    database: bool
    redis: bool | Literal["in-process"]
    checks: dict[str, str]
    failing: list[str]


class Liveness(BaseModel):
    status: Literal["ok"]
