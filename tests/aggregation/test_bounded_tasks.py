"""Aggregation tasks are computed once and retried a bounded number of times: a worker's
heartbeat keeps a long task from being reclaimed (two workers, a compute far longer than the
reclaim idle time and the scheduler's re-enqueue check), and a task that keeps failing is
dead-lettered, its round FAILED and its job PAUSED with the reason until an admin resumes it."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from crew import crew, token, wait_round
from fedhl.aggregation.commit import Outcome, run_task
from fedhl.aggregation.worker import run_worker
from fedhl.backends import Deps, WorkerOptions
from fedhl.coordinator.app import Coordinator
from fedhl.jobspec import JobSpec
from fedhl.storage.db import transaction
from fedhl.storage.models import JobStatus, RoundState
from fedhl.storage.repos import JobRepo, RoundRepo
from private_backends import PrivateRedis
from stack import job_spec, settings_for

SPEC = job_spec(rounds=1, selection={"count": 2, "min_clients": 2, "deadline_s": 120})
COMPUTE_S = 8.0  # > reclaim idle (1 s) and > the scheduler's re-enqueue check (5 s)


@pytest.fixture
def private_redis() -> Iterator[str]:
    """A Redis of this test's own: tasks of other test processes on the shared one must not
    reach these workers."""
    server = PrivateRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_a_long_task_is_computed_exactly_once_by_two_workers(tmp_path: Path, private_redis: str) -> None:
    settings = settings_for("postgres+redis", tmp_path, inprocess_aggregator=False, redis_url=private_redis)
    c = Coordinator.from_settings(settings, auto_migrate=True)
    c.start()
    computed: Counter[tuple[int, int]] = Counter()

    def slow(deps: Deps, round_id: int, shard: int, worker: str) -> Outcome:
        computed[(round_id, shard)] += 1
        time.sleep(COMPUTE_S)  # a long merge
        return run_task(deps, round_id, shard, worker)

    stop = threading.Event()
    options = WorkerOptions(reclaim_idle_s=1.0, max_deliveries=5, block_s=0.2)
    workers = []
    for name in ("w1", "w2"):
        deps = Deps(c.deps.sessions, c.deps.blobs, settings.coordination())  # a Redis client each
        t = threading.Thread(target=run_worker, args=(deps, name, stop, options), kwargs={"runner": slow})
        t.start()
        workers.append((t, deps))
    try:
        job = c.jobs.create(JobSpec.model_validate(SPEC))
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 2)
        try:
            done = wait_round(c, job.id, {RoundState.COMMITTED, RoundState.FAILED}, timeout=120)
        finally:
            team.close()
        assert done.state is RoundState.COMMITTED, done.error
        assert computed == Counter({(done.id, 0): 1})  # never reclaimed, never re-enqueued
        assert c.deps.coordination.queue.outstanding() == []
    finally:
        stop.set()
        for t, deps in workers:
            t.join(15)
            deps.coordination.close()
        c.shutdown(grace_s=1.0)


@pytest.mark.parametrize("backend", ["postgres+redis", "sqlite+inprocess"])
def test_a_task_that_keeps_failing_is_dead_lettered_and_pauses_its_job(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    attempts: list[int] = []

    def oom(deps: Deps, round_id: int, shard: int, worker: str) -> Outcome:
        attempts.append(round_id)
        raise RuntimeError("CUDA out of memory (simulated)")

    settings = settings_for(backend, tmp_path, aggregator_reclaim_idle_s=0.3, aggregator_max_deliveries=2)
    if backend == "postgres+redis":
        settings = dataclasses.replace(settings, redis_url=request.getfixturevalue("private_redis"))
    c = Coordinator.from_settings(settings, auto_migrate=True, aggregator=functools.partial(run_worker, runner=oom))
    c.start()
    try:
        job = c.jobs.create(JobSpec.model_validate(SPEC))
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 2)
        try:
            failed = wait_round(c, job.id, {RoundState.FAILED, RoundState.COMMITTED}, timeout=60)
        finally:
            team.close()
        reason = f"aggregation of round {failed.id} shard 0 was delivered 3 times (limit 2) without finishing"
        assert (failed.state, failed.error) == (RoundState.FAILED, reason)
        assert attempts == [failed.id, failed.id]  # two deliveries computed, the third dead-lettered
        with transaction(c.deps.sessions) as s:
            row = JobRepo(s).get(job.id)
            assert (row.status, row.error) == (JobStatus.PAUSED, reason)
        end = time.monotonic() + 10  # the round fails first, then the entry moves to the dead letters
        while not c.deps.coordination.queue.dead_letters() and time.monotonic() < end:
            time.sleep(0.05)
        (dead,) = c.deps.coordination.queue.dead_letters()
        assert dead[1]["round_id"] == str(failed.id) and dead[1]["reason"] == reason
        time.sleep(1.0)
        with transaction(c.deps.sessions) as s:  # paused: no new attempt opens
            assert len(RoundRepo(s).for_job(job.id)) == 1
        c.jobs.resume(job.id)  # the admin resumes: a new attempt opens
        wait_round(c, job.id, {RoundState.OPEN, RoundState.COLLECTING}, timeout=30)
        with transaction(c.deps.sessions) as s:
            row = JobRepo(s).get(job.id)
            assert (row.status, row.error) == (JobStatus.RUNNING, None)
    finally:
        c.shutdown(grace_s=1.0)
