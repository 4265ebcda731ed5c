"""The agent plane's pure parts, with hand-computed expectations: pacing by fleet size, the
call caps (global per kind and per agent), the waiter registry (wake exactly the named agents,
one wait per agent) and the round events that carry the selected agents."""

from __future__ import annotations

import asyncio
import random

import pytest

from fedhl.coordinator.errors import Code, ServiceError
from fedhl.coordinator.limits import CallLimits, Kind
from fedhl.coordinator.pacing import Pacing
from fedhl.coordinator.waiters import EVENT_AGENTS_MAX, Waiters, agents_of, task_events

PACING = Pacing(heartbeat_ttl_s=15.0, pull_wait_max_s=20.0, calls_per_s=100.0)


@pytest.mark.parametrize(
    ("fleet", "interval", "ttl"),
    [
        (1, 5, 15.0),  # a third of the TTL
        (500, 5, 15.0),  # 500 agents / 5 s = 100 calls/s: still the TTL's third
        (501, 6, 18.0),  # ceil(5.01) = 6; alive for three intervals
        (5000, 50, 150.0),  # 5,000 agents at 100 calls/s: every 50 s
    ],
)
def test_heartbeat_interval_and_liveness_lengthen_with_the_fleet(fleet: int, interval: int, ttl: float) -> None:
    assert PACING.heartbeat_interval_s(fleet) == interval
    assert PACING.liveness_ttl_s(fleet) == ttl
    assert PACING.wait_ttl_s(20.0, fleet) == 20.0 + ttl  # an open wait keeps the agent alive


def test_pull_pause_only_after_a_zero_wait() -> None:
    assert PACING.pull_pause_s(20.0, 5000) == 0  # waiting is free: pull again at once
    assert PACING.pull_pause_s(0.0, 10) == 1
    assert PACING.pull_pause_s(0.0, 5000) == 50
    assert PACING.pull_wait_s() == 20


@pytest.mark.parametrize(
    ("fleet", "wait", "idle_interval"),
    [
        (1, 20, 40),  # a small fleet: the configured long-poll; idle heartbeats at twice it
        (2000, 20, 40),  # 2,000 / 20 s = 100 long-polls per second
        (5000, 50, 100),  # long-polls lengthen to keep ~100 per second
        (50_000, 120, 500),  # long-polls up to pull_wait_fleet_max_s; heartbeats paced as a busy one's
    ],
)
def test_long_polls_and_idle_heartbeats_lengthen_with_the_fleet(fleet: int, wait: int, idle_interval: int) -> None:
    assert PACING.pull_wait_s(fleet) == wait
    assert PACING.idle_heartbeat_interval_s(fleet) == idle_interval
    assert PACING.idle_heartbeat_interval_s(fleet) >= PACING.heartbeat_interval_s(fleet)
    assert Pacing(6.0, 5.0, 100.0).heartbeat_interval_s(1) == 2  # the TTL's third, as before


def test_an_overloaded_server_spreads_retries_over_the_pacing_period() -> None:
    rng = random.Random(0)
    small = {PACING.spread_retry_after_s(10, rng) for _ in range(200)}
    assert small <= {1, 2} and len(small) == 2  # a small fleet: back in a second or two
    large = [PACING.spread_retry_after_s(5000, rng) for _ in range(5000)]
    assert min(large) >= 1 and max(large) <= 50  # 5,000 agents at 100 calls/s: over 50 s
    assert 20 < sum(large) / len(large) < 30  # uniform: about 100 come back per second


def refused(fn: object) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        assert callable(fn)
        fn()
    assert e.value.code is Code.RESOURCE_EXHAUSTED
    return e.value


def test_global_cap_per_kind_refuses_with_a_retry_after_and_frees_on_exit() -> None:
    limits = CallLimits({Kind.CALL: 2, Kind.WAIT: 1, Kind.TRANSFER: 1}, per_agent=10, retry_after_s=3)
    with limits.slot(Kind.CALL), limits.slot(Kind.CALL):
        err = refused(lambda: limits.slot(Kind.CALL).__enter__())
        assert err.retry_after_s == 3
        with limits.slot(Kind.WAIT):  # other kinds have their own caps
            assert limits.open(Kind.WAIT) == 1
        assert limits.open(Kind.CALL) == 2
    assert limits.open(Kind.CALL) == 0
    with limits.slot(Kind.CALL):  # free again
        pass


