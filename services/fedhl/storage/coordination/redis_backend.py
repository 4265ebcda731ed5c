"""Redis backends of the coordination interfaces, shared by coordinator replicas and
aggregation workers."""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
from redis.client import PubSub

from ...supervise import Backoff, LoopState
from .base import (
    Entry,
    Subscription,
    _check_count,
    _check_fields,
    _check_limit,
    _encode_event,
    _entries,
    _Fanout,
    _glob_escape,
    _idle_ms,
    _text,
    _ttl_ms,
)

log = logging.getLogger(__name__)


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

# Reset the idle time only while the entry is still pending with this consumer: a worker that
# was presumed dead and lost its entry to another must not take it back. JUSTID: no delivery.
_TOUCH = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] and p[1][2] == ARGV[2] then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
  return 1
end
return 0
"""
# Copy to the dead-letter stream, then ack and drop, in one step.
_DEAD_LETTER = """
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if not e[1] then return 0 end
local f = e[1][2]
table.insert(f, 'reason')
table.insert(f, ARGV[3])
table.insert(f, 'entry_id')
table.insert(f, ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', unpack(f))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


class RedisLiveness:
    _MGET_BATCH = 1000

    def __init__(self, client: redis.Redis, prefix: str = "fedhl:") -> None:
        self._r = client
        self._prefix = prefix + "alive:"

    def beat(self, agent_id: str, ttl_s: float) -> None:
        self._r.set(self._prefix + agent_id, "1", px=_ttl_ms(ttl_s))

    def beat_many(self, beats: Mapping[str, float]) -> None:
        items = list(beats.items())
        for i in range(0, len(items), self._MGET_BATCH):  # one pipelined round trip per batch
            pipe = self._r.pipeline(transaction=False)
            for agent_id, ttl_s in items[i : i + self._MGET_BATCH]:
                pipe.set(self._prefix + agent_id, "1", px=_ttl_ms(ttl_s))
            pipe.execute()

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
        self._dead = prefix + stream + ":dead"
        self._ack = client.register_script(_ACK)
        self._touch = client.register_script(_TOUCH)
        self._dead_letter = client.register_script(_DEAD_LETTER)
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

    def touch(self, consumer: str, entry_id: str) -> bool:
        return bool(self._with_group(lambda: self._touch(keys=[self._stream], args=[self._group, consumer, entry_id])))

    def outstanding(self, count: int = 10_000) -> list[Entry]:
        _check_count(count)
        # Acked entries are deleted (see _ACK), so the stream holds exactly the unacked ones.
        return _entries(self._r.xrange(self._stream, "-", "+", count=count) or [])

    def dead_letter(self, entry_id: str, reason: str) -> None:
        self._dead_letter(keys=[self._stream, self._dead], args=[self._group, entry_id, reason])

    def dead_letters(self, count: int = 100) -> list[Entry]:
        _check_count(count)
        return list(reversed(_entries(self._r.xrevrange(self._dead, "+", "-", count=count) or [])))

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
    Channel messages published while the connection is down are lost (events are hints).
    The listener survives Redis restarts (it backs off and redis-py re-subscribes on
    reconnect) and reports its last successful read in `health`."""

    def __init__(self, client: redis.Redis, prefix: str = "fedhl:", stale_after_s: float = 30.0) -> None:
        self.health: LoopState | None = LoopState("events", stale_after_s)
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
        health, backoff = self.health, Backoff(0.2, 5.0)
        assert health is not None
        try:
            while not self._stop.is_set():
                try:
                    msg = pubsub.get_message(timeout=0.2)
                except Exception as e:  # never let the one listener of the process die
                    # redis-py reconnects and re-subscribes on the next read.
                    health.failures += 1
                    health.error = f"{type(e).__name__}: {e}"[:500]
                    log.warning("event listener lost Redis (%s); retrying", e)
                    self._stop.wait(backoff.delay(health.failures))
                    continue
                health.tick()
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
