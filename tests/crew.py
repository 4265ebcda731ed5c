"""Scripted agents working in threads against a coordinator, and waiting for round states:
shared by the aggregation and fault tests."""

from __future__ import annotations

import dataclasses
import threading
import time

from sqlalchemy import select

from fedhl.agent.scripted import ScriptedAgent
from fedhl.coordinator.app import Coordinator
from fedhl.storage.db import transaction
from fedhl.storage.models import Round, RoundState
from fedhl.storage.repos import AgentRepo


def token(c: Coordinator, uses: int = 10) -> str:
    with transaction(c.deps.sessions) as s:
        tok, _ = AgentRepo(s).create_token("test", uses, None)
    return tok


@dataclasses.dataclass
class Crew:
    agents: list[ScriptedAgent]
    stop: threading.Event
    threads: list[threading.Thread]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        for a in self.agents:
            a.close()


def crew(address: str, tok: str, n: int, cls: type[ScriptedAgent] = ScriptedAgent) -> Crew:
    agents = [cls(address, tok, f"agent-{i}", n_examples=40 + 7 * i, noise=0.05, seed=i) for i in range(n)]
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop, 1), daemon=True) for a in agents]
    for t in threads:
        t.start()
    return Crew(agents, stop, threads)


def wait_round(c: Coordinator, job_id: str, states: set[RoundState], timeout: float = 60) -> Round:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with transaction(c.deps.sessions) as s:
            rounds = s.scalars(select(Round).where(Round.job_id == job_id).order_by(Round.id)).all()
            hit = [r for r in rounds if r.state in states]
            if hit:
                return hit[-1]
        time.sleep(0.05)
    raise AssertionError(f"no round of job {job_id} reached {states}")


def wait_agents(c: Coordinator, n: int, timeout: float = 60) -> None:
    """Until `n` agents have enrolled: a round opens as soon as min_clients agents are live, so a
    test that needs a given agent in the first round creates the job only after this."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with transaction(c.deps.sessions, read_only=True) as s:
            if len(AgentRepo(s).active_ids()) >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} agents enrolled in {timeout} s")
