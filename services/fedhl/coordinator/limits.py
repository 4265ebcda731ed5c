"""Admission of agent calls: a global cap per kind of call and a cap per agent, so a crowd
cannot grow the server's queues without bound and one agent cannot take the slots of others.

A refused call gets RESOURCE_EXHAUSTED with a `retry-after` (seconds). A burst (a round that
wakes hundreds of agents, who all download and later upload at once) need not bounce: `queued`
lets a call wait up to `queue_s` for a slot, on the event loop (no thread), behind at most
`queue_factor × cap` others; past either bound it is refused as above. Used from the agent
plane's event loop only (one thread), so the counters need no lock."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from ..metrics import AGENT_CALLS_IN_FLIGHT as IN_FLIGHT
from ..metrics import AGENT_CALLS_REFUSED as REFUSED
from .errors import Code, ServiceError


class Kind(enum.StrEnum):
    CALL = "call"  # short unary calls: register, heartbeat, status, metrics
    WAIT = "wait"  # PullTask long-polls: cheap to hold (no thread, no transaction)
    TRANSFER = "transfer"  # upload and download streams: each holds a thread while bytes move


class CallLimits:
    def __init__(self, caps: dict[Kind, int], per_agent: int, retry_after_s: int) -> None:
        missing = set(Kind) - set(caps)
        if missing or any(c < 1 for c in caps.values()) or per_agent < 1 or retry_after_s < 1:
            raise ValueError(f"every cap must be >= 1 (caps {caps}, per agent {per_agent}, retry {retry_after_s})")
        self.caps = dict(caps)
        self.per_agent = per_agent
        self.retry_after_s = retry_after_s
        self._open: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self._by_agent: dict[str, int] = {}
        self._queues: dict[Kind, list[asyncio.Future[None]]] = {k: [] for k in Kind}

    def queued_count(self, kind: Kind) -> int:
        return len(self._queues[kind])

    def open(self, kind: Kind) -> int:
        return self._open[kind]

    def agent_open(self, agent_id: str) -> int:
        return self._by_agent.get(agent_id, 0)

    def _busy(self, kind: Kind) -> ServiceError:
        REFUSED.labels(kind.value).inc()
        return ServiceError(
            Code.RESOURCE_EXHAUSTED,
            f"the server is busy ({self.caps[kind]} {kind.value}s in progress); retry in {self.retry_after_s} s",
            retry_after_s=self.retry_after_s,
        )

    def _release(self, kind: Kind) -> None:
        self._open[kind] -= 1
        IN_FLIGHT.labels(kind.value).dec()
        queue = self._queues[kind]
        while queue:  # hand the slot to the oldest waiter still waiting
            fut = queue.pop(0)
            if not fut.done():
                self._open[kind] += 1
                IN_FLIGHT.labels(kind.value).inc()
                fut.set_result(None)
                return

    @contextmanager
    def slot(self, kind: Kind) -> Iterator[None]:
        """Hold one of the `kind` slots for the block, or raise RESOURCE_EXHAUSTED."""
        if self._open[kind] >= self.caps[kind] or self._queues[kind]:
            raise self._busy(kind)
        self._open[kind] += 1
        IN_FLIGHT.labels(kind.value).inc()
        try:
            yield
        finally:
            self._release(kind)

    @asynccontextmanager
    async def queued(self, kind: Kind, queue_s: float, queue_factor: int = 4) -> AsyncIterator[None]:
        """`slot`, but a call that finds the slots full waits up to `queue_s` for one (first
        come, first served) when fewer than `queue_factor × cap` calls already wait."""
        if self._open[kind] < self.caps[kind] and not self._queues[kind]:
            self._open[kind] += 1
            IN_FLIGHT.labels(kind.value).inc()
        else:
            queue = self._queues[kind]
            if queue_s <= 0 or len(queue) >= queue_factor * self.caps[kind]:
                raise self._busy(kind)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.append(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), queue_s)
            except (TimeoutError, asyncio.CancelledError) as e:
                if fut.done() and not fut.cancelled():  # granted as we gave up: give it back
                    self._release(kind)
                else:
                    fut.cancel()
                    if fut in queue:
                        queue.remove(fut)
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise self._busy(kind) from None
        try:
            yield
        finally:
            self._release(kind)

    @contextmanager
    def agent_slot(self, agent_id: str) -> Iterator[None]:
        """Hold one of this agent's slots for the block, or raise RESOURCE_EXHAUSTED."""
        held = self._by_agent.get(agent_id, 0)
        if held >= self.per_agent:
            REFUSED.labels("agent").inc()
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"this agent already has {held} calls in progress (at most {self.per_agent}); "
                f"retry in {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self._by_agent[agent_id] = held + 1
        try:
            yield
        finally:
            left = self._by_agent[agent_id] - 1
            if left:
                self._by_agent[agent_id] = left
            else:
                del self._by_agent[agent_id]
