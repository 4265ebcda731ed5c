"""Coordination state that can be rebuilt from Postgres: agent liveness, leases, the
aggregation job queue, round events and rate limits.

Each concern is a small Protocol with two backends: Redis (shared by coordinator replicas and
aggregator workers) and an in-process twin for the embedded mode with no Redis. The twins
follow Redis semantics, so one test suite runs against both (tests/storage/).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import redis
from redis.client import PubSub

log = logging.getLogger(__name__)

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

    def delivery_count(self, entry_id: str) -> int:
        """How often a pending entry was delivered (1 after consume, +1 per reclaim); 0 if it
        is not pending. Lets workers dead-letter an entry that keeps crashing them."""
        ...


class Events(Protocol):
    """Fire-and-forget JSON events (wake-up hints: a subscriber that was not listening, or
    lagged too far, misses them and must fall back to reading Postgres)."""

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


# -- in-process backends ----------------------------------------------------------------


class InProcessLiveness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: _ExpiringMap[bool] = _ExpiringMap()

    def beat(self, agent_id: str, ttl_s: float) -> None:
        ttl = _ttl_ms(ttl_s)
        with self._lock:
            self._beats.set(agent_id, True, ttl, time.monotonic())

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


class InProcessEvents:
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


# -- Redis backends ---------------------------------------------------------------------

# Compare-and-act scripts: the owner check and the write must be one atomic step, or a lease
# that expired and was taken over in between would be extended or deleted for the new owner.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# INCR and PEXPIRE in one step: a crash between them would leave a counter that never resets.
_RATE = """
local hits = redis.call('INCR', KEYS[1])
if hits == 1 or redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return hits
"""
# XDEL only what XACK acked, so acking an undelivered id does not drop it (as in-process).
_ACK = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XDEL', KEYS[1], ARGV[2])
end
return 0
"""


class RedisLiveness:
    _MGET_BATCH = 1000

    def __init__(self, client: redis.Redis, prefix: str = "fedhl:") -> None:
        self._r = client
        self._prefix = prefix + "alive:"

    def beat(self, agent_id: str, ttl_s: float) -> None:
        self._r.set(self._prefix + agent_id, "1", px=_ttl_ms(ttl_s))

    def alive(self, agent_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(agent_ids))
        out: set[str] = set()
        for i in range(0, len(ids), self._MGET_BATCH):
            batch = ids[i : i + self._MGET_BATCH]
            values = self._r.mget([self._prefix + a for a in batch])
            out.update(a for a, v in zip(batch, values, strict=True) if v is not None)
        return out


class RedisLeases:
    def __init__(self, client: redis.Redis, prefix: str = "fedhl:") -> None:
        self._r = client
        self._prefix = prefix + "lease:"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(self._r.set(self._prefix + key, owner, nx=True, px=_ttl_ms(ttl_s)))

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        ttl = _ttl_ms(ttl_s)
        return bool(self._renew(keys=[self._prefix + key], args=[owner, ttl]))

    def release(self, key: str, owner: str) -> bool:
        return bool(self._release(keys=[self._prefix + key], args=[owner]))

    def owner(self, key: str) -> str | None:
        value = self._r.get(self._prefix + key)
        return None if value is None else _text(value)


