"""Chaos benchmark: a job on a private Postgres + private Redis, driven by scripted agents (no
ML) as processes, a coordinator and two aggregator workers as processes; one fault injected
per scenario while rounds run. Prints one JSON line per scenario and a summary line.

    PYTHONPATH=services nice -n 10 .venv/bin/python bench/chaos.py [--agents 20] [--only NAME ...]

Never touches the machine's own Postgres (5432) or Redis (6379): it starts its own (initdb +
pg_ctl in a temp dir, redis-server on a spare port) and stops only those.

Per scenario: `rounds_completed` (rounds committed in the scenario), `updates_accepted`
(uploads the agents were told were accepted), `updates_lost` (of those, not in a committed or
still-open round's updates), `updates_doubled` (a round version committed more than once, or an
assignment with two updates), `recovery_s` (fault over → next round committed), `stuck` (no
round committed within the recovery limit after the fault).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from private_backends import PrivatePostgres, PrivateRedis, free_port  # noqa: E402

RECOVERY_LIMIT_S = 90.0
STARTUP_LIMIT_S = 300.0  # the first round of a scenario (agent processes may still be starting)
ADMIN = "chaos-admin-token-0123456789"


def agent_main(address: str, token: str, name: str, log: str, seed: int) -> None:
    """One scripted agent process: append each accepted upload's task id to `log`."""
    import grpc

    from fedhl.agent.scripted import ScriptedAgent

    while True:
        try:
            agent = ScriptedAgent(address, token, name, n_examples=50 + seed, noise=0.05, seed=seed)
            break
        except grpc.RpcError:
            time.sleep(1)
    while True:
        try:
            agent.client.heartbeat(agent.resources)
            task = agent.client.pull_task(2)
            if task is None:
                continue
            start = agent.client.download(task.blobs[0][0])
            agent.client.upload(task, agent.train(task, start), agent.n_examples, {"loss": 1.0})
            with open(log, "a") as f:
                f.write(task.task_id + "\n")
        except grpc.RpcError:
            time.sleep(0.5)


