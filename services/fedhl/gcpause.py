"""Bounded pauses of Python's cyclic garbage collector in a process that holds a fleet.

CPython 3.11 runs a full (generation 2) collection whenever the objects that survived into
the oldest generation since the last one reach a quarter of it. A coordinator holding 5,000
agents' open long-polls tracks ~700,000 objects and renews them at the fleet's call rate, so
a full collection ran every 5-10 s and stopped every thread for 0.2-0.5 s on 2 cores: the
agent plane's heartbeat p99 tail (bench/README.md, fleet). `bound_full_collections` turns the
automatic full collections off (threshold 2 out of reach) and runs one every `every_s`
instead; young collections (generations 0 and 1: recent objects only, tens of ms) stay
automatic. The cost: a reference cycle that reached the oldest generation is freed up to
`every_s` later (objects without cycles are freed by reference counting at once).

Every collection's pause is observed in `fedhl_gc_pause_seconds{generation}`, and a pause
above `SLOW_S` is logged, so an operator sees what the collector costs the process.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from prometheus_client import Histogram

from .metrics import REGISTRY
from .supervise import LoopState

log = logging.getLogger(__name__)

SLOW_S = 0.1  # a collection pausing the process longer than this is logged
TICK_S = 5.0  # the loop reports itself alive this often between full collections
NEVER = 2**31 - 1  # generation-1 collections before an automatic full one: never, in practice

GC_PAUSE = Histogram(
    "fedhl_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector, by generation (2: full collection).",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)

_started: dict[str, float] = {}
_installed = threading.Lock()


def _observe(phase: str, info: dict[str, Any]) -> None:
    # called by the collector itself, on whichever thread triggered it
    if phase == "start":
        _started["t"] = time.perf_counter()
        return
    began = _started.pop("t", None)
    if began is None:
        return
    pause = time.perf_counter() - began
    GC_PAUSE.labels(str(info["generation"])).observe(pause)
    if pause > SLOW_S:
        log.info("gc: generation %d paused the process %.0f ms", info["generation"], 1000 * pause)


def observe_pauses() -> None:
    """Observe every collection's pause (idempotent)."""
    with _installed:
        if _observe not in gc.callbacks:
            gc.callbacks.append(_observe)


def bound_full_collections(state: LoopState, every_s: float, stop: threading.Event) -> None:
    """Body for `supervise`: automatic full collections off, one every `every_s` here; the
    automatic policy is restored when `stop` is set."""
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], NEVER)
    due = time.monotonic() + every_s
    try:
        while not stop.wait(min(TICK_S, every_s)):
            if time.monotonic() >= due:
                gc.collect(2)
                due = time.monotonic() + every_s
            state.tick()
    finally:
        gc.set_threshold(*before)