def test_a_burst_queues_for_a_slot_first_come_first_served_within_its_bounds() -> None:
    async def run() -> None:
        limits = CallLimits({Kind.CALL: 1, Kind.WAIT: 1, Kind.TRANSFER: 2}, per_agent=10, retry_after_s=3)
        order: list[int] = []
        release = asyncio.Event()

        async def transfer(i: int, queue_s: float = 5.0) -> None:
            async with limits.queued(Kind.TRANSFER, queue_s):
                order.append(i)
                await release.wait()

        running = [asyncio.create_task(transfer(i)) for i in range(2)]
        await asyncio.sleep(0)
        assert limits.open(Kind.TRANSFER) == 2
        queued = [asyncio.create_task(transfer(i)) for i in range(2, 10)]  # 4 × cap = 8 may wait
        await asyncio.sleep(0)
        assert limits.queued_count(Kind.TRANSFER) == 8
        with pytest.raises(ServiceError) as full:  # the ninth finds the queue full: refused at once
            await transfer(10)
        assert full.value.code is Code.RESOURCE_EXHAUSTED and full.value.retry_after_s == 3
        with pytest.raises(ServiceError):  # the plain slot does not jump the queue either
            limits.slot(Kind.TRANSFER).__enter__()
        release.set()
        await asyncio.gather(*running, *queued)
        assert order == list(range(10))  # in arrival order
        assert limits.open(Kind.TRANSFER) == 0 and limits.queued_count(Kind.TRANSFER) == 0

    asyncio.run(run())


def test_a_queued_call_is_refused_after_its_wait_and_leaves_no_slot_behind() -> None:
    async def run() -> None:
        limits = CallLimits({Kind.CALL: 1, Kind.WAIT: 1, Kind.TRANSFER: 1}, per_agent=10, retry_after_s=1)
        async with limits.queued(Kind.CALL, 1.0):
            with pytest.raises(ServiceError) as late:
                async with limits.queued(Kind.CALL, 0.05):
                    pass
            assert late.value.code is Code.RESOURCE_EXHAUSTED
            waiting = asyncio.create_task(limits.queued(Kind.CALL, 5.0).__aenter__())
            await asyncio.sleep(0)
            waiting.cancel()  # a caller that goes away while queued
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert limits.queued_count(Kind.CALL) == 0
        assert limits.open(Kind.CALL) == 0
        async with limits.queued(Kind.CALL, 0.0):  # free again
            assert limits.open(Kind.CALL) == 1

    asyncio.run(run())


def test_one_agent_cannot_take_more_than_its_share() -> None:
    limits = CallLimits({Kind.CALL: 100, Kind.WAIT: 100, Kind.TRANSFER: 100}, per_agent=2, retry_after_s=1)
    with limits.agent_slot("greedy"), limits.agent_slot("greedy"):
        err = refused(lambda: limits.agent_slot("greedy").__enter__())
        assert err.retry_after_s == 1 and "at most 2" in err.message
        with limits.agent_slot("other"), limits.agent_slot("other"):  # others keep their own share
            assert limits.agent_open("other") == 2
    assert limits.agent_open("greedy") == 0 and limits.agent_open("other") == 0


def test_slots_are_released_when_the_call_fails() -> None:
    limits = CallLimits({Kind.CALL: 1, Kind.WAIT: 1, Kind.TRANSFER: 1}, per_agent=1, retry_after_s=1)
    with pytest.raises(RuntimeError), limits.slot(Kind.CALL), limits.agent_slot("a"):
        raise RuntimeError("the handler failed")
    assert limits.open(Kind.CALL) == 0 and limits.agent_open("a") == 0


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        CallLimits({Kind.CALL: 0, Kind.WAIT: 1, Kind.TRANSFER: 1}, per_agent=1, retry_after_s=1)
    with pytest.raises(ValueError):
        CallLimits({Kind.CALL: 1, Kind.WAIT: 1}, per_agent=1, retry_after_s=1)  # type: ignore[dict-item]


def test_waiters_wake_exactly_the_named_agents() -> None:
    async def run() -> None:
        waiters = Waiters()
        a, b, c = waiters.register("a"), waiters.register("b"), waiters.register("c")
        assert waiters.wake(["a", "c", "not-here"]) == 2
        assert a.event.is_set() and c.event.is_set() and not b.event.is_set()
        assert waiters.wake(None) == 3  # an event that names no agents wakes everyone
        assert b.event.is_set()
        waiters.unregister("b", b)
        assert len(waiters) == 2 and waiters.wake(["b"]) == 0

    asyncio.run(run())


def test_a_new_wait_of_the_same_agent_supersedes_the_old_one() -> None:
    async def run() -> None:
        waiters = Waiters()
        old = waiters.register("a")
        new = waiters.register("a")
        assert old.superseded and old.event.is_set()
        assert not new.superseded and not new.event.is_set()
        waiters.unregister("a", old)  # the old call ending does not remove the new wait
        assert len(waiters) == 1 and waiters.wake(["a"]) == 1 and new.event.is_set()

    asyncio.run(run())