class RedisJobQueue:
    """A Redis stream and one consumer group. The group is created on first use (MKSTREAM,
    from id 0 so entries published before it exist are delivered) and re-created if Redis
    lost it (restart without persistence)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "fedhl:",
        stream: str = "jobs:aggregate",
        group: str = "aggregators",
    ) -> None:
        self._r = client
        self._stream = prefix + stream
        self._group = group
        self._ack = client.register_script(_ACK)
        self._group_ready = False

    def publish(self, fields: dict[str, str]) -> str:
        _check_fields(fields)
        self._ensure_group()
        return _text(self._r.xadd(self._stream, dict[Any, Any](fields)))

    def consume(self, consumer: str, block_s: float, count: int = 1) -> list[Entry]:
        _check_count(count)
        # BLOCK 0 means "forever" to Redis; omit it for a non-blocking read.
        block = max(1, math.ceil(block_s * 1000)) if block_s > 0 else None

        def read() -> Any:
            return self._r.xreadgroup(self._group, consumer, {self._stream: ">"}, count=count, block=block)

        raw = self._with_group(read)
        if not raw:
            return []
        # RESP2: [[stream, entries]]; RESP3: {stream: entries} (one stream either way).
        streams = raw.values() if isinstance(raw, dict) else (s[1] for s in raw)
        return [e for entries in streams for e in _entries(entries)]

    def ack(self, entry_id: str) -> None:
        self._ack(keys=[self._stream], args=[self._group, entry_id])

    def reclaim(self, consumer: str, min_idle_s: float, count: int = 10) -> list[Entry]:
        _check_count(count)
        min_idle = _idle_ms(min_idle_s)
        out: list[Entry] = []
        cursor = "0-0"
        # XAUTOCLAIM scans a bounded slice of the pending list per call; follow the cursor.
        while len(out) < count:
            claim = functools.partial(
                self._r.xautoclaim,
                self._stream,
                self._group,
                consumer,
                min_idle,
                cursor,
                count=count - len(out),
            )
            reply = self._with_group(claim)
            out.extend(_entries(reply[1]))
            cursor = _text(reply[0])
            if cursor == "0-0":
                break
        return out

    def pending_count(self) -> int:
        summary = self._with_group(lambda: self._r.xpending(self._stream, self._group))
        return int(summary["pending"])

    def delivery_count(self, entry_id: str) -> int:
        rows = self._with_group(lambda: self._r.xpending_range(self._stream, self._group, entry_id, entry_id, 1))
        return int(rows[0]["times_delivered"]) if rows else 0

    def _ensure_group(self, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            self._r.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):  # another worker created it first
                raise
        self._group_ready = True

    def _with_group(self, call: Callable[[], Any]) -> Any:
        self._ensure_group()
        try:
            return call()
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._ensure_group(force=True)
            return call()


class RedisEvents:
    """Redis pub/sub fanned out locally: one connection and one listener thread per
    process, subscribed to the pattern of all event channels, however many long-polls wait.
    Channel messages published while the connection is down are lost (events are hints)."""

    def __init__(self, client: redis.Redis, prefix: str = "fedhl:") -> None:
        self._r = client
        self._prefix = prefix + "events:"
        self._fanout = _Fanout()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    def publish(self, channel: str, event: dict[str, Any]) -> None:
        self._r.publish(self._prefix + channel, _encode_event(event))

    def subscribe(self, channel: str) -> Subscription:
        self._start_listener()
        return self._fanout.add(channel)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            listener = self._listener
        if listener is not None:
            listener.join(timeout=5)
        self._fanout.close_all()

    def _start_listener(self) -> None:
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("events are closed")
            if self._listener is not None:
                return
            pubsub: PubSub = self._r.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.psubscribe(_glob_escape(self._prefix) + "*")
                # Wait for the server's confirmation: an event published right after
                # subscribe() returns must not overtake the subscription.
                deadline = time.monotonic() + 5.0
                while (msg := pubsub.get_message(timeout=0.5)) is None or (msg["type"] != "psubscribe"):
                    if time.monotonic() > deadline:
                        raise redis.TimeoutError("no psubscribe confirmation from Redis")
            except BaseException:
                pubsub.close()
                raise
            self._listener = threading.Thread(target=self._listen, args=(pubsub,), name="fedhl-events", daemon=True)
            self._listener.start()

    def _listen(self, pubsub: PubSub) -> None:
        try:
            while not self._stop.is_set():
                try:
                    msg = pubsub.get_message(timeout=0.2)
                except redis.RedisError as e:
                    # redis-py reconnects and re-subscribes on the next read.
                    log.warning("event listener lost Redis (%s); retrying", e)
                    self._stop.wait(0.5)
                    continue
                if msg is None or msg["type"] != "pmessage":
                    continue
                channel, data = _text(msg["channel"]), _text(msg["data"])
                try:
                    valid = isinstance(json.loads(data), dict)
                except ValueError:
                    valid = False
                if not valid:
                    log.warning("dropping non-JSON-object event on %s", channel)
                    continue
                self._fanout.deliver(channel.removeprefix(self._prefix), data)
        finally:
            pubsub.close()


class RedisRateLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "fedhl:") -> None:
        self._prefix = prefix + "rate:"
        self._incr = client.register_script(_RATE)

    def allow(self, key: str, limit: int, window_s: float) -> bool:
        window = _ttl_ms(window_s, "window_s")
        _check_limit(limit)
        return int(self._incr(keys=[self._prefix + key], args=[window])) <= limit


# -- bundle -----------------------------------------------------------------------------


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


def open_coordination(redis_url: str | None, prefix: str = "fedhl:") -> Coordination:
    """Redis-backed coordination at `redis_url`, or the in-process twin when it is None.
    Connects lazily: use `ping()` to check the server."""
    if redis_url is None:
        return Coordination(
            liveness=InProcessLiveness(),
            leases=InProcessLeases(),
            queue=InProcessJobQueue(),
            events=InProcessEvents(),
            rate_limiter=InProcessRateLimiter(),
        )
    # URL query options (e.g. ?socket_timeout=5) override these defaults; a socket_timeout
    # must exceed the longest `consume(block_s=...)`.
    client = redis.Redis.from_url(
        redis_url, decode_responses=True, socket_connect_timeout=5.0, health_check_interval=30
    )
    return Coordination(
        liveness=RedisLiveness(client, prefix),
        leases=RedisLeases(client, prefix),
        queue=RedisJobQueue(client, prefix),
        events=RedisEvents(client, prefix),
        rate_limiter=RedisRateLimiter(client, prefix),
        client=client,
    )


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
