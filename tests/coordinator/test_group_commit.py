"""Group commit (coordinator/batcher.py): the batcher alone, then the batched claim and accept
of the agent plane on both backends, with every way an item of a batch can be wrong beside
good ones. A bad item gets its own precise error and changes nothing; the others go through."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import select

from fedhl.agent.client import AgentClient
from fedhl.coordinator.admin import AgentAdmin
from fedhl.coordinator.agents import Accept, UploadHeader, UploadResult
from fedhl.coordinator.batcher import Batcher, Full
from fedhl.coordinator.errors import Code, ServiceError
from fedhl.jobspec import JobSpec
from fedhl.storage.db import transaction
from fedhl.storage.models import Assignment, AssignmentState, AuditEvent, Round, RoundState, Update
from fedhl.storage.repos import AgentRepo
from stack import BACKENDS, job_spec, running, settings_for

# ---------------------------------------------------------------- the batcher alone


def test_a_burst_shares_batches_and_each_item_gets_its_own_result() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def double(items: Sequence[int]) -> list[int | Exception]:
        gate.wait(5)  # the first batch holds the worker while the rest queue
        sizes.append(len(items))
        return [2 * i for i in items]

    b: Batcher[int, int] = Batcher("t", double, workers=1, max_batch=64)
    futs = [b.submit(0)]
    deadline = time.monotonic() + 5
    while b.backlog() and time.monotonic() < deadline:  # the worker holds the first item alone
        time.sleep(0.01)
    futs += [b.submit(i) for i in range(1, 100)]
    gate.set()
    assert [f.result(5) for f in futs] == [2 * i for i in range(100)]
    assert sum(sizes) == 100 and len(sizes) <= 3 and max(sizes) == 64  # 1 alone, then 64, then the rest
    b.close()


def test_one_bad_item_never_fails_the_others() -> None:
    calls: list[list[int]] = []

    def strict(items: Sequence[int]) -> list[int | Exception]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("13 is refused")
        return [i + 1 for i in items]

    gate = threading.Event()
    b: Batcher[int, int] = Batcher("t", lambda xs: (gate.wait(5), strict(xs))[1], workers=1)
    futs = {i: b.submit(i) for i in (1, 13, 2, 3)}
    gate.set()
    assert futs[1].result(5) == 2 and futs[2].result(5) == 3 and futs[3].result(5) == 4
    with pytest.raises(ValueError, match="13 is refused"):
        futs[13].result(5)
    assert [13] in calls  # the failed batch was rerun item by item
    b.close()


def test_an_item_error_is_returned_not_raised_and_a_short_answer_is_an_error() -> None:
    b: Batcher[int, int] = Batcher("t", lambda xs: [ValueError(f"no {x}") if x < 0 else x for x in xs])
    assert b.run(4) == 4
    with pytest.raises(ValueError, match="no -1"):
        b.run(-1)
    short: Batcher[int, int] = Batcher("short", lambda xs: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        short.run(1)
    b.close()
    short.close()


def test_the_queue_is_bounded_and_close_drains_it() -> None:
    gate = threading.Event()
    b: Batcher[int, int] = Batcher("t", lambda xs: (gate.wait(5), list(xs))[1], workers=1, max_queue=3)
    first = b.submit(0)
    deadline = time.monotonic() + 5
    while b.backlog() and time.monotonic() < deadline:  # the worker took the first item
        time.sleep(0.01)
    queued = [b.submit(i) for i in (1, 2, 3)]
    with pytest.raises(Full):
        b.submit(4)
    gate.set()
    b.close()
    assert first.result(1) == 0 and [f.result(1) for f in queued] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(5)


def test_no_thread_until_first_use() -> None:
    before = threading.active_count()
    b: Batcher[int, int] = Batcher("idle", lambda xs: list(xs), workers=3)
    assert threading.active_count() == before
    assert b.run(1) == 1
    b.close()


# ---------------------------------------------------------------- claims and accepts, both backends


def header(task_id: str, job_id: str, number: int) -> UploadHeader:
    return UploadHeader(task_id=task_id, job_id=job_id, round=number, size=10, sha256="0" * 64, offset=0, n_examples=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_claims_and_accepts_on_a_real_round(backend: str, tmp_path: Path) -> None:
    spec = job_spec(rounds=1, selection={"count": 4, "min_clients": 4, "deadline_s": 120})
    with running(settings_for(backend, tmp_path)) as c:
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 10, None)
        clients = [AgentClient(f"127.0.0.1:{c.grpc_port}") for _ in range(5)]
        agents = [cl.register(tok, f"a{i}")[0] for i, cl in enumerate(clients)]
        job = c.jobs.create(JobSpec.model_validate(spec))
        deadline = time.monotonic() + 60
        rows: list[Assignment] = []
        while len(rows) < 4 and time.monotonic() < deadline:
            with transaction(c.deps.sessions) as s:
                rows = list(s.scalars(select(Assignment)).all())
            time.sleep(0.05)
        assert len(rows) == 4, "the round did not open"
        task_of = {a.agent_id: a.id for a in rows}
        chosen = [a for a in agents if a in task_of]
        left_out = next(a for a in agents if a not in task_of)
        x, y, z, w = chosen

        # claims: two agents, one of them twice, and one without a task
        got = c.agents.claim_many([(x, {}), (y, {}), (x, {}), (left_out, {})])
        assert [getattr(t, "task_id", t) for t in got] == [task_of[x], task_of[y], task_of[x], None]
        with transaction(c.deps.sessions) as s:
            states = {a.agent_id: a.state for a in s.scalars(select(Assignment))}
        assert states[x] is states[y] is AssignmentState.RUNNING
        assert states[z] is states[w] is AssignmentState.ISSUED

        # accepts: a good one, the same task again, another agent's task, no such task
        jid = job.id
        items = [
            Accept(x, header(task_of[x], jid, 0), "k-x", 10),
            Accept(x, header(task_of[x], jid, 0), "k-x2", 10),
            Accept(y, header(task_of[z], jid, 0), "k-y", 10),
            Accept(y, header("nope", jid, 0), "k-n", 10),
            Accept(w, header(task_of[w], jid, 0), "k-w", 10),
        ]
        res = c.agents.accept_many(items)
        assert isinstance(res[0], UploadResult) and res[0].accepted and isinstance(res[4], UploadResult)
        codes = [r.code if isinstance(r, ServiceError) else None for r in res]
        assert codes == [None, Code.ALREADY_EXISTS, Code.PERMISSION_DENIED, Code.NOT_FOUND, None]
        again = c.agents.accept_many([Accept(x, header(task_of[x], jid, 0), "k-x3", 10)])
        assert isinstance(again[0], ServiceError) and again[0].code is Code.ALREADY_EXISTS
        with transaction(c.deps.sessions) as s:
            updates = {u.agent_id: u.blob_key for u in s.scalars(select(Update))}
            states = {a.agent_id: a.state for a in s.scalars(select(Assignment))}
            accepted = s.scalars(select(AuditEvent).where(AuditEvent.action == "upload_accepted")).all()
            rnd = s.scalars(select(Round)).one()
        assert updates == {x: "k-x", w: "k-w"}  # nothing from the refused items
        assert states[x] is states[w] is AssignmentState.UPLOADED
        assert states[z] is AssignmentState.ISSUED and states[y] is AssignmentState.RUNNING
        assert sorted(e.actor for e in accepted) == sorted([f"agent:{x}", f"agent:{w}"])
        assert rnd.state is RoundState.COLLECTING
        for cl in clients:
            cl.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_authentication_tells_each_credential_apart(backend: str, tmp_path: Path) -> None:
    with running(settings_for(backend, tmp_path)) as c:
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 10, None)
        clients = [AgentClient(f"127.0.0.1:{c.grpc_port}") for _ in range(3)]
        ids = [cl.register(tok, f"a{i}")[0] for i, cl in enumerate(clients)]
        creds = [cl.credential for cl in clients]
        assert all(creds)
        AgentAdmin(c.deps).revoke_agent(ids[2])
        good, other = creds[0], creds[1]
        wrong_secret = f"{ids[0]}.{'x' * 20}"
        res = c.agents.authenticate_many([good, wrong_secret, "no-dot", f"unknown.{'y' * 20}", creds[2], other])  # type: ignore[list-item]
        assert res[0] == ids[0] and res[5] == ids[1]
        codes = [r.code if isinstance(r, ServiceError) else None for r in res]
        assert codes == [None, *[Code.UNAUTHENTICATED] * 3, Code.PERMISSION_DENIED, None]
        # a fresh replica's cache: the credential checked by the batch is cached, the bad ones are not
        assert c.agents.cached_agent(good) == ids[0] and c.agents.cached_agent(wrong_secret) is None
        for cl in clients:
            cl.close()
