"""One scripted attacker among honest agents, over real gRPC, on both backends (issue 12).

Round 0: lying data sizes (just above the bound, 10**12, 2**64-1), a replayed header for
another round, metric flooding, a restart mid-upload, then a ×1000-scaled update (left out:
far above reject_k × median). The
attacker is then quarantined (three refusals) and an admin clears it. Round 1: 1e20 factors.
Round 2: a sign-flipped update claiming the largest size the job accepts (its size counts as
the round's median; the honest agents share a change direction, and the direction screen
leaves the flip out of every module by name). Round 3: the attacker uploads, is revoked before the merge, and its
upload is withdrawn. Every upload of the attacker claims `max_examples_per_agent`. Every
round commits; the attacker's effective weight stays within `max_weight_ratio / N` and within
the median agent's share; the report names it; the honest agents' uploads are merged.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from sqlalchemy import select

from fedhl.agent.client import AgentClient, Task
from fedhl.agent.scripted import ScriptedAgent, drift_direction
from fedhl.codec import decode_start, encode_update, load_state
from fedhl.coordinator.admin import AgentAdmin
from fedhl.coordinator.api.schemas import RoundPublic
from fedhl.coordinator.app import Coordinator
from fedhl.core import LoRAFactors
from fedhl.jobspec import JobSpec
from fedhl.metrics import REGISTRY
from fedhl.storage.db import transaction
from fedhl.storage.models import Agent, AuditEvent, Job, Round, RoundState
from fedhl.storage.repos import AgentRepo
from fedhl.v1 import agent_pb2
from stack import job_spec, running, settings_for

BOUND = 1000  # defence.max_examples_per_agent
DRIFT = 0.1  # the honest agents share a change of this size (and add their own noise of 0.05)
RATIO = 1.5  # defence.max_weight_ratio: with 4 uploads no agent weighs more than 0.375
SPEC = job_spec(
    n_layers=1,
    dim=8,
    ranks=[2],
    rounds=4,
    selection={"count": 4, "min_clients": 4, "deadline_s": 60, "quorum": 0.5},
    defence={"max_examples_per_agent": BOUND, "max_weight_ratio": RATIO, "quarantine_after": 3},
)


def counted(action: str, reason: str) -> float:
    return REGISTRY.get_sample_value("fedhl_defence_actions_total", {"action": action, "reason": reason}) or 0.0


def rejected(fn: object, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        fn()  # type: ignore[operator]
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w in (e.value.details() or ""), e.value.details()


def payload(start_bytes: bytes, scale: float, honest_seed: int = 99, round_: int | None = None) -> bytes:
    """The start factors moved by a small honest-looking step, times `scale`; with `round_`, the
    step includes the honest agents' shared change of that round (`DRIFT`), as theirs does."""
    start = decode_start(start_bytes)
    g = torch.Generator().manual_seed(honest_seed)
    out = {}
    for m, f in start.factors.items():
        dB, dA = 0.05 * torch.randn(f.B.shape, generator=g), 0.05 * torch.randn(f.A.shape, generator=g)
        if round_ is not None:
            sB, sA = drift_direction(round_, m, tuple(f.B.shape), tuple(f.A.shape))
            dB, dA = dB + DRIFT * sB, dA + DRIFT * sA
        out[m] = LoRAFactors(f.B + scale * dB, f.A + scale * dA)
    return encode_update(out, {k: v.clone() for k, v in start.extras.items()})


def huge(start_bytes: bytes) -> bytes:
    start = decode_start(start_bytes)
    out = {m: LoRAFactors(torch.full_like(f.B, 1e20), torch.full_like(f.A, 1e20)) for m, f in start.factors.items()}
    return encode_update(out, start.extras)


def header(task: Task, data: bytes, n: int, offset: int = 0, round_: int | None = None) -> object:
    return agent_pb2.UploadMessage(
        header=agent_pb2.UploadHeader(
            task_id=task.task_id,
            job_id=task.job_id,
            round=task.round if round_ is None else round_,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            offset=offset,
            n_examples=n,
        )
    )


def send(client: AgentClient, task: Task, data: bytes, n: int, upto: int | None = None, round_: int | None = None):  # type: ignore[no-untyped-def]
    msgs = [header(task, data, n, round_=round_), agent_pb2.UploadMessage(data=data[: upto or len(data)])]
    return client.stub.UploadUpdate(iter(msgs), metadata=client._md())


def wait(c: Coordinator, job_id: str, number: int, states: set[RoundState], timeout: float = 90) -> Round:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with transaction(c.deps.sessions) as s:
            r = s.scalars(
                select(Round).where(Round.job_id == job_id, Round.number == number).order_by(Round.id.desc())
            ).first()
            if r is not None and r.state in states:
                return r
        time.sleep(0.05)
    raise AssertionError(f"round {number} of job {job_id} did not reach {states}")


