"""The agent protocol over real gRPC on loopback, against Postgres + Redis and against SQLite +
in-process: authentication, revocation, and malformed uploads — each gets a precise status and
leaves every stored state unchanged."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save

from fedhl.agent.client import AgentClient, Task
from fedhl.codec import decode_start, encode_update
from fedhl.coordinator.admin import AgentAdmin
from fedhl.coordinator.app import Coordinator
from fedhl.coordinator.errors import Code, ServiceError
from fedhl.core import LoRAFactors
from fedhl.jobspec import JobSpec
from fedhl.storage.db import transaction
from fedhl.storage.models import RoundState
from fedhl.storage.repos import AgentRepo, RoundRepo
from fedhl.v1 import agent_pb2, agent_pb2_grpc
from stack import (
    BACKENDS,
    job_spec,
    running,
    settings_for,
    snapshot,
)


def token(c: Coordinator, uses: int = 10) -> str:
    with transaction(c.deps.sessions) as s:
        tok, _ = AgentRepo(s).create_token("test", uses, None)
    return tok


def wait_task(client: AgentClient, timeout: float = 20) -> Task:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        task = client.pull_task(wait_s=2)
        if task is not None:
            return task
    raise AssertionError("no task was assigned")


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Coordinator, str]]:
    with running(settings_for(request.param, tmp_path)) as c:
        yield c, f"127.0.0.1:{c.grpc_port}"


def test_unauthenticated_and_revoked_calls_are_refused(world: tuple[Coordinator, str]) -> None:
    c, addr = world
    stub = agent_pb2_grpc.AgentServiceStub(grpc.insecure_channel(addr))
    with pytest.raises(grpc.RpcError) as e:
        stub.PullTask(agent_pb2.PullTaskRequest(wait_seconds=0))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.PullTask(agent_pb2.PullTaskRequest(wait_seconds=0), metadata=[("authorization", "Bearer nope.nope")])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(agent_pb2.RegisterRequest(enrolment_token="fedhl-enrol-wrong", name="x"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    client = AgentClient(addr)
    agent_id, _ = client.register(token(c), "a")
    assert client.heartbeat() == "CONTINUE"
    AgentAdmin(c.deps).revoke_agent(agent_id)  # the credential is cached now: revocation must reach the cache
    with pytest.raises(grpc.RpcError) as e:
        client.heartbeat()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_enrolment_token_is_single_use(world: tuple[Coordinator, str]) -> None:
    c, addr = world
    tok = token(c, uses=1)
    AgentClient(addr).register(tok, "first")
    with pytest.raises(grpc.RpcError) as e:
        AgentClient(addr).register(tok, "second")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "used up" in (e.value.details() or "")


def _stream(header: dict[str, Any], chunks: list[bytes], first: str = "header") -> Iterator[Any]:
    if first == "header":
        yield agent_pb2.UploadMessage(header=agent_pb2.UploadHeader(**header))
    for ch in chunks:
        yield agent_pb2.UploadMessage(data=ch)


def test_malformed_uploads_get_precise_status_and_change_nothing(world: tuple[Coordinator, str]) -> None:
    c, addr = world
    job = c.jobs.create(
        JobSpec.model_validate(job_spec(rounds=1, selection={"count": 2, "min_clients": 2, "deadline_s": 120}))
    )
    tok = token(c)
    a, b = AgentClient(addr), AgentClient(addr)
    a.register(tok, "a")
    b.register(tok, "b")
    a.heartbeat()
    b.heartbeat()
    task = wait_task(a)
    other = wait_task(b)
    start = decode_start(a.download(task.blobs[0][0]))
    good = {m: LoRAFactors(f.B.clone(), f.A.clone()) for m, f in start.factors.items()}
    extras = {k: v.clone() for k, v in start.extras.items()}
    r = task.rank
    m0 = next(iter(good))

    def payload(
        factors: dict[str, LoRAFactors] | None = None,
        ex: dict[str, torch.Tensor] | None = None,
        raw: dict[str, torch.Tensor] | None = None,
    ) -> bytes:
        if raw is not None:
            return save(raw)
        return encode_update(factors if factors is not None else good, ex if ex is not None else extras)

    def with_module(f: LoRAFactors) -> dict[str, LoRAFactors]:
        return {**good, m0: f}

    def header(data: bytes, **over: Any) -> dict[str, Any]:
        h = {
            "task_id": task.task_id,
            "job_id": task.job_id,
            "round": task.round,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "offset": 0,
            "n_examples": 10,
        }
        h.update(over)
        return h

    def chunks(data: bytes) -> list[bytes]:
        return [data[i : i + 4096] for i in range(0, len(data), 4096)]

    ok = payload()
    wrong_rank = payload(with_module(LoRAFactors(torch.zeros(16, r + 1), torch.zeros(r + 1, 16))))
    nan = payload(with_module(LoRAFactors(good[m0].B.clone().fill_(float("nan")), good[m0].A)))
    inf = payload(with_module(LoRAFactors(good[m0].B, good[m0].A.clone().fill_(float("inf")))))
    missing = payload({k: v for k, v in good.items() if k != m0})
    unknown = payload(ex={**extras, "sneaky.weight": torch.zeros(2)})
    int_dtype = payload(
        raw={
            **{f"lora_B::{m}": f.B.to(torch.int32) for m, f in good.items()},
            **{f"lora_A::{m}": f.A for m, f in good.items()},
            **{f"extra::{k}": v for k, v in extras.items()},
        }
    )
    bad_extra_shape = payload(ex={k: torch.zeros(3, 3) for k in extras})
    garbage = b"\x00" * len(ok)

    md = [("authorization", f"Bearer {a.credential}")]
    stub = agent_pb2_grpc.AgentServiceStub(grpc.insecure_channel(addr))
    cases: list[tuple[str, Callable[[], Any], grpc.StatusCode]] = [
        (
            "wrong rank",
            lambda: stub.UploadUpdate(_stream(header(wrong_rank), chunks(wrong_rank)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "NaN",
            lambda: stub.UploadUpdate(_stream(header(nan), chunks(nan)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "Inf",
            lambda: stub.UploadUpdate(_stream(header(inf), chunks(inf)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "missing module",
            lambda: stub.UploadUpdate(_stream(header(missing), chunks(missing)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "unknown tensor",
            lambda: stub.UploadUpdate(_stream(header(unknown), chunks(unknown)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "int dtype",
            lambda: stub.UploadUpdate(_stream(header(int_dtype), chunks(int_dtype)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "extra shape",
            lambda: stub.UploadUpdate(_stream(header(bad_extra_shape), chunks(bad_extra_shape)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "not safetensors",
            lambda: stub.UploadUpdate(_stream(header(garbage), chunks(garbage)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "sha mismatch",
            lambda: stub.UploadUpdate(_stream(header(ok, sha256="0" * 64), chunks(ok)), metadata=md),
            grpc.StatusCode.DATA_LOSS,
        ),
        (
            "longer than declared",
            lambda: stub.UploadUpdate(_stream(header(ok, size=len(ok) - 10), chunks(ok)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "oversized declaration",
            lambda: stub.UploadUpdate(_stream(header(ok, size=1 << 40), []), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "unknown task",
            lambda: stub.UploadUpdate(_stream(header(ok, task_id="f" * 32), chunks(ok)), metadata=md),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "someone else's task",
            lambda: stub.UploadUpdate(_stream(header(ok, task_id=other.task_id), chunks(ok)), metadata=md),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            "wrong round",
            lambda: stub.UploadUpdate(_stream(header(ok, round=task.round + 3), chunks(ok)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "zero examples",
            lambda: stub.UploadUpdate(_stream(header(ok, n_examples=0), chunks(ok)), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "bad resume offset",
            lambda: stub.UploadUpdate(_stream(header(ok, offset=100), chunks(ok)[1:]), metadata=md),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            "no header",
            lambda: stub.UploadUpdate(_stream({}, chunks(ok), first="data"), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("no credential", lambda: stub.UploadUpdate(_stream(header(ok), chunks(ok))), grpc.StatusCode.UNAUTHENTICATED),
    ]
    before = snapshot(c, job.id)
    for name, call, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, f"{name}: {e.value.code()} {e.value.details()}"
        assert e.value.details(), name
        assert snapshot(c, job.id) == before, f"{name} changed the stored state"
        assert c.deps.blobs.staging_size(task.task_id) == 0, f"{name} left staged bytes"

    # the same agent can still upload correctly, exactly once
    a.upload(task, ok, n_examples=10)
    after = snapshot(c, job.id)
    assert after.updates == before.updates + 1
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadUpdate(_stream(header(ok), chunks(ok)), metadata=md)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert snapshot(c, job.id) == after


def test_upload_resumes_after_a_dropped_stream(world: tuple[Coordinator, str]) -> None:
    c, addr = world
    c.jobs.create(JobSpec.model_validate(job_spec(rounds=1, selection={"count": 1, "deadline_s": 120})))
    client = AgentClient(addr)
    client.register(token(c), "a")
    client.heartbeat()
    task = wait_task(client)
    start = decode_start(client.download(task.blobs[0][0]))
    data = encode_update(start.factors, start.extras)
    half = len(data) // 2
    stub = agent_pb2_grpc.AgentServiceStub(grpc.insecure_channel(addr))
    md = [("authorization", f"Bearer {client.credential}")]
    h = {
        "task_id": task.task_id,
        "job_id": task.job_id,
        "round": task.round,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "offset": 0,
        "n_examples": 5,
    }
    res = stub.UploadUpdate(_stream(h, [data[:half]]), metadata=md)  # the stream ends early
    assert not res.accepted and res.received == half
    assert client.upload_status(task.task_id) == half
    res = stub.UploadUpdate(_stream({**h, "offset": half}, [data[half:]]), metadata=md)
    assert res.accepted and res.received == len(data)


def test_register_rate_limits_are_per_peer_and_per_token(world: tuple[Coordinator, str]) -> None:
    """A caller flooding Register with bad tokens spends its own budget only: other peers still
    enrol; malformed requests are refused before any budget is spent."""
    c, addr = world
    svc = c.agents
    for _ in range(5):  # cheap validation first: no bucket spent
        with pytest.raises(ServiceError) as e:
            svc.register("", "x", {}, peer="ipv4:10.0.0.1:1000")
        assert e.value.code is Code.INVALID_ARGUMENT
    codes = []
    for i in range(40):
        try:
            svc.register(f"fedhl-enrol-bad{i}", "x", {}, peer=f"ipv4:10.0.0.1:{2000 + i}")  # new port each time
        except ServiceError as e:
            codes.append(e.code)
    assert codes[:30] == [Code.PERMISSION_DENIED] * 30 and set(codes[30:]) == {Code.RESOURCE_EXHAUSTED}
    client = AgentClient(addr)  # a different peer (loopback) still enrols
    agent_id, _ = client.register(token(c), "good")
    assert agent_id
    client.close()


def test_report_metrics_is_bounded_atomic_and_refused_on_closed_rounds(world: tuple[Coordinator, str]) -> None:
    c, addr = world
    job = c.jobs.create(JobSpec.model_validate(job_spec(selection={"count": 2, "min_clients": 2, "deadline_s": 60})))
    tok = token(c)
    clients = [AgentClient(addr) for _ in range(2)]
    ids = [cl.register(tok, f"m{i}")[0] for i, cl in enumerate(clients)]
    tasks = [wait_task(cl) for cl in clients]

    def report(cl: AgentClient, task: Task, values: dict[str, float], step: int = 1) -> None:
        req = agent_pb2.ReportMetricsRequest(task_id=task.task_id, metrics=values, step=step)
        cl.stub.ReportMetrics(req, metadata=cl._md())

    for bad in ({f"k{i}": 1.0 for i in range(33)}, {"k" * 65: 1.0}, {"loss": float("nan")}, {"": 1.0}):
        with pytest.raises(grpc.RpcError) as e:
            report(clients[0], tasks[0], bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # two agents reporting at once: neither loses the other's entry (row lock / serialised writer)
    errors: list[BaseException] = []

    def spam(k: int) -> None:
        try:
            for step in range(15):
                report(clients[k], tasks[k], {"loss": float(step)}, step)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=spam, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with transaction(c.deps.sessions) as s:
        rnd = RoundRepo(s).active(job.id)
        assert rnd is not None
        assert {k: v["step"] for k, v in rnd.metrics.items()} == dict.fromkeys(ids, 14)
        rnd.state = RoundState.FAILED
    with pytest.raises(grpc.RpcError) as e:
        report(clients[0], tasks[0], {"loss": 1.0})
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for cl in clients:
        cl.close()
