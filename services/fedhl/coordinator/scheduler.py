"""The round state machine, driven by one leader among the coordinator replicas.

PENDING → OPEN (assignments issued) → COLLECTING (first upload) → AGGREGATING (target reached,
every assignment reported, or the deadline passed with quorum) → COMMITTED (by the
aggregation runner), or FAILED (deadline without quorum, cancellation, bad merge); a failed
round is retried as a new attempt from the same global state. Every transition is one
transaction with a conditional UPDATE, so a coordinator killed at any instant resumes from
the tables.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy.orm import Session

from ..backends import ROUND_EVENTS, SCHEDULER_EVENTS, TASK_EVENTS, AggregationTask, Deps
from ..jobspec import JobSpec
from ..storage.coordination import Subscription
from ..storage.db import transaction
from ..storage.leader import LeaderLock
from ..storage.models import Job, JobStatus, Round, RoundState, utcnow
from ..storage.repos import AgentRepo, AuditRepo, JobRepo, RoundRepo, ShardRepo
from ..supervise import LoopRegistry, LoopState, supervise
from .ranks import AgentInfo, assign_ranks
from .selection import quorum, select
from .waiters import task_events

log = logging.getLogger(__name__)

REQUEUE_CHECK_S = 5.0  # how often an AGGREGATING round's queue entries are checked
RESUBSCRIBE_S = 5.0  # how often a leader without an event subscription tries again
EVENT_DRAIN_MAX = 10_000  # events answered by one tick, at most


class Scheduler:
    def __init__(
        self,
        deps: Deps,
        interval_s: float = 0.2,
        shards: int = 1,
        *,
        max_round_attempts: int = 5,
        stale_after_s: float = 30.0,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deps = deps
        self.interval_s = interval_s
        self.shards = shards  # aggregation jobs per round (module shards), capped by the module count
        self.clock = clock  # wall time for deadlines (injected by tests)
        self.monotonic = monotonic  # for re-enqueue timing
        self.max_round_attempts = max_round_attempts  # failed attempts of one round before the job pauses
        self.stale_after_s = stale_after_s  # /readyz: the loop is stuck past this without a tick
        self.role: Literal["leader", "standby"] = "standby"
        self._enqueued: dict[int, float] = {}  # round id -> when its queue entries were last checked

    def run(self, stop: threading.Event, loops: LoopRegistry | None = None) -> None:
        """Until stopped: wait to become leader, then tick on every round event or interval.
        Supervised: a backend error steps down, backs off and tries again; never returns early."""
        state = (loops or LoopRegistry()).register("scheduler", self.stale_after_s)
        leader = LeaderLock(self.deps.sessions.kw["bind"])
        try:
            supervise(state, lambda st: self._lead(st, leader, stop), stop)
        finally:
            self.role = "standby"
            leader.release()

    def _lead(self, state: LoopState, leader: LeaderLock, stop: threading.Event) -> None:
        try:
            while not stop.is_set() and not leader.acquire():
                state.tick()  # a standby that reaches the database is healthy
                stop.wait(1.0)
            if stop.is_set():
                return
            self.role = "leader"
            log.info("scheduler is the leader")
            self._enqueued.clear()  # a new leader checks every AGGREGATING round's queue entries at once
            sub: Subscription | None = None
            next_subscribe = 0.0
            try:
                while not stop.is_set():
                    if not leader.held():  # e.g. the database restarted: the lock went with the session
                        log.warning("scheduler lost the leader lock; stepping down")
                        return
                    self.tick()
                    state.tick()
                    if sub is None and self.monotonic() >= next_subscribe:
                        sub = self._subscribe()
                        next_subscribe = self.monotonic() + RESUBSCRIBE_S
                    if sub is None:
                        stop.wait(self.interval_s)  # events are hints: poll while they are away
                    elif sub.get(timeout_s=self.interval_s) is not None:
                        # one tick answers every event already queued (a 1,000-agent round
                        # publishes 1,000 uploads: a tick each would be quadratic)
                        for _ in range(EVENT_DRAIN_MAX):
                            if sub.get(timeout_s=0) is None:
                                break
            finally:
                if sub is not None:
                    sub.close()
        finally:
            if self.role == "leader":
                log.info("scheduler steps down")
            self.role = "standby"
            leader.release()

    def _subscribe(self) -> Subscription | None:
        try:
            return self.deps.coordination.events.subscribe(SCHEDULER_EVENTS)
        except Exception as e:  # Redis away: tick on the interval until it is back
            log.warning("scheduler cannot subscribe to events (%s); polling every %.2fs", e, self.interval_s)
            return None

    def tick(self) -> None:
        with transaction(self.deps.sessions, read_only=True) as s:
            job_ids = JobRepo(s).ids([JobStatus.RUNNING, JobStatus.PAUSED])
        for job_id in job_ids:
            self.advance(job_id)

    def advance(self, job_id: str) -> None:
        enqueue: tuple[int, list[int]] | None = None  # (round id, shards to publish)
        check: tuple[int, int] | None = None  # (round id, shards): re-publish what has no queue entry
        opened: list[str] | None = None  # the agents of a round opened now: their waits are woken
        with transaction(self.deps.sessions) as s:
            jobs = JobRepo(s)
            job = jobs.get(job_id, lock=True)  # serialises transitions of this job
            spec = jobs.spec(job)  # cached: parsed once per job, not per tick
            rounds = RoundRepo(s)
            rnd = rounds.active(job_id)
            now = self.clock()
            if rnd is None:
                if job.current_round >= spec.rounds:
                    jobs.transition(job_id, [JobStatus.RUNNING, JobStatus.PAUSED], JobStatus.COMPLETED)
                elif job.status is JobStatus.RUNNING:
                    opened = self._open(s, job, spec, now)
            elif rnd.state in (RoundState.OPEN, RoundState.COLLECTING):
                n = rounds.update_count(rnd.id)
                expected = rounds.expected_count(rnd.id)  # counted in SQL: no assignment rows loaded
                everyone = expected > 0 and n >= expected
                if n >= rnd.target or everyone or (now >= rnd.deadline and n >= rnd.quorum):
                    rounds.expire_open_assignments(rnd.id)
                    # the validation screen needs the whole model in one task (aggregation/validate.py)
                    wanted = 1 if spec.defence.validation is not None else self.shards
                    shards = max(1, min(wanted, len(spec.module_shapes)))
                    rounds.transition(
                        rnd.id,
                        [RoundState.OPEN, RoundState.COLLECTING],
                        RoundState.AGGREGATING,
                        closed_at=now,
                        shards=shards,
                    )
                    AuditRepo(s).record("scheduler", "round_closed", job_id, round=rnd.number, uploads=n)
                    enqueue = (rnd.id, list(range(shards)))
                elif now >= rnd.deadline or expected == 0:
                    rounds.expire_open_assignments(rnd.id)
                    rounds.transition(
                        rnd.id,
                        [RoundState.OPEN, RoundState.COLLECTING],
                        RoundState.FAILED,
                        closed_at=now,
                        error=f"deadline passed with {n} of {rnd.quorum} uploads needed",
                    )
                    AuditRepo(s).record("scheduler", "round_failed", job_id, round=rnd.number, uploads=n)
            elif rnd.state is RoundState.AGGREGATING:
                last = self._enqueued.get(rnd.id)
                if last is None or self.monotonic() - last > REQUEUE_CHECK_S:
                    check = (rnd.id, rnd.shards)  # after a leader change or a lost queue
        if check is not None:
            round_id, shards = check
            self._enqueued[round_id] = self.monotonic()
            missing = self._unqueued_shards(round_id, shards)
            if missing:
                log.warning("round %s: shard(s) %s have no queue entry and no result; re-enqueued", round_id, missing)
                enqueue = (round_id, missing)
        if enqueue is not None:
            round_id, shard_list = enqueue
            for shard in shard_list:
                self.deps.coordination.queue.publish(AggregationTask(round_id, shard).to_fields())
            self._enqueued[round_id] = self.monotonic()
        if opened is not None or enqueue is not None:
            self.deps.coordination.events.publish(ROUND_EVENTS, {"type": "round_changed", "job_id": job_id})
        if opened:  # wakes exactly the waits of the selected agents, on every replica
            for event in task_events(job_id, opened):
                self.deps.coordination.events.publish(TASK_EVENTS, event)

    def _unqueued_shards(self, round_id: int, shards: int) -> list[int]:
        """Shards of an AGGREGATING round with neither a queue entry (pending with a worker, or
        not yet delivered) nor a recorded result, or [0] when all have results but no commit.
        The queue is read before the database: a worker records its shard before it acks, so a
        shard in neither is really lost."""
        queued: set[int] = set()
        for _, fields in self.deps.coordination.queue.outstanding():
            try:
                task = AggregationTask.from_fields(fields)
            except ValueError:
                continue
            if task.round_id == round_id:
                queued.add(task.shard)
        with transaction(self.deps.sessions, read_only=True) as s:
            done = {r.shard for r in ShardRepo(s).for_round(round_id)}
        if not queued and len(done) >= shards:
            # every shard has its result but the round is still AGGREGATING: a worker died between
            # the last shard and the commit. One task commits it (its shard is done: straight to commit).
            return [0]
        return [i for i in range(shards) if i not in queued and i not in done]

    def _open(self, s: Session, job: Job, spec: JobSpec, now: datetime) -> list[str] | None:
        """Open the job's next round; → the selected agent ids, or None when none opened.
        Reads the fleet's ids (not its rows) and loads the rows of the selected agents only."""
        job_id, number = job.id, job.current_round
        rounds = RoundRepo(s)
        # Failed attempts since the job last changed status (an admin resume starts a new count).
        failed = rounds.failed_attempts(job_id, number, since=job.updated_at)
        if failed >= self.max_round_attempts:
            last = rounds.last_error(job_id, number) or "unknown error"
            reason = f"round {number} failed {failed} times in a row (last: {last}); resume the job to retry"
            if JobRepo(s).transition(job_id, [JobStatus.RUNNING], JobStatus.PAUSED, error=reason):
                AuditRepo(s).record("scheduler", "job_paused", job_id, round=number, reason=reason)
                log.warning("job %s paused: %s", job_id, reason)
            return None
        live = self.deps.coordination.liveness.alive(AgentRepo(s).active_ids())
        for agent_id in AgentRepo(s).expire_quarantines(now):  # wall-time limit: no job waits forever
            AuditRepo(s).record("scheduler", "agent_quarantine_expired", job_id, agent_id=agent_id)
        quarantined = AgentRepo(s).quarantined_ids()  # repeated offenders sit rounds out (issue 12)
        available = sorted(live - rounds.busy_agents() - quarantined)
        attempt = rounds.attempts(job_id, number)
        chosen = select(spec.selection, available, seed=f"{spec.seed}:{job_id}:{number}:{attempt}")
        if chosen is None:
            return None
        ids, target = chosen
        infos = [AgentInfo(a.id, a.name, a.resources, a.rank_override) for a in AgentRepo(s).in_ids(ids)]
        values_per_rank = sum(o + i for o, i in spec.module_shapes.values())
        ranks = assign_ranks(infos, spec.rank_set, spec.rank_policy, values_per_rank, number)
        deadline = now + timedelta(seconds=spec.selection.deadline_s)
        rnd: Round = rounds.open(
            job_id, number, attempt, deadline, target, quorum(spec.selection, target), ranks, inputs=job
        )
        if quarantined:
            AgentRepo(s).pass_quarantine_round()
        AuditRepo(s).record(
            "scheduler",
            "round_opened",
            job_id,
            round=number,
            attempt=attempt,
            agents=len(ids),
            ranks=sorted(set(ranks.values())),
            round_id=rnd.id,
        )
        return ids