def pull(client: AgentClient) -> Task:
    for _ in range(60):
        task = client.pull_task(2)
        if task is not None:
            return task
    raise AssertionError("no task for the attacker")


def named(report: dict[str, object]) -> set[str]:
    return {d["client"] for d in report["dropped"]} | {c["client"] for c in report["clipped"]}  # type: ignore[index,union-attr]


def check_round(c: Coordinator, rnd: Round, attacker: str, honest: list[str], *, must_name: bool) -> dict[str, object]:
    assert rnd.state is RoundState.COMMITTED, rnd.error
    report = rnd.report
    assert report is not None
    assert set(honest) <= set(report["clients"])  # honest agents are merged
    eff = report["effective_weights"]
    if attacker in report["clients"]:
        assert eff[attacker] <= RATIO / len(report["clients"]) + 1e-9
        # its claim of BOUND counts as the round's median size (defence.size_k = 1, the default):
        # the lower median of 40, 41, 42 and BOUND is 41, and so is the largest honest size after it
        sizes = {r["client"]: r for r in report["sizes_bounded"]}  # type: ignore[union-attr]
        assert sizes[attacker] == {"client": attacker, "reported": BOUND, "bounded": 41.0, "bound": 41.0}
        assert set(sizes) == {attacker, honest[2]}  # honest-2 reported 42: counted as 41, named, merged
        assert eff[attacker] <= 41 / (40 + 41 + 41 + 41) + 1e-9  # no more than the median agent's share
    if must_name:
        assert attacker in named(report), report
    for h in honest:
        assert h not in named(report), (h, report["dropped"], report["clipped"])
    with transaction(c.deps.sessions) as s:
        job = s.get(Job, rnd.job_id)
        assert job is not None and job.state_key is not None
        key = job.state_key
    with c.deps.blobs.local_path(key) as path:
        for name, t in load_state(path).tensors().items():
            assert bool(torch.isfinite(t).all()), name
    return report


