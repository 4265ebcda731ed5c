"""How often agents call (pure): the server tells each agent its heartbeat interval and how long
to wait between pulls, and lengthens both as the fleet grows so that the whole fleet sends about
`calls_per_s` long-polls (and as many heartbeats of busy agents) per second, whatever its size.

An idle agent is kept alive by its open long-poll, so its own heartbeats only refresh its
resources: they come at twice the long-poll length. Liveness stretches with the interval: an
agent is alive for three intervals after its last call (or after its open wait ends)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Pacing:
    heartbeat_ttl_s: float  # liveness after one call, for a small fleet
    pull_wait_max_s: float  # the long-poll of a small fleet
    calls_per_s: float  # what the whole fleet's long-polls (or busy heartbeats) should add up to
    pull_wait_fleet_max_s: float = 120.0  # the longest long-poll asked of a large fleet

    def heartbeat_interval_s(self, fleet: int) -> int:
        """Seconds between a busy agent's heartbeats: a third of the TTL, longer for a large fleet."""
        return max(1, int(self.heartbeat_ttl_s / 3), math.ceil(max(fleet, 0) / self.calls_per_s))

    def idle_heartbeat_interval_s(self, fleet: int) -> int:
        """Seconds between an idle agent's heartbeats (its open long-poll keeps it alive)."""
        return max(self.heartbeat_interval_s(fleet), 2 * self.pull_wait_s(fleet))

    def liveness_ttl_s(self, fleet: int) -> float:
        """How long one call keeps an agent alive: three of its heartbeat intervals."""
        return max(self.heartbeat_ttl_s, 3.0 * self.heartbeat_interval_s(fleet))

    def wait_ttl_s(self, wait_s: float, fleet: int) -> float:
        """Liveness set when a long-poll starts: its whole length, then as after any call."""
        return max(wait_s, 0.0) + self.liveness_ttl_s(fleet)

    def pull_pause_s(self, wait_s: float, fleet: int) -> int:
        """Seconds an agent waits before pulling again after an empty answer: none after a
        long-poll (waiting costs the server nothing), paced like heartbeats after a zero wait."""
        if wait_s > 0:
            return 0
        return max(1, math.ceil(max(fleet, 0) / self.calls_per_s))

    def spread_retry_after_s(self, fleet: int, rng: random.Random | None = None) -> int:
        """A refused agent's retry-after when the server is overloaded: uniform over the fleet's
        pacing period, so a crowd that arrived together comes back spread out."""
        period = max(2, math.ceil(max(fleet, 0) / self.calls_per_s))
        return (rng or random).randint(1, period)

    def pull_wait_s(self, fleet: int = 0) -> int:
        """The long-poll length the server asks agents to request (and the most it grants):
        `pull_wait_max_s` for a small fleet, up to `pull_wait_fleet_max_s` for a large one."""
        paced = min(max(fleet, 0) / self.calls_per_s, max(self.pull_wait_fleet_max_s, self.pull_wait_max_s))
        return max(1, int(self.pull_wait_max_s), math.ceil(paced))
