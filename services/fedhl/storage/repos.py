"""Small repositories over the ORM models, one per resource. Each works inside the caller's
transaction (a `Session` from `db.transaction`), so a service function composes several of
them into one atomic state transition. Services write no SQL of their own.

Names: an `Assignment` row is one agent's part of one round; its id is the `task_id` agents
see on the wire (a `TrainTask`)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.orm import Session, joinedload

from ..jobspec import JobSpec
from .models import (
    CHANGE_KEY,
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
    RoundShard,
    RoundState,
    Update,
    new_id,
    utcnow,
)


class NotFound(LookupError):
    pass


class AuthError(Exception):
    """A credential or enrolment token was refused (unknown, malformed, expired, used up).
    Deliberately not the builtin PermissionError, which is an OSError about files."""


class RevokedError(AuthError):
    """The credential is genuine but its agent has been revoked."""


def ping(s: Session) -> bool:
    """The database answers a trivial query (readiness probes)."""
    return s.execute(text("SELECT 1")).scalar() == 1


def secret_hash(secret: str) -> str:
    # Secrets are 256-bit random tokens, so a plain SHA-256 is not brute-forceable.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class AgentRepo:
    def __init__(self, s: Session) -> None:
        self.s = s

    def create_token(self, label: str, uses: int, expires_at: datetime | None) -> tuple[str, EnrolmentToken]:
        token = "fedhl-enrol-" + new_secret()
        row = EnrolmentToken(token_hash=secret_hash(token), label=label, uses_left=uses, expires_at=expires_at)
        self.s.add(row)
        self.s.flush()
        return token, row

    def list_tokens(self, offset: int = 0, limit: int | None = None) -> Sequence[EnrolmentToken]:
        q = select(EnrolmentToken).order_by(EnrolmentToken.created_at, EnrolmentToken.id)
        return self.s.scalars(q.offset(offset).limit(limit)).all()

    def revoke_token(self, token_id: str) -> tuple[EnrolmentToken, bool]:
        """(the token, whether this call revoked it): revoking twice changes nothing."""
        row = self.s.get(EnrolmentToken, token_id)
        if row is None:
            raise NotFound(f"enrolment token {token_id} not found")
        changed = not row.revoked
        row.revoked = True
        return row, changed

    def redeem(self, token: str, name: str, resources: dict[str, Any]) -> tuple[Agent, str]:
        """Enrolment token → a new agent and its credential `<agent_id>.<secret>` (shown once)."""
        row = self.s.scalars(
            select(EnrolmentToken).where(EnrolmentToken.token_hash == secret_hash(token)).with_for_update()
        ).first()
        if row is None or row.revoked:
            raise AuthError("unknown or revoked enrolment token")
        if row.expires_at is not None and row.expires_at <= utcnow():
            raise AuthError("enrolment token expired")
        if row.uses_left <= 0:
            raise AuthError("enrolment token used up")
        row.uses_left -= 1
        secret = new_secret()
        agent = Agent(
            name=name,
            credential_hash=secret_hash(secret),
            resources=resources,
            enrolment_token_id=row.id,
            last_seen_at=utcnow(),
        )
        self.s.add(agent)
        self.s.flush()
        return agent, f"{agent.id}.{secret}"

    def authenticate(self, credential: str) -> Agent:
        """Raises AuthError (unknown/malformed) or RevokedError (a subclass)."""
        checked = self.authenticate_many([credential])[0]
        if isinstance(checked, AuthError):
            raise checked
        return self.get(checked)

    def authenticate_many(self, credentials: Sequence[str]) -> list[str | AuthError]:
        """`authenticate` for many credentials in one query → each one's agent id or error."""
        parts = [c.partition(".") for c in credentials]
        ids = {a for a, _, secret in parts if a and secret}
        rows = {}
        if ids:
            q = select(Agent.id, Agent.credential_hash, Agent.status).where(Agent.id.in_(ids))
            rows = {r.id: r for r in self.s.execute(q)}
        out: list[str | AuthError] = []
        for agent_id, _, secret in parts:
            row = rows.get(agent_id) if secret else None
            if row is None or not hmac.compare_digest(row.credential_hash, secret_hash(secret)):
                out.append(AuthError("unknown agent or bad credential"))
            elif row.status is AgentStatus.REVOKED:
                out.append(RevokedError(f"agent {agent_id} is revoked"))
            else:
                out.append(agent_id)
        return out

    def get(self, agent_id: str) -> Agent:
        agent = self.s.get(Agent, agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id} not found")
        return agent

    def list(self, offset: int = 0, limit: int | None = None) -> Sequence[Agent]:
        return self.s.scalars(select(Agent).order_by(Agent.created_at, Agent.id).offset(offset).limit(limit)).all()

    def find(self, agent_id: str) -> Agent | None:
        return self.s.get(Agent, agent_id)

    def active(self) -> Sequence[Agent]:
        return self.s.scalars(select(Agent).where(Agent.status == AgentStatus.ACTIVE).order_by(Agent.id)).all()

    def revoked_ids(self) -> Sequence[str]:
        return self.s.scalars(select(Agent.id).where(Agent.status == AgentStatus.REVOKED)).all()

    def active_ids(self) -> Sequence[str]:
        return self.s.scalars(select(Agent.id).where(Agent.status == AgentStatus.ACTIVE).order_by(Agent.id)).all()

    def count_active(self) -> int:
        q = select(func.count()).select_from(Agent).where(Agent.status == AgentStatus.ACTIVE)
        return int(self.s.scalar(q) or 0)

    def in_ids(self, agent_ids: Sequence[str]) -> Sequence[Agent]:
        """These agents' rows by id (a round's selected agents only, not the whole fleet)."""
        ids, rows = list(agent_ids), list[Agent]()
        for i in range(0, len(ids), 1000):  # bounded IN lists
            rows.extend(self.s.scalars(select(Agent).where(Agent.id.in_(ids[i : i + 1000]))).all())
        return sorted(rows, key=lambda a: a.id)

    def touch_many(self, agent_ids: Sequence[str], now: datetime) -> None:
        """last_seen_at = now for these agents, in one UPDATE (liveness proper is in Redis)."""
        if agent_ids:
            self.s.execute(update(Agent).where(Agent.id.in_(list(agent_ids))).values(last_seen_at=now))

    def touch(self, agent_id: str, resources: dict[str, Any], now: datetime) -> bool:
        """Record a sign of life: last_seen_at = now and the reported resources merged over
        the stored ones. False for an unknown agent."""
        agent = self.s.get(Agent, agent_id)
        if agent is None:
            return False
        agent.last_seen_at = now
        agent.resources = {**agent.resources, **resources}
        return True

    def revoke(self, agent_id: str) -> bool:
        """Mark the agent revoked; False if it already was (NotFound if unknown)."""
        agent = self.get(agent_id)
        if agent.status is AgentStatus.REVOKED:
            return False
        agent.status = AgentStatus.REVOKED
        return True

    def strike(self, agent_id: str, after: int, rounds: int, until: datetime | None = None) -> bool:
        """One more strike (a refused upload, a dropped unsound one, an update far above the
        bound). At `after` strikes the agent is left out of selection for `rounds` rounds, or
        until `until` (None: no wall-time limit), whichever ends first, and its count
        restarts; True then."""
        agent = self.s.get(Agent, agent_id, with_for_update=True)
        if agent is None or rounds <= 0:
            return False
        agent.strikes += 1
        if agent.strikes < after:
            return False
        agent.strikes = 0
        if agent.quarantine_rounds == 0:  # a new quarantine
            agent.quarantine_until = until
        elif until is None or agent.quarantine_until is None:  # extending one: the longer limit
            agent.quarantine_until = None
        else:
            agent.quarantine_until = max(agent.quarantine_until, until)
        agent.quarantine_rounds = max(agent.quarantine_rounds, rounds)
        return True

    def clear_strikes(self, agent_ids: Sequence[str]) -> None:
        """A round without a strike: the count of strikes in a row restarts."""
        if agent_ids:
            self.s.execute(update(Agent).where(Agent.id.in_(list(agent_ids)), Agent.strikes > 0).values(strikes=0))

    def clear_quarantine(self, agent_id: str) -> tuple[int, int]:
        """An admin lifts the quarantine and forgets the strikes; returns what they were."""
        agent = self.get(agent_id)
        before = (agent.strikes, agent.quarantine_rounds)
        agent.strikes, agent.quarantine_rounds, agent.quarantine_until = 0, 0, None
        return before

    def expire_quarantines(self, now: datetime) -> Sequence[str]:
        """End every quarantine whose wall-time limit has passed (rounds left or not); returns
        the agents released. A job whose min_clients needs a quarantined agent opens no round,
        so counting rounds alone would keep it waiting for an admin."""
        due = (Agent.quarantine_rounds > 0) & (Agent.quarantine_until <= now)
        ids = list(self.s.scalars(select(Agent.id).where(due).order_by(Agent.id)).all())
        if ids:
            self.s.execute(update(Agent).where(Agent.id.in_(ids)).values(quarantine_rounds=0, quarantine_until=None))
        return ids

    def quarantined_ids(self) -> set[str]:
        return set(self.s.scalars(select(Agent.id).where(Agent.quarantine_rounds > 0)).all())

    def pass_quarantine_round(self) -> None:
        """A round opened without the quarantined agents: each has one round fewer left (and
        no wall-time limit once none is left)."""
        q = update(Agent).where(Agent.quarantine_rounds > 0)
        self.s.execute(q.values(quarantine_rounds=Agent.quarantine_rounds - 1))
        self.s.execute(
            update(Agent)
            .where(Agent.quarantine_rounds == 0, Agent.quarantine_until.is_not(None))
            .values(quarantine_until=None)
        )

    def set_rank_override(self, agent_id: str, rank: int | None) -> int | None:
        """Pin (or clear, with None) the agent's rank; returns the previous override."""
        agent = self.get(agent_id)
        previous = agent.rank_override
        agent.rank_override = rank
        return previous


