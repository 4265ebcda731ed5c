"""Control-plane overhead per round: round wall time minus aggregation time, with scripted
agents that return their start factors at once (~0.3 MB adapters), real gRPC on loopback
through a byte-counting TCP relay, and the coordinator as its own process.

    python bench/control_plane.py --agents 8 --rounds 10
    python bench/control_plane.py --agents 32 --rounds 10 --backend postgres+redis

Prints one JSON line: agents, rounds, median_round_overhead_s, bytes_on_wire_per_round,
payload_bytes_per_round, coordinator_peak_rss_mb (plus details).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from fedhl.agent.scripted import ScriptedAgent  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingRelay:
    """A TCP relay that counts every byte between the agents and the coordinator."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.up = 0
        self.down = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (server, True))
        sel.register(server, selectors.EVENT_READ, (client, False))
        try:
            while True:
                for key, _ in sel.select():
                    dst, upward = key.data
                    data = key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                    if not data:
                        return
                    dst.sendall(data)
                    with self.lock:
                        if upward:
                            self.up += len(data)
                        else:
                            self.down += len(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def total(self) -> int:
        with self.lock:
            return self.up + self.down


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2, help="q and v per layer; 2 layers × rank 8 ≈ 0.26 MB")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--backend", choices=["sqlite+inprocess", "postgres+redis"], default="sqlite+inprocess")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fedhl-cp-"))
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")}
    env.update(
        FEDHL_ENV="development",
        FEDHL_BLOB_URL=f"file://{tmp}/blobs",
        FEDHL_GRPC_PORT=str(grpc_port),
        FEDHL_HTTP_PORT=str(http_port),
        FEDHL_HTTP_HOST="127.0.0.1",
        FEDHL_GRPC_HOST="127.0.0.1",
        FEDHL_SCHEDULER_INTERVAL_S="0.05",
        FEDHL_LOG_LEVEL="WARNING",
        # every scripted agent enrols from 127.0.0.1 with one token
        FEDHL_REGISTER_PER_PEER=str(max(30, 2 * args.agents)),
        FEDHL_REGISTER_PER_TOKEN=str(max(120, 2 * args.agents)),
    )
    if args.backend == "postgres+redis":
        import redis
        from sqlalchemy import create_engine, text

        eng = create_engine(args.postgres.replace("postgresql://", "postgresql+psycopg://"))
        with eng.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        eng.dispose()
        redis.Redis.from_url(args.redis).flushdb()
        env.update(FEDHL_DATABASE_URL=args.postgres, FEDHL_REDIS_URL=args.redis)
    else:
        env.update(FEDHL_DATABASE_URL=f"sqlite:///{tmp}/fedhl.db")
    cli = [sys.executable, "-m", "fedhl.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    log = (tmp / "coordinator.log").open("wb")
    proc = subprocess.Popen([*cli, "coordinator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{http_port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        http = httpx.Client(base_url=f"{base}/api/v1", headers={"Authorization": "Bearer dev-admin-token"}, timeout=30)
        relay = CountingRelay(grpc_port)
        token = http.post("/agents/enrolment-tokens", json={"label": "bench", "uses": args.agents}).json()["token"]
        crew = [ScriptedAgent(f"127.0.0.1:{relay.port}", token, f"a{i}", n_examples=100) for i in range(args.agents)]
        stop = threading.Event()
        threads = [threading.Thread(target=a.run, args=(stop, 5), daemon=True) for a in crew]
        for t in threads:
            t.start()
        shapes = {f"layers.{i}.{p}": [args.dim, args.dim] for i in range(args.layers) for p in ("q", "v")}
        spec = {
            "name": "control-plane bench",
            "base_model": "none",
            "target_modules": ["q", "v"],
            "module_shapes": shapes,
            "rank_set": [args.rank],
            "rounds": args.rounds,
            "rank_policy": {"kind": "fixed", "default_rank": args.rank},
            "selection": {"count": args.agents, "min_clients": args.agents, "deadline_s": 300},
        }
        wire_before = relay.total()
        t0 = time.monotonic()
        job = http.post("/jobs", json=spec).raise_for_status().json()
        while http.get(f"/jobs/{job['id']}").json()["status"] != "COMPLETED":
            if time.monotonic() - t0 > 600:
                raise SystemExit("job did not complete in 10 minutes")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        wire = relay.total() - wire_before
        stop.set()
        rounds = http.get(f"/jobs/{job['id']}/rounds").json()
        overheads, payload = [], 0
        from datetime import datetime

        for r in rounds:
            if r["state"] != "COMMITTED":
                continue
            opened = datetime.fromisoformat(r["created_at"])
            committed = datetime.fromisoformat(r["committed_at"])
            agg = r["report"]["timings"]["total_s"]
            overheads.append((committed - opened).total_seconds() - agg)
            detail = http.get(f"/jobs/{job['id']}/rounds/{r['id']}").json()
            payload += sum(u["size"] for u in detail["updates"])
        start_bytes = sum(a.client.stats.bytes_down for a in crew)  # start packages actually downloaded
        payload += start_bytes
        rss = peak_rss_mb(proc.pid)
        result = {
            "agents": args.agents,
            "rounds": len(overheads),
            "backend": args.backend,
            "median_round_overhead_s": round(statistics.median(overheads), 4),
            "max_round_overhead_s": round(max(overheads), 4),
            "bytes_on_wire_per_round": int(wire / len(overheads)),
            "payload_bytes_per_round": int(payload / len(overheads)),
            "wire_to_payload": round(wire / payload, 3),
            "coordinator_peak_rss_mb": round(rss, 1),
            "job_wall_s": round(wall, 2),
        }
        print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    main()
