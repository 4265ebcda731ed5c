"""Coordination suite: every test runs against the in-process twin and against Redis
(`coordination` fixture, tests/storage/conftest.py). TTLs are short (0.2 s) to keep it fast."""

from __future__ import annotations

import threading
import time
from unittest.mock import ANY

import pytest
import redis

from fedhl.storage.coordination import Coordination, open_coordination

TTL = 0.2


def past_ttl() -> None:
    time.sleep(TTL + 0.1)


# -- liveness ---------------------------------------------------------------------------


def test_liveness_expires(coordination: Coordination) -> None:
    live = coordination.liveness
    live.beat("a1", TTL)
    live.beat("a2", 5.0)

    assert live.alive(["a1", "a2", "a3"]) == {"a1", "a2"}
    past_ttl()
    assert live.alive(["a1", "a2", "a3"]) == {"a2"}
    live.beat("a1", TTL)  # a beat revives
    assert live.alive(iter(["a1", "a1"])) == {"a1"}
    assert live.alive([]) == set()


def test_liveness_beat_extends(coordination: Coordination) -> None:
    live = coordination.liveness
    live.beat("a", TTL)
    time.sleep(TTL * 0.6)
    live.beat("a", TTL)
    time.sleep(TTL * 0.6)

    assert live.alive(["a"]) == {"a"}


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf")])
def test_liveness_rejects_bad_ttl(coordination: Coordination, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        coordination.liveness.beat("a", ttl)


# -- leases -----------------------------------------------------------------------------


def test_lease_is_exclusive(coordination: Coordination) -> None:
    leases = coordination.leases

    assert leases.acquire("leader", "s1", 5.0)
    assert not leases.acquire("leader", "s2", 5.0)
    assert not leases.acquire("leader", "s1", 5.0)  # owners renew, they don't re-acquire
    assert leases.owner("leader") == "s1"
    assert leases.owner("other") is None


def test_lease_renew_and_release_only_by_owner(coordination: Coordination) -> None:
    leases = coordination.leases
    leases.acquire("task:7", "w1", TTL)

    assert not leases.renew("task:7", "w2", 5.0)
    assert not leases.release("task:7", "w2")
    assert leases.renew("task:7", "w1", 5.0)
    past_ttl()
    assert leases.owner("task:7") == "w1"  # renewed past the first TTL
    assert leases.release("task:7", "w1")
    assert leases.owner("task:7") is None
    assert not leases.release("task:7", "w1")
    assert not leases.renew("task:7", "w1", 5.0)  # a released lease cannot be renewed
    assert leases.acquire("task:7", "w2", 5.0)


def test_lease_expires(coordination: Coordination) -> None:
    leases = coordination.leases
    leases.acquire("task:1", "w1", TTL)
    past_ttl()

    assert leases.owner("task:1") is None
    assert not leases.renew("task:1", "w1", TTL)  # too late: it must re-acquire
    assert leases.acquire("task:1", "w2", TTL)
    assert not leases.release("task:1", "w1")
    assert leases.owner("task:1") == "w2"


# -- job queue --------------------------------------------------------------------------


def test_queue_publish_consume_ack(coordination: Coordination) -> None:
    q = coordination.queue
    first = q.publish({"round_id": "1"})
    second = q.publish({"round_id": "2", "job": "j"})

    got = q.consume("w1", block_s=0.5, count=10)

    assert got == [(first, {"round_id": "1"}), (second, {"round_id": "2", "job": "j"})]
    assert q.pending_count() == 2
    assert q.delivery_count(first) == 1
    q.ack(first)
    q.ack(first)  # acking twice is harmless
    assert q.pending_count() == 1
    assert q.delivery_count(first) == 0
    assert q.consume("w2", block_s=0) == []  # delivered entries are not delivered again


def test_queue_delivers_each_entry_once(coordination: Coordination) -> None:
    q = coordination.queue
    ids = [q.publish({"n": str(i)}) for i in range(5)]

    a = q.consume("w1", block_s=0.2, count=2)
    b = q.consume("w2", block_s=0.2, count=10)

    assert [e for e, _ in a + b] == ids
    assert q.consume("w3", block_s=0) == []


def test_queue_consume_times_out_empty(coordination: Coordination) -> None:
    start = time.monotonic()

    assert coordination.queue.consume("w1", block_s=0.2) == []
    assert 0.15 <= time.monotonic() - start < 2.0


def test_queue_blocked_consumer_wakes_on_publish(coordination: Coordination) -> None:
    q = coordination.queue
    timer = threading.Timer(0.1, q.publish, args=({"round_id": "9"},))
    timer.start()
    try:
        got = q.consume("w1", block_s=3.0)
    finally:
        timer.cancel()

    assert [fields for _, fields in got] == [{"round_id": "9"}]


def test_queue_reclaims_entry_of_dead_consumer(coordination: Coordination) -> None:
    q = coordination.queue
    entry = q.publish({"round_id": "3"})
    assert q.consume("dies", block_s=0.5) == [(entry, {"round_id": "3"})]

    assert q.reclaim("rescuer", min_idle_s=TTL) == []  # not idle long enough yet
    past_ttl()
    assert q.reclaim("rescuer", min_idle_s=TTL) == [(entry, {"round_id": "3"})]
    assert q.delivery_count(entry) == 2
    assert q.reclaim("other", min_idle_s=TTL) == []  # the reclaim restarted its idle clock
    q.ack(entry)
    assert q.pending_count() == 0


def test_queue_touch_keeps_a_live_entry_from_being_reclaimed(coordination: Coordination) -> None:
    q = coordination.queue
    entry = q.publish({"round_id": "3"})
    q.consume("busy", block_s=0.5)
    past_ttl()
    assert q.touch("busy", entry)  # the owner's heartbeat: idle clock restarts, no delivery counted
    assert q.reclaim("rescuer", min_idle_s=TTL) == []
    assert q.delivery_count(entry) == 1
    assert not q.touch("stranger", entry)  # only the consumer holding it can touch it
    past_ttl()
    assert [e for e, _ in q.reclaim("rescuer", min_idle_s=TTL)] == [entry]
    assert not q.touch("busy", entry)  # taken over: the old owner learns it lost the entry
    q.ack(entry)
    assert not q.touch("rescuer", entry)


def test_queue_outstanding_lists_pending_and_undelivered_entries(coordination: Coordination) -> None:
    q = coordination.queue
    a, b, c = (q.publish({"n": str(i)}) for i in range(3))
    q.consume("w", block_s=0.5)  # a: pending
    q.consume("w", block_s=0.5)
    q.ack(b)  # b: done
    assert q.outstanding() == [(a, {"n": "0"}), (c, {"n": "2"})]
    assert q.outstanding(count=1) == [(a, {"n": "0"})]


def test_queue_dead_letter_moves_an_entry_out_of_the_queue(coordination: Coordination) -> None:
    q = coordination.queue
    entry, other = q.publish({"round_id": "3"}), q.publish({"round_id": "4"})
    q.consume("w", block_s=0.5)
    q.dead_letter(entry, "delivered 6 times")
    q.dead_letter("1-0", "unknown ids are ignored")
    assert q.pending_count() == 0
    assert q.outstanding() == [(other, {"round_id": "4"})]
    assert q.reclaim("w2", min_idle_s=0) == []
    assert q.dead_letters() == [(ANY, {"round_id": "3", "reason": "delivered 6 times", "entry_id": entry})]


def test_queue_acked_entries_never_reclaimed(coordination: Coordination) -> None:
    q = coordination.queue
    done, open_ = q.publish({"n": "1"}), q.publish({"n": "2"})
    q.consume("w1", block_s=0.5, count=2)
    q.ack(done)
    past_ttl()

    assert [e for e, _ in q.reclaim("w2", min_idle_s=TTL)] == [open_]
    q.ack(open_)
    past_ttl()
    assert q.reclaim("w3", min_idle_s=0) == []


def test_queue_reclaim_respects_count_and_order(coordination: Coordination) -> None:
    q = coordination.queue
    ids = [q.publish({"n": str(i)}) for i in range(5)]
    q.consume("dies", block_s=0.5, count=5)

    first = q.reclaim("w2", min_idle_s=0, count=2)
    rest = q.reclaim("w3", min_idle_s=0, count=10)

    assert [e for e, _ in first] == ids[:2]
    assert [e for e, _ in rest] == ids  # min_idle 0: the two just reclaimed count too


def test_queue_ack_of_undelivered_entry_is_ignored(coordination: Coordination) -> None:
    q = coordination.queue
    entry = q.publish({"n": "1"})
    q.ack(entry)

    assert q.consume("w1", block_s=0.5) == [(entry, {"n": "1"})]


def test_queue_rejects_bad_input(coordination: Coordination) -> None:
    with pytest.raises(ValueError, match="at least one field"):
        coordination.queue.publish({})
    with pytest.raises(ValueError, match="count"):
        coordination.queue.consume("w", block_s=0, count=0)
    with pytest.raises(ValueError, match="min_idle_s"):
        coordination.queue.reclaim("w", min_idle_s=-1)


# -- events -----------------------------------------------------------------------------


def test_event_delivered_to_subscribers(coordination: Coordination) -> None:
    ev = coordination.events
    with ev.subscribe("rounds") as a, ev.subscribe("rounds") as b, ev.subscribe("x") as other:
        ev.publish("rounds", {"type": "round_open", "job_id": "j1", "round": 3})

        expected = {"type": "round_open", "job_id": "j1", "round": 3}
        assert a.get(2.0) == expected
        assert b.get(2.0) == expected
        assert other.get(0.1) is None


def test_event_get_times_out(coordination: Coordination) -> None:
    with coordination.events.subscribe("quiet") as sub:
        start = time.monotonic()

        assert sub.get(0.2) is None
        assert time.monotonic() - start >= 0.15


def test_events_keep_order_and_stop_after_close(coordination: Coordination) -> None:
    ev = coordination.events
    sub = ev.subscribe("rounds")
    for i in range(3):
        ev.publish("rounds", {"n": i})

    assert [sub.get(2.0) for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    sub.close()
    ev.publish("rounds", {"n": 3})
    assert sub.get(0.1) is None


def test_close_wakes_blocked_subscriber(coordination: Coordination) -> None:
    sub = coordination.events.subscribe("rounds")
    threading.Timer(0.1, sub.close).start()
    start = time.monotonic()

    assert sub.get(5.0) is None
    assert time.monotonic() - start < 2.0


def test_event_must_be_json_object(coordination: Coordination) -> None:
    with pytest.raises(TypeError):
        coordination.events.publish("rounds", {"bad": object()})
    with pytest.raises(TypeError):
        coordination.events.publish("rounds", ["not", "a", "dict"])  # type: ignore[arg-type]


# -- rate limiter -----------------------------------------------------------------------


def test_rate_limit_window(coordination: Coordination) -> None:
    rl = coordination.rate_limiter

    assert [rl.allow("agent:a", 3, TTL) for _ in range(5)] == [True] * 3 + [False] * 2
    assert rl.allow("agent:b", 3, TTL)  # keys count separately
    past_ttl()
    assert rl.allow("agent:a", 3, TTL)  # a new window


def test_rate_limit_rejects_bad_arguments(coordination: Coordination) -> None:
    with pytest.raises(ValueError, match="limit"):
        coordination.rate_limiter.allow("k", 0, 1.0)
    with pytest.raises(ValueError, match="window_s"):
        coordination.rate_limiter.allow("k", 1, 0)


# -- bundle and Redis-only behaviour ----------------------------------------------------


def test_ping(coordination: Coordination) -> None:
    assert coordination.ping()


def test_ping_false_when_redis_is_unreachable() -> None:
    with open_coordination("redis://127.0.0.1:1/0") as coord:
        assert not coord.ping()


def test_events_cross_replicas(redis_url: str, redis_prefix: str) -> None:
    # Two coordinator replicas share one Redis: an event published by one wakes the other.
    with (
        open_coordination(redis_url, redis_prefix) as a,
        open_coordination(redis_url, redis_prefix) as b,
        open_coordination(redis_url, redis_prefix + "other:") as foreign,
        b.events.subscribe("rounds") as sub,
        foreign.events.subscribe("rounds") as foreign_sub,
    ):
        a.events.publish("rounds", {"type": "round_open"})

        assert sub.get(2.0) == {"type": "round_open"}
        assert foreign_sub.get(0.1) is None  # another prefix is another deployment


def test_queue_survives_lost_stream(redis_url: str, redis_prefix: str) -> None:
    # Redis restarted without persistence: the stream and its group are gone. Jobs are
    # re-published from Postgres, and the queue must recreate its group instead of failing.
    with open_coordination(redis_url, redis_prefix) as coord:
        coord.queue.publish({"n": "1"})
        raw = redis.Redis.from_url(redis_url)
        raw.delete(redis_prefix + "jobs:aggregate")
        raw.close()

        entry = coord.queue.publish({"n": "2"})

        assert coord.queue.consume("w1", block_s=0.5) == [(entry, {"n": "2"})]
        assert coord.queue.pending_count() == 1


def test_redis_keys_live_under_prefix(redis_url: str, redis_prefix: str) -> None:
    with open_coordination(redis_url, redis_prefix) as coord:
        coord.liveness.beat("a", 5.0)
        coord.leases.acquire("l", "o", 5.0)
        coord.queue.publish({"n": "1"})
        coord.rate_limiter.allow("r", 1, 5.0)
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        keys = sorted(raw.scan_iter(match=redis_prefix + "*"))
        raw.close()

    assert keys == [redis_prefix + k for k in ("alive:a", "jobs:aggregate", "lease:l", "rate:r")]