class SpecCache:
    """Parsed job specs keyed by (job id, digest of the stored config): a spec is validated,
    and its strategy built, once per process rather than at every hop or scheduler tick. The
    digest keeps an entry honest should a row's config ever change. Callers must treat the
    returned spec as read-only: it is shared."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str], JobSpec] = OrderedDict()
        self._lock = threading.Lock()
        self.parses = 0  # how many times a config was actually validated (tests, diagnostics)

    @staticmethod
    def digest(config: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def get(self, job_id: str, config: dict[str, Any]) -> JobSpec:
        key = (job_id, self.digest(config))
        with self._lock:
            spec = self._entries.get(key)
            if spec is not None:
                self._entries.move_to_end(key)
                return spec
        spec = JobSpec.model_validate(config)  # outside the lock: validation builds a strategy
        with self._lock:
            self.parses += 1
            self._entries[key] = spec
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return spec

    def cached(self, job_id: str) -> JobSpec | None:
        """The job's spec if it is cached, without its config: a job's config is written once,
        when the job is created (coordinator/jobs.py), so the id names one spec. The agent plane's
        hot path uses it to skip loading and hashing the config on every call."""
        with self._lock:
            for (jid, _), spec in reversed(self._entries.items()):
                if jid == job_id:
                    return spec
        return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


SPECS = SpecCache()


class JobRepo:
    def __init__(self, s: Session) -> None:
        self.s = s

    def add(self, job: Job) -> Job:
        self.s.add(job)
        self.s.flush()
        return job

    def get(self, job_id: str, *, lock: bool = False) -> Job:
        q = select(Job).where(Job.id == job_id)
        job = self.s.scalars(q.with_for_update() if lock else q).first()
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def list(self, status: JobStatus | None = None, offset: int = 0, limit: int | None = None) -> Sequence[Job]:
        q = select(Job).order_by(Job.created_at, Job.id).offset(offset).limit(limit)
        return self.s.scalars(q.where(Job.status == status) if status else q).all()

    def ids(self, statuses: Sequence[JobStatus]) -> Sequence[str]:
        """Ids of the jobs in any of `statuses`, oldest first (no row loaded)."""
        return self.s.scalars(
            select(Job.id).where(Job.status.in_(list(statuses))).order_by(Job.created_at, Job.id)
        ).all()

    def spec(self, job: Job, cache: SpecCache = SPECS) -> JobSpec:
        """The job's parsed spec, from the process-wide cache (parsed once per job)."""
        return cache.get(job.id, job.config)

    def spec_of(self, job_id: str, cache: SpecCache = SPECS) -> JobSpec:
        """`spec` by id: the config is read only when the cache does not hold the job."""
        spec = cache.cached(job_id)
        if spec is not None:
            return spec
        config = self.s.scalar(select(Job.config).where(Job.id == job_id))
        if config is None:
            raise NotFound(f"job {job_id} not found")
        return cache.get(job_id, config)

    def transition(self, job_id: str, allowed: Sequence[JobStatus], to: JobStatus, **values: Any) -> bool:
        res = self.s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(list(allowed)))
            .values(status=to, updated_at=utcnow(), **values)
            .execution_options(synchronize_session="fetch")
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TaskRow:
    """An assignment with what the agent plane checks of its round and job. Read in one
    narrow query, no ORM objects: every participant's claim, download, heartbeat and upload
    reads one, and loading the ORM rows (with the round's report and the job's config) cost
    several times the query (bench/README.md, fleet)."""

    id: str
    agent_id: str
    rank: int
    state: AssignmentState
    round_id: int
    number: int
    round_state: RoundState
    deadline: datetime
    start_keys: dict[str, Any]
    input_state_key: str | None
    job_id: str
    job_status: JobStatus

    @property
    def round_open(self) -> bool:
        return self.round_state in (RoundState.OPEN, RoundState.COLLECTING)


