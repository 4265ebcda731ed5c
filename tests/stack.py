"""Real backends for control-plane tests: Postgres + Redis (as in CI and production) and
SQLite + in-process (the embedded default). Unreachable servers fail the tests, never skip."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, select, text

from fedhl.aggregation.worker import run_worker
from fedhl.coordinator.app import Coordinator
from fedhl.settings import Settings
from fedhl.storage.db import transaction
from fedhl.storage.models import Assignment, Job, Round, Update

PG_URL = os.environ.get("FEDHL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FEDHL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ["postgres+redis", "sqlite+inprocess"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reset_postgres() -> None:
    engine = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    except Exception as e:
        pytest.fail(f"Postgres at {PG_URL} is unreachable ({e}); the control-plane suite needs it", pytrace=False)
    finally:
        engine.dispose()


def fresh_postgres_db(suffix: str) -> str:
    """A database of its own next to PG_URL's (`<name>_<suffix>`, created if missing, emptied):
    for a coordinator that outlives one test, so its scheduler's leader lock and rows never
    meet those of the tests that reset PG_URL's database meanwhile."""
    base, name = PG_URL.rsplit("/", 1)
    url = f"{base}/{name}_{suffix}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            if not c.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": f"{name}_{suffix}"}):
                c.execute(text(f'CREATE DATABASE "{name}_{suffix}"'))
    except Exception as e:
        pytest.fail(f"Postgres at {PG_URL} is unreachable ({e}); the control-plane suite needs it", pytrace=False)
    finally:
        admin.dispose()
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    finally:
        engine.dispose()
    return url


def fresh_redis_db(db: int) -> str:
    base = REDIS_URL.rsplit("/", 1)[0]
    url = f"{base}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as e:
        pytest.fail(f"Redis at {url} is unreachable ({e}); the control-plane suite needs it", pytrace=False)
    finally:
        client.close()
    return url


def settings_for(backend: str, tmp: Path, **overrides: object) -> Settings:
    if backend == "postgres+redis":
        reset_postgres()
        db, rd = PG_URL, fresh_redis_db(5)
    else:
        db, rd = f"sqlite:///{tmp}/fedhl.db", None
    s = Settings(
        env="development",
        admin_token="test-admin-token-0123456789",
        database_url=db,
        redis_url=rd,
        blob_url=f"file://{tmp}/blobs",
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=free_port(),
        heartbeat_ttl_s=5.0,
        scheduler_interval_s=0.05,
        pull_wait_max_s=5.0,
    )
    return replace(s, **overrides)  # type: ignore[arg-type]


def env_for(settings: Settings) -> dict[str, str]:
    """The same settings as FEDHL_* variables, for a coordinator subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")}
    for k, v in settings.__dict__.items():
        if v is not None:
            env[f"FEDHL_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


@contextmanager
def running(settings: Settings) -> Iterator[Coordinator]:
    """An in-process coordinator with real gRPC on a loopback port, scheduler and worker."""
    c = Coordinator.from_settings(settings, auto_migrate=True, aggregator=run_worker)
    c.start()
    try:
        yield c
    finally:
        c.shutdown(grace_s=1.0)


def job_spec(
    n_layers: int = 2, dim: int = 16, ranks: list[int] | None = None, rounds: int = 2, **over: object
) -> dict[str, object]:
    shapes = {f"layers.{i}.{p}": [dim, dim] for i in range(n_layers) for p in ("q", "v")}
    spec: dict[str, object] = {
        "name": "scripted",
        "base_model": "none",
        "target_modules": ["q", "v"],
        "module_shapes": shapes,
        "extra_shapes": {"classifier.weight": [2, dim]},
        "rank_set": ranks or [2, 4, 8],
        "rounds": rounds,
        "rank_policy": {"kind": "random", "seed": 1},
        "selection": {"min_clients": 2, "deadline_s": 60, "quorum": 0.5},
    }
    spec.update(over)
    return spec


@dataclass(frozen=True)
class Snapshot:
    digest: str
    updates: int


def snapshot(c: Coordinator, job_id: str) -> Snapshot:
    """A hash over everything an upload could change: the job's version and state keys, round
    states, assignment states and accepted updates."""
    with transaction(c.deps.sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        rounds = s.scalars(select(Round).where(Round.job_id == job_id).order_by(Round.id)).all()
        ids = [r.id for r in rounds]
        assigns = s.scalars(select(Assignment).where(Assignment.round_id.in_(ids)).order_by(Assignment.id)).all()
        ups = s.scalars(select(Update).where(Update.round_id.in_(ids)).order_by(Update.id)).all()
        doc = {
            "job": [job.current_round, job.state_key, job.plan_key, job.start_keys, job.status.value],
            "rounds": [[r.id, r.state.value] for r in rounds],
            "assignments": [[a.id, a.state.value] for a in assigns],
            "updates": [[u.id, u.blob_key, u.n_examples] for u in ups],
        }
    return Snapshot(hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(), len(ups))


class Proc:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log = settings, log
        self.env = env_for(settings)
        self.p: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        with self.log.open("ab") as out:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "fedhl.cli", "coordinator"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{self.settings.http_port}/healthz"
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            assert self.p.poll() is None, f"coordinator exited:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"coordinator did not come up:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()


@contextmanager
def coordinator(backend: str, tmp: Path, **overrides: object) -> Iterator[tuple[Proc, httpx.Client]]:
    settings = settings_for(backend, tmp, **{"grpc_port": free_port(), **overrides})
    subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "migrate"], env=env_for(settings), check=True, capture_output=True
    )
    proc = Proc(settings, tmp / "coordinator.log")
    proc.start()
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{settings.http_port}/api/v1",
        headers={"Authorization": f"Bearer {settings.admin_token}"},
        timeout=30,
    )
    try:
        yield proc, http
    finally:
        http.close()
        proc.stop()


def wait_job(http: httpx.Client, job_id: str, status: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < end:
        job = http.get(f"/jobs/{job_id}").raise_for_status().json()
        if job["status"] == status:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job did not reach {status}: {job}")
