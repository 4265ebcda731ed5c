"""`bench/aggregation.py --worker`: a full aggregation job through the worker process — queue,
blob I/O, merge, next-round start packages, commit — against Postgres + Redis, with 1 worker
and then 2 workers on module shards, on identical inputs.

Uploads are produced in-process through the coordinator's own validation path (staging,
sha256, shape and finiteness checks), so the worker reads exactly what agents would leave."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def run_job(args: argparse.Namespace, workers: int, shards: int, tmp: Path) -> dict[str, Any]:
    import hashlib

    import redis
    from sqlalchemy import create_engine, select, text

    from fedhl.codec import decode_start, encode_update
    from fedhl.coordinator.agents import UploadHeader
    from fedhl.coordinator.app import Coordinator
    from fedhl.core import LoRAFactors
    from fedhl.jobspec import JobSpec
    from fedhl.settings import Settings
    from fedhl.storage.db import transaction
    from fedhl.storage.models import Round, RoundState
    from fedhl.storage.repos import AgentRepo

    eng = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://"))
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()
    redis.Redis.from_url(args.redis).flushdb()
    settings = Settings(
        env="development",
        admin_token="dev-admin-token",
        database_url=args.postgres,
        redis_url=args.redis,
        blob_url=f"file://{tmp}/blobs",
        inprocess_aggregator=False,
        aggregation_shards=shards,
        heartbeat_ttl_s=3600,
    )
    c = Coordinator.from_settings(settings, auto_migrate=True)
    modules = {
        f"model.layers.{i}.self_attn.{p}": [args.dim, args.dim]
        for i in range(args.layers)
        for p in ("q_proj", "v_proj")
    }
    rank_set = [int(r) for r in args.ranks.split(",")]
    spec = JobSpec.model_validate(
        {
            "name": "worker bench",
            "base_model": "none",
            "target_modules": ["q_proj", "v_proj"],
            "module_shapes": modules,
            "rank_set": rank_set,
            "rounds": 1,
            "seed": args.seed,
            "rank_policy": {"kind": "random", "seed": args.seed},
            "selection": {"count": args.clients, "min_clients": args.clients, "deadline_s": 86400},
        }
    )
    job = c.jobs.create(spec)
    with transaction(c.deps.sessions) as s:
        tok, _ = AgentRepo(s).create_token("bench", args.clients, None)
    # one simulated peer address per client: Register is rate-limited per peer (30 a minute)
    agents = [
        c.agents.register(tok, f"client-{i:03d}", {}, peer=f"ipv4:10.0.{i // 200}.{i % 200 + 1}:40000")[0]
        for i in range(args.clients)
    ]
    for a in agents:
        c.deps.coordination.liveness.beat(a, 3600)
    c.scheduler.advance(job.id)  # opens the round with every client
    t_up = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    n_bytes = 0
    for a in agents:
        task = c.agents.pull_task(a, 0)
        assert task is not None
        start = decode_start(c.deps.blobs.get_bytes(task.blobs[0].key))
        trained = {
            m: LoRAFactors(
                f.B + 1e-3 * torch.randn(f.B.shape, generator=g), f.A + 1e-3 * torch.randn(f.A.shape, generator=g)
            )
            for m, f in start.factors.items()
        }
        payload = encode_update(trained, start.extras)
        n_bytes += len(payload)
        h = UploadHeader(
            task.task_id, task.job_id, task.round, len(payload), hashlib.sha256(payload).hexdigest(), 0, n_examples=100
        )
        assert c.agents.upload(a, h, [payload]).accepted
    t_up = time.perf_counter() - t_up
    state_mb = 4 * sum(o * i for o, i in modules.values()) / 2**20  # float32 dense W_t
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")}
    env.update(
        FEDHL_ENV="development",
        FEDHL_DATABASE_URL=args.postgres,
        FEDHL_REDIS_URL=args.redis,
        FEDHL_BLOB_URL=f"file://{tmp}/blobs",
        FEDHL_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT / "services") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if args.device:
        env["FEDHL_AGGREGATOR_DEVICE"] = args.device
    # one BLAS pool per core: two workers with two threads each would oversubscribe 2 cores
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    procs = [
        subprocess.Popen([sys.executable, "-m", "fedhl.cli", "aggregator", "--name", f"w{i}"], env=env)
        for i in range(workers)
    ]
    time.sleep(3.0)  # workers import torch and connect before the job is queued
    t0 = time.perf_counter()
    c.scheduler.advance(job.id)  # every client reported: the round closes and its shards are queued
    rss: dict[int, float] = {}
    while True:
        for p in procs:
            rss[p.pid] = max(rss.get(p.pid, 0.0), _peak_rss_mb(p.pid))
        with transaction(c.deps.sessions) as s:
            rnd = s.scalars(select(Round).where(Round.job_id == job.id)).one()
            state, report = rnd.state, rnd.report
        if state in (RoundState.COMMITTED, RoundState.FAILED):
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    for p in procs:
        p.terminate()
        p.wait(30)
    c.shutdown()
    assert state is RoundState.COMMITTED, f"round ended {state}"
    assert report is not None
    t = report["timings"]
    return {
        "workers": workers,
        "shards": shards,
        "job_wall_s": round(wall, 3),
        "merge_s": round(t["merge_s"], 3),
        "load_s": round(t["load_s"], 3),
        "next_round_s": round(t["next_round_s"], 3),
        "publish_s": round(t["publish_s"], 3),
        "max_shard_s": round(t["max_shard_s"], 3),
        "merge_fraction": round(t["merge_s"] / wall, 3),
        "worker_peak_rss_mb": round(max(rss.values()), 1),
        "state_mb": round(state_mb, 1),
        "rss_over_state": round(max(rss.values()) / state_mb, 2),
        "upload_bytes": n_bytes,
        "upload_validation_s": round(t_up, 2),
        "device": t["device"],
    }


def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "services"))
    results = []
    counts = [int(w) for w in args.worker_counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedhl-wbench-") as d:
        for workers, shards in ((w, w) for w in counts):
            tmp = Path(d) / f"w{workers}"
            tmp.mkdir()
            res = run_job(args, workers, shards, tmp)
            print(json.dumps(res), flush=True)
            results.append(res)
    one = results[0]
    summary = {
        "mode": "worker",
        "modules": 2 * args.layers,
        "shape": [args.dim, args.dim],
        "clients": args.clients,
        f"seconds_{one['workers']}_worker": one["job_wall_s"],
        "merge_fraction_1_worker": one["merge_fraction"],
        "worker_peak_rss_mb": one["worker_peak_rss_mb"],
        "state_mb": one["state_mb"],
        "rss_over_state": one["rss_over_state"],
        "device": one["device"],
    }
    if len(results) > 1:
        two = results[1]
        summary[f"seconds_{two['workers']}_workers"] = two["job_wall_s"]
        summary[f"worker_peak_rss_mb_{two['workers']}_workers"] = two["worker_peak_rss_mb"]
        summary["speedup_2_workers"] = round(one["job_wall_s"] / two["job_wall_s"], 2)
    print(json.dumps(summary))
