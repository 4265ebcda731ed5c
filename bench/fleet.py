"""Fleet benchmark: thousands of scripted agents (asyncio gRPC clients, many per channel, no ML)
against coordinator processes on a private Postgres + private Redis, with one aggregator process.

    PYTHONPATH=services nice -n 0 .venv/bin/python bench/fleet.py                     # the full suite
    PYTHONPATH=services .venv/bin/python bench/fleet.py --agents 200 --idle 200 --select 20,50 --duration 20
    PYTHONPATH=services .venv/bin/python bench/fleet.py --replicas 2                  # 1 replica, then 2

Scenarios (one JSON line each):
  idle:N    N enrolled agents connected for --duration s: each keeps a PullTask long-poll open and
            heartbeats at the interval the server asks (HeartbeatResponse.interval_seconds).
  round:K   all --agents agents connected; a job whose rounds select K of them (count = min_clients
            = K); the K agents download their start factors and upload a valid adapter of their
            assigned rank (the start factors, perturbed: scripted, no training).
Then a summary line: max_connected_agents, heartbeat_p50_ms / heartbeat_p99_ms (the largest idle
scenario), errors (every failed call in every scenario, RESOURCE_EXHAUSTED refusals counted apart
as `refused`), round_overhead_s (participants -> median per round of: created -> committed wall
time minus the aggregation time (round report) minus the slowest selected agent's scripted
compute), coordinator_peak_rss_mb (VmHWM, the largest replica), coordinator_cpu_s_per_round
(participants -> coordinator CPU seconds, all replicas, per committed round).

An agent is *connected* while its last heartbeat succeeded less than two intervals ago (or, for a
fleet whose server lengthens the interval, its long-poll is open) and no call of it has failed since;
`connected_min` is the fewest connected during the measured window.

Enrolment goes through Register (gRPC), in parallel. The coordinator bounds Register calls per
peer host and per enrolment token, as it should for a real fleet, where every agent is its own
host; the load generator is one host, so it enrols through small TCP relays whose upstream
connections leave from distinct loopback addresses (127.1.x.y), at most --per-source agents each,
with one enrolment token per --per-token agents. After enrolment every call goes straight to
the coordinator over --per-channel agents per channel.

Never touches the machine's own Postgres (5432) or Redis (6379) unless --postgres / --redis name
them: it starts its own (initdb + pg_ctl in a temp dir, redis-server on a spare port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "services"))
import torch  # noqa: E402

from fedhl.codec import decode_start, encode_update  # noqa: E402
from fedhl.core import LoRAFactors  # noqa: E402
from fedhl.storage.db import migrate  # noqa: E402
from fedhl.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from private_backends import PrivatePostgres, PrivateRedis, free_port  # noqa: E402

ADMIN = "fleet-bench-admin-token-0123456789"
WAIT_S = 20  # PullTask wait_seconds (the server caps it)
HEARTBEAT_TIMEOUT_S = 10.0  # a heartbeat slower than this is an error (main's pool starves)
PULL_SLACK_S = 10.0  # a long-poll that outlives its wait by this much is an error
CALL_TIMEOUT_S = 30.0  # download / upload
TRANSFER_TRIES = 20  # a download or upload refused past the transfer cap is retried (bounded)
RANKS = [2, 4, 8]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    # channels to one target with equal arguments would share one connection (the global
    # subchannel pool) and so the server's per-connection stream cap: one connection per channel
    ("grpc.use_local_subchannel_pool", 1),
]


# ------------------------------------------------------------------------------ measurements
def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


@dataclass
class Stats:
    """What the agents saw in one scenario."""

    heartbeat_ms: list[float] = field(default_factory=list)
    wait_overshoot_ms: list[float] = field(default_factory=list)  # a no-task long-poll past its wait
    errors: Counter[str] = field(default_factory=Counter)  # "Method:CODE"
    refused: Counter[str] = field(default_factory=Counter)  # RESOURCE_EXHAUSTED (the agent backs off)
    uploads: int = 0
    probes: int = 0  # heartbeats sent by the probe (counted in heartbeat_ms too)
    compute_s: dict[tuple[str, int], float] = field(default_factory=dict)  # (job, round) -> slowest agent
    loop_lag_ms: list[float] = field(default_factory=list)  # the load generator's own event-loop delay
    # failed or refused calls before the window (ramp, warm-up): "Method:CODE"
    ramp_errors: Counter[str] = field(default_factory=Counter)
    recording: bool = False

    def fail(self, method: str, e: grpc.aio.AioRpcError) -> None:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.refused[method] += 1
        else:
            self.errors[f"{method}:{e.code().name}"] += 1


def retry_after(e: grpc.aio.AioRpcError, default: float = 1.0) -> float:
    """The server's `retry-after` trailing metadata plus up to 50 % jitter (as the agent does),
    else `default`."""
    for k, v in e.trailing_metadata() or ():
        if k == "retry-after":
            with contextlib.suppress(ValueError):
                return min(float(v), 300.0) * (1.0 + 0.5 * random.random())
    return default


def rss_peak_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the JSON lines)."""
    print(f"[fleet {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------ the cluster
class Cluster:
    """Private Postgres + Redis, one aggregator process, `replicas` coordinator processes."""

    def __init__(
        self, work: Path, postgres: str | None, redis_url: str | None, settings: dict[str, str] | None = None
    ) -> None:
        self.work = work
        self.settings = settings or {}  # FEDHL_* overrides for the coordinators (--set)
        self.postgres, self.redis_given = postgres, redis_url
        self.pg = None if postgres else PrivatePostgres()
        self.rd = None if redis_url else PrivateRedis()
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.coordinators: list[tuple[subprocess.Popen[bytes], int, int]] = []  # (process, grpc, http)
        self.db_url = postgres or (self.pg.url if self.pg else "")
        self.redis_url = redis_url or (self.rd.url if self.rd else "")

    def start(self) -> None:
        """Backends, migrations, the aggregator (`close` stops whatever of it started)."""
        postgres, redis_url, work = self.postgres, self.redis_given, self.work
        if self.pg:
            self.pg.start()
        if self.rd:
            self.rd.start()
        if postgres:  # a dedicated database: start from an empty schema
            from sqlalchemy import create_engine, text

            eng = create_engine(postgres.replace("postgresql://", "postgresql+psycopg://"))
            with eng.begin() as c:
                c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            eng.dispose()
        if redis_url:
            import redis

            redis.Redis.from_url(redis_url).flushdb()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")} | {
            "FEDHL_ENV": "development",
            "FEDHL_ADMIN_TOKEN": ADMIN,
            "FEDHL_DATABASE_URL": self.db_url,
            "FEDHL_REDIS_URL": self.redis_url,
            "FEDHL_BLOB_URL": f"file://{work / 'blobs'}",
            "FEDHL_GRPC_HOST": "127.0.0.1",
            "FEDHL_HTTP_HOST": "127.0.0.1",
            "FEDHL_INPROCESS_AGGREGATOR": "false",
            "FEDHL_BLOB_GC_INTERVAL_S": "0",
            "FEDHL_LOG_LEVEL": "WARNING",
        } | self.settings
        migrate(self.db_url)  # here, not `fedhl migrate`: one interpreter start less
        cli = [sys.executable, "-m", "fedhl.cli"]
        self.aggregator = self._spawn([*cli, "aggregator", "--name", "fleet-agg"], {}, "aggregator.log")

    def _spawn(self, args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with (self.work / log).open("ab") as out:
            return subprocess.Popen(args, env=self.env | env, stdout=out, stderr=subprocess.STDOUT)

    def start_coordinators(self, n: int) -> None:
        self.stop_coordinators()
        for i in range(n):
            grpc_port, http_port = free_port(), free_port()
            env = {"FEDHL_GRPC_PORT": str(grpc_port), "FEDHL_HTTP_PORT": str(http_port)}
            p = self._spawn([sys.executable, "-m", "fedhl.cli", "coordinator"], env, f"coordinator{i}.log")
            self.coordinators.append((p, grpc_port, http_port))
        for p, _, http_port in self.coordinators:
            end = time.monotonic() + 300  # a loaded machine starts torch slowly
            while True:
                if p.poll() is not None:
                    raise RuntimeError(f"coordinator exited with {p.returncode}; see {self.work}/coordinator*.log")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{http_port}/livez", timeout=2).status_code == 200:
                        break
                if time.monotonic() > end:
                    raise TimeoutError("coordinator did not come up in 300 s")
                time.sleep(0.3)

    @property
    def grpc_targets(self) -> list[str]:
        return [f"127.0.0.1:{g}" for _, g, _ in self.coordinators]

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.coordinators[0][2]}/api/v1"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _, _ in self.coordinators]

    def stop_coordinators(self) -> None:
        for p, _, _ in self.coordinators:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        self.coordinators = []

    def live(self, agent_ids: list[str]) -> int:
        """How many of these agents the coordinators count as alive (Redis liveness keys)."""
        import redis

        r = redis.Redis.from_url(self.redis_url)
        n = 0
        for i in range(0, len(agent_ids), 1000):
            n += sum(v is not None for v in r.mget([f"fedhl:alive:{a}" for a in agent_ids[i : i + 1000]]))
        return n

    def close(self) -> None:
        self.stop_coordinators()
        if self.aggregator is not None and self.aggregator.poll() is None:
            self.aggregator.kill()
            self.aggregator.wait(10)
        if self.rd:
            self.rd.stop()
        if self.pg:
            self.pg.destroy()