def test_task_events_carry_the_selected_agents_in_bounded_messages() -> None:
    ids = [f"agent-{i:04d}" for i in range(2 * EVENT_AGENTS_MAX + 1)]
    events = list(task_events("job-1", ids))
    assert [len(e["agents"]) for e in events] == [EVENT_AGENTS_MAX, EVENT_AGENTS_MAX, 1]
    assert [a for e in events for a in e["agents"]] == ids
    assert {e["type"] for e in events} == {"tasks_assigned"} and {e["job_id"] for e in events} == {"job-1"}
    assert list(task_events("job-1", [])) == []
    assert agents_of({"type": "tasks_assigned", "job_id": "j"}) is None  # names no agents: wake all
    assert agents_of({"agents": ["a", 3, "b"]}) == ["a", "b"]


def test_an_empty_read_stays_fresh_while_the_sweep_works_until_an_event_or_sweep_names_the_agent() -> None:
    waiters = Waiters(sweep_s=15.0)
    waiters.note_empty("a", waiters.read_mark())
    waiters.note_empty("b", waiters.read_mark())
    assert waiters.needs_read("a", 0.0)  # no sweep yet: every wait reads
    assert waiters.recheck_s(0.0) == 15.0  # ... and re-reads by itself
    waiters.swept([], 0.0, waiters.read_mark())  # a sweep found no pending agent
    assert not waiters.needs_read("a", 5.0)
    assert waiters.recheck_s(5.0) is None  # waits need no periodic read while sweeps work
    assert not waiters.needs_read("c", 5.0)  # never read here, but the sweep would have named it
    waiters.wake(["a"])  # a round named a (not waiting here: still remembered)
    assert waiters.needs_read("a", 5.0)
    assert not waiters.needs_read("b", 5.0)
    waiters.swept(["b"], 15.0, waiters.read_mark())  # the sweep finds b's task (its event was lost)
    assert waiters.needs_read("b", 16.0)
    waiters.note_empty("b", waiters.read_mark())
    waiters.wake(None)  # an event naming no one concerns everyone
    assert waiters.needs_read("b", 16.0)
    waiters.note_empty("b", waiters.read_mark())
    assert not waiters.needs_read("b", 45.0)
    assert waiters.needs_read("b", 46.0)  # two sweep periods (+1 s) without one: back to reading
    assert waiters.recheck_s(46.0) == 15.0


def test_a_sweep_wakes_the_pending_agents_waiting_here() -> None:
    async def run() -> None:
        waiters = Waiters(sweep_s=15.0)
        a, b = waiters.register("a"), waiters.register("b")
        assert waiters.swept(["b", "z"], 0.0, waiters.read_mark()) == 1  # z has a task but waits on another replica
        assert (a.event.is_set(), b.event.is_set()) == (False, True)

    asyncio.run(run())


def test_an_event_during_the_read_makes_its_empty_answer_stale() -> None:
    waiters = Waiters(sweep_s=15.0)
    waiters.swept([], 0.0, waiters.read_mark())
    mark = waiters.read_mark()  # the read starts ...
    waiters.wake(["a"])  # ... a round names a while it runs ...
    waiters.note_empty("a", mark)  # ... and it found nothing
    assert waiters.needs_read("a", 1.0)


def test_a_sweep_names_a_never_read_agent_with_a_task_and_an_event_during_its_query_counts() -> None:
    waiters = Waiters(sweep_s=15.0)
    mark = waiters.read_mark()  # the sweep's query starts ...
    waiters.wake(["late"])  # ... a round opens for `late` while it runs (its event arrives first)
    waiters.swept(["pending"], 0.0, mark)  # ... and the query saw `pending` only
    assert waiters.needs_read("pending", 1.0)
    assert waiters.needs_read("late", 1.0)
    assert not waiters.needs_read("idle", 1.0)


def test_the_empty_reads_remembered_are_bounded() -> None:
    waiters = Waiters(sweep_s=15.0)
    waiters.swept([], 0.0, waiters.read_mark())
    for i in range(5000):
        waiters.note_empty(f"agent-{i}", waiters.read_mark())
    assert len(waiters._empty) <= 4 * 1024
    assert not waiters.needs_read("agent-0", 1.0)  # forgotten: the sweep's mark stands in for it
    waiters.wake(["agent-0"])
    assert waiters.needs_read("agent-0", 1.0)