@pytest.mark.parametrize("backend", ["sqlite+inprocess", "postgres+redis"])
def test_one_hostile_agent_among_honest_ones(backend: str, tmp_path: Path) -> None:
    with running(settings_for(backend, tmp_path)) as c:
        job = c.jobs.create(JobSpec.model_validate(SPEC))
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 10, None)
        address = f"127.0.0.1:{c.grpc_port}"
        # the honest agents take a moment to "train", so the attacker's moves land first
        good = [
            ScriptedAgent(address, tok, f"honest-{i}", n_examples=40 + i, noise=0.05, seed=i, delay_s=1.0, drift=DRIFT)
            for i in range(3)
        ]
        stop = threading.Event()
        threads = [threading.Thread(target=a.run, args=(stop, 1), daemon=True) for a in good]
        evil = AgentClient(address)
        attacker, _ = evil.register(tok, "attacker")
        honest = [a.agent_id for a in good]
        for t in threads:
            t.start()
        try:
            # -- round 0: refusals at the edge, then a ×1000 update
            refused_before = counted("refused", "n_examples_above_bound")
            dropped_before = counted("dropped", "update_norm_above_bound")
            task = pull(evil)
            start = evil.download(task.blobs[0][0])
            data = payload(start, 1000.0)
            for n in (BOUND + 1, 10**12, 5 * BOUND):
                rejected(
                    lambda n=n: send(evil, task, data, n), grpc.StatusCode.INVALID_ARGUMENT, "n_examples", str(BOUND)
                )
            rejected(lambda: send(evil, task, data, 2**64 - 1), grpc.StatusCode.INVALID_ARGUMENT, "n_examples")
            rejected(
                lambda: send(evil, task, data, 10, round_=task.round + 7), grpc.StatusCode.INVALID_ARGUMENT, "round"
            )
            flood = agent_pb2.ReportMetricsRequest(task_id=task.task_id, metrics={f"k{i}": 1.0 for i in range(1000)})
            rejected(lambda: evil.stub.ReportMetrics(flood, metadata=evil._md()), grpc.StatusCode.INVALID_ARGUMENT)
            long_key = agent_pb2.ReportMetricsRequest(task_id=task.task_id, metrics={"x" * 100_000: 1.0})
            rejected(lambda: evil.stub.ReportMetrics(long_key, metadata=evil._md()), grpc.StatusCode.INVALID_ARGUMENT)
            # a restart mid-upload: half the bytes, then a fresh process starts over from 0
            res = send(evil, task, data, BOUND, upto=len(data) // 2)
            assert not res.accepted and res.received == len(data) // 2
            restarted = AgentClient(address, credential=evil.credential)
            assert restarted.pull_task(1) is not None  # the same task again
            restarted.upload(task, data, BOUND)
            restarted.close()
            rnd = wait(c, job.id, 0, {RoundState.COMMITTED, RoundState.FAILED})
            report = check_round(c, rnd, attacker, honest, must_name=True)
            # ×1000 is far above reject_k (30) × median: left out by name, not clipped
            assert any(
                x["client"] == attacker and x["reason"] == "update_norm_above_bound"
                for x in report["dropped"]  # type: ignore[union-attr]
            )
            assert report["effective_weights"][attacker] == 0.0  # type: ignore[index]
            assert counted("refused", "n_examples_above_bound") == refused_before + 3
            assert counted("dropped", "update_norm_above_bound") >= dropped_before + 1
            assert RoundPublic.of(rnd).defence["agents"] == 2  # REST: the attacker and honest-2's size
            assert RoundPublic.of(rnd).defence["sizes_bounded"] == 2
            with transaction(c.deps.sessions) as s:
                refusals = s.scalars(select(AuditEvent).where(AuditEvent.action == "upload_refused")).all()
                assert {e.actor for e in refusals} == {f"agent:{attacker}"}
                assert {e.details["reason"] for e in refusals} == {"n_examples_above_bound"}
                # the ×1000 update is far above reject_k × median: a strike; honest clips would not be
                bounded = s.scalars(select(AuditEvent).where(AuditEvent.action == "upload_bounded")).all()
                assert {(e.details["agent_id"], e.details["strike"]) for e in bounded} == {(attacker, True)}
                agent = s.get(Agent, attacker)
                assert agent is not None and agent.quarantine_rounds > 0  # three refusals
            time.sleep(0.5)
            with transaction(c.deps.sessions) as s:  # not selected while quarantined (4 needed)
                assert s.scalars(select(Round).where(Round.job_id == job.id, Round.number == 1)).first() is None
            AgentAdmin(c.deps).clear_quarantine(attacker)

            # -- round 1: 1e20 factors are dropped (or clipped) by name
            task = pull(evil)
            evil.upload(task, huge(evil.download(task.blobs[0][0])), BOUND)
            check_round(
                c, wait(c, job.id, 1, {RoundState.COMMITTED, RoundState.FAILED}), attacker, honest, must_name=True
            )

            # -- round 2: a sign flip (of an honest-looking step, the round's shared change included)
            # at the size bound keeps its norm; the direction screen leaves it out of every module
            # by name with its cosine to the others (negative), and counts a strike
            sizes_before = counted("size_bounded", "n_examples_above_median_bound")
            against_before = counted("dropped", "update_against_round")
            task = pull(evil)
            evil.upload(task, payload(evil.download(task.blobs[0][0]), -1.0, round_=task.round), BOUND)
            rnd = wait(c, job.id, 2, {RoundState.COMMITTED, RoundState.FAILED})
            report = check_round(c, rnd, attacker, honest, must_name=True)
            against = [x for x in report["dropped"] if x["reason"] == "update_against_round"]  # type: ignore[union-attr]
            # the screen acts in the modules where the honest agents agree: with these scripted
            # agents that is most of them, but how much they agree depends on the ranks the round
            # drew (their start factors enter the update), so "every module" is not guaranteed
            modules = {x["module"] for x in against}
            assert modules and modules <= set(SPEC["module_shapes"]), against
            assert all(x["client"] == attacker and x["cosine"] < 0 for x in against), against  # never an honest one
            assert "cosine" in against[0]["detail"]
            if modules == set(SPEC["module_shapes"]):
                assert report["effective_weights"][attacker] == 0.0  # type: ignore[index]
            assert counted("dropped", "update_against_round") == against_before + len(against)
            assert counted("size_bounded", "n_examples_above_median_bound") == sizes_before + 2
            with transaction(c.deps.sessions) as s:
                bounded = s.scalars(select(AuditEvent).where(AuditEvent.action == "upload_bounded")).all()
                in_round = [(e.details["agent_id"], e.details["strike"]) for e in bounded if e.details["round"] == 2]
                # a strike when left out of at least 3/4 of the LoRA modules
                assert in_round == [(attacker, 4 * len(modules) >= 3 * len(SPEC["module_shapes"]))]

            # -- round 3: upload, then revocation before the merge withdraws it
            task = pull(evil)
            evil.upload(task, payload(evil.download(task.blobs[0][0]), 1.0), BOUND)
            AgentAdmin(c.deps).revoke_agent(attacker)
            rejected(lambda: evil.pull_task(1), grpc.StatusCode.PERMISSION_DENIED)
            again = payload(start, 1.0)
            rejected(lambda: send(evil, task, again, BOUND), grpc.StatusCode.PERMISSION_DENIED)  # after revocation
            rnd = wait(c, job.id, 3, {RoundState.COMMITTED, RoundState.FAILED})
            report = check_round(c, rnd, attacker, honest, must_name=False)
            assert attacker not in report["clients"]
            with transaction(c.deps.sessions) as s:
                withdrawn = s.scalars(select(AuditEvent).where(AuditEvent.action == "upload_withdrawn")).all()
                assert [e.details["agent_id"] for e in withdrawn] == [attacker]
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for a in good:
                a.close()
            evil.close()
