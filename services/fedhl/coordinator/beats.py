"""Liveness writes of the agent plane's hot path, batched: an idle agent's heartbeat or the
start of its long-poll records `agent -> ttl` here, on the plane's event loop (no I/O), and the
plane writes everything recorded in one pipelined round trip every `LIVENESS_FLUSH_S`
(`Liveness.beat_many`). A liveness TTL is at least `heartbeat_ttl_s` (15 s by default), so a
beat that lands a fraction of a second late changes nothing; a failed write keeps its beats
for the next flush (they are bounded by the fleet: only authenticated agents are recorded)."""

from __future__ import annotations

LIVENESS_FLUSH_S = 0.25


class LivenessBatch:
    """Not thread-safe: used on the agent plane's event loop only."""

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def beat(self, agent_id: str, ttl_s: float) -> None:
        if ttl_s > self._pending.get(agent_id, 0.0):
            self._pending[agent_id] = ttl_s

    def take(self) -> dict[str, float]:
        """Everything recorded since the last take (the caller writes it)."""
        taken, self._pending = self._pending, {}
        return taken

    def restore(self, beats: dict[str, float]) -> None:
        """A write failed: keep these beats for the next flush (newer ones win)."""
        for agent_id, ttl_s in beats.items():
            self.beat(agent_id, ttl_s)
