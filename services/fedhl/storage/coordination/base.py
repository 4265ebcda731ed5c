"""The coordination interfaces (one small Protocol per concern), the pieces both backends
share, and argument checks, so the in-process twin and Redis refuse the same bad input."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from ...supervise import LoopState

Entry = tuple[str, dict[str, str]]
"""A job queue entry: (entry id, fields)."""

_V = TypeVar("_V")


def _ttl_ms(seconds: float, what: str = "ttl_s") -> int:
    # `not > 0` also rejects NaN; rounding up keeps a tiny positive TTL from meaning "never".
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{what} must be a positive finite number of seconds, got {seconds}")
    return max(1, math.ceil(seconds * 1000))


# -- interfaces -------------------------------------------------------------------------


class Liveness(Protocol):
    """Agent heartbeats: an agent is alive until `ttl_s` after its last beat."""

    def beat(self, agent_id: str, ttl_s: float) -> None: ...

    def beat_many(self, beats: Mapping[str, float]) -> None:
        """`beat` for each agent id -> ttl_s, in one round trip."""
        ...

    def alive(self, agent_ids: Iterable[str]) -> set[str]: ...


class Leases(Protocol):
    """Expiring exclusive ownership of a key (task leases, the scheduler leader lease)."""

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        """True if `key` was free and now belongs to `owner`. A held lease is not re-acquired,
        even by its owner: owners use `renew`."""
        ...

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        """Extend to `ttl_s` from now, only if `owner` still holds the lease."""
        ...

    def release(self, key: str, owner: str) -> bool:
        """Free the lease, only if `owner` holds it."""
        ...

    def owner(self, key: str) -> str | None: ...


class JobQueue(Protocol):
    """At-least-once work queue with one consumer group: an entry stays pending with the
    consumer it was delivered to until acked, and can be reclaimed from a consumer that died."""

    def publish(self, fields: dict[str, str]) -> str:
        """Append an entry; return its id."""
        ...

    def consume(self, consumer: str, block_s: float, count: int = 1) -> list[Entry]:
        """Up to `count` never-delivered entries, waiting up to `block_s` (<= 0: don't wait)."""
        ...

    def ack(self, entry_id: str) -> None:
        """Mark done and drop the entry. Unknown or undelivered ids are ignored."""
        ...

    def reclaim(self, consumer: str, min_idle_s: float, count: int = 10) -> list[Entry]:
        """Take over up to `count` delivered, unacked entries idle for at least `min_idle_s`
        (from any consumer), oldest first. Each reclaim counts as a delivery."""
        ...

    def pending_count(self) -> int:
        """Entries delivered but not yet acked (not the undelivered backlog)."""
        ...

    def touch(self, consumer: str, entry_id: str) -> bool:
        """Reset the idle time of an entry pending with `consumer` (a worker still computing
        it), without counting a delivery, so `reclaim` leaves it alone. False if the entry
        is no longer pending with `consumer` (acked, or reclaimed by another worker)."""
        ...

    def outstanding(self, count: int = 10_000) -> list[Entry]:
        """Up to `count` unacked entries, pending or not yet delivered, oldest first."""
        ...

    def dead_letter(self, entry_id: str, reason: str) -> None:
        """Move an entry to the dead-letter list with `reason` and drop it from the queue."""
        ...

    def dead_letters(self, count: int = 100) -> list[Entry]:
        """The last `count` dead-lettered entries (their fields plus `reason`), oldest first."""
        ...

    def delivery_count(self, entry_id: str) -> int:
        """How often a pending entry was delivered (1 after consume, +1 per reclaim); 0 if it
        is not pending. Lets workers dead-letter an entry that keeps crashing them."""
        ...


class Events(Protocol):
    """Fire-and-forget JSON events (wake-up hints: a subscriber that was not listening, or
    lagged too far, misses them and must fall back to reading Postgres)."""

    health: LoopState | None  # the background listener's health (None: there is no listener)

    def publish(self, channel: str, event: dict[str, Any]) -> None: ...

    def subscribe(self, channel: str) -> Subscription:
        """Receive events published on `channel` after this call returns."""
        ...

    def close(self) -> None:
        """Stop delivery and close every open subscription."""
        ...


class RateLimiter(Protocol):
    def allow(self, key: str, limit: int, window_s: float) -> bool:
        """Count one hit on `key`; True while the hits in the current fixed window of
        `window_s` (starting at the window's first hit) are at most `limit`."""
        ...


# -- shared pieces ----------------------------------------------------------------------


class Subscription:
    """Events of one channel, oldest first. Holds at most `maxlen` undelivered events and
    drops the oldest beyond that, so a stalled reader cannot grow memory without bound."""

    def __init__(self, on_close: Callable[[Subscription], None], maxlen: int = 1024) -> None:
        self._on_close = on_close
        self._cond = threading.Condition()
        self._events: deque[str] = deque(maxlen=maxlen)
        self._closed = False

    def get(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event, or None after `timeout_s` without one or once closed."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while not self._events and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if not self._events:
                return None
            payload = self._events.popleft()
        event: dict[str, Any] = json.loads(payload)
        return event

    def close(self) -> None:
        """Stop receiving; wakes a reader blocked in `get` (useful at shutdown)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._events.clear()
            self._cond.notify_all()
        self._on_close(self)

    def _deliver(self, payload: str) -> None:
        with self._cond:
            if not self._closed:
                self._events.append(payload)
                self._cond.notify()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Fanout:
    """Local subscriptions by channel. Payloads stay JSON text until `get`, so every
    subscriber decodes its own copy and both backends share the same encoding rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}

    def add(self, channel: str) -> Subscription:
        sub = Subscription(lambda s: self._remove(channel, s))
        with self._lock:
            self._subs.setdefault(channel, set()).add(sub)
        return sub

    def deliver(self, channel: str, payload: str) -> None:
        with self._lock:
            subs = list(self._subs.get(channel, ()))
        for sub in subs:
            sub._deliver(payload)

    def close_all(self) -> None:
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for sub in subs:
            sub.close()

    def _remove(self, channel: str, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.get(channel)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[channel]


class _ExpiringMap(Generic[_V]):
    """Keys that vanish at a deadline (time.monotonic), like Redis keys set with PX.
    Not locked: the owner holds its own lock."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, _V]] = {}
        self._writes = 0

    def get(self, key: str, now: float) -> _V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        return item[1]

    def set(self, key: str, value: _V, ttl_ms: int, now: float) -> None:
        self._items[key] = (now + ttl_ms / 1000, value)
        self._writes += 1
        # Expired keys never read again would stay forever; sweeping once per len(items)
        # writes keeps that bounded at amortised O(1) per write.
        if self._writes >= max(1024, len(self._items)):
            self._writes = 0
            self._items = {k: v for k, v in self._items.items() if v[0] > now}

    def update(self, key: str, value: _V) -> None:
        """Replace a live key's value, keeping its deadline."""
        self._items[key] = (self._items[key][0], value)

    def delete(self, key: str) -> None:
        self._items.pop(key, None)


# -- helpers ----------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: Iterable[Any]) -> list[Entry]:
    # Redis < 7 reports entries deleted while pending as (id, None): nothing left to run.
    return [(_text(eid), {_text(k): _text(v) for k, v in fields.items()}) for eid, fields in raw if fields is not None]


def _encode_event(event: dict[str, Any]) -> str:
    if not isinstance(event, dict):
        raise TypeError(f"event must be a dict, got {type(event).__name__}")
    return json.dumps(event, separators=(",", ":"), allow_nan=False)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _idle_ms(seconds: float) -> int:
    if not seconds >= 0 or math.isinf(seconds):
        raise ValueError(f"min_idle_s must be a finite number >= 0, got {seconds}")
    return math.ceil(seconds * 1000)


def _check_fields(fields: dict[str, str]) -> None:
    if not fields:
        raise ValueError("a queue entry needs at least one field")
    for k, v in fields.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"queue entry fields must be str -> str, got {k!r}: {v!r}")


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
