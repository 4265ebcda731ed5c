"""The agent plane under a mostly idle fleet, over real gRPC to a coordinator process (Postgres +
Redis, and SQLite + in-process): 300 agents hold PullTask long-polls while a few others
heartbeat, pull, download and upload. No call waits behind a long-poll (each finishes in a
small fraction of the wait length: a thread-per-call server with fewer threads than waiting
agents would hold them until a wait ended), the round commits, the idle agents see no error,
and one agent past its cap of concurrent calls is refused with RESOURCE_EXHAUSTED and a
retry-after while the others carry on."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest

from fedhl.agent.client import AgentClient, retry_after_s
from fedhl.codec import decode_start, encode_update
from fedhl.coordinator.limits import Kind
from fedhl.storage.db import transaction
from fedhl.storage.repos import AgentRepo
from fedhl.v1 import agent_pb2, agent_pb2_grpc
from stack import BACKENDS, Proc, env_for, free_port, job_spec, running, settings_for, wait_job

IDLE_AGENTS = 300
WORKERS = 3
WAIT_S = 20  # the idle agents' long-poll length
BOUND_S = WAIT_S / 4  # a call that queued behind a long-poll would take up to WAIT_S
PER_AGENT = 4  # FEDHL_GRPC_MAX_CALLS_PER_AGENT (the default)
AGENTS_PER_CHANNEL = 30  # below the server's 100 streams per connection
# channels of one process share a connection unless each has its own subchannel pool
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
T = TypeVar("T")


@contextmanager
def coordinator_process(backend: str, tmp: Path) -> Iterator[tuple[str, httpx.Client, httpx.Client]]:
    """(gRPC address, HTTP client at the root, HTTP client at the API) of a coordinator process."""
    settings = settings_for(
        backend,
        tmp,
        grpc_port=free_port(),
        pull_wait_max_s=float(WAIT_S),
        heartbeat_ttl_s=15.0,
        register_per_peer=1000,  # every agent of this test enrols from 127.0.0.1
        register_per_token=1000,
        grpc_max_calls_per_agent=PER_AGENT,
    )
    subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "migrate"], env=env_for(settings), check=True, capture_output=True
    )
    proc = Proc(settings, tmp / "coordinator.log")
    base, headers = f"http://127.0.0.1:{settings.http_port}", {"Authorization": f"Bearer {settings.admin_token}"}
    # a fresh connection per request: uvicorn closes idle keep-alive connections after 5 s, and a
    # request racing that close fails with ReadError
    fresh = httpx.Limits(max_keepalive_connections=0)
    http = httpx.Client(base_url=base, headers=headers, timeout=30, limits=fresh)
    api = httpx.Client(base_url=f"{base}/api/v1", headers=headers, timeout=30, limits=fresh)
    try:
        proc.start(timeout_s=180)  # imports take long on a loaded CI machine
        yield f"127.0.0.1:{settings.grpc_port}", http, api
    finally:
        http.close()
        api.close()
        proc.stop()  # also when it did not come up in time


def gauge(http: httpx.Client, name: str) -> float:
    """The sum of a metric's series on the coordinator's /metrics."""
    text = http.get("/metrics").raise_for_status().text
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def md(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


async def timed(latencies: list[float], call: Awaitable[T]) -> T:
    t0 = time.monotonic()
    try:
        return await call
    finally:
        latencies.append(time.monotonic() - t0)


async def register_all(channels: list[grpc.aio.Channel], token: str, names: list[str]) -> list[str]:
    gate = asyncio.Semaphore(16)

    async def one(i: int, name: str) -> str:
        stub = agent_pb2_grpc.AgentServiceStub(channels[i % len(channels)])
        async with gate:
            res = await stub.Register(agent_pb2.RegisterRequest(enrolment_token=token, name=name), timeout=30)
        return str(res.credential)

    return list(await asyncio.gather(*(one(i, n) for i, n in enumerate(names))))


async def idle_agent(stub: Any, credential: str, errors: list[str], tasks: list[str]) -> None:
    """Long-poll forever, like an agent with nothing to do (cancelled at the end)."""
    while True:
        try:
            res = await stub.PullTask(agent_pb2.PullTaskRequest(wait_seconds=WAIT_S), metadata=md(credential))
        except grpc.aio.AioRpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")
            await asyncio.sleep(1)
            continue
        if res.WhichOneof("result") == "task":
            tasks.append(res.task.task_id)


async def work_one_task(stub: Any, credential: str, latencies: list[float]) -> None:
    """What a selected agent does: heartbeat, pull its task, download, upload, heartbeat."""
    m = md(credential)
    await timed(latencies, stub.Heartbeat(agent_pb2.HeartbeatRequest(), metadata=m, timeout=30))
    res = await timed(latencies, stub.PullTask(agent_pb2.PullTaskRequest(wait_seconds=5), metadata=m, timeout=30))
    assert res.WhichOneof("result") == "task", "a worker selected by the open round got no task"
    task = res.task
    t0 = time.monotonic()
    data = b"".join(
        [
            msg.data
            async for msg in stub.DownloadBlob(
                agent_pb2.DownloadBlobRequest(key=task.blobs[0].key), metadata=m, timeout=30
            )
            if msg.WhichOneof("part") == "data"
        ]
    )
    latencies.append(time.monotonic() - t0)
    start = decode_start(data)
    payload = encode_update(start.factors, start.extras)
    header = agent_pb2.UploadHeader(
        task_id=task.task_id,
        job_id=task.job_id,
        round=task.round,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        n_examples=10,
    )

    async def messages() -> AsyncIterator[Any]:
        yield agent_pb2.UploadMessage(header=header)
        for i in range(0, len(payload), 1 << 16):
            yield agent_pb2.UploadMessage(data=payload[i : i + (1 << 16)])

    up = await timed(latencies, stub.UploadUpdate(messages(), metadata=m, timeout=30))
    assert up.accepted
    await timed(latencies, stub.Heartbeat(agent_pb2.HeartbeatRequest(), metadata=m, timeout=30))


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def scenario(address: str, http: httpx.Client, api: httpx.Client) -> None:
    token = api.post("/agents/enrolment-tokens", json={"label": "fleet", "uses": 400}).raise_for_status()
    token_text = token.json()["token"]
    n_channels = IDLE_AGENTS // AGENTS_PER_CHANNEL
    idle_channels = [grpc.aio.insecure_channel(address, CHANNEL_OPTIONS) for _ in range(n_channels)]
    worker_channels = [grpc.aio.insecure_channel(address, CHANNEL_OPTIONS) for _ in range(WORKERS + 1)]
    background: list[asyncio.Task[None]] = []
    try:
        # Prepare: the workers enrol and a one-round job selects exactly them (the only live agents)
        workers = await register_all(worker_channels[:WORKERS], token_text, [f"w{i}" for i in range(WORKERS)])
        spec = job_spec(rounds=1, selection={"count": WORKERS, "min_clients": WORKERS, "deadline_s": 120})
        job = api.post("/jobs", json=spec).raise_for_status().json()
        await until(
            lambda: any(r["state"] == "OPEN" for r in api.get(f"/jobs/{job['id']}/rounds").json()),
            30,
            "the round to open",
        )
        # ... then the idle fleet and one greedy agent enrol; the idle agents hold their waits
        names = [f"idle{i}" for i in range(IDLE_AGENTS)] + ["greedy"]
        *idle, greedy = await register_all(idle_channels, token_text, names)
        idle_errors: list[str] = []
        idle_tasks: list[str] = []
        for i, cred in enumerate(idle):
            stub = agent_pb2_grpc.AgentServiceStub(idle_channels[i % n_channels])
            background.append(asyncio.create_task(idle_agent(stub, cred, idle_errors, idle_tasks)))
        await until(lambda: gauge(http, "fedhl_agents_waiting") >= IDLE_AGENTS, 60, "300 open waits")

        # The greedy agent holds PER_AGENT upload streams that never send their header ...
        greedy_stub = agent_pb2_grpc.AgentServiceStub(worker_channels[WORKERS])
        hold = asyncio.Event()

        async def silent() -> AsyncIterator[Any]:
            await hold.wait()
            if False:  # an async generator that yields nothing
                yield agent_pb2.UploadMessage()

        streams = [greedy_stub.UploadUpdate(silent(), metadata=md(greedy)) for _ in range(PER_AGENT)]
        held = [asyncio.ensure_future(s) for s in streams]
        await until(lambda: gauge(http, 'fedhl_agent_calls_in_flight{kind="transfer"}') >= PER_AGENT, 30, "streams")
        # ... so its next call is refused, with a retry-after ...
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await greedy_stub.Heartbeat(agent_pb2.HeartbeatRequest(), metadata=md(greedy), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(refused.value.trailing_metadata() or ())
        assert float(trailing["retry-after"]) > 0

        # ... while the workers do a whole round next to 300 waits and the greedy agent's streams
        latencies: list[float] = []
        await asyncio.gather(
            *(
                work_one_task(agent_pb2_grpc.AgentServiceStub(worker_channels[i]), cred, latencies)
                for i, cred in enumerate(workers)
            )
        )
        assert (await asyncio.to_thread(wait_job, api, job["id"], "COMPLETED", 60))["status"] == "COMPLETED"
        assert len(latencies) == WORKERS * 5
        assert max(latencies) < BOUND_S, f"a call took {max(latencies):.2f} s next to {IDLE_AGENTS} waits"

        # The greedy agent's slots come back when its streams end
        for s in streams:
            s.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await until(lambda: gauge(http, 'fedhl_agent_calls_in_flight{kind="transfer"}') == 0, 30, "streams to end")
        await greedy_stub.Heartbeat(agent_pb2.HeartbeatRequest(), metadata=md(greedy), timeout=30)

        assert gauge(http, "fedhl_agents_waiting") >= IDLE_AGENTS  # the idle fleet still waits
        assert idle_errors == []
        assert idle_tasks == []  # the one round selected the workers only
    finally:
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for ch in idle_channels + worker_channels:
            await ch.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_fleet_does_not_hold_up_the_working_agents(backend: str, tmp_path: Path) -> None:
    with coordinator_process(backend, tmp_path) as (address, http, api):
        asyncio.run(scenario(address, http, api))


def test_global_transfer_cap_refuses_with_retry_after_and_other_calls_go_on(tmp_path: Path) -> None:
    """Two agents hold the only two transfer slots with silent upload streams: a third agent's
    download is refused RESOURCE_EXHAUSTED with a retry-after, its heartbeat is served, and
    the slots come back when the streams end."""
    settings = settings_for("sqlite+inprocess", tmp_path, grpc_max_transfers=2, register_per_peer=100)
    with running(settings) as c:
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 3, None)
        clients = [AgentClient(f"127.0.0.1:{c.grpc_port}", retries=0) for _ in range(3)]
        release = threading.Event()

        def silent() -> Iterator[Any]:
            release.wait(30)
            return
            yield  # a generator that sends nothing until released

        try:
            for i, client in enumerate(clients):
                client.register(tok, f"a{i}")
            held = [cl.stub.UploadUpdate.future(silent(), metadata=cl._md()) for cl in clients[:2]]
            assert c.plane is not None
            end = time.monotonic() + 30
            while c.plane.limits.open(Kind.TRANSFER) < 2:
                assert time.monotonic() < end, "the two streams were not admitted"
                time.sleep(0.05)
            third = clients[2]
            with pytest.raises(grpc.RpcError) as refused:
                third.download("0" * 64)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_after_s(refused.value) == settings.grpc_retry_after_s
            assert third.heartbeat() == "CONTINUE"  # short calls have their own cap
            release.set()
            for f in held:
                with pytest.raises(grpc.RpcError):
                    f.result(timeout=30)  # no header: INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as after:
                third.download("0" * 64)
            assert after.value.code() == grpc.StatusCode.PERMISSION_DENIED  # admitted again (not its blob)
        finally:
            release.set()
            for client in clients:
                client.close()


def test_a_crowd_past_the_database_backlog_is_refused_with_a_spread_retry_after(tmp_path: Path) -> None:
    """Twenty agents' first heartbeats (each needs a database read) arrive at once at a plane
    whose database backlog bound is 1: the calls past it are refused RESOURCE_EXHAUSTED at once,
    each with a retry-after inside the pacing period, and every agent is answered (no timeout)."""
    settings = settings_for("sqlite+inprocess", tmp_path, grpc_max_db_backlog=1, register_per_peer=100)
    with running(settings) as c:
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 20, None)
        address = f"127.0.0.1:{c.grpc_port}"

        async def crowd() -> list[Any]:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                creds = []
                for i in range(20):  # one at a time: Register's database work counts in the backlog too
                    req = agent_pb2.RegisterRequest(enrolment_token=tok, name=f"c{i}")
                    creds.append((await stub.Register(req, timeout=30)).credential)
                beat = agent_pb2.HeartbeatRequest(resources=agent_pb2.Resources(device_type="cuda"))
                calls = [stub.Heartbeat(beat, metadata=md(cred), timeout=30) for cred in creds]
                return list(await asyncio.gather(*calls, return_exceptions=True))

        answers = asyncio.run(crowd())
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert refused, "nobody was refused past a backlog of 1"
    assert len(refused) < len(answers)  # the first one was served
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert 1 <= float(dict(e.trailing_metadata() or ())["retry-after"]) <= 2  # 20 agents: a 2 s period
