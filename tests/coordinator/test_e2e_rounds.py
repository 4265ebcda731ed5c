"""End to end with real processes: `fedhl migrate` + `fedhl coordinator` as a subprocess,
jobs created through the REST API, scripted agents over loopback gRPC — against Postgres +
Redis and against SQLite + in-process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from fedhl.agent.client import Resources
from fedhl.agent.scripted import ScriptedAgent
from fedhl.storage.db import normalise_url
from fedhl.storage.models import Update
from stack import BACKENDS, coordinator, job_spec, wait_job


@contextmanager
def agents(n: int, address: str, token: str, **kw: Any) -> Iterator[list[ScriptedAgent]]:
    stop = threading.Event()
    crew = [
        ScriptedAgent(
            address,
            token,
            f"agent-{i}",
            n_examples=50 + 10 * i,
            noise=0.01,
            seed=i,
            resources=Resources(device_memory_bytes=(1 + i % 3) << 30),
            **kw,
        )
        for i in range(n)
    ]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in crew]
    for t in threads:
        t.start()
    try:
        yield crew
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for a in crew:
            a.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_job_created_over_rest_runs_rounds_with_a_dozen_heterogeneous_agents(backend: str, tmp_path: Path) -> None:
    with coordinator(backend, tmp_path) as (proc, http):
        token = http.post("/agents/enrolment-tokens", json={"label": "e2e", "uses": 12}).raise_for_status().json()
        fixed = {f"agent-{i}": [2, 4, 8][i % 3] for i in range(12)}
        spec = job_spec(
            rounds=3,
            rank_policy={"kind": "fixed", "fixed": fixed},
            selection={"count": 10, "min_clients": 10, "over_selection": 1.2, "deadline_s": 60},
        )
        with agents(12, f"127.0.0.1:{proc.settings.grpc_port}", token["token"]):
            job = http.post("/jobs", json=spec).raise_for_status().json()
            wait_job(http, job["id"], "COMPLETED", timeout=180)
        rounds = http.get(f"/jobs/{job['id']}/rounds").raise_for_status().json()
        committed = [r for r in rounds if r["state"] == "COMMITTED"]
        assert [r["number"] for r in committed] == [0, 1, 2]
        for r in committed:
            report = r["report"]
            assert len(report["clients"]) >= 10
            assert abs(sum(report["weights"].values()) - 1) < 1e-9
            assert set(report["energy_kept"]) <= {"2", "4", "8"}
            detail = http.get(f"/jobs/{job['id']}/rounds/{r['id']}").raise_for_status().json()
            assert len(detail["updates"]) == len(report["clients"])
            assert {a["rank"] for a in detail["assignments"]} == {2, 4, 8}
        assert committed[-1]["report"]["global_update_norm"] > 0
        checkpoints = http.get(f"/jobs/{job['id']}/checkpoints").raise_for_status().json()
        assert [c["round_number"] for c in checkpoints] == [1, 2, 3]
        state = http.get(f"/jobs/{job['id']}/checkpoints/3/state")
        assert state.status_code == 200 and len(state.content) > 0
        # the process runs its full garbage collections on a period (fedhl/gcpause.py), a
        # supervised loop /readyz names, and reports every collection's pause
        root = f"http://127.0.0.1:{proc.settings.http_port}"
        assert httpx.get(f"{root}/readyz", timeout=30).json()["checks"]["loop:gc-full"] == "ok"
        metrics = httpx.get(f"{root}/metrics", headers=http.headers, timeout=30).raise_for_status().text
        assert 'fedhl_gc_pause_seconds_count{generation="0"}' in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_coordinator_killed_mid_round_resumes_without_losing_or_doubling_updates(backend: str, tmp_path: Path) -> None:
    with coordinator(backend, tmp_path) as (proc, http):
        token = http.post("/agents/enrolment-tokens", json={"label": "e2e", "uses": 4}).raise_for_status().json()
        spec = job_spec(rounds=3, selection={"count": 4, "min_clients": 4, "deadline_s": 120})
        db = create_engine(normalise_url(proc.settings.database_url))
        with agents(4, f"127.0.0.1:{proc.settings.grpc_port}", token["token"], delay_s=0.0) as crew:
            for i, a in enumerate(crew):
                a.delay_s = 0.3 * i  # stagger uploads so the kill lands mid-round
            job = http.post("/jobs", json=spec).raise_for_status().json()
            end = time.monotonic() + 60
            live: list[dict[str, Any]] = []
            while time.monotonic() < end and not live:  # a round with some, not all, uploads in
                rounds = http.get(f"/jobs/{job['id']}/rounds").json()
                live = [r for r in rounds if r["state"] == "COLLECTING" and r["number"] >= 1]
                time.sleep(0.05)
            assert live, "never caught a round mid-collection"
            with db.connect() as c:
                accepted_before = set(c.scalars(select(Update.id)).all())
            proc.kill()
            time.sleep(1.0)
            proc.start()
            done = wait_job(http, job["id"], "COMPLETED", timeout=180)
        assert done["current_round"] == 3
        rounds = http.get(f"/jobs/{job['id']}/rounds").raise_for_status().json()
        committed = [r for r in rounds if r["state"] == "COMMITTED"]
        assert [r["number"] for r in committed] == [0, 1, 2]
        committed_ids = {r["id"] for r in committed}
        with db.connect() as c:
            for r in committed:
                agents_in = c.scalars(select(Update.agent_id).where(Update.round_id == r["id"])).all()
                assert len(agents_in) == len(set(agents_in)), "an agent counted twice in one round"
                assert sorted(r["report"]["clients"]) == sorted(agents_in), "report and accepted uploads differ"
            rows = c.execute(select(Update.id, Update.round_id).where(Update.id.in_(accepted_before))).all()
            assert len(rows) == len(accepted_before), "an update accepted before the kill was lost"
            assert {rid for _, rid in rows} <= committed_ids, "an update accepted before the kill was not merged"
            assert c.scalar(select(func.count()).select_from(Update)) == sum(
                len(r["report"]["clients"]) for r in committed
            ), "updates outside committed rounds"
        db.dispose()
