"""A bounded, expiring in-process map used on the agent plane's hot path: credential digest →
agent id (so Heartbeat and PullTask need no database query to authenticate), and agent id →
the resources it last reported (so an unchanged heartbeat needs no database read).

Keys of the credential cache are sha256 digests: the plaintext credential is never stored.
Entries expire after `ttl_s` (the bound on a missed revocation event) and the least recently
used are evicted past `max_entries`. Thread-safe: the agent plane's pool threads and the
event relay thread use it at once."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

V = TypeVar("V")


def credential_digest(credential: str) -> bytes:
    return hashlib.sha256(credential.encode()).digest()


class TtlLru(Generic[V]):
    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or not ttl_s > 0:
            raise ValueError("max_entries and ttl_s must be positive")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes | str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes | str) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if hit[0] <= self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: bytes | str, value: V) -> None:
        with self._lock:
            self._items[key] = (self._clock() + self.ttl_s, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def discard(self, key: bytes | str) -> None:
        with self._lock:
            self._items.pop(key, None)


class AuthCache:
    """sha256(credential) → agent id, and agent id → its digest (to forget an agent by id)."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_digest: TtlLru[str] = TtlLru(max_entries, ttl_s, clock)
        self._lock = threading.Lock()
        self._digest_of: dict[str, bytes] = {}
        self._epoch = 0  # bumped by every `forget`

    def __len__(self) -> int:
        return len(self._by_digest)

    def get(self, credential: str) -> str | None:
        return self._by_digest.get(credential_digest(credential))

    def epoch(self) -> int:
        """Read before the database check whose answer is `put`: a revocation in between wins."""
        return self._epoch

    def put(self, credential: str, agent_id: str, epoch: int) -> None:
        """Cache a database-checked credential, unless a revocation came since `epoch`."""
        digest = credential_digest(credential)
        with self._lock:
            if epoch != self._epoch:
                return
            old = self._digest_of.get(agent_id)
            if old is not None and old != digest:
                self._by_digest.discard(old)
            self._digest_of[agent_id] = digest
            self._by_digest.put(digest, agent_id)
            if len(self._digest_of) > 2 * self._by_digest.max_entries:  # evicted entries' back-references
                self._digest_of = {a: d for a, d in self._digest_of.items() if self._by_digest.get(d) == a}

    def forget(self, agent_ids: Iterable[str]) -> None:
        """These agents authenticate against the database again (revocation)."""
        with self._lock:
            self._epoch += 1
            for agent_id in agent_ids:
                digest = self._digest_of.pop(agent_id, None)
                if digest is not None:
                    self._by_digest.discard(digest)
