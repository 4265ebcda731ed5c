"""End to end with real processes: `fedhl migrate` + `fedhl coordinator` as a subprocess,
jobs created through the REST API, scripted agents over loopback gRPC — against Postgres +
Redis and against SQLite + in-process."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from stack import BACKENDS, env_for, free_port, job_spec, settings_for

from fedhl.agent.client import Resources
from fedhl.agent.scripted import ScriptedAgent
from fedhl.settings import Settings
from fedhl.storage.db import normalise_url
from fedhl.storage.models import Update


class Proc:
    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log = settings, log
        self.env = env_for(settings)
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "fedhl.cli", "coordinator"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{self.settings.http_port}/healthz"
        end = time.monotonic() + 60
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
def coordinator(backend: str, tmp: Path) -> Iterator[tuple[Proc, httpx.Client]]:
    settings = settings_for(backend, tmp, grpc_port=free_port())
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


def wait_job(http: httpx.Client, job_id: str, status: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < end:
        job = http.get(f"/jobs/{job_id}").raise_for_status().json()
        if job["status"] == status:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job did not reach {status}: {job}")


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
