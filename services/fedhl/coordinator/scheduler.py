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

from sqlalchemy.orm import Session

from ..backends import ROUND_EVENTS, SCHEDULER_EVENTS, AggregationTask, Deps
from ..jobspec import JobSpec
from ..storage.db import transaction
from ..storage.leader import LeaderLock
from ..storage.models import AssignmentState, Job, JobStatus, Round, RoundState, utcnow
from ..storage.repos import AgentRepo, AuditRepo, JobRepo, RoundRepo
from .ranks import AgentInfo, assign_ranks
from .selection import quorum, select

log = logging.getLogger(__name__)

REENQUEUE_AFTER_S = 60.0


class Scheduler:
    def __init__(
        self,
        deps: Deps,
        interval_s: float = 0.2,
        shards: int = 1,
        *,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deps = deps
        self.interval_s = interval_s
        self.shards = shards  # aggregation jobs per round (module shards), capped by the module count
        self.clock = clock  # wall time for deadlines (injected by tests)
        self.monotonic = monotonic  # for re-enqueue timing
        self._enqueued: dict[int, float] = {}

    def run(self, stop: threading.Event) -> None:
        """Loop until stopped: become leader, then tick on every round event or interval."""
        leader = LeaderLock(self.deps.sessions.kw["bind"])
        try:
            while not stop.is_set():
                if leader.acquire():
                    break
                stop.wait(1.0)
            if stop.is_set():
                return
            log.info("scheduler is the leader")
            self._enqueued.clear()  # a new leader re-enqueues every AGGREGATING round once
            with self.deps.coordination.events.subscribe(SCHEDULER_EVENTS) as sub:
                while not stop.is_set():
                    try:
                        self.tick()
                    except Exception:
                        log.exception("scheduler tick failed")
                    sub.get(timeout_s=self.interval_s)
        finally:
            leader.release()

    def tick(self) -> None:
        with transaction(self.deps.sessions, read_only=True) as s:
            job_ids = JobRepo(s).ids([JobStatus.RUNNING, JobStatus.PAUSED])
        for job_id in job_ids:
            self.advance(job_id)

    def advance(self, job_id: str) -> None:
        enqueue: tuple[int, int] | None = None  # (round id, shards)
        opened = False
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
                expected = [a for a in rnd.assignments if a.state is not AssignmentState.CANCELLED]
                everyone = bool(expected) and n >= len(expected)
                if n >= rnd.target or everyone or (now >= rnd.deadline and n >= rnd.quorum):
                    rounds.expire_open_assignments(rnd.id)
                    shards = max(1, min(self.shards, len(spec.module_shapes)))
                    rounds.transition(
                        rnd.id,
                        [RoundState.OPEN, RoundState.COLLECTING],
                        RoundState.AGGREGATING,
                        closed_at=now,
                        shards=shards,
                    )
                    AuditRepo(s).record("scheduler", "round_closed", job_id, round=rnd.number, uploads=n)
                    enqueue = (rnd.id, shards)
                elif now >= rnd.deadline or not expected:
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
                if last is None or self.monotonic() - last > REENQUEUE_AFTER_S:
                    enqueue = (rnd.id, rnd.shards)  # after a leader change or a lost queue: duplicates are harmless
        if enqueue is not None:
            round_id, shards = enqueue
            for shard in range(shards):
                self.deps.coordination.queue.publish(AggregationTask(round_id, shard).to_fields())
            self._enqueued[round_id] = self.monotonic()
        if opened or enqueue is not None:
            self.deps.coordination.events.publish(ROUND_EVENTS, {"type": "round_changed", "job_id": job_id})

    def _open(self, s: Session, job: Job, spec: JobSpec, now: datetime) -> bool:
        job_id, number = job.id, job.current_round
        rounds = RoundRepo(s)
        agents = {a.id: a for a in AgentRepo(s).active()}
        live = self.deps.coordination.liveness.alive(agents)
        quarantined = AgentRepo(s).quarantined_ids()  # repeated offenders sit rounds out (issue 12)
        available = sorted(live - rounds.busy_agents() - quarantined)
        attempt = rounds.attempts(job_id, number)
        chosen = select(spec.selection, available, seed=f"{spec.seed}:{job_id}:{number}:{attempt}")
        if chosen is None:
            return False
        ids, target = chosen
        infos = [AgentInfo(a.id, a.name, a.resources, a.rank_override) for a in (agents[i] for i in ids)]
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
        return True
