"""What the coordinator and the aggregator share at run time, so neither imports the other:
the backends a process is wired to, the event channels, the aggregation-task message, and the
shape of the worker loop a coordinator may run in-process (handed to it by the process wiring)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from .storage.blobs import BlobStore
from .storage.coordination import Coordination
from .supervise import LoopRegistry

ROUND_EVENTS = "rounds"  # a round opened or changed
TASK_EVENTS = "tasks"  # a round gave these agents tasks: {"type", "job_id", "agents": [ids]} wakes their waits
AGENT_REVOKED = "agent_revoked"  # TASK_EVENTS type: {"type", "agents": [ids]}: every replica forgets their credentials
SCHEDULER_EVENTS = "scheduler"  # uploads, commits, job changes: wake the scheduler


@dataclass
class Deps:
    """The backends one process is wired to (built once at start, passed down)."""

    sessions: sessionmaker[Session]
    blobs: BlobStore
    coordination: Coordination  # liveness, leases, the aggregation queue, events, rate limits
    device: str | None = None  # aggregation device; None: CUDA when present, else CPU
    # called with revoked agent ids in this process at once (the auth cache forgets them);
    # other replicas learn it from an AGENT_REVOKED event on TASK_EVENTS
    on_revoked: list[Callable[[Sequence[str]], None]] = field(default_factory=list)


@dataclass(frozen=True)
class AggregationTask:
    """One entry of the aggregation stream: merge shard `shard` of round `round_id`."""

    round_id: int
    shard: int = 0

    def to_fields(self) -> dict[str, str]:
        return {"round_id": str(self.round_id), "shard": str(self.shard)}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> AggregationTask:
        """Raises ValueError on a malformed entry (missing or non-integer fields)."""
        try:
            return cls(int(fields["round_id"]), int(fields.get("shard", "0")))
        except (KeyError, ValueError) as e:
            raise ValueError(f"malformed aggregation task {fields!r}") from e


@dataclass(frozen=True)
class WorkerOptions:
    """How an aggregation worker treats its queue (from settings)."""

    reclaim_idle_s: float = 60.0  # a task pending this long without a heartbeat is taken over
    max_deliveries: int = 5  # deliveries of one task before it is dead-lettered and its job paused
    block_s: float = 1.0  # longest wait for a new task per read
    stale_after_s: float = 30.0  # /readyz: the loop counts as stuck past this without a tick


# (deps, consumer name, stop event, options, loop registry): consume aggregation tasks until stopped.
WorkerLoop = Callable[[Deps, str, threading.Event, WorkerOptions, LoopRegistry | None], None]
