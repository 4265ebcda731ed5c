"""The control plane rides out backend outages: with Redis, then Postgres, stopped for a few
seconds while a job runs (private servers; the machine's own are never touched), the
scheduler, the leader election, the event listener and the in-process aggregation worker all
keep running, `/readyz` names the failing check while the backend is away and recovers after,
and the job completes with every round committed once. Also: a leader whose advisory lock is
dropped (what a database restart does) steps down at once, and only one scheduler leads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from crew import crew, token
from fedhl.backends import Deps
from fedhl.coordinator.api.routes.health import readiness
from fedhl.coordinator.app import Coordinator
from fedhl.coordinator.scheduler import Scheduler
from fedhl.jobspec import JobSpec
from fedhl.storage.blobs import FileBlobStore
from fedhl.storage.coordination import open_coordination
from fedhl.storage.db import make_engine, migrate, session_factory, transaction
from fedhl.storage.leader import SCHEDULER_LOCK_ID
from fedhl.storage.models import Job, JobStatus, Round, RoundState, Update
from private_backends import PrivatePostgres, PrivateRedis
from stack import job_spec, running, settings_for

ROUNDS = 4
SPEC = job_spec(rounds=ROUNDS, selection={"count": 2, "min_clients": 2, "deadline_s": 60})
OUTAGE_S = 3.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def rd() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def committed_rounds(c: Coordinator, job_id: str) -> int:
    with transaction(c.deps.sessions) as s:
        return len(s.scalars(select(Round).where(Round.job_id == job_id, Round.state == RoundState.COMMITTED)).all())


def wait_for(what: str, check: object, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_loops_survive_redis_and_postgres_outages(pg: PrivatePostgres, rd: PrivateRedis, tmp_path: Path) -> None:
    settings = settings_for(
        "sqlite+inprocess",
        tmp_path,
        database_url=pg.url,
        redis_url=rd.url,
        db_connect_timeout_s=1.0,
        redis_socket_timeout_s=2.0,
        redis_connect_timeout_s=0.5,
        loop_stale_s=10.0,
        aggregator_reclaim_idle_s=2.0,
    )
    with running(settings) as c:
        wait_for("leader", lambda: c.scheduler.role == "leader", 30)
        job = c.jobs.create(JobSpec.model_validate(SPEC))
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 2)
        try:
            wait_for("round 0 committed", lambda: committed_rounds(c, job.id) >= 1, 60)

            rd.stop()
            wait_for("/readyz names redis", lambda: "redis" in readiness(c)[1].failing, 10)
            time.sleep(OUTAGE_S)
            rd.start()
            wait_for("/readyz ok after redis", lambda: readiness(c)[0], 30)

            pg.stop()
            wait_for("/readyz names the database", lambda: "database" in readiness(c)[1].failing, 10)
            time.sleep(OUTAGE_S)
            pg.start()
            wait_for("leader again", lambda: c.scheduler.role == "leader" and readiness(c)[0], 30)

            wait_for("every round committed", lambda: committed_rounds(c, job.id) == ROUNDS, 90)
        finally:
            team.close()
        assert all(t.is_alive() for t in c.threads), [t.name for t in c.threads if not t.is_alive()]
        ok, health = readiness(c)
        assert ok, health
        with transaction(c.deps.sessions) as s:
            row = s.get(Job, job.id)
            assert row is not None and (row.status, row.current_round) == (JobStatus.COMPLETED, ROUNDS)
            committed = s.scalars(select(Round).where(Round.job_id == job.id, Round.state == RoundState.COMMITTED))
            assert sorted(r.number for r in committed) == list(range(ROUNDS))  # each version committed once
            ups = s.scalars(select(Update)).all()
            assert len({u.assignment_id for u in ups}) == len(ups)  # no update applied twice


def test_a_leader_that_loses_its_lock_steps_down_and_only_one_leads(pg: PrivatePostgres, tmp_path: Path) -> None:
    migrate(pg.url)
    engine = make_engine(pg.url, connect_timeout_s=1.0)
    stop = threading.Event()
    schedulers = []
    threads = []
    for _ in range(2):
        deps = Deps(session_factory(engine), FileBlobStore(tmp_path / "blobs"), open_coordination(None))
        sch = Scheduler(deps, interval_s=0.05)
        schedulers.append(sch)
        threads.append(threading.Thread(target=sch.run, args=(stop,), daemon=True))
    for t in threads:
        t.start()
    try:
        wait_for("a leader", lambda: [s.role for s in schedulers].count("leader") == 1, 20)
        first = next(s for s in schedulers if s.role == "leader")
        roles: list[list[str]] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                roles.append([s.role for s in schedulers])
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with engine.connect() as conn:  # drop the leader's session, as a database restart would
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objid = :k AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"k": SCHEDULER_LOCK_ID},
            )
            conn.commit()
        wait_for(
            "the old leader steps down",
            lambda: first.role == "standby" or any(r.count("leader") == 0 for r in roles),
            5,
        )
        wait_for("a leader again", lambda: [s.role for s in schedulers].count("leader") == 1, 20)
        watching.set()
        watcher.join()
        assert max(r.count("leader") for r in roles) <= 1  # never two at once
        assert all(t.is_alive() for t in threads)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        engine.dispose()