# ------------------------------------------------------------------------------ enrolment
class SourceRelay:
    """A TCP relay on 127.0.0.1 whose upstream connections leave from `source` (one loopback
    address per simulated host, so the coordinator's per-peer Register budget applies per host)."""

    def __init__(self, source: str, target: tuple[str, int]) -> None:
        self.source, self.target = source, target
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target, local_addr=(self.source, 0))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    async def close(self) -> None:
        if self.server:
            self.server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)


@dataclass
class Agent:
    idx: int
    agent_id: str
    credential: str
    replica: int = 0
    stub: Any = None
    interval_s: float = 5.0
    last_ok: float = 0.0  # monotonic time of the last successful heartbeat (or open wait)
    waiting: bool = False  # a long-poll is open
    failed: bool = False  # a call failed since the last success
    failures: int = 0  # consecutive failed calls: the back-off grows with them

    def backoff_s(self, e: grpc.aio.AioRpcError) -> float:
        """As the agent client does: the server's retry-after when it gave one, else exponential
        back-off (0.5 s × 2^n, at most 30 s) with jitter, so a failing fleet does not retry in step."""
        self.failures += 1
        return retry_after(e, min(30.0, 0.5 * 2 ** min(self.failures, 6)) * (1.0 + 0.5 * random.random()))

    @property
    def md(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.credential}"),)


