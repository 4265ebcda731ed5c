"""One real coordinator process (Postgres + Redis, gRPC and REST on loopback ports) shared by
the security tests of this directory: the raw-socket, REST fuzz and gRPC fuzz tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from fedhl.v1 import agent_pb2, agent_pb2_grpc
from stack import Proc, coordinator, fresh_postgres_db, fresh_redis_db, job_spec

REDIS_DB = 13  # a database of its own: the stack tests flush theirs


@dataclass
class Live:
    proc: Proc
    http: httpx.Client  # /api/v1 with the admin token
    http_port: int
    grpc_target: str
    credential: str  # a registered agent's
    agent_id: str
    job_id: str


def live_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp: Path = tmp_path_factory.mktemp("security")
    # its own database: this coordinator lives for the whole directory (package fixture, kept to
    # the session's end), and on the shared one its scheduler would hold the leader lock while
    # later tests start coordinators of their own there
    db = fresh_postgres_db("security")
    with coordinator("postgres+redis", tmp, database_url=db, redis_url=fresh_redis_db(REDIS_DB)) as (proc, http):
        settings = proc.settings
        spec = job_spec(selection={"min_clients": 1, "deadline_s": 3600, "quorum": 1.0}, rounds=3)
        job_id = http.post("/jobs", json=spec).raise_for_status().json()["id"]
        token = http.post("/agents/enrolment-tokens", json={"label": "fuzz"}).raise_for_status().json()["token"]
        target = f"127.0.0.1:{settings.grpc_port}"
        with grpc.insecure_channel(target) as ch:
            reg = agent_pb2_grpc.AgentServiceStub(ch).Register(
                agent_pb2.RegisterRequest(enrolment_token=token, name="fuzz"), timeout=30
            )
        # the scheduler opens the job's first round for the new agent on its own tick: wait for it, so
        # the fuzz starts from a settled database (a round opening mid-call is not the call's doing)
        deadline = time.monotonic() + 60
        while not http.get(f"/jobs/{job_id}/rounds").raise_for_status().json():
            if time.monotonic() > deadline:
                pytest.fail("the live coordinator opened no round for its agent within 60 s")
            time.sleep(0.1)
        yield Live(proc, http, settings.http_port, target, reg.credential, reg.agent_id, job_id)
