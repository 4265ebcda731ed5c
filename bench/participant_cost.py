"""What one round participant costs the coordinator, call by call, without the network: SQL
statements and CPU of each agent-plane call a participant makes (claim its task,
download the start factors, heartbeat with the task, upload, the next wait's read), measured
on a private Postgres + Redis, sequentially, median over the agents. The fleet benchmark
(bench/fleet.py) measures the same path end to end; this one says where the time goes.

    PYTHONPATH=services .venv/bin/python bench/participant_cost.py --agents 100

Prints one JSON line: per call, statements and median CPU / wall milliseconds, and the total.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "services"))

from fedhl.codec import decode_start, encode_update  # noqa: E402
from fedhl.coordinator.agents import UploadHeader  # noqa: E402
from fedhl.coordinator.app import Coordinator  # noqa: E402
from fedhl.jobspec import JobSpec  # noqa: E402
from fedhl.settings import DEV_ADMIN_TOKEN, Settings  # noqa: E402
from fedhl.storage.db import transaction  # noqa: E402
from fedhl.storage.repos import AgentRepo  # noqa: E402
from private_backends import PrivatePostgres, PrivateRedis  # noqa: E402

CALLS = ("claim", "download", "heartbeat", "upload", "wait")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--dim", type=int, default=64, help="module width (4 modules, as bench/fleet.py)")
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()

    pg, rd = PrivatePostgres(), PrivateRedis()
    pg.start()
    rd.start()
    tmp = Path(tempfile.mkdtemp(prefix="fedhl-participant-"))
    settings = Settings(
        env="development",
        admin_token=DEV_ADMIN_TOKEN,
        database_url=pg.url,
        redis_url=rd.url,
        blob_url=f"file://{tmp}/blobs",
    )
    c = Coordinator.from_settings(settings, auto_migrate=True)
    statements: list[str] = []

    @event.listens_for(c.deps.sessions.kw["bind"], "before_cursor_execute")
    def _count(*_: Any) -> None:
        statements.append("")

    ledger: dict[str, list[tuple[int, float, float]]] = {k: [] for k in CALLS}

    def download(agent: str, key: str) -> bytes:
        return b"".join(c.agents.open_blob(agent, key, 0)[2])

    def timed(name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        # process CPU: an accept runs in the group-commit thread (coordinator/batcher.py); nothing
        # else runs in this process (the coordinator is not started)
        n0, c0, w0 = len(statements), time.process_time(), time.perf_counter()
        out = fn(*args, **kw)
        cpu_ms, wall_ms = 1000 * (time.process_time() - c0), 1000 * (time.perf_counter() - w0)
        ledger[name].append((len(statements) - n0, cpu_ms, wall_ms))
        return out

    try:
        with transaction(c.deps.sessions) as s:
            repo = AgentRepo(s)
            token, _ = repo.create_token("bench", args.agents, None)
            agents = [repo.redeem(token, f"a{i}", {})[0].id for i in range(args.agents)]
        shapes = {f"layers.{i}.{p}": [args.dim, args.dim] for i in range(2) for p in ("q", "v")}
        spec = {
            "name": "participant cost",
            "base_model": "none",
            "target_modules": ["q", "v"],
            "module_shapes": shapes,
            "rank_set": [args.rank],
            "rounds": 2,
            "rank_policy": {"kind": "fixed", "default_rank": args.rank},
            "selection": {"count": args.agents, "min_clients": args.agents, "deadline_s": 600},
        }
        for a in agents:
            c.deps.coordination.liveness.beat(a, 600)
        job = c.jobs.create(JobSpec.model_validate(spec))
        c.scheduler.advance(job.id)
        for a in agents:
            task = timed("claim", c.agents.try_claim, a)
            data = timed("download", download, a, task.blobs[0].key)
            timed("heartbeat", c.agents.heartbeat, a, {}, task.task_id, 0.5)
            start = decode_start(data)
            payload = encode_update(start.factors, start.extras)
            sha = hashlib.sha256(payload).hexdigest()
            h = UploadHeader(task.task_id, task.job_id, task.round, len(payload), sha, 0, 10)
            timed("upload", c.agents.upload, a, h, [payload])
            timed("wait", c.agents.try_claim, a)
        out: dict[str, Any] = {"agents": args.agents}
        for k, rows in ledger.items():
            out[k] = {
                "statements": round(statistics.mean(r[0] for r in rows), 2),
                "cpu_ms": round(statistics.median(r[1] for r in rows), 3),
                "wall_ms": round(statistics.median(r[2] for r in rows), 3),
            }
        out["total_cpu_ms"] = round(sum(out[k]["cpu_ms"] for k in CALLS), 2)
        out["total_statements"] = round(sum(out[k]["statements"] for k in CALLS), 2)
        print(json.dumps(out), flush=True)
    finally:
        c.shutdown(grace_s=1.0)
        pg.stop()
        rd.stop()


if __name__ == "__main__":
    main()
