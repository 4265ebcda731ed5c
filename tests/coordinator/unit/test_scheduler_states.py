"""The scheduler's round state machine, one transition per test, driven by `Scheduler.tick`
on a real database (SQLite and Postgres) with in-process coordination, file blobs and an
injected clock: no threads, no sleeps, no subprocesses.

Each test prepares the tables, runs one tick (or a few), and asserts the states, the
aggregation queue and the events against values worked out by hand from the spec."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fedhl.backends import ROUND_EVENTS, AggregationTask, Deps
from fedhl.coordinator.jobs import JobService
from fedhl.coordinator.scheduler import REQUEUE_CHECK_S, Scheduler
from fedhl.jobspec import JobSpec
from fedhl.storage.blobs import FileBlobStore
from fedhl.storage.coordination import open_coordination
from fedhl.storage.db import transaction
from fedhl.storage.models import AssignmentState, AuditEvent, Job, JobStatus, Round, RoundState, Update
from fedhl.storage.repos import SPECS, AgentRepo, JobRepo, RoundRepo, ShardRepo

T0 = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
DEADLINE_S = 60.0
KEY = "cd" * 32
# two modules, so a round may be split into at most two aggregation shards
SPEC: dict[str, Any] = {
    "name": "unit",
    "base_model": "none",
    "target_modules": ["q", "v"],
    "module_shapes": {"layers.0.q": [8, 8], "layers.0.v": [8, 8]},
    "rank_set": [2, 4],
    "rank_policy": {"kind": "fixed", "default_rank": 2},
    "rounds": 2,
    "selection": {"min_clients": 1, "deadline_s": DEADLINE_S, "quorum": 0.5},
}


@dataclass
class Clock:
    now: datetime = T0
    mono: float = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


@dataclass
class World:
    sessions: sessionmaker[Session]
    deps: Deps
    clock: Clock
    scheduler: Scheduler
    queued: list[AggregationTask] = field(default_factory=list)

    def drain_queue(self) -> list[AggregationTask]:
        """The aggregation tasks published since the last call."""
        entries = self.deps.coordination.queue.consume("test", block_s=0, count=100)
        for entry_id, _ in entries:
            self.deps.coordination.queue.ack(entry_id)
        return [AggregationTask.from_fields(f) for _, f in entries]

    def agents(self, n: int, live: int | None = None) -> list[str]:
        """`n` enrolled agents named a0, a1, ...; the first `live` (default all) heartbeat."""
        ids = []
        with transaction(self.sessions) as s:
            repo = AgentRepo(s)
            for i in range(n):
                token, _ = repo.create_token("t", 1, None)
                ids.append(repo.redeem(token, f"a{i}", {})[0].id)
        for agent_id in ids[: n if live is None else live]:
            self.deps.coordination.liveness.beat(agent_id, 3600)
        return ids

    def job(self, status: JobStatus = JobStatus.RUNNING, current_round: int = 0, **selection: Any) -> str:
        spec = JobSpec.model_validate({**SPEC, "selection": {**SPEC["selection"], **selection}})
        with transaction(self.sessions) as s:
            job = JobRepo(s).add(
                Job(
                    name=spec.name,
                    status=status,
                    strategy=spec.strategy,
                    base_model=spec.base_model,
                    config=spec.model_dump(mode="json"),
                    current_round=current_round,
                    state_key=KEY,
                    start_keys={"2": KEY, "4": KEY},
                )
            )
            return job.id

    def round(self, job_id: str) -> Round:
        with transaction(self.sessions) as s:
            rounds = RoundRepo(s).for_job(job_id)
            assert rounds, "no round"
            rnd = rounds[-1]
            _ = rnd.assignments  # loaded while the session is open
            return rnd

    def states(self, job_id: str) -> dict[str, AssignmentState]:
        return {a.agent_id: a.state for a in self.round(job_id).assignments}

    def upload(self, job_id: str, agent_id: str) -> None:
        """What an accepted upload writes (AgentService._accept)."""
        with transaction(self.sessions) as s:
            rounds = RoundRepo(s)
            rnd = rounds.active(job_id)
            assert rnd is not None
            a = next(a for a in rnd.assignments if a.agent_id == agent_id)
            assert rounds.set_assignment_state(
                a.id, [AssignmentState.ISSUED, AssignmentState.RUNNING], AssignmentState.UPLOADED
            )
            rounds.add_update(
                Update(
                    assignment_id=a.id,
                    round_id=rnd.id,
                    agent_id=agent_id,
                    blob_key=KEY,
                    sha256=KEY,
                    size=1,
                    n_examples=1,
                )
            )
            rounds.transition(rnd.id, [RoundState.OPEN], RoundState.COLLECTING)

    def cancel(self, agent_id: str) -> None:
        with transaction(self.sessions) as s:
            RoundRepo(s).cancel_open_assignments(agent_id)

    def job_row(self, job_id: str) -> Job:
        with transaction(self.sessions) as s:
            return JobRepo(s).get(job_id)


@pytest.fixture
def world(sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[World]:
    clock = Clock()
    deps = Deps(sessions, FileBlobStore(tmp_path / "blobs"), open_coordination(None))
    scheduler = Scheduler(deps, shards=4, clock=lambda: clock.now, monotonic=lambda: clock.mono)
    try:
        yield World(sessions, deps, clock, scheduler)
    finally:
        deps.coordination.close()


# ------------------------------------------------------------------------------ opening


def test_a_running_job_opens_round_0_with_every_live_agent(world: World) -> None:
    agents = world.agents(3)
    job_id = world.job()
    with world.deps.coordination.events.subscribe(ROUND_EVENTS) as events:
        world.scheduler.tick()
        assert events.get(timeout_s=1) == {"type": "round_changed", "job_id": job_id}
    rnd = world.round(job_id)
    # no count or fraction: target = all 3 available; quorum = max(1, ceil(0.5 × 3)) = 2
    assert (rnd.number, rnd.attempt, rnd.state, rnd.target, rnd.quorum) == (0, 0, RoundState.OPEN, 3, 2)
    assert rnd.deadline == T0 + timedelta(seconds=DEADLINE_S)
    assert (rnd.input_state_key, rnd.start_keys) == (KEY, {"2": KEY, "4": KEY})
    assert sorted((a.agent_id, a.rank, a.state) for a in rnd.assignments) == sorted(
        (a, 2, AssignmentState.ISSUED) for a in agents
    )
    assert world.drain_queue() == []


@pytest.mark.parametrize(
    ("case", "enrolled", "live", "status", "min_clients", "opens"),
    [
        ("enough live agents", 2, 2, JobStatus.RUNNING, 2, True),
        ("too few live agents", 2, 1, JobStatus.RUNNING, 2, False),  # enrolled but silent: not available
        ("no agents", 0, 0, JobStatus.RUNNING, 1, False),
        ("paused job", 2, 2, JobStatus.PAUSED, 1, False),
        ("pending job", 2, 2, JobStatus.PENDING, 1, False),  # not scheduled at all
    ],
)
def test_open_needs_a_running_job_and_min_clients_live_agents(
    world: World, case: str, enrolled: int, live: int, status: JobStatus, min_clients: int, opens: bool
) -> None:
    world.agents(enrolled, live=live)
    job_id = world.job(status, min_clients=min_clients)
    world.scheduler.tick()
    with transaction(world.sessions) as s:
        assert len(RoundRepo(s).for_job(job_id)) == (1 if opens else 0)


def test_agents_busy_in_another_round_and_revoked_agents_are_not_selected(world: World) -> None:
    agents = set(world.agents(3))
    first = world.job(count=1)
    world.scheduler.tick()
    (busy,) = world.states(first)  # the one agent the first job took
    revoked = min(agents - {busy})
    with transaction(world.sessions) as s:
        AgentRepo(s).revoke(revoked)
    second = world.job()  # no count: every available agent
    world.scheduler.tick()
    assert set(world.states(second)) == agents - {busy, revoked}


def test_a_job_that_needs_a_quarantined_agent_waits_only_until_the_quarantine_expires(world: World) -> None:
    # Prepare: 2 agents, min_clients 2; one is quarantined for 5 rounds or 100 s
    offender, other = world.agents(2)
    job_id = world.job(min_clients=2)
    with transaction(world.sessions) as s:
        assert AgentRepo(s).strike(offender, after=1, rounds=5, until=T0 + timedelta(seconds=100))
    # Execute / Assert: no round can open (so no round passes) until the wall-time limit
    world.scheduler.tick()
    world.clock.advance(99)
    world.scheduler.tick()
    with transaction(world.sessions) as s:
        assert RoundRepo(s).for_job(job_id) == []
        assert AgentRepo(s).get(offender).quarantine_rounds == 5
    world.clock.advance(1)
    world.scheduler.tick()
    assert set(world.states(job_id)) == {offender, other}
    with transaction(world.sessions) as s:
        agent = AgentRepo(s).get(offender)
        assert (agent.quarantine_rounds, agent.quarantine_until) == (0, None)
        expired = s.scalars(select(AuditEvent).where(AuditEvent.action == "agent_quarantine_expired")).all()
        assert [(e.job_id, e.details) for e in expired] == [(job_id, {"agent_id": offender})]


def test_over_selection_issues_more_assignments_than_the_target(world: World) -> None:
    world.agents(5)
    job_id = world.job(count=2, over_selection=1.5)
    world.scheduler.tick()
    rnd = world.round(job_id)
    assert (len(rnd.assignments), rnd.target, rnd.quorum) == (3, 2, 1)  # ceil(2 × 1.5); max(1, ceil(1))


# ------------------------------------------------------------------------------ closing


@pytest.mark.parametrize(
    ("case", "selection", "agents", "uploads", "cancelled", "after_s", "state", "expired"),
    [
        # target reached before the deadline: close at once
        ("target reached", {"count": 2}, 2, 2, 0, 0.0, RoundState.AGGREGATING, 0),
        ("over-selected target reached", {"count": 2, "over_selection": 1.5}, 3, 2, 0, 0.0, RoundState.AGGREGATING, 1),
        # nothing decides yet
        ("no upload", {"count": 2}, 2, 0, 0, 0.0, RoundState.OPEN, 0),
        ("below target, before the deadline", {"count": 3}, 3, 2, 0, DEADLINE_S - 0.001, RoundState.COLLECTING, 0),
        # every assignment still expected has reported (one was cancelled): no need to wait
        ("everyone expected reported", {"count": 3}, 3, 2, 1, 0.0, RoundState.AGGREGATING, 0),
        # deadline (inclusive): quorum = max(1, ceil(0.5 × 3)) = 2
        ("deadline with quorum", {"count": 3}, 3, 2, 0, DEADLINE_S, RoundState.AGGREGATING, 1),
        ("deadline without quorum", {"count": 3}, 3, 1, 0, DEADLINE_S, RoundState.FAILED, 2),
        ("deadline, quorum 1.0", {"count": 3, "quorum": 1.0}, 3, 2, 0, DEADLINE_S + 1, RoundState.FAILED, 1),
        # every assignment cancelled: nobody can report, fail without waiting
        ("all cancelled", {"count": 2}, 2, 0, 2, 0.0, RoundState.FAILED, 0),
    ],
)
def test_close_decision(
    world: World,
    case: str,
    selection: dict[str, Any],
    agents: int,
    uploads: int,
    cancelled: int,
    after_s: float,
    state: RoundState,
    expired: int,
) -> None:
    world.agents(agents)
    job_id = world.job(**selection)
    world.scheduler.tick()
    assigned = sorted(world.states(job_id))
    for agent_id in assigned[:uploads]:
        world.upload(job_id, agent_id)
    for agent_id in assigned[uploads : uploads + cancelled]:
        world.cancel(agent_id)
    world.clock.advance(after_s)
    world.scheduler.tick()
    rnd = world.round(job_id)
    assert rnd.state is state
    counts = {s: list(world.states(job_id).values()).count(s) for s in AssignmentState}
    assert (counts[AssignmentState.UPLOADED], counts[AssignmentState.CANCELLED], counts[AssignmentState.EXPIRED]) == (
        uploads,
        cancelled,
        expired,
    )
    closed = state in (RoundState.AGGREGATING, RoundState.FAILED)
    assert rnd.closed_at == (world.clock.now if closed else None)
    if state is RoundState.FAILED and uploads:
        assert rnd.error == f"deadline passed with {uploads} of {rnd.quorum} uploads needed"
    # a closed round is queued for aggregation, one task per shard (min(4 configured, 2 modules))
    queued = world.drain_queue()
    if state is RoundState.AGGREGATING:
        assert rnd.shards == 2
        assert queued == [AggregationTask(rnd.id, 0), AggregationTask(rnd.id, 1)]
    else:
        assert queued == []


def test_an_aggregating_round_is_requeued_only_for_shards_without_a_queue_entry(world: World) -> None:
    (a,) = world.agents(1)
    job_id = world.job(count=1)
    world.scheduler.tick()
    world.upload(job_id, a)
    world.scheduler.tick()
    rnd_id = world.round(job_id).id
    queue = world.deps.coordination.queue
    # a worker holds shard 0 (pending, unacked); shard 1 is lost (consumed and acked, no result)
    (e0,) = queue.consume("w", block_s=0)
    (e1,) = queue.consume("w", block_s=0)
    queue.ack(e1[0])
    world.clock.advance(REQUEUE_CHECK_S)  # not yet: strictly more than the check interval
    world.scheduler.tick()
    assert world.drain_queue() == []
    world.clock.advance(0.001)
    world.scheduler.tick()
    assert world.drain_queue() == [AggregationTask(rnd_id, 1)]  # never shard 0: a worker has it
    assert queue.outstanding() == [e0]
    assert world.round(job_id).state is RoundState.AGGREGATING  # the scheduler never commits


def test_a_round_whose_shards_all_have_results_but_no_commit_gets_one_task_to_commit_it(world: World) -> None:
    """A worker killed between recording the last shard and the commit (seen in the killed-
    coordinator e2e test): nothing is queued and nothing is missing, yet the round must commit."""
    (a,) = world.agents(1)
    job_id = world.job(count=1)
    world.scheduler.tick()
    world.upload(job_id, a)
    world.scheduler.tick()
    rnd_id = world.round(job_id).id
    world.drain_queue()  # both shard tasks consumed and acked ...
    with transaction(world.sessions) as s:  # ... after their results were recorded
        for shard in (0, 1):
            ShardRepo(s).add(rnd_id, shard, f"{shard:064x}", "w", 0.1)
    world.clock.advance(REQUEUE_CHECK_S + 0.001)
    world.scheduler.tick()
    assert world.drain_queue() == [AggregationTask(rnd_id, 0)]
    assert world.round(job_id).state is RoundState.AGGREGATING  # the scheduler never commits


def test_a_new_scheduler_requeues_aggregating_rounds_at_once(world: World) -> None:
    (a,) = world.agents(1)
    job_id = world.job(count=1)
    world.scheduler.tick()
    world.upload(job_id, a)
    world.scheduler.tick()
    world.drain_queue()
    successor = Scheduler(world.deps, shards=4, clock=lambda: world.clock.now, monotonic=lambda: world.clock.mono)
    successor.tick()  # a leader change: its own memory of what was queued is empty
    assert len(world.drain_queue()) == 2


# ------------------------------------------------------------------------------ attempts and completion


def test_a_failed_round_is_retried_as_the_next_attempt_of_the_same_number(world: World) -> None:
    world.agents(2)
    job_id = world.job(count=2, quorum=1.0)
    world.scheduler.tick()
    world.clock.advance(DEADLINE_S)
    world.scheduler.tick()  # no upload at the deadline: FAILED
    assert world.round(job_id).state is RoundState.FAILED
    world.scheduler.tick()  # the same job state: a new attempt
    with transaction(world.sessions) as s:
        rounds = RoundRepo(s).for_job(job_id)
        assert [(r.number, r.attempt, r.state) for r in rounds] == [
            (0, 0, RoundState.FAILED),
            (0, 1, RoundState.OPEN),
        ]
        assert rounds[1].deadline == world.clock.now + timedelta(seconds=DEADLINE_S)


def test_a_round_that_keeps_failing_pauses_its_job_until_an_admin_resumes_it(world: World) -> None:
    world.agents(2)
    job_id = world.job(count=2, quorum=1.0)
    world.scheduler.max_round_attempts = 2
    for _ in range(2):
        world.scheduler.tick()  # opens an attempt
        world.clock.advance(DEADLINE_S)
        world.scheduler.tick()  # no upload at the deadline: FAILED
    world.scheduler.tick()  # a third attempt would pass the limit: the job pauses instead
    job = world.job_row(job_id)
    assert job.status is JobStatus.PAUSED
    assert job.error == (
        "round 0 failed 2 times in a row (last: deadline passed with 0 of 2 uploads needed); resume the job to retry"
    )
    with transaction(world.sessions) as s:
        assert [r.attempt for r in RoundRepo(s).for_job(job_id)] == [0, 1]
    JobService(world.deps).resume(job_id)  # the count starts again from the resume
    world.scheduler.tick()
    assert (world.job_row(job_id).status, world.job_row(job_id).error) == (JobStatus.RUNNING, None)
    assert (world.round(job_id).attempt, world.round(job_id).state) == (2, RoundState.OPEN)


@pytest.mark.parametrize(
    ("status", "current_round", "final"),
    [
        (JobStatus.RUNNING, 2, JobStatus.COMPLETED),  # rounds = 2 committed: done
        (JobStatus.PAUSED, 2, JobStatus.COMPLETED),  # a paused job with nothing left completes too
        (JobStatus.RUNNING, 1, JobStatus.RUNNING),  # one round left: opens it instead
    ],
)
def test_a_job_completes_once_every_round_is_committed(
    world: World, status: JobStatus, current_round: int, final: JobStatus
) -> None:
    world.agents(1)
    job_id = world.job(status, current_round=current_round)
    world.scheduler.tick()
    assert world.job_row(job_id).status is final
    with transaction(world.sessions) as s:
        opened = RoundRepo(s).for_job(job_id)
    assert [r.number for r in opened] == ([1] if final is JobStatus.RUNNING else [])


def test_ticks_parse_the_job_spec_once(world: World) -> None:
    world.agents(1)
    job_id = world.job(count=1)
    before = SPECS.parses
    for _ in range(5):
        world.scheduler.tick()
        world.clock.advance(1)
    assert SPECS.parses - before == 1
    assert world.job_row(job_id).status is JobStatus.RUNNING