class Cluster:
    def __init__(self, work: Path, agents: int) -> None:
        self.work, self.n_agents = work, agents
        self.pg, self.rd = PrivatePostgres(), PrivateRedis()
        self.pg.start()
        self.rd.start()
        self.grpc_port, self.http_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")} | {
            "FEDHL_ENV": "development",
            "FEDHL_ADMIN_TOKEN": ADMIN,
            "FEDHL_DATABASE_URL": self.pg.url,
            "FEDHL_REDIS_URL": self.rd.url,
            "FEDHL_BLOB_URL": f"file://{work / 'blobs'}",
            "FEDHL_GRPC_HOST": "127.0.0.1",
            "FEDHL_GRPC_PORT": str(self.grpc_port),
            "FEDHL_HTTP_HOST": "127.0.0.1",
            "FEDHL_HTTP_PORT": str(self.http_port),
            "FEDHL_INPROCESS_AGGREGATOR": "false",
            "FEDHL_HEARTBEAT_TTL_S": "6",
            "FEDHL_AGGREGATOR_RECLAIM_IDLE_S": "5",
            "FEDHL_DB_CONNECT_TIMEOUT_S": "2",
            "FEDHL_REDIS_SOCKET_TIMEOUT_S": "3",
            "FEDHL_REDIS_CONNECT_TIMEOUT_S": "1",
            "FEDHL_BLOB_GC_INTERVAL_S": "0",
        }
        subprocess.run([sys.executable, "-m", "fedhl.cli", "migrate"], env=self.env, check=True, capture_output=True)
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.aggregators: list[subprocess.Popen[bytes]] = []
        self.agents: list[subprocess.Popen[bytes]] = []
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        self.accepted_log = work / "accepted.log"

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.work / log).open("ab") as out:
            return subprocess.Popen([sys.executable, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def start_coordinator(self) -> None:
        self.coordinator = self._spawn(["-m", "fedhl.cli", "coordinator"], "coordinator.log")
        self.wait(lambda: self.http.get("/livez").status_code == 200, 60, "coordinator up")

    def start_aggregator(self, i: int) -> subprocess.Popen[bytes]:
        return self._spawn(["-m", "fedhl.cli", "aggregator", "--name", f"agg-{i}-{time.time():.0f}"], f"agg{i}.log")

    def start(self) -> None:
        self.start_coordinator()
        self.aggregators = [self.start_aggregator(i) for i in range(2)]
        token = self.http.post("/api/v1/agents/enrolment-tokens", json={"label": "chaos", "uses": 10_000}).json()
        self.token = token["token"]
        for i in range(self.n_agents):
            self.spawn_agent(i)

    def spawn_agent(self, i: int) -> None:
        args = [
            __file__,
            "agent",
            f"127.0.0.1:{self.grpc_port}",
            self.token,
            f"agent-{i}",
            str(self.accepted_log),
            str(i),
        ]
        self.agents.append(self._spawn(args, f"agent{i}.log"))

    @staticmethod
    def wait(check: Callable[[], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if check():
                    return time.monotonic() - t0
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(what)

    @staticmethod
    def wait_value(read: Callable[[], int], timeout: float) -> int:
        t0 = time.monotonic()
        while True:
            try:
                return read()
            except Exception:
                if time.monotonic() - t0 > timeout:
                    raise
                time.sleep(0.2)

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.pg.url.replace("postgresql://", "postgresql://"), connect_timeout=2) as conn:
            return list(conn.execute(query).fetchall())

    def close(self) -> None:
        for p in [*self.agents, *self.aggregators, *([self.coordinator] if self.coordinator else [])]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(10)
        self.http.close()
        self.rd.stop()
        self.pg.destroy()


def job_body(name: str, dim: int) -> dict[str, Any]:
    shapes = {f"layers.{i}.{p}": [dim, dim] for i in range(6) for p in ("q", "v")}
    return {
        "name": name,
        "base_model": "none",
        "target_modules": ["q", "v"],
        "module_shapes": shapes,
        "rank_set": [4, 8, 16],
        "rounds": 10_000,
        "rank_policy": {"kind": "random", "seed": 1},
        "selection": {"fraction": 0.5, "min_clients": 2, "deadline_s": DEADLINE_S, "quorum": 0.5},
    }


def committed(c: Cluster, job_id: str) -> int:
    return int(c.sql(f"SELECT count(*) FROM rounds WHERE job_id = '{job_id}' AND state = 'COMMITTED'")[0][0])


def round_state(c: Cluster, job_id: str) -> str | None:
    rows = c.sql(f"SELECT state FROM rounds WHERE job_id = '{job_id}' ORDER BY id DESC LIMIT 1")
    return str(rows[0][0]) if rows else None


def run_scenario(c: Cluster, name: str, inject: Callable[[Cluster, str], None]) -> dict[str, Any]:
    r = c.http.post("/api/v1/jobs", json=job_body(name, 128))
    r.raise_for_status()
    job_id = r.json()["id"]
    try:
        return _measure(c, name, job_id, inject)
    finally:  # one job at a time: a scenario's job never competes for the next one's agents
        c.wait(lambda: c.http.post(f"/api/v1/jobs/{job_id}/cancel").status_code in (200, 409), 60, "cancel")


def _measure(c: Cluster, name: str, job_id: str, inject: Callable[[Cluster, str], None]) -> dict[str, Any]:
    c.accepted_log.write_text("")
    c.wait(lambda: committed(c, job_id) >= 1, STARTUP_LIMIT_S, f"{name}: first round")
    before = committed(c, job_id)
    inject(c, job_id)  # returns when the fault is over (backend back, process restarted)
    fault_over = time.monotonic()
    stuck, recovery = False, None
    try:
        at_end = c.wait_value(lambda: committed(c, job_id), RECOVERY_LIMIT_S)  # Postgres may still be starting
        c.wait(lambda: committed(c, job_id) > at_end, RECOVERY_LIMIT_S, "recovery")
        recovery = round(time.monotonic() - fault_over, 1)
        c.wait(lambda: committed(c, job_id) >= before + 2, RECOVERY_LIMIT_S, "two more rounds")
    except TimeoutError:
        stuck = True
    c.wait(lambda: c.http.post(f"/api/v1/jobs/{job_id}/cancel").status_code in (200, 409), 60, "cancel")
    time.sleep(1.0)  # uploads in flight finish (or are refused) before counting
    accepted = {t for t in c.accepted_log.read_text().split() if t}
    stored = {
        str(a)
        for (a,) in c.sql(
            f"SELECT u.assignment_id FROM updates u JOIN rounds r ON r.id = u.round_id WHERE r.job_id = '{job_id}'"
        )
    }
    doubled = sum(
        int(n) - 1
        for (n,) in c.sql(
            f"SELECT count(*) FROM rounds WHERE job_id = '{job_id}' AND state = 'COMMITTED' GROUP BY number"
        )
    )
    doubled += sum(int(n) - 1 for (n,) in c.sql("SELECT count(*) FROM updates GROUP BY assignment_id"))
    return {
        "scenario": name,
        "rounds_completed": committed(c, job_id),
        "updates_accepted": len(accepted),
        "updates_lost": len(accepted - stored),
        "updates_doubled": doubled,
        "recovery_s": recovery,
        "stuck": stuck,
    }


OUTAGE_S = 10.0
DEADLINE_S = 15


def redis_outage(c: Cluster, job_id: str) -> None:
    c.rd.stop()
    time.sleep(OUTAGE_S)
    c.rd.start()


def postgres_outage(c: Cluster, job_id: str) -> None:
    c.pg.stop()
    time.sleep(OUTAGE_S)
    c.pg.start()


def kill_coordinator_in(states: set[str]) -> Callable[[Cluster, str], None]:
    def inject(c: Cluster, job_id: str) -> None:
        Cluster.wait(lambda: round_state(c, job_id) in states, RECOVERY_LIMIT_S, f"a round in {states}")
        assert c.coordinator is not None
        c.coordinator.kill()
        c.coordinator.wait(10)
        c.start_coordinator()

    return inject


def kill_aggregator_mid_merge(c: Cluster, job_id: str) -> None:
    Cluster.wait(lambda: round_state(c, job_id) == "AGGREGATING", RECOVERY_LIMIT_S, "aggregating")
    victim = c.aggregators[0]
    victim.kill()
    victim.wait(10)
    c.aggregators[0] = c.start_aggregator(0)


def kill_30pct_agents(c: Cluster, job_id: str) -> None:
    Cluster.wait(lambda: round_state(c, job_id) in {"OPEN", "COLLECTING"}, RECOVERY_LIMIT_S, "open round")
    n = max(1, round(0.3 * len(c.agents)))
    for p in c.agents[:n]:
        p.kill()
        p.wait(10)


def partition_one_agent(c: Cluster, job_id: str) -> None:
    Cluster.wait(lambda: round_state(c, job_id) in {"OPEN", "COLLECTING"}, RECOVERY_LIMIT_S, "open round")
    victim = c.agents[-1]
    os.kill(victim.pid, signal.SIGSTOP)
    time.sleep(DEADLINE_S + 5)  # past the round's deadline
    os.kill(victim.pid, signal.SIGCONT)


SCENARIOS: dict[str, Callable[[Cluster, str], None]] = {
    "redis_stopped_10s": redis_outage,
    "postgres_stopped_10s": postgres_outage,
    "coordinator_sigkill_open": kill_coordinator_in({"OPEN"}),
    "coordinator_sigkill_collecting": kill_coordinator_in({"COLLECTING"}),
    "coordinator_sigkill_aggregating": kill_coordinator_in({"AGGREGATING"}),
    "aggregator_sigkill_mid_merge": kill_aggregator_mid_merge,
    "agent_partition_sigstop": partition_one_agent,
    "agents_30pct_killed": kill_30pct_agents,  # last: the agents stay dead
}


def main() -> None:
    global OUTAGE_S
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        agent_main(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--outage-s", type=float, default=OUTAGE_S, help="how long Redis / Postgres stay stopped")
    args = ap.parse_args()
    OUTAGE_S = args.outage_s
    results = []
    with tempfile.TemporaryDirectory(prefix="fedhl-chaos-") as tmp:
        c = Cluster(Path(tmp), args.agents)
        try:
            c.start()
            for name, inject in SCENARIOS.items():
                if args.only and name not in args.only:
                    continue
                try:
                    res = run_scenario(c, name, inject)
                except Exception as e:  # a scenario that cannot even run is stuck
                    res = {"scenario": name, "stuck": True, "error": f"{type(e).__name__}: {e}"}
                results.append(res)
                print(json.dumps(res), flush=True)
        finally:
            c.close()
    print(
        json.dumps(
            {
                "scenarios": len(results),
                "total_lost": sum(r.get("updates_lost", 0) for r in results),
                "total_doubled": sum(r.get("updates_doubled", 0) for r in results),
                "stuck_scenarios": [r["scenario"] for r in results if r.get("stuck")],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    threading.stack_size(0)
    main()
