"""FedHL's full view with the factored downlink, end to end over real gRPC: scripted agents
rebuild the global update from each round's change and must hold, bit for bit (module sha256),
the state the server checkpointed for that version — also an agent that sits rounds out (it gets
a chain of changes) and one whose held copy is corrupted (hash mismatch → dense state)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from crew import token, wait_agents
from fedhl.agent.scripted import ScriptedAgent
from fedhl.codec import load_state
from fedhl.coordinator.app import Coordinator
from fedhl.core.downlink import state_hashes
from fedhl.jobspec import JobSpec
from fedhl.storage.db import transaction
from fedhl.storage.models import Agent, Assignment, Job, JobStatus, Round, RoundState
from fedhl.storage.repos import CheckpointRepo
from stack import BACKENDS, job_spec, running, settings_for

DIM = 96  # factors of a round's change (K ≤ 12) are far smaller than a 96×96 module


def _open_round(c: Coordinator, job_id: str, number: int, timeout: float = 120) -> set[str]:
    """The agents assigned in the open round `number`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with transaction(c.deps.sessions, read_only=True) as s:
            rnd = s.scalars(
                select(Round).where(Round.job_id == job_id, Round.number == number, Round.state == RoundState.OPEN)
            ).first()
            if rnd is not None:
                return set(s.scalars(select(Assignment.agent_id).where(Assignment.round_id == rnd.id)).all())
        time.sleep(0.05)
    raise AssertionError(f"round {number} of job {job_id} did not open")


def _server_hashes(c: Coordinator, job_id: str, version: int) -> dict[str, str]:
    with transaction(c.deps.sessions, read_only=True) as s:
        key = CheckpointRepo(s).get(job_id, version).state_key
    with c.deps.blobs.local_path(key) as p:
        return state_hashes(load_state(p).dense)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit of the last module's values: the header still reads
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_agents_hold_the_servers_state_bit_for_bit(backend: str, tmp_path: Path) -> None:
    # Prepare: three agents at ranks 2, 2, 4; every available agent takes part
    # a long liveness TTL: an agent that sits a round out stays selectable however slow the machine
    settings = settings_for(backend, tmp_path, inprocess_aggregator=True, heartbeat_ttl_s=120.0)
    names = ["agent-a", "agent-b", "agent-c"]
    spec = job_spec(
        n_layers=2,
        dim=DIM,
        ranks=[2, 4],
        rounds=5,
        strategy="fedhl",
        strategy_options={"client_view": "full"},
        rank_policy={"kind": "fixed", "fixed": {"agent-a": 2, "agent-b": 2, "agent-c": 4}},
        selection={"min_clients": 2, "deadline_s": 60},
    )
    with running(settings) as c:
        address, tok = f"127.0.0.1:{c.grpc_port}", token(c)
        team = [
            ScriptedAgent(address, tok, n, n_examples=40 + 7 * i, noise=0.05, seed=i, cache_dir=tmp_path / n)
            for i, n in enumerate(names)
        ]
        b = team[1]
        try:
            wait_agents(c, 3)
            job = c.jobs.create(JobSpec.model_validate(spec))
            # Execute: rounds 0..4, B sits out rounds 2 and 3, C's held copy is corrupted after round 2
            for number in range(5):
                for agent in team:
                    agent.client.heartbeat()
                assigned = _open_round(c, job.id, number)
                if number == 1:  # B is quarantined for the next two rounds
                    with transaction(c.deps.sessions) as s:
                        row = s.get(Agent, b.agent_id)
                        assert row is not None
                        row.quarantine_rounds = 2
                if number == 3:
                    _corrupt(tmp_path / "agent-c" / f"{job.id}.safetensors")
                for agent in team:
                    if agent.agent_id in assigned:
                        assert agent.run_once(30), (agent.name, number)
            end = time.monotonic() + 120
            while time.monotonic() < end:
                with transaction(c.deps.sessions, read_only=True) as s:
                    row = s.get(Job, job.id)
                    assert row is not None
                    if row.status is JobStatus.COMPLETED:
                        break
                time.sleep(0.05)
            # Assert: every version an agent obtained is the server's checkpoint, bit for bit
            zeros = state_hashes({m: torch.zeros(DIM, DIM) for m in spec["module_shapes"]})  # type: ignore[union-attr]
            for agent in team:
                for got in agent.obtained:
                    want = zeros if got.round == 0 else _server_hashes(c, job.id, got.round)
                    assert state_hashes(got.modules) == want, (agent.name, got.round, got.route)
            routes = {ag.name: [(g.round, g.route, g.mismatch) for g in ag.obtained] for ag in team}
            assert routes["agent-a"] == [(0, "zeros", False)] + [(v, "chain", False) for v in range(1, 5)]
            assert routes["agent-b"] == [(0, "zeros", False), (1, "chain", False), (4, "chain", False)]
            assert routes["agent-c"][3] == (3, "state", True)  # corrupted copy → dense state
            assert routes["agent-c"][4] == (4, "chain", False)  # and back on the factored path
            chain_b = b.obtained[-1].bytes  # three changes, still less than the dense state
            with transaction(c.deps.sessions, read_only=True) as s:
                state_key = CheckpointRepo(s).get(job.id, 4).state_key
                report = s.scalars(select(Round).where(Round.job_id == job.id, Round.number == 3)).one().report
            assert 0 < chain_b < c.deps.blobs.size(state_key)
            assert report is not None and report["downlink"]["client_view"] == "full"
            per_rank = report["downlink"]["per_rank_bytes"]
            assert set(per_rank) == {"2", "4"} and per_rank["2"] < report["downlink"]["state_bytes"]
        finally:
            for agent in team:
                agent.close()
