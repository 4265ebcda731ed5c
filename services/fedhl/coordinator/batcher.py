"""Group commit for the agent plane's hot writes: many callers, one transaction.

A round that opens for 1,000 agents wakes them together, and their claims (and, a little
later, their uploads) arrive together. Each in its own transaction costs a pool thread hop,
a connection checkout and a commit per agent: the coordinator spent its CPU on that, not on
the work (bench/README.md, fleet). A `Batcher` queues the items; each of its worker threads
takes every item queued so far (up to `max_batch`) and runs the batch function once, so a
burst of N costs a few transactions instead of N. Nothing waits to fill a batch: a lone item
runs at once, and batches grow only while the workers are busy (the load makes them).

One bad item never fails the others: when the batch function raises, every item is run again
alone, and only the items that fail alone get the error. The queue is bounded: past
`max_queue` waiting items `submit` raises `Full` (the edge answers RESOURCE_EXHAUSTED with a
retry-after), so a burst cannot grow memory without limit."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .. import metrics as prom

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result


class Full(Exception):
    """The batcher's queue holds `max_queue` items already."""


class Batcher(Generic[I, R]):
    def __init__(
        self,
        name: str,
        fn: Callable[[Sequence[I]], Sequence[R | Exception]],  # one result or error per item, in order
        *,
        workers: int = 2,
        max_batch: int = 256,
        max_queue: int = 8192,
    ) -> None:
        if workers < 1 or max_batch < 1 or max_queue < 1:
            raise ValueError("workers, max_batch and max_queue must be at least 1")
        self.name = name
        self.fn = fn
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._workers = workers
        self._queue: deque[tuple[I, concurrent.futures.Future[R]]] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, item: I) -> concurrent.futures.Future[R]:
        """Queue `item`; its future resolves to its result or raises its error."""
        fut: concurrent.futures.Future[R] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            if len(self._queue) >= self.max_queue:
                raise Full(f"{len(self._queue)} {self.name} items queued")
            if len(self._threads) < self._workers:  # started on first use: idle services hold no thread
                t = threading.Thread(target=self._run, name=f"batch-{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            self._queue.append((item, fut))
            self._cond.notify()
        return fut

    def run(self, item: I) -> R:
        """Submit and wait (for blocking callers)."""
        return self.submit(item).result()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking items; the workers finish what is queued, then exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout_s)

    def backlog(self) -> int:
        return len(self._queue)

    def _take(self) -> list[tuple[I, concurrent.futures.Future[R]]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            n = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        # Never dies: every error of a batch ends up in its items' futures.
        while (batch := self._take()) is not None:
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            prom.DB_BATCH_ITEMS.labels(self.name).observe(len(live))
            try:
                results = self._call([item for item, _ in live])
            except Exception as e:  # rerun alone: one bad item must not fail the rest
                if len(live) > 1:
                    log.info(
                        "batch %s of %d failed (%s: %s); running its items one by one",
                        self.name,
                        len(live),
                        type(e).__name__,
                        e,
                    )
                results = [self._alone(item) for item, _ in live] if len(live) > 1 else [e]
            for (_, fut), res in zip(live, results, strict=True):
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _call(self, items: list[I]) -> Sequence[R | Exception]:
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch {self.name}: {len(results)} results for {len(items)} items")
        return results

    def _alone(self, item: I) -> R | Exception:
        try:
            return self._call([item])[0]
        except Exception as e:  # the item's own error, for its caller
            return e
