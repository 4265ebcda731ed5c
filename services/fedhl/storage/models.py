"""The source of truth: SQLAlchemy 2 typed ORM models (Postgres in production, SQLite in the
embedded default). Redis and the blob store hold nothing these tables cannot rebuild."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite returns naive datetimes otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
        datetime: UTCDateTime,
    }


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class AgentStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    REVOKED = "REVOKED"


class RoundState(enum.StrEnum):
    PENDING = "PENDING"
    OPEN = "OPEN"
    COLLECTING = "COLLECTING"
    AGGREGATING = "AGGREGATING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"


class AssignmentState(enum.StrEnum):
    ISSUED = "ISSUED"  # created with the round; not yet pulled
    RUNNING = "RUNNING"  # pulled by the agent
    UPLOADED = "UPLOADED"  # accepted exactly once
    EXPIRED = "EXPIRED"  # the round closed before an upload arrived
    CANCELLED = "CANCELLED"


def _enum(e: type[enum.Enum]) -> Enum:
    return Enum(e, native_enum=False, length=16, validate_strings=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.PENDING, index=True)
    strategy: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(500))
    base_model_sha256: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict[str, Any]]  # the validated job spec, as created
    current_round: Mapped[int] = mapped_column(Integer, default=0)  # = rounds committed so far
    state_key: Mapped[str | None] = mapped_column(String(64))  # blob: global state after current_round
    plan_key: Mapped[str | None] = mapped_column(String(64))  # blob: spectra for the next round
    start_keys: Mapped[dict[str, Any]] = mapped_column(default=dict)  # rank (str) -> blob key
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    rounds: Mapped[list[Round]] = relationship(back_populates="job", order_by="Round.id")


class EnrolmentToken(Base):
    __tablename__ = "enrolment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    uses_left: Mapped[int] = mapped_column(Integer, default=1)
    expires_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), default="")
    credential_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[AgentStatus] = mapped_column(_enum(AgentStatus), default=AgentStatus.ACTIVE)
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rank_override: Mapped[int | None] = mapped_column(Integer)
    enrolment_token_id: Mapped[str | None] = mapped_column(ForeignKey("enrolment_tokens.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]
    # attribution (issue 12): offences (refused or dropped uploads) since the agent's
    # last clean round, and rounds it is still left out of selection for
    strikes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    quarantine_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # the global state version this round starts from
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # > 0 after a failed attempt
    state: Mapped[RoundState] = mapped_column(_enum(RoundState), default=RoundState.PENDING, index=True)
    deadline: Mapped[datetime]
    target: Mapped[int] = mapped_column(Integer)  # uploads that close the round early
    quorum: Mapped[int] = mapped_column(Integer)  # uploads needed at the deadline
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    # what the round started from: agents train on these, the aggregation merges against them
    input_state_key: Mapped[str | None] = mapped_column(String(64))
    input_plan_key: Mapped[str | None] = mapped_column(String(64))
    start_keys: Mapped[dict[str, Any]] = mapped_column(default=dict)  # rank (str) -> blob key
    shards: Mapped[int] = mapped_column(Integer, default=1)  # aggregation tasks the merge is split into
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    committed_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="rounds")
    assignments: Mapped[list[Assignment]] = relationship(back_populates="round", order_by="Assignment.agent_id")


class Assignment(Base):
    __tablename__ = "assignments"
    # (agent_id, state): the pending-task check of every PullTask reads one agent's open assignments
    __table_args__ = (
        UniqueConstraint("round_id", "agent_id"),
        Index("ix_assignments_agent_state", "agent_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)  # the task id
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    state: Mapped[AssignmentState] = mapped_column(_enum(AssignmentState), default=AssignmentState.ISSUED)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    round: Mapped[Round] = relationship(back_populates="assignments")


class Update(Base):
    __tablename__ = "updates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # unique: an upload is accepted exactly once per (round, agent) = per assignment
    assignment_id: Mapped[str] = mapped_column(ForeignKey("assignments.id"), unique=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    blob_key: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    n_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    weight: Mapped[float | None] = mapped_column(Float)  # filled in by the aggregation
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RoundShard(Base):
    """One aggregation task's result for a shard of a round's modules; the round commits once
    every shard is in (the insert is idempotent: one row per (round, shard))."""

    __tablename__ = "round_shards"
    __table_args__ = (UniqueConstraint("round_id", "shard"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    shard: Mapped[int] = mapped_column(Integer)
    blob_key: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str] = mapped_column(String(200), default="")
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "round_number"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)  # state version after this many rounds
    state_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_job_at", "job_id", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))  # "admin", "agent:<id>", "scheduler", "aggregator"
    action: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
