"""Supervised background loops: a loop body that raises is logged, backed off with jitter
(bounded) and run again; it never ends while the process lives (only when `stop` is set).
Each loop records its last successful tick, which `/readyz` and the Prometheus gauges read.

Shared by the coordinator (scheduler, leader election, blob GC, in-process worker) and the
aggregation worker, so it is a neutral module: it imports neither service."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Gauge

from . import metrics

log = logging.getLogger(__name__)

LOOP_UP = Gauge(
    "fedhl_loop_up",
    "1 while a background loop's last step succeeded, 0 while it is backing off after an error.",
    ["loop"],
    registry=metrics.REGISTRY,
)
LOOP_TICK_AGE = Gauge(
    "fedhl_loop_last_tick_age_seconds",
    "Seconds since a background loop's last successful tick.",
    ["loop"],
    registry=metrics.REGISTRY,
)


@dataclass
class LoopState:
    """What one loop reports about itself (read by health checks from other threads)."""

    name: str
    max_age_s: float  # older than this, the loop counts as stuck
    last_tick: float = field(default_factory=time.monotonic)  # monotonic; start counts as a tick
    error: str | None = None  # the last error while backing off; None once a tick succeeds
    failures: int = 0  # consecutive failures

    def tick(self) -> None:
        self.last_tick, self.error, self.failures = time.monotonic(), None, 0
        LOOP_UP.labels(self.name).set(1)

    def age_s(self) -> float:
        return time.monotonic() - self.last_tick

    def healthy(self) -> bool:
        return self.error is None and self.age_s() <= self.max_age_s


class LoopRegistry:
    """The loops of one process, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loops: dict[str, LoopState] = {}

    def register(self, name: str, max_age_s: float) -> LoopState:
        return self.add(LoopState(name, max_age_s))

    def add(self, state: LoopState) -> LoopState:
        """Track a loop created elsewhere (e.g. the Redis event listener)."""
        with self._lock:
            self._loops[state.name] = state
        LOOP_UP.labels(state.name).set(1 if state.error is None else 0)
        LOOP_TICK_AGE.labels(state.name).set_function(state.age_s)
        return state

    def all(self) -> list[LoopState]:
        with self._lock:
            return list(self._loops.values())


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th consecutive failure waits a random time
    in [base/2, min(cap, base * 2**n)], so replicas that failed together do not retry together."""

    base_s: float = 0.5
    cap_s: float = 15.0

    def delay(self, failures: int) -> float:
        top = min(self.cap_s, self.base_s * (2 ** min(failures, 30)))
        return random.uniform(min(self.base_s / 2, top), top)


def supervise(
    state: LoopState,
    body: Callable[[LoopState], None],
    stop: threading.Event,
    backoff: Backoff = Backoff(),
) -> None:
    """Run `body(state)` until `stop` is set, restarting it after any exception. The body
    loops itself and calls `state.tick()` after each successful step; returning while `stop`
    is clear simply starts it again (after a short pause, so a body that returns at once does
    not spin)."""
    while not stop.is_set():
        try:
            body(state)
            if not stop.is_set():
                stop.wait(backoff.base_s)
        except Exception as e:  # every failure is retried: the loop must outlive its backends
            state.failures += 1
            state.error = f"{type(e).__name__}: {e}"[:500]
            LOOP_UP.labels(state.name).set(0)
            wait = backoff.delay(state.failures)
            log.warning(
                "%s loop failed (%s, %d in a row); retrying in %.1fs",
                state.name,
                state.error,
                state.failures,
                wait,
                exc_info=state.failures == 1,
            )
            stop.wait(wait)
