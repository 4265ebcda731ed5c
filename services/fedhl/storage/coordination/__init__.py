"""Coordination state that can be rebuilt from Postgres: agent liveness, leases, the
aggregation task queue, round events and rate limits.

Each concern is a small Protocol with two backends: Redis (shared by coordinator replicas and
aggregator workers) and an in-process twin for the embedded mode with no Redis. The twins
follow Redis semantics, so one test suite runs against both (tests/storage/).

Modules: `base` (interfaces, shared pieces), `inprocess`, `redis_backend`; this module bundles
one backend per concern (`Coordination`) and opens it (`open_coordination`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import redis

from .base import Entry, Events, JobQueue, Leases, Liveness, RateLimiter, Subscription
from .inprocess import InProcessEvents, InProcessJobQueue, InProcessLeases, InProcessLiveness, InProcessRateLimiter
from .redis_backend import RedisEvents, RedisJobQueue, RedisLeases, RedisLiveness, RedisRateLimiter

__all__ = [
    "Coordination",
    "Entry",
    "Events",
    "JobQueue",
    "Leases",
    "Liveness",
    "RateLimiter",
    "Subscription",
    "open_coordination",
]


@dataclass(frozen=True)
class Coordination:
    liveness: Liveness
    leases: Leases
    queue: JobQueue
    events: Events
    rate_limiter: RateLimiter
    client: redis.Redis | None = None  # None in the in-process mode

    def ping(self) -> bool:
        """Whether the backend answers (always True in-process)."""
        if self.client is None:
            return True
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.events.close()
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> Coordination:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_coordination(
    redis_url: str | None,
    prefix: str = "fedhl:",
    *,
    socket_timeout_s: float = 10.0,
    connect_timeout_s: float = 5.0,
) -> Coordination:
    """Redis-backed coordination at `redis_url`, or the in-process twin when it is None.
    Connects lazily: use `ping()` to check the server. Every call is bounded by
    `socket_timeout_s` (raises redis.TimeoutError), which must exceed the longest
    `consume(block_s=...)`."""
    if redis_url is None:
        return Coordination(
            liveness=InProcessLiveness(),
            leases=InProcessLeases(),
            queue=InProcessJobQueue(),
            events=InProcessEvents(),
            rate_limiter=InProcessRateLimiter(),
        )
    # URL query options (e.g. ?socket_timeout=5) override these defaults.
    client = redis.Redis.from_url(
        redis_url,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=30,
    )
    return Coordination(
        liveness=RedisLiveness(client, prefix),
        leases=RedisLeases(client, prefix),
        queue=RedisJobQueue(client, prefix),
        events=RedisEvents(client, prefix),
        rate_limiter=RedisRateLimiter(client, prefix),
        client=client,
    )
