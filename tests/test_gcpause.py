"""fedhl.gcpause: full collections at a fixed period instead of Python's heap-growth trigger,
and every collection's pause observed (a fleet-sized heap made those pauses the agent plane's
heartbeat tail: bench/README.md, fleet)."""

from __future__ import annotations

import gc
import threading
import time

from fedhl.gcpause import NEVER, bound_full_collections, observe_pauses
from fedhl.metrics import REGISTRY
from fedhl.supervise import LoopState


def pauses(generation: str) -> float:
    value = REGISTRY.get_sample_value("fedhl_gc_pause_seconds_count", {"generation": generation})
    return value or 0.0


def test_collections_are_observed_by_generation() -> None:
    observe_pauses()
    observe_pauses()  # idempotent: one callback, one observation per collection
    before = pauses("2"), pauses("0")
    gc.collect(2)
    gc.collect(0)
    assert (pauses("2"), pauses("0")) == (before[0] + 1, before[1] + 1)


def test_full_collections_run_on_the_period_and_the_policy_is_restored() -> None:
    observe_pauses()
    original = gc.get_threshold()
    state, stop = LoopState("gc-full", 60.0), threading.Event()
    t = threading.Thread(target=bound_full_collections, args=(state, 0.2, stop))
    before = pauses("2")
    t.start()
    try:
        deadline = time.monotonic() + 10
        while gc.get_threshold()[2] != NEVER and time.monotonic() < deadline:
            time.sleep(0.01)
        # automatic full collections are off; young generations keep Python's thresholds
        assert gc.get_threshold() == (original[0], original[1], NEVER)
        while pauses("2") < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pauses("2") >= before + 2  # the loop ran full collections itself, every 0.2 s
        assert state.healthy()
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert gc.get_threshold() == original
