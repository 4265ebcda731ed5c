"""In-process twins of the coordination backends, for the embedded mode with no Redis. They
follow Redis semantics (TTL expiry, consumer groups with pending entries, pub/sub fan-out),
so one test suite runs against both (tests/storage/)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ...supervise import LoopState
from .base import (
    Entry,
    Subscription,
    _check_count,
    _check_fields,
    _check_limit,
    _encode_event,
    _ExpiringMap,
    _Fanout,
    _idle_ms,
    _ttl_ms,
)


class InProcessLiveness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: _ExpiringMap[bool] = _ExpiringMap()

    def beat(self, agent_id: str, ttl_s: float) -> None:
        ttl = _ttl_ms(ttl_s)
        with self._lock:
            self._beats.set(agent_id, True, ttl, time.monotonic())

    def beat_many(self, beats: Mapping[str, float]) -> None:
        with self._lock:
            now = time.monotonic()
            for agent_id, ttl_s in beats.items():
                self._beats.set(agent_id, True, _ttl_ms(ttl_s), now)

    def alive(self, agent_ids: Iterable[str]) -> set[str]:
        with self._lock:
            now = time.monotonic()
            return {a for a in agent_ids if self._beats.get(a, now)}


class InProcessLeases:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: _ExpiringMap[str] = _ExpiringMap()

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        ttl = _ttl_ms(ttl_s)
        with self._lock:
            now = time.monotonic()
            if self._owners.get(key, now) is not None:
                return False
            self._owners.set(key, owner, ttl, now)
            return True

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        ttl = _ttl_ms(ttl_s)
        with self._lock:
            now = time.monotonic()
            if self._owners.get(key, now) != owner:
                return False
            self._owners.set(key, owner, ttl, now)
            return True

    def release(self, key: str, owner: str) -> bool:
        with self._lock:
            if self._owners.get(key, time.monotonic()) != owner:
                return False
            self._owners.delete(key)
            return True

    def owner(self, key: str) -> str | None:
        with self._lock:
            return self._owners.get(key, time.monotonic())


@dataclass
class _Delivery:
    consumer: str
    at: float  # time.monotonic() of the last delivery
    count: int


class InProcessJobQueue:
    """Mirrors a Redis stream with one consumer group: undelivered entries in id order, and a
    pending entries list (consumer, delivery time, delivery count) until ack."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fields: dict[str, dict[str, str]] = {}  # every unacked entry
        self._undelivered: deque[str] = deque()
        # Insertion order is id order: entries are delivered in id order and a reclaim
        # updates its record in place.
        self._pending: dict[str, _Delivery] = {}
        self._last_id = (0, 0)
        self._dead: deque[Entry] = deque(maxlen=10_000)  # capped like the Redis dead-letter stream

    def publish(self, fields: dict[str, str]) -> str:
        _check_fields(fields)
        with self._cond:
            # Redis-style "<ms>-<seq>" ids, strictly increasing even if the clock steps back.
            ms, seq = int(time.time() * 1000), 0
            if ms <= self._last_id[0]:
                ms, seq = self._last_id[0], self._last_id[1] + 1
            self._last_id = (ms, seq)
            entry_id = f"{ms}-{seq}"
            self._fields[entry_id] = dict(fields)
            self._undelivered.append(entry_id)
            self._cond.notify_all()
        return entry_id

    def consume(self, consumer: str, block_s: float, count: int = 1) -> list[Entry]:
        _check_count(count)
        deadline = time.monotonic() + max(block_s, 0.0)
        with self._cond:
            while not self._undelivered:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            now = time.monotonic()
            out: list[Entry] = []
            while self._undelivered and len(out) < count:
                entry_id = self._undelivered.popleft()
                self._pending[entry_id] = _Delivery(consumer, now, 1)
                out.append((entry_id, dict(self._fields[entry_id])))
            return out

    def ack(self, entry_id: str) -> None:
        with self._cond:
            if self._pending.pop(entry_id, None) is not None:
                del self._fields[entry_id]

    def reclaim(self, consumer: str, min_idle_s: float, count: int = 10) -> list[Entry]:
        _check_count(count)
        with self._cond:
            now = time.monotonic()
            # Same millisecond granularity as XAUTOCLAIM's min-idle-time.
            min_idle = _idle_ms(min_idle_s) / 1000
            out: list[Entry] = []
            for entry_id, d in self._pending.items():
                if len(out) == count:
                    break
                if now - d.at >= min_idle:
                    d.consumer, d.at, d.count = consumer, now, d.count + 1
                    out.append((entry_id, dict(self._fields[entry_id])))
            return out

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def delivery_count(self, entry_id: str) -> int:
        with self._cond:
            d = self._pending.get(entry_id)
            return 0 if d is None else d.count

    def touch(self, consumer: str, entry_id: str) -> bool:
        with self._cond:
            d = self._pending.get(entry_id)
            if d is None or d.consumer != consumer:
                return False
            d.at = time.monotonic()
            return True

    def outstanding(self, count: int = 10_000) -> list[Entry]:
        _check_count(count)
        with self._cond:
            ids = sorted(self._fields, key=lambda e: tuple(int(p) for p in e.split("-")))[:count]
            return [(e, dict(self._fields[e])) for e in ids]

    def dead_letter(self, entry_id: str, reason: str) -> None:
        with self._cond:
            fields = self._fields.pop(entry_id, None)
            if fields is None:
                return
            self._pending.pop(entry_id, None)
            if entry_id in self._undelivered:
                self._undelivered.remove(entry_id)
            self._dead.append((entry_id, {**fields, "reason": reason, "entry_id": entry_id}))

    def dead_letters(self, count: int = 100) -> list[Entry]:
        _check_count(count)
        with self._cond:
            return [(e, dict(f)) for e, f in list(self._dead)[-count:]]


class InProcessEvents:
    health: LoopState | None = None  # no listener thread: nothing to supervise

    def __init__(self) -> None:
        self._fanout = _Fanout()

    def publish(self, channel: str, event: dict[str, Any]) -> None:
        self._fanout.deliver(channel, _encode_event(event))

    def subscribe(self, channel: str) -> Subscription:
        return self._fanout.add(channel)

    def close(self) -> None:
        self._fanout.close_all()


class InProcessRateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: _ExpiringMap[int] = _ExpiringMap()

    def allow(self, key: str, limit: int, window_s: float) -> bool:
        window = _ttl_ms(window_s, "window_s")
        _check_limit(limit)
        with self._lock:
            now = time.monotonic()
            hits = self._hits.get(key, now)
            if hits is None:
                self._hits.set(key, 1, window, now)
                hits = 1
            else:
                hits += 1
                self._hits.update(key, hits)
            return hits <= limit
