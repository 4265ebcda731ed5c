"""Event-driven PullTask waits: one registry per coordinator process, keyed by agent id, woken
by the task events every replica receives (Redis pub/sub, or the in-process channel).

A round that opens publishes the ids of the agents it selected on TASK_EVENTS (`task_events`);
each replica wakes exactly those of its waiting agents, and each of them reads the database
once. An event without an `agents` list wakes every waiter. Events are hints; the guarantee is
the plane's *sweep*: every `pull_recheck_s`, one query lists every agent with a task to claim
(`AgentService.pending_agents`) and wakes those (`Waiters.swept`), so a lost event delays a
task by at most one sweep, and an idle agent costs no query at all: its wait starts without a
read when its last read found nothing and no event or sweep has named it since. While sweeps
fail (the database away), waits fall back to a read at their start and every `pull_recheck_s`.

`Waiters` lives on the agent plane's event loop; `WakeRelay` is the thread that reads the
event subscription and hands wake-ups to that loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..backends import AGENT_REVOKED, TASK_EVENTS
from ..metrics import AGENT_WAKEUPS as WAKEUPS
from ..metrics import AGENTS_WAITING as WAITING
from ..storage.coordination import Events, Subscription
from ..supervise import LoopState, supervise

log = logging.getLogger(__name__)

EVENT_AGENTS_MAX = 1000  # agent ids per published event (a 1,000-agent round: one ≈ 37 kB message)


def task_events(job_id: str, agents: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The TASK_EVENTS messages that wake `agents` (several for a large round)."""
    ids = list(agents)
    for i in range(0, len(ids), EVENT_AGENTS_MAX):
        yield {"type": "tasks_assigned", "job_id": job_id, "agents": ids[i : i + EVENT_AGENTS_MAX]}


class Waiter:
    """One open PullTask: `event` is set when it should read the database again (its claim
    goes through the claim batcher either way)."""

    __slots__ = ("event", "superseded")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.superseded = False


class Waiters:
    """At most one open wait per agent: a new PullTask of the same agent supersedes the older
    one, which answers `no_task` at once (a reconnected agent never waits behind its ghost)."""

    def __init__(self, sweep_s: float = 15.0) -> None:
        self._by_agent: dict[str, Waiter] = {}
        self.sweep_s = sweep_s  # how often the plane sweeps (pull_recheck_s)
        self.last_sweep: float | None = None  # loop time of the last successful sweep
        self._seq = 0  # wake events seen (sweeps included)
        self._all_seq = 0  # the last event that named no one (wakes everyone)
        self._named: dict[str, int] = {}  # agent -> the last event that named it
        self._empty: dict[str, int] = {}  # agent -> the event count when its last read found nothing
        self._sweep_mark = 0  # the event count when the last successful sweep's query started

    def __len__(self) -> int:
        return len(self._by_agent)

    def register(self, agent_id: str) -> Waiter:
        old = self._by_agent.get(agent_id)
        if old is not None:
            old.superseded = True
            old.event.set()
        w = self._by_agent[agent_id] = Waiter()
        WAITING.set(len(self._by_agent))
        return w

    def unregister(self, agent_id: str, w: Waiter) -> None:
        if self._by_agent.get(agent_id) is w:
            del self._by_agent[agent_id]
            WAITING.set(len(self._by_agent))

    def _bound(self) -> int:
        return 4 * max(len(self._by_agent), 1024)

    def swept_recently(self, now: float) -> bool:
        """Whether the sweep is working (its last success less than two periods ago)."""
        return self.last_sweep is not None and now - self.last_sweep < 2 * self.sweep_s + 1.0

    def recheck_s(self, now: float) -> float | None:
        """How often an open wait must re-read by itself: never while the sweep works."""
        return None if self.swept_recently(now) else self.sweep_s

    def read_mark(self) -> int:
        """Take before a read whose answer may be `note_empty`: an event during it wins."""
        return self._seq

    def note_empty(self, agent_id: str, mark: int) -> None:
        if len(self._empty) >= self._bound():  # bounded: forget them all, each reads once more
            self._empty.clear()
        self._empty[agent_id] = mark

    def needs_read(self, agent_id: str, now: float) -> bool:
        """False when the sweep works and no event or sweep has named this agent (or everyone)
        since its last empty read, or, for an agent that never read here, since the last sweep
        started (which would have named it had it had a task): a replica that restarts does not
        read once per agent of its fleet."""
        if not self.swept_recently(now):
            return True
        last = self._empty.get(agent_id, self._sweep_mark)
        return max(self._named.get(agent_id, 0), self._all_seq) > last

    def swept(self, pending: Iterable[str], now: float, mark: int) -> int:
        """A sweep's answer: wake (and mark) every agent with a task; → how many were waiting.
        `mark`: `read_mark()` taken before its query (an event during the query still counts)."""
        woken = self.wake(pending)
        self.last_sweep, self._sweep_mark = now, mark
        return woken

    def wake(self, agent_ids: Iterable[str] | None) -> int:
        """Wake these agents' waits (None: all of them); returns how many were waiting here."""
        self._seq += 1
        if agent_ids is None:
            self._all_seq = self._seq
            woken = list(self._by_agent.values())
        else:
            ids = list(agent_ids)
            for a in ids:
                self._named[a] = self._seq
            if len(self._named) > self._bound():  # bounded: forget, everyone reads next time
                self._named.clear()
                self._all_seq = self._seq
            woken = [w for a in ids if (w := self._by_agent.get(a)) is not None]
        for w in woken:
            w.event.set()
        WAKEUPS.inc(len(woken))
        return len(woken)


def agents_of(event: dict[str, Any]) -> list[str] | None:
    """The agent ids an event names, or None when it names none (wake everyone)."""
    agents = event.get("agents")
    if not isinstance(agents, list):
        return None
    return [a for a in agents if isinstance(a, str)]


class WakeRelay:
    """Reads TASK_EVENTS in a thread and wakes the named waiters on `loop`. Supervised: when
    the subscription fails (Redis away) it backs off and subscribes again; meanwhile the sweep
    finds the tasks."""

    def __init__(
        self,
        events: Events,
        waiters: Waiters,
        loop: asyncio.AbstractEventLoop,
        state: LoopState,
        on_revoked: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.events = events
        self.on_revoked = on_revoked  # AGENT_REVOKED events: forget these agents' credentials
        self.waiters = waiters
        self.loop = loop
        self.state = state
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-wakeups", daemon=True)
        self._sub: Subscription | None = None
        self._subscribed = threading.Event()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the thread and wait (bounded) for its first subscription, so an event published
        after the plane started is not missed."""
        self._thread.start()
        if not self._subscribed.wait(timeout_s):
            log.warning("round events: no subscription yet; the sweep finds tasks until there is one")

    def close(self) -> None:
        self.stop.set()
        sub = self._sub
        if sub is not None:
            sub.close()  # wakes the reader blocked in get()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        supervise(self.state, self._relay, self.stop)

    def _relay(self, state: LoopState) -> None:
        with self.events.subscribe(TASK_EVENTS) as sub:
            self._sub = sub
            self._subscribed.set()
            while not self.stop.is_set():
                event = sub.get(timeout_s=1.0)
                state.tick()
                if event is None:
                    continue
                agents = agents_of(event)
                if event.get("type") == AGENT_REVOKED:
                    if agents and self.on_revoked is not None:
                        self.on_revoked(agents)  # thread-safe; then their waits wake and re-read
                    if not agents:
                        continue
                try:
                    self.loop.call_soon_threadsafe(self.waiters.wake, agents)
                except RuntimeError:  # the loop closed: the plane is stopping
                    return
