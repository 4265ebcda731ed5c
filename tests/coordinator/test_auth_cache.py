"""The agent plane's authentication cache: bounded (LRU), expiring (TTL), keyed by a digest of
the credential, and emptied of a revoked agent at once on the replica that revoked it and, by
the AGENT_REVOKED event, on every other replica (two coordinators on one Postgres + Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from fedhl.agent.client import AgentClient
from fedhl.coordinator.admin import AgentAdmin
from fedhl.coordinator.authcache import AuthCache, TtlLru, credential_digest
from fedhl.storage.db import transaction
from fedhl.storage.repos import AgentRepo
from stack import running, settings_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lru_keeps_at_most_max_entries_and_evicts_the_least_recently_used() -> None:
    lru: TtlLru[int] = TtlLru(3, 60.0)
    for k in "abc":
        lru.put(k, ord(k))
    assert lru.get("a") == ord("a")  # a is now the most recently used
    lru.put("d", 4)
    assert len(lru) == 3
    assert lru.get("b") is None
    assert [lru.get(k) for k in "acd"] == [ord("a"), ord("c"), 4]


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    lru: TtlLru[str] = TtlLru(10, 30.0, clock)
    lru.put("k", "v")
    clock.now = 29.9
    assert lru.get("k") == "v"
    clock.now = 30.0
    assert lru.get("k") is None
    assert len(lru) == 0


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TtlLru(0, 1.0)
    with pytest.raises(ValueError):
        TtlLru(1, 0.0)


def test_auth_cache_stores_digests_only_and_forgets_an_agent_by_id() -> None:
    cache = AuthCache(100, 30.0)
    cache.put("a1.secret-one", "a1", cache.epoch())
    cache.put("a2.secret-two", "a2", cache.epoch())
    keys = list(cache._by_digest._items)
    assert keys == [credential_digest("a1.secret-one"), credential_digest("a2.secret-two")]
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    assert cache.get("a1.secret-one") == "a1"
    assert cache.get("a1.wrong") is None
    cache.forget(["a1"])
    assert cache.get("a1.secret-one") is None
    assert cache.get("a2.secret-two") == "a2"


def test_a_check_that_started_before_a_revocation_is_not_cached() -> None:
    cache = AuthCache(100, 30.0)
    epoch = cache.epoch()  # the database said "active" ...
    cache.forget(["a1"])  # ... then the agent was revoked, before the answer was cached
    cache.put("a1.secret", "a1", epoch)
    assert cache.get("a1.secret") is None
    cache.put("a1.secret", "a1", cache.epoch())
    assert cache.get("a1.secret") == "a1"


def test_auth_cache_is_bounded_by_its_size() -> None:
    cache = AuthCache(50, 30.0)
    for i in range(500):
        cache.put(f"a{i}.s", f"a{i}", cache.epoch())
    assert len(cache) == 50
    assert len(cache._digest_of) <= 100
    assert cache.get("a0.s") is None
    assert cache.get("a499.s") == "a499"


def refused_within(call: Callable[[], object], timeout_s: float) -> grpc.StatusCode:
    """The status of the first refused call, polling until `timeout_s` (a bound, not a measurement)."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            call()
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
        if time.monotonic() > end:
            raise AssertionError(f"still accepted after {timeout_s} s")
        time.sleep(0.05)


def test_revocation_reaches_the_cache_of_this_replica_at_once_and_of_another_by_event(tmp_path: Path) -> None:
    # the auth cache TTL is an hour: within this test only the event can empty replica B's cache
    base = settings_for("postgres+redis", tmp_path, auth_cache_ttl_s=3600.0)
    with running(base) as a, running(replace(base, http_port=base.http_port + 1)) as b:
        with transaction(a.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 10, None)
        on_a = AgentClient(f"127.0.0.1:{a.grpc_port}")
        agent_id, credential = on_a.register(tok, "edge")
        on_b = AgentClient(f"127.0.0.1:{b.grpc_port}", credential=credential)
        assert on_a.heartbeat() == "CONTINUE"
        assert on_b.heartbeat() == "CONTINUE"
        assert a.agents.auth_cache.get(credential) == agent_id  # both replicas hold it now
        assert b.agents.auth_cache.get(credential) == agent_id

        AgentAdmin(a.deps).revoke_agent(agent_id)
        with pytest.raises(grpc.RpcError) as e:  # the revoking replica: the very next call
            on_a.heartbeat()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused_within(lambda: on_b.pull_task(0), 10.0) == grpc.StatusCode.PERMISSION_DENIED
        assert b.agents.auth_cache.get(credential) is None
        on_a.close()
        on_b.close()