async def enrol(
    http: httpx.AsyncClient, target: str, first: int, n: int, per_source: int, per_token: int, parallel: int
) -> tuple[list[Agent], float, Counter[str]]:
    """Register agents first .. first+n-1 over gRPC; (agents, seconds, errors)."""
    host, port = target.rsplit(":", 1)
    tokens: dict[int, str] = {}
    for t in range((first // per_token), (first + n - 1) // per_token + 1):
        r = await http.post("/agents/enrolment-tokens", json={"label": f"fleet-{t}", "uses": per_token})
        tokens[t] = r.raise_for_status().json()["token"]
    relays: dict[int, SourceRelay] = {}
    channels: dict[int, grpc.aio.Channel] = {}
    for s in range(first // per_source, (first + n - 1) // per_source + 1):
        relay = SourceRelay(f"127.1.{s // 250}.{s % 250 + 1}", (host, int(port)))
        await relay.start()
        relays[s] = relay
        channels[s] = grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}", options=CHANNEL_OPTIONS)
    sem = asyncio.Semaphore(parallel)
    errors: Counter[str] = Counter()
    agents: list[Agent] = []

    async def one(i: int) -> None:
        stub = agent_pb2_grpc.AgentServiceStub(channels[i // per_source])
        req = agent_pb2.RegisterRequest(
            enrolment_token=tokens[i // per_token],
            name=f"fleet-{i}",
            resources=agent_pb2.Resources(device_type="cuda", device_memory_bytes=24 << 30, steps_per_second=5.0),
            agent_version="fleet-bench",
        )
        async with sem:
            for attempt in range(5):
                try:
                    res = await stub.Register(req, timeout=CALL_TIMEOUT_S)
                    agents.append(Agent(i, res.agent_id, res.credential))
                    return
                except grpc.aio.AioRpcError as e:
                    errors[f"Register:{e.code().name}"] += 1
                    if e.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                        return
                    await asyncio.sleep(retry_after(e, 1.0) * (attempt + 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(first, first + n)))
    wall = time.perf_counter() - t0
    for ch in channels.values():
        await ch.close()
    for relay in relays.values():
        await relay.close()
    return sorted(agents, key=lambda a: a.idx), wall, errors


# ------------------------------------------------------------------------------ scripted agents
class Trainer:
    """The scripted compute: the downloaded start factors, perturbed, encoded as a valid update
    of the assigned rank. The load generator runs every agent on one event loop, so the payloads
    are cached: VARIANTS perturbations per start blob, agent k uploading variant k mod VARIANTS
    (a real agent's compute is its own machine's, not the coordinator host's)."""

    VARIANTS = 16

    def __init__(self) -> None:
        self._payloads: dict[tuple[str, int], bytes] = {}

    def update(self, key: str, data: bytes, agent: int, round_: int) -> bytes:
        slot = (key, agent % self.VARIANTS)
        payload = self._payloads.get(slot)
        if payload is None:
            start = decode_start(data)
            g = torch.Generator().manual_seed(zlib.crc32(f"{slot[1]}:{round_}".encode()))
            factors = {
                m: LoRAFactors(
                    f.B + 1e-3 * torch.randn(f.B.shape, generator=g),  # (d_out, r)
                    f.A + 1e-3 * torch.randn(f.A.shape, generator=g),  # (r, d_in)
                )
                for m, f in start.factors.items()
            }
            payload = self._payloads[slot] = encode_update(factors, {k: v.clone() for k, v in start.extras.items()})
        return payload


class Fleet:
    """Runs agents as coroutines on a few shared channels per coordinator replica."""

    def __init__(self, targets: list[str], per_channel: int) -> None:
        self.targets = targets
        self.per_channel = per_channel
        self.channels: dict[tuple[int, int], grpc.aio.Channel] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.stats = Stats()
        self.trainer = Trainer()
        self.running = False

    def attach(self, agents: list[Agent]) -> None:
        """Agent k talks to replica k mod R, over that replica's channel number (k // R) // per_channel."""
        r = len(self.targets)
        for k, a in enumerate(agents):
            a.replica = k % r
            key = (a.replica, (k // r) // self.per_channel)
            if key not in self.channels:
                self.channels[key] = grpc.aio.insecure_channel(self.targets[a.replica], options=CHANNEL_OPTIONS)
            a.stub = agent_pb2_grpc.AgentServiceStub(self.channels[key])
            a.last_ok, a.waiting, a.failed, a.failures = 0.0, False, False, 0

    async def start(self, agents: list[Agent], ramp_s: float) -> None:
        self.running = True
        self.tasks.append(asyncio.create_task(self._lag()))
        for a in agents:
            self.tasks.append(asyncio.create_task(self._heartbeats(a, random.uniform(0, ramp_s))))
            self.tasks.append(asyncio.create_task(self._pulls(a, random.uniform(0, ramp_s))))

    async def stop(self) -> None:
        self.running = False
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for ch in self.channels.values():
            await ch.close()
        self.channels = {}

    @staticmethod
    def connected(agents: Iterable[Agent]) -> int:
        now = time.monotonic()
        return sum(not a.failed and (a.waiting or now - a.last_ok < 2 * a.interval_s + 1) for a in agents)

    async def _lag(self) -> None:
        """How late a 100 ms sleep wakes: a latency is the coordinator's only if this stays small."""
        while self.running:
            t0 = time.perf_counter()
            await asyncio.sleep(0.1)
            if self.stats.recording:
                self.stats.loop_lag_ms.append((time.perf_counter() - t0 - 0.1) * 1000)

    async def _heartbeats(self, a: Agent, delay: float) -> None:
        await asyncio.sleep(delay)
        req = agent_pb2.HeartbeatRequest(resources=agent_pb2.Resources(device_type="cuda"))
        while self.running:
            t0 = time.perf_counter()
            pause = a.interval_s
            try:
                res = await a.stub.Heartbeat(req, metadata=a.md, timeout=HEARTBEAT_TIMEOUT_S)
                if self.stats.recording:
                    self.stats.heartbeat_ms.append((time.perf_counter() - t0) * 1000)
                a.last_ok, a.failed, a.failures = time.monotonic(), False, 0
                if res.interval_seconds > 0:
                    a.interval_s = pause = float(res.interval_seconds)
            except grpc.aio.AioRpcError as e:
                if self.stats.recording:
                    self.stats.fail("Heartbeat", e)
                else:
                    self.stats.ramp_errors[f"Heartbeat:{e.code().name}"] += 1
                a.failed = e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                pause = a.backoff_s(e)
            await asyncio.sleep(pause)

    async def probe(self, a: Agent) -> None:
        """One extra heartbeat of an idle agent, timed like the others."""
        req = agent_pb2.HeartbeatRequest(resources=agent_pb2.Resources(device_type="cuda"))
        t0 = time.perf_counter()
        try:
            await a.stub.Heartbeat(req, metadata=a.md, timeout=HEARTBEAT_TIMEOUT_S)
            self.stats.heartbeat_ms.append((time.perf_counter() - t0) * 1000)
            self.stats.probes += 1
        except grpc.aio.AioRpcError as e:
            self.stats.fail("Heartbeat", e)

    async def _pulls(self, a: Agent, delay: float) -> None:
        await asyncio.sleep(delay)
        wait_s = WAIT_S  # until the server says which long-poll length it honours
        while self.running:
            t0 = time.perf_counter()
            pause = 0.0
            try:
                a.waiting = True
                res = await a.stub.PullTask(
                    agent_pb2.PullTaskRequest(wait_seconds=wait_s), metadata=a.md, timeout=wait_s + PULL_SLACK_S
                )
                a.waiting, a.failures = False, 0
                a.failed = False  # an answered long-poll: connected again
                if res.WhichOneof("result") == "task":
                    await self._work(a, res.task)
                else:
                    if self.stats.recording:
                        self.stats.wait_overshoot_ms.append(max(0.0, time.perf_counter() - t0 - wait_s) * 1000)
                    pause = float(res.no_task.retry_after_seconds)
                    wait_s = int(getattr(res.no_task, "wait_seconds", 0)) or wait_s  # 0 or absent: an older server
            except grpc.aio.AioRpcError as e:
                a.waiting = False
                if self.stats.recording:
                    self.stats.fail("PullTask", e)
                else:
                    self.stats.ramp_errors[f"PullTask:{e.code().name}"] += 1
                a.failed = e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                pause = a.backoff_s(e)
            await asyncio.sleep(pause)

    async def _work(self, a: Agent, task: Any) -> None:
        """Download the start factors, compute the scripted update, upload it (errors counted
        whatever `recording` says: a round's calls all count)."""
        key = task.blobs[0].key
        buf = bytearray()
        header = None
        for attempt in range(TRANSFER_TRIES):  # a refusal (transfer cap) is retried after its retry-after
            try:
                buf, header = bytearray(), None
                async for msg in a.stub.DownloadBlob(
                    agent_pb2.DownloadBlobRequest(key=key), metadata=a.md, timeout=CALL_TIMEOUT_S
                ):
                    if msg.WhichOneof("part") == "header":
                        header = msg.header
                    else:
                        buf += msg.data
                break
            except grpc.aio.AioRpcError as e:
                self.stats.fail("DownloadBlob", e)
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == TRANSFER_TRIES - 1:
                    return
                await asyncio.sleep(retry_after(e, 1.0))
        if header is None or hashlib.sha256(buf).hexdigest() != header.sha256:
            self.stats.errors["DownloadBlob:sha256"] += 1
            return
        t0 = time.perf_counter()
        payload = self.trainer.update(key, bytes(buf), a.idx, task.round)
        slot = (task.job_id, task.round)
        self.stats.compute_s[slot] = max(self.stats.compute_s.get(slot, 0.0), time.perf_counter() - t0)
        sha = hashlib.sha256(payload).hexdigest()

        async def messages() -> AsyncIterator[Any]:
            yield agent_pb2.UploadMessage(
                header=agent_pb2.UploadHeader(
                    task_id=task.task_id,
                    job_id=task.job_id,
                    round=task.round,
                    size=len(payload),
                    sha256=sha,
                    n_examples=100,
                    metrics={"loss": 1.0},
                )
            )
            for i in range(0, len(payload), 1 << 20):
                yield agent_pb2.UploadMessage(data=payload[i : i + (1 << 20)])

        for attempt in range(TRANSFER_TRIES):
            try:
                res = await a.stub.UploadUpdate(messages(), metadata=a.md, timeout=CALL_TIMEOUT_S)
                if res.accepted:
                    self.stats.uploads += 1
                else:
                    self.stats.errors["UploadUpdate:incomplete"] += 1
                return
            except grpc.aio.AioRpcError as e:
                self.stats.fail("UploadUpdate", e)
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == TRANSFER_TRIES - 1:
                    return
                await asyncio.sleep(retry_after(e, 1.0))


# ------------------------------------------------------------------------------ scenarios
@dataclass
class Bench:
    cluster: Cluster
    args: argparse.Namespace
    agents: list[Agent] = field(default_factory=list)
    enrolment: dict[str, Any] = field(default_factory=dict)
    http: httpx.AsyncClient | None = None

    async def ensure_enrolled(self, n: int) -> None:
        if len(self.agents) >= n:
            return
        assert self.http
        first = len(self.agents)
        new, wall, errors = await enrol(
            self.http,
            self.cluster.grpc_targets[0],
            first,
            n - first,
            self.args.per_source,
            self.args.per_token,
            self.args.enrol_parallel,
        )
        self.agents += new
        log(f"enrolled {len(new)} agents in {wall:.1f} s ({dict(errors) or 'no errors'})")
        e = self.enrolment
        e["agents"] = e.get("agents", 0) + len(new)
        e["seconds"] = round(e.get("seconds", 0.0) + wall, 2)
        e["per_s"] = round(e["agents"] / e["seconds"], 1) if e["seconds"] else None
        e["errors"] = dict(Counter(e.get("errors", {})) + errors)
        if len(self.agents) < n:
            raise RuntimeError(f"enrolled {len(self.agents)} of {n} agents: {dict(errors)}")

    async def run_fleet(self, n: int, body: Callable[[Fleet, list[Agent]], Any]) -> tuple[Fleet, Any, dict[str, Any]]:
        await self.ensure_enrolled(n)
        agents = self.agents[:n]
        fleet = Fleet(self.cluster.grpc_targets, self.args.per_channel)
        fleet.attach(agents)
        cpu0 = sum(cpu_s(p) for p in self.cluster.pids)
        load0 = load_average()
        await fleet.start(agents, ramp_s=self.args.ramp)
        log(f"{n} agents started on {len(fleet.channels)} channels")
        try:
            await asyncio.sleep(self.args.ramp + self.args.warmup)
            out = await body(fleet, agents)
        finally:
            live = self.cluster.live([a.agent_id for a in agents])
            await fleet.stop()
        common = {
            "agents": n,
            "replicas": len(self.cluster.pids),
            "coordinator_live": live,
            "errors": sum(fleet.stats.errors.values()),
            "error_kinds": dict(fleet.stats.errors),
            "ramp_errors": dict(fleet.stats.ramp_errors),  # before the measured window (not in `errors`)
            "refused": sum(fleet.stats.refused.values()),
            "coordinator_cpu_s": round(sum(cpu_s(p) for p in self.cluster.pids) - cpu0, 2),
            "coordinator_peak_rss_mb": round(max(rss_peak_mb(p) for p in self.cluster.pids), 1),
            "load_average_before": load0,
            "load_average_after": load_average(),
        }
        await asyncio.sleep(self.args.settle)
        return fleet, out, common

    async def idle(self, n: int) -> dict[str, Any]:
        async def body(fleet: Fleet, agents: list[Agent]) -> dict[str, Any]:
            fleet.stats.recording = True
            samples: list[int] = []
            end = time.monotonic() + self.args.duration
            probes: list[asyncio.Task[None]] = []
            while time.monotonic() < end:
                samples.append(Fleet.connected(agents))
                # a large fleet's own heartbeats are rare (every 100 s at 5,000): --probes random
                # agents per second send one more, so the latency is measured within the window
                probes += [asyncio.create_task(fleet.probe(a)) for a in random.sample(agents, min(self.args.probes, n))]
                await asyncio.sleep(1.0)
            await asyncio.gather(*probes)
            fleet.stats.recording = False
            return {"connected_min": min(samples), "connected_end": samples[-1]}

        fleet, out, common = await self.run_fleet(n, body)
        s = fleet.stats
        return {
            "scenario": f"idle:{n}",
            "duration_s": self.args.duration,
            **out,
            "heartbeats": len(s.heartbeat_ms),
            "probe_heartbeats": s.probes,
            "heartbeat_p50_ms": percentile(s.heartbeat_ms, 0.5),
            "heartbeat_p99_ms": percentile(s.heartbeat_ms, 0.99),
            "heartbeat_max_ms": percentile(s.heartbeat_ms, 1.0),
            "loadgen_loop_lag_p50_ms": percentile(s.loop_lag_ms, 0.5),
            "loadgen_loop_lag_p99_ms": percentile(s.loop_lag_ms, 0.99),
            "waits_completed": len(s.wait_overshoot_ms),
            "wait_overshoot_p99_ms": percentile(s.wait_overshoot_ms, 0.99),
            "interval_s": statistics.median(a.interval_s for a in self.agents[:n]),
            **common,
        }

    async def round(self, k: int) -> dict[str, Any]:
        assert self.http
        http = self.http
        rounds_wanted = self.args.rounds

        async def body(fleet: Fleet, agents: list[Agent]) -> dict[str, Any]:
            fleet.stats.recording = True
            shapes = {f"layers.{i}.{p}": [self.args.dim, self.args.dim] for i in range(2) for p in ("q", "v")}
            spec = {
                "name": f"fleet round {k}",
                "base_model": "none",
                "target_modules": ["q", "v"],
                "module_shapes": shapes,
                "rank_set": RANKS,
                "rounds": rounds_wanted,
                "rank_policy": {"kind": "random", "seed": 1},
                "selection": {"count": k, "min_clients": k, "deadline_s": self.args.deadline, "quorum": 1.0},
            }
            cpu0 = sum(cpu_s(p) for p in self.cluster.pids)
            job = (await http.post("/jobs", json=spec)).raise_for_status().json()
            t0 = time.monotonic()
            status = ""
            while time.monotonic() - t0 < self.args.round_limit:
                status = (await http.get(f"/jobs/{job['id']}")).json()["status"]
                if status in ("COMPLETED", "FAILED", "CANCELLED"):
                    break
                await asyncio.sleep(0.5)
            cpu = sum(cpu_s(p) for p in self.cluster.pids) - cpu0
            if status != "COMPLETED":
                await http.post(f"/jobs/{job['id']}/cancel")
            fleet.stats.recording = False
            rounds = (await http.get(f"/jobs/{job['id']}/rounds")).json()
            overheads, walls, aggs = [], [], []
            for r in rounds:
                if r["state"] != "COMMITTED":
                    continue
                wall = (
                    datetime.fromisoformat(r["committed_at"]) - datetime.fromisoformat(r["created_at"])
                ).total_seconds()
                agg = float(r["report"]["timings"]["total_s"])
                compute = fleet.stats.compute_s.get((job["id"], r["number"]), 0.0)
                walls.append(wall)
                aggs.append(agg)
                overheads.append(wall - agg - compute)
            return {
                "job_status": status,
                "rounds_committed": len(overheads),
                "round_overhead_s": [round(x, 3) for x in overheads],
                "median_round_overhead_s": round(statistics.median(overheads), 3) if overheads else None,
                "median_round_wall_s": round(statistics.median(walls), 3) if walls else None,
                "median_aggregation_s": round(statistics.median(aggs), 3) if aggs else None,
                "job_coordinator_cpu_s": round(cpu, 2),
            }

        fleet, out, common = await self.run_fleet(self.args.agents, body)
        n_rounds = out["rounds_committed"]
        return {
            "scenario": f"round:{k}",
            "participants": k,
            **out,
            "uploads": fleet.stats.uploads,
            "max_agent_compute_s": round(max(fleet.stats.compute_s.values(), default=0.0), 4),
            "coordinator_cpu_s_per_round": round(out["job_coordinator_cpu_s"] / n_rounds, 2) if n_rounds else None,
            **common,
        }


def summarise(lines: list[dict[str, Any]], enrolment: dict[str, Any]) -> dict[str, Any]:
    idle = [x for x in lines if x["scenario"].startswith("idle:")]
    rounds = [x for x in lines if x["scenario"].startswith("round:")]
    biggest = max(idle, key=lambda x: x["agents"], default=None)
    return {
        "max_connected_agents": max((x["connected_min"] for x in idle), default=None),
        "heartbeat_p50_ms": biggest["heartbeat_p50_ms"] if biggest else None,
        "heartbeat_p99_ms": biggest["heartbeat_p99_ms"] if biggest else None,
        "heartbeat_at_agents": biggest["agents"] if biggest else None,
        "errors": sum(x["errors"] for x in lines),
        "refused": sum(x["refused"] for x in lines),
        "round_overhead_s": {str(x["participants"]): x["median_round_overhead_s"] for x in rounds},
        "coordinator_peak_rss_mb": max((x["coordinator_peak_rss_mb"] for x in lines), default=None),
        "coordinator_cpu_s_per_round": {str(x["participants"]): x["coordinator_cpu_s_per_round"] for x in rounds},
        "enrolment": enrolment,
        "replicas": max((x["replicas"] for x in lines), default=None),
    }


def ratios(two: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    def r(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    return {
        "max_connected_agents": r(two["max_connected_agents"], one["max_connected_agents"]),
        "heartbeat_p99_ms": r(two["heartbeat_p99_ms"], one["heartbeat_p99_ms"]),
        "round_overhead_s": {k: r(v, one["round_overhead_s"].get(k)) for k, v in two["round_overhead_s"].items()},
    }


async def run(args: argparse.Namespace, cluster: Cluster) -> None:
    plan: list[tuple[str, int]] = []
    if "idle" in args.scenarios:
        plan += [("idle", n) for n in args.idle]
    if "rounds" in args.scenarios:
        plan += [("round", k) for k in args.select]
    summaries: dict[int, dict[str, Any]] = {}
    bench = Bench(cluster, args)
    counts = ([2] if args.skip_one_replica else [1, 2]) if args.replicas == 2 else [args.replicas]
    for replicas in counts:
        cluster.start_coordinators(replicas)
        log(f"{replicas} coordinator(s) up")
        lines: list[dict[str, Any]] = []
        async with httpx.AsyncClient(
            base_url=cluster.http_base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        ) as http:
            bench.http = http
            for kind, n in plan:
                try:
                    line = await (bench.idle(n) if kind == "idle" else bench.round(n))
                except Exception as e:  # a scenario that cannot run is reported, not hidden
                    line = {"scenario": f"{kind}:{n}", "replicas": replicas, "failed": f"{type(e).__name__}: {e}"}
                    line |= {"errors": 1, "refused": 0, "agents": n, "coordinator_peak_rss_mb": 0.0}
                    line |= {"connected_min": 0, "heartbeat_p50_ms": None, "heartbeat_p99_ms": None}
                    line |= {"participants": n, "median_round_overhead_s": None, "coordinator_cpu_s_per_round": None}
                lines.append(line)
                print(json.dumps(line), flush=True)
        summaries[replicas] = summarise(lines, dict(bench.enrolment))
        cluster.stop_coordinators()
    final = summaries[args.replicas]
    if args.replicas == 2 and 1 in summaries:
        final = final | {"one_replica": summaries[1], "ratio_2_to_1": ratios(summaries[2], summaries[1])}
    print(json.dumps(final | {"load_average": load_average()}), flush=True)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=5000, help="the fleet the round scenarios select from")
    ap.add_argument("--idle", type=ints, default=[1000, 2000, 5000], help="idle fleet sizes")
    ap.add_argument("--select", type=ints, default=[100, 500, 1000], help="participants per round")
    ap.add_argument("--scenarios", type=lambda s: s.split(","), default=["idle", "rounds"])
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds per idle scenario")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per round scenario")
    ap.add_argument("--replicas", type=int, choices=[1, 2], default=1, help="2: run with 1 replica, then 2")
    ap.add_argument("--set", action="append", default=[], metavar="FEDHL_X=V", help="coordinator setting (repeatable)")
    ap.add_argument("--skip-one-replica", action="store_true", help="with --replicas 2: only the two-replica pass")
    ap.add_argument("--probes", type=int, default=20, help="extra heartbeats per second from random idle agents")
    ap.add_argument("--ramp", type=float, default=5.0, help="agents start spread over this many seconds")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds after the ramp before measuring")
    ap.add_argument("--settle", type=float, default=2.0, help="pause between scenarios")
    ap.add_argument("--deadline", type=float, default=300.0, help="round deadline_s")
    ap.add_argument("--round-limit", type=float, default=240.0, help="give up on a round job after this")
    ap.add_argument("--dim", type=int, default=64, help="module width (4 modules, ranks 2/4/8)")
    ap.add_argument("--per-channel", type=int, default=40, help="agents per gRPC channel (each holds up to 2 streams)")
    ap.add_argument("--per-source", type=int, default=25, help="Register calls per source address")
    ap.add_argument("--per-token", type=int, default=100, help="agents per enrolment token")
    ap.add_argument("--enrol-parallel", type=int, default=32, help="Register calls in flight")
    ap.add_argument("--postgres", default=None, help="a dedicated database URL (its schema is dropped)")
    ap.add_argument("--redis", default=None, help="a dedicated Redis URL (flushed)")
    args = ap.parse_args()
    need = max([*args.idle, args.agents]) * 6 + 1024  # a socket per relay hop, channels, processes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard) if hard != resource.RLIM_INFINITY else need, hard))
    with tempfile.TemporaryDirectory(prefix="fedhl-fleet-") as tmp:
        overrides = dict(kv.split("=", 1) for kv in args.set)
        cluster = Cluster(Path(tmp), args.postgres, args.redis, overrides)
        try:
            cluster.start()
            log("backends, migrations and aggregator ready")
            asyncio.run(run(args, cluster))
        finally:
            cluster.close()
            if os.environ.get("FLEET_KEEP_LOGS"):
                for path in Path(tmp).glob("*.log"):
                    dst = Path(os.environ["FLEET_KEEP_LOGS"]) / path.name
                    dst.write_bytes(path.read_bytes())


if __name__ == "__main__":
    main()