_TASK_COLUMNS = (
    Assignment.id,
    Assignment.agent_id,
    Assignment.rank,
    Assignment.state,
    Assignment.round_id,
    Round.number,
    Round.state,
    Round.deadline,
    Round.start_keys,
    Round.input_state_key,
    Round.job_id,
    Job.status,
)


class RoundRepo:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, round_id: int, *, lock: bool = False) -> Round:
        """`lock`: SELECT ... FOR UPDATE, re-read from the database (Postgres; SQLite's writers
        are serialised already), for a read-modify-write of the row."""
        q = select(Round).where(Round.id == round_id)
        if lock:
            q = q.with_for_update().execution_options(populate_existing=True)
        r = self.s.scalars(q).first()
        if r is None:
            raise NotFound(f"round {round_id} not found")
        return r

    def active(self, job_id: str) -> Round | None:
        """The job's round that has not ended (at most one by construction)."""
        return self.s.scalars(
            select(Round).where(
                Round.job_id == job_id,
                Round.state.in_(
                    [
                        RoundState.PENDING,
                        RoundState.OPEN,
                        RoundState.COLLECTING,
                        RoundState.AGGREGATING,
                    ]
                ),
            )
        ).first()

    def for_job(self, job_id: str, offset: int = 0, limit: int | None = None) -> Sequence[Round]:
        q = select(Round).where(Round.job_id == job_id).order_by(Round.id)
        return self.s.scalars(q.offset(offset).limit(limit)).all()

    def change_keys(self, job_id: str, first: int, last: int) -> dict[int, str]:
        """Version -> key of the change that produced it (factored downlink), for the versions
        first..last whose rounds still record one."""
        rows = self.s.execute(
            select(Round.number, Round.start_keys).where(
                Round.job_id == job_id, Round.number >= first, Round.number <= last
            )
        ).all()
        return {int(n): str(keys[CHANGE_KEY]) for n, keys in rows if keys and keys.get(CHANGE_KEY)}

    def validation_summaries(self, job_id: str, first: int, last: int) -> dict[int, dict[str, Any] | None]:
        """Round number -> the validation screen's summary in its report (`validation`; None
        when it has none), for the job's committed rounds first..last: the window rule's
        history (aggregation/validate.py), one query reading that part of each report only."""
        rows = self.s.execute(
            select(Round.number, Round.report["validation"]).where(
                Round.job_id == job_id,
                Round.state == RoundState.COMMITTED,
                Round.number >= first,
                Round.number <= last,
            )
        ).all()
        return {int(n): v if isinstance(v, dict) else None for n, v in rows}

    def count_in(self, states: Sequence[RoundState]) -> int:
        """Rounds of every job in any of `states`."""
        return int(self.s.scalar(select(func.count()).select_from(Round).where(Round.state.in_(list(states)))) or 0)

    def attempts(self, job_id: str, number: int) -> int:
        n = self.s.scalar(select(func.count()).select_from(Round).where(Round.job_id == job_id, Round.number == number))
        return int(n or 0)

    def failed_attempts(self, job_id: str, number: int, since: datetime) -> int:
        """FAILED attempts of round `number` opened at or after `since`."""
        n = self.s.scalar(
            select(func.count())
            .select_from(Round)
            .where(
                Round.job_id == job_id,
                Round.number == number,
                Round.state == RoundState.FAILED,
                Round.created_at >= since,
            )
        )
        return int(n or 0)

    def last_error(self, job_id: str, number: int) -> str | None:
        """The error of the latest FAILED attempt of round `number`."""
        return self.s.scalar(
            select(Round.error)
            .where(Round.job_id == job_id, Round.number == number, Round.state == RoundState.FAILED)
            .order_by(Round.id.desc())
            .limit(1)
        )

    def open(
        self,
        job_id: str,
        number: int,
        attempt: int,
        deadline: datetime,
        target: int,
        quorum: int,
        ranks: dict[str, int],
        inputs: Job | None = None,
    ) -> Round:
        """A round OPEN with one assignment per agent; it records the job's current state,
        spectra and start packages as its inputs."""
        r = Round(
            job_id=job_id,
            number=number,
            attempt=attempt,
            deadline=deadline,
            target=target,
            quorum=quorum,
            state=RoundState.OPEN,
            input_state_key=inputs.state_key if inputs else None,
            input_plan_key=inputs.plan_key if inputs else None,
            start_keys=dict(inputs.start_keys) if inputs else {},
        )
        self.s.add(r)
        self.s.flush()
        for agent_id, rank in sorted(ranks.items()):
            self.s.add(Assignment(round_id=r.id, agent_id=agent_id, rank=rank))
        self.s.flush()
        return r

    def transition(self, round_id: int, allowed: Sequence[RoundState], to: RoundState, **values: Any) -> bool:
        """Conditional UPDATE: applies only from an allowed state (idempotent under races)."""
        res = self.s.execute(
            update(Round)
            .where(Round.id == round_id, Round.state.in_(list(allowed)))
            .values(state=to, **values)
            .execution_options(synchronize_session="fetch")
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]

    def find_assignment(self, task_id: str) -> Assignment | None:
        return self.s.get(Assignment, task_id)

    def assignment(self, task_id: str) -> Assignment:
        """The task with its round and job, in one query (every caller reads all three)."""
        a = self.s.get(Assignment, task_id, options=[joinedload(Assignment.round).joinedload(Round.job)])
        if a is None:
            raise NotFound(f"task {task_id} not found")
        return a

    @staticmethod
    def _pending(agents: str | Sequence[str], *columns: Any) -> Any:
        """`columns` of the agent's (or agents') assignments not uploaded, in rounds still
        collecting of running jobs, oldest first."""
        who = Assignment.agent_id == agents if isinstance(agents, str) else Assignment.agent_id.in_(set(agents))
        return (
            select(*columns)
            .select_from(Assignment)
            .join(Round)
            .join(Job)
            .where(
                who,
                Assignment.state.in_([AssignmentState.ISSUED, AssignmentState.RUNNING]),
                Round.state.in_([RoundState.OPEN, RoundState.COLLECTING]),
                Job.status == JobStatus.RUNNING,
            )
            .order_by(Assignment.created_at)
        )

    def pending_for_agent(self, agent_id: str) -> Assignment | None:
        """The agent's oldest assignment it has not uploaded, in a round still collecting."""
        return self.s.scalars(self._pending(agent_id, Assignment)).first()

    @staticmethod
    def _tasks() -> Any:
        return select(*_TASK_COLUMNS).select_from(Assignment).join(Round).join(Job)

    def task_row(self, task_id: str) -> TaskRow | None:
        """`assignment` as a `TaskRow` (None: no such task)."""
        row = self.s.execute(self._tasks().where(Assignment.id == task_id)).first()
        return None if row is None else TaskRow(*row)

    def pending_row(self, agent_id: str) -> TaskRow | None:
        """`pending_for_agent` as a `TaskRow`."""
        row = self.s.execute(self._pending(agent_id, *_TASK_COLUMNS).limit(1)).first()
        return None if row is None else TaskRow(*row)

    def task_rows(self, task_ids: Sequence[str]) -> dict[str, TaskRow]:
        """`task_row` for many tasks in one query (absent ids: no such task)."""
        if not task_ids:
            return {}
        rows = (TaskRow(*r) for r in self.s.execute(self._tasks().where(Assignment.id.in_(set(task_ids)))))
        return {r.id: r for r in rows}

    def pending_rows(self, agent_ids: Sequence[str]) -> dict[str, TaskRow]:
        """`pending_row` for many agents in one query: agent id → its oldest pending task
        (agents without one are absent)."""
        if not agent_ids:
            return {}
        out: dict[str, TaskRow] = {}
        for r in self.s.execute(self._pending(agent_ids, *_TASK_COLUMNS)):
            out.setdefault(r.agent_id, TaskRow(*r))  # oldest first
        return out

    def move_assignments(
        self, task_ids: Sequence[str], allowed: Sequence[AssignmentState], to: AssignmentState
    ) -> set[str]:
        """`move_assignment` for many tasks in one statement → the ids it moved."""
        if not task_ids:
            return set()
        res = self.s.execute(
            update(Assignment)
            .where(Assignment.id.in_(set(task_ids)), Assignment.state.in_(list(allowed)))
            .values(state=to, updated_at=utcnow())
            .returning(Assignment.id)
            .execution_options(synchronize_session=False)
        )
        return set(res.scalars().all())

    def move_assignment(self, task_id: str, allowed: Sequence[AssignmentState], to: AssignmentState) -> bool:
        """`set_assignment_state` without synchronising loaded objects (the agent plane holds
        `TaskRow`s, not ORM rows)."""
        return bool(self.move_assignments([task_id], allowed, to))

    def pending_id_for_agent(self, agent_id: str) -> str | None:
        """The id of what `pending_for_agent` returns, in one indexed query (no ORM rows)."""
        found: str | None = self.s.scalar(self._pending(agent_id, Assignment.id).limit(1))
        return found

    def pending_agents(self) -> set[str]:
        """Every agent with an assignment it has not uploaded in a round still collecting of a
        running job: one query, O(open rounds' assignments), whatever the fleet's size."""
        rows = self.s.scalars(
            select(Assignment.agent_id)
            .join(Round)
            .join(Job)
            .where(
                Assignment.state.in_([AssignmentState.ISSUED, AssignmentState.RUNNING]),
                Round.state.in_([RoundState.OPEN, RoundState.COLLECTING]),
                Job.status == JobStatus.RUNNING,
            )
            .distinct()
        ).all()
        return set(rows)

    def busy_agents(self) -> set[str]:
        rows = self.s.scalars(
            select(Assignment.agent_id)
            .join(Round)
            .where(
                Assignment.state.in_([AssignmentState.ISSUED, AssignmentState.RUNNING]),
                Round.state.in_([RoundState.OPEN, RoundState.COLLECTING]),
            )
        ).all()
        return set(rows)

    def set_assignment_state(self, task_id: str, allowed: Sequence[AssignmentState], to: AssignmentState) -> bool:
        res = self.s.execute(
            update(Assignment)
            .where(Assignment.id == task_id, Assignment.state.in_(list(allowed)))
            .values(state=to, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]

    def expire_open_assignments(self, round_id: int) -> int:
        res = self.s.execute(
            update(Assignment)
            .where(
                Assignment.round_id == round_id,
                Assignment.state.in_([AssignmentState.ISSUED, AssignmentState.RUNNING]),
            )
            .values(state=AssignmentState.EXPIRED, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
        return int(res.rowcount)  # type: ignore[attr-defined]

    def cancel_open_assignments(self, agent_id: str) -> int:
        res = self.s.execute(
            update(Assignment)
            .where(
                Assignment.agent_id == agent_id,
                Assignment.state.in_([AssignmentState.ISSUED, AssignmentState.RUNNING]),
            )
            .values(state=AssignmentState.CANCELLED, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
        return int(res.rowcount)  # type: ignore[attr-defined]

    def withdraw_unmerged_updates(self, agent_id: str) -> list[tuple[str, int, int]]:
        """Remove the agent's accepted uploads from rounds still collecting (not yet handed to
        the aggregation); their assignments become CANCELLED. → (job id, round number, round id)."""
        rows = self.s.execute(
            select(Update, Round)
            .join(Round, Update.round_id == Round.id)
            .where(Update.agent_id == agent_id, Round.state.in_([RoundState.OPEN, RoundState.COLLECTING]))
            .with_for_update(of=Round)
        ).all()
        out = []
        for upd, rnd in rows:
            self.s.execute(
                update(Assignment)
                .where(Assignment.id == upd.assignment_id)
                .values(state=AssignmentState.CANCELLED, updated_at=utcnow())
                .execution_options(synchronize_session="fetch")
            )
            self.s.delete(upd)
            out.append((rnd.job_id, rnd.number, rnd.id))
        self.s.flush()
        return out

    def updates(self, round_id: int) -> Sequence[Update]:
        return self.s.scalars(select(Update).where(Update.round_id == round_id).order_by(Update.agent_id)).all()

    def expected_count(self, round_id: int) -> int:
        """The round's assignments that may still upload or have (every one but the cancelled)."""
        q = select(func.count()).select_from(Assignment)
        q = q.where(Assignment.round_id == round_id, Assignment.state != AssignmentState.CANCELLED)
        return int(self.s.scalar(q) or 0)

    def update_count(self, round_id: int) -> int:
        return int(self.s.scalar(select(func.count()).select_from(Update).where(Update.round_id == round_id)) or 0)

    def insert_update(self, **values: Any) -> str:
        """`add_update` as a Core INSERT (the upload path's cost; bench/README.md, fleet) → its id."""
        return self.insert_updates([values])[0]

    def insert_updates(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """`insert_update` for many rows in one executemany → their ids, in order."""
        ids = [new_id() for _ in rows]
        if rows:
            self.s.execute(
                insert(cast(Table, Update.__table__)), [{"id": i, **r} for i, r in zip(ids, rows, strict=True)]
            )
        return ids

    def add_update(self, upd: Update) -> Update:
        self.s.add(upd)
        self.s.flush()
        return upd


class CheckpointRepo:
    def __init__(self, s: Session) -> None:
        self.s = s

    def add(self, job_id: str, round_number: int, state_key: str) -> Checkpoint:
        c = Checkpoint(job_id=job_id, round_number=round_number, state_key=state_key)
        self.s.add(c)
        self.s.flush()
        return c

    def for_job(self, job_id: str, offset: int = 0, limit: int | None = None) -> Sequence[Checkpoint]:
        q = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.round_number)
        return self.s.scalars(q.offset(offset).limit(limit)).all()

    def get(self, job_id: str, round_number: int) -> Checkpoint:
        c = self.s.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.round_number == round_number)
        ).first()
        if c is None:
            raise NotFound(f"job {job_id} has no checkpoint for round {round_number}")
        return c


class AuditRepo:
    def __init__(self, s: Session) -> None:
        self.s = s

    def record(self, actor: str, action: str, job_id: str | None = None, **details: Any) -> None:
        # a Core INSERT: the ORM unit of work cost more than the statement on the upload path
        row = {"actor": actor, "action": action, "job_id": job_id, "details": details}
        self.s.execute(insert(cast(Table, AuditEvent.__table__)).values(**row))

    def record_many(self, events: Sequence[tuple[str, str, str | None, dict[str, Any]]]) -> None:
        """`record` for many (actor, action, job_id, details) events in one executemany."""
        if events:
            rows = [{"actor": a, "action": x, "job_id": j, "details": d} for a, x, j, d in events]
            self.s.execute(insert(cast(Table, AuditEvent.__table__)), rows)

    def list(self, job_id: str | None = None, limit: int = 200, before_id: int | None = None) -> Sequence[AuditEvent]:
        """Newest first; `before_id`: only events older than that one (the next page)."""
        q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if before_id is not None:
            q = q.where(AuditEvent.id < before_id)
        return self.s.scalars(q.where(AuditEvent.job_id == job_id) if job_id else q).all()


class ShardRepo:
    """The aggregation side's shard results: one row per (round, shard), inserted once."""

    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, round_id: int, shard: int) -> RoundShard | None:
        return self.s.scalars(
            select(RoundShard).where(RoundShard.round_id == round_id, RoundShard.shard == shard)
        ).first()

    def for_round(self, round_id: int) -> Sequence[RoundShard]:
        return self.s.scalars(
            select(RoundShard).where(RoundShard.round_id == round_id).order_by(RoundShard.shard)
        ).all()

    def add(self, round_id: int, shard: int, blob_key: str, worker: str, seconds: float) -> RoundShard:
        """Raises sqlalchemy's IntegrityError (at flush) when the shard is already recorded."""
        row = RoundShard(round_id=round_id, shard=shard, blob_key=blob_key, worker=worker, seconds=seconds)
        self.s.add(row)
        self.s.flush()
        return row


class BlobRefRepo:
    """Which blobs the tables still reference, for the blob garbage collector."""

    def __init__(self, s: Session) -> None:
        self.s = s

    def referenced(self, keep_checkpoints: int) -> set[str]:
        """Every key a job, an unfinished round, one of each job's last `keep_checkpoints`
        rounds (inputs, uploads, shard results) or last `keep_checkpoints` checkpoints
        references. What an export reads is a checkpoint, so it is kept with them."""
        keys: set[str] = set()
        for job in self.s.scalars(select(Job)).all():
            keys.update(k for k in (job.state_key, job.plan_key) if k)
            keys.update(str(v) for v in job.start_keys.values())
            floor = job.current_round - keep_checkpoints  # rounds numbered >= floor are kept
            rounds = self.s.scalars(
                select(Round).where(
                    Round.job_id == job.id,
                    (Round.number >= floor) | Round.state.notin_([RoundState.COMMITTED, RoundState.FAILED]),
                )
            ).all()
            ids = [r.id for r in rounds]
            for r in rounds:
                keys.update(k for k in (r.input_state_key, r.input_plan_key) if k)
                keys.update(str(v) for v in r.start_keys.values())
            if ids:
                keys.update(self.s.scalars(select(Update.blob_key).where(Update.round_id.in_(ids))).all())
                keys.update(self.s.scalars(select(RoundShard.blob_key).where(RoundShard.round_id.in_(ids))).all())
            keys.update(
                self.s.scalars(
                    select(Checkpoint.state_key)
                    .where(Checkpoint.job_id == job.id)
                    .order_by(Checkpoint.round_number.desc())
                    .limit(keep_checkpoints)
                ).all()
            )
        return keys
