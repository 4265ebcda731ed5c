"""Per-upload cost of the coordinator's acceptance path, by stage, without the network: one
round with N agents, each upload driven straight through `AgentService.upload` (check the
header and task, stage the bytes, verify sha256 + validate + store, accept in one transaction),
first one at a time, then from T threads at once (uploads of different agents do not conflict,
so they should overlap except where the database serialises writers: SQLite).

    python bench/upload_cost.py --agents 64 --threads 8
    python bench/upload_cost.py --agents 64 --threads 8 --backend postgres+redis \\
        --postgres postgresql://postgres@127.0.0.1:5432/test --redis redis://127.0.0.1:6379/7

Prints one JSON line per phase: per-stage median and p90 milliseconds, and uploads per second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from fedhl import metrics as prom  # noqa: E402
from fedhl.codec import decode_start, encode_update  # noqa: E402
from fedhl.coordinator.agents import TrainTask, UploadHeader  # noqa: E402
from fedhl.coordinator.app import Coordinator  # noqa: E402
from fedhl.jobspec import JobSpec  # noqa: E402
from fedhl.settings import DEV_ADMIN_TOKEN, Settings  # noqa: E402
from fedhl.storage.db import transaction  # noqa: E402
from fedhl.storage.repos import AgentRepo  # noqa: E402

STAGES = ("check", "stage", "verify", "accept")


def stage_samples() -> dict[str, tuple[float, float]]:
    """(sum, count) of the upload stage histogram, per stage."""
    out: dict[str, tuple[float, float]] = {}
    for metric in prom.REGISTRY.collect():
        if metric.name != "fedhl_upload_stage_seconds":
            continue
        sums = {s.labels["stage"]: s.value for s in metric.samples if s.name.endswith("_sum")}
        counts = {s.labels["stage"]: s.value for s in metric.samples if s.name.endswith("_count")}
        out = {k: (sums.get(k, 0.0), counts.get(k, 0.0)) for k in STAGES}
    return out


def upload_one(c: Coordinator, agent: str, task: TrainTask) -> float:
    data = c.deps.blobs.get_bytes(task.blobs[0].key)
    start = decode_start(data)
    payload = encode_update(start.factors, start.extras)
    h = UploadHeader(task.task_id, task.job_id, task.round, len(payload), hashlib.sha256(payload).hexdigest(), 0, 10)
    chunks = [payload[i : i + (1 << 20)] for i in range(0, len(payload), 1 << 20)]
    t0 = time.perf_counter()
    res = c.agents.upload(agent, h, chunks)
    assert res.accepted
    return time.perf_counter() - t0


def one_round(c: Coordinator, agents: list[str], spec: dict[str, Any]) -> list[tuple[str, TrainTask]]:
    for a in agents:
        c.deps.coordination.liveness.beat(a, 600)
    job = c.jobs.create(JobSpec.model_validate(spec))
    c.scheduler.advance(job.id)
    tasks = []
    for a in agents:
        t = c.agents.try_claim(a)
        assert t is not None, "every agent is selected"
        tasks.append((a, t))
    return tasks


def phase(c: Coordinator, name: str, agents: list[str], spec: dict[str, Any], threads: int) -> dict[str, Any]:
    tasks = one_round(c, agents, spec)
    before = stage_samples()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        walls = list(pool.map(lambda at: upload_one(c, *at), tasks))
    wall = time.perf_counter() - t0
    after = stage_samples()
    per_stage = {}
    for k in STAGES:
        total, count = after[k][0] - before.get(k, (0.0, 0.0))[0], after[k][1] - before.get(k, (0.0, 0.0))[1]
        per_stage[k] = round(1000 * total / max(1.0, count), 2)
    walls.sort()
    return {
        "phase": name,
        "uploads": len(walls),
        "threads": threads,
        "upload_ms_median": round(1000 * statistics.median(walls), 2),
        "upload_ms_p90": round(1000 * walls[int(0.9 * (len(walls) - 1))], 2),
        "stage_ms_mean": per_stage,
        "uploads_per_s": round(len(walls) / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--backend", choices=["sqlite+inprocess", "postgres+redis"], default="sqlite+inprocess")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fedhl-upload-"))
    if args.backend == "postgres+redis":
        import redis
        from sqlalchemy import create_engine, text

        eng = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://"))
        with eng.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        eng.dispose()
        redis.Redis.from_url(args.redis).flushdb()
        db, rd = args.postgres, args.redis
    else:
        db, rd = f"sqlite:///{tmp}/fedhl.db", None
    settings = Settings(
        env="development",
        admin_token=DEV_ADMIN_TOKEN,
        database_url=db,
        redis_url=rd,
        blob_url=f"file://{tmp}/blobs",
        max_concurrent_validations=max(4, args.threads),
    )
    c = Coordinator.from_settings(settings, auto_migrate=True)
    try:
        with transaction(c.deps.sessions) as s:
            repo = AgentRepo(s)
            tok, _ = repo.create_token("bench", args.agents, None)
            agents = [repo.redeem(tok, f"a{i}", {})[0].id for i in range(args.agents)]
        shapes = {f"layers.{i}.{p}": [args.dim, args.dim] for i in range(args.layers) for p in ("q", "v")}
        spec = {
            "name": "upload cost",
            "base_model": "none",
            "target_modules": ["q", "v"],
            "module_shapes": shapes,
            "rank_set": [args.rank],
            "rounds": 1,
            "rank_policy": {"kind": "fixed", "default_rank": args.rank},
            "selection": {"count": args.agents, "min_clients": args.agents, "deadline_s": 600},
        }
        for name, threads in (("sequential", 1), ("concurrent", args.threads)):
            print(json.dumps({"backend": args.backend, **phase(c, name, agents, spec, threads)}), flush=True)
    finally:
        c.shutdown(grace_s=1.0)


if __name__ == "__main__":
    main()
