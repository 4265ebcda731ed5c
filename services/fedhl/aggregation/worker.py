"""The aggregation worker: a loop that consumes aggregation tasks from the queue (Redis Stream
consumer group, or the in-process queue), and `fedhl aggregator`, the process that runs it,
merging on CUDA when present (else CPU) and committing rounds exactly once. Run as many
workers as you like; each takes tasks (round shards) as they come.

The coordinator runs the same loop in a thread when `inprocess_aggregator` is set; it is handed
`run_worker` by the process wiring (`fedhl.cli`), so it never imports this package."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from prometheus_client import start_http_server

from .. import metrics
from ..backends import AggregationTask, Deps, WorkerOptions
from ..settings import Settings, SettingsError
from ..storage.blobs import open_blob_store, resolve_blob_url
from ..storage.coordination import JobQueue
from ..storage.db import schema_is_current, session_factory
from ..supervise import LoopRegistry, LoopState, supervise
from .allocator import fix_mmap_threshold
from .commit import Outcome, dead_letter_round, run_task
from .inputs import pick_device

log = logging.getLogger(__name__)


class WorkerConfigError(SettingsError):
    """The worker cannot run with these settings."""


DEFAULT_OPTIONS = WorkerOptions()
TaskRunner = Callable[[Deps, int, int, str], Outcome]  # (deps, round id, shard, worker) -> outcome


def run_worker(
    deps: Deps,
    consumer: str,
    stop: threading.Event,
    options: WorkerOptions = DEFAULT_OPTIONS,
    loops: LoopRegistry | None = None,
    *,
    runner: TaskRunner = run_task,
) -> None:
    """Consume aggregation tasks until `stop` is set, supervised: a Redis or database error
    is logged, backed off and retried; the loop only ends with `stop`. Each pass first
    reclaims tasks a silent worker left pending longer than `reclaim_idle_s`; a task
    delivered more than `max_deliveries` times is dead-lettered, its round failed and its job
    paused. `runner` computes one task (tests inject a slow one)."""
    state = (loops or LoopRegistry()).register(f"aggregator:{consumer}", options.stale_after_s)
    supervise(state, lambda st: _consume(deps, consumer, stop, options, st, runner), stop)


def _consume(
    deps: Deps, consumer: str, stop: threading.Event, options: WorkerOptions, state: LoopState, runner: TaskRunner
) -> None:
    queue = deps.coordination.queue
    while not stop.is_set():
        reclaimed = queue.reclaim(consumer, options.reclaim_idle_s)
        if reclaimed:
            metrics.RECLAIMED_JOBS.inc(len(reclaimed))
            log.info("reclaimed %d aggregation task(s) left pending by another worker", len(reclaimed))
        entries = reclaimed or queue.consume(consumer, options.block_s)
        state.tick()
        for entry_id, fields in entries:
            if stop.is_set():
                return  # still pending: another worker (or this one, restarted) takes it over
            _handle(deps, consumer, entry_id, fields, options, runner)
            state.tick()


def _handle(
    deps: Deps, consumer: str, entry_id: str, fields: dict[str, str], options: WorkerOptions, runner: TaskRunner
) -> None:
    queue = deps.coordination.queue
    try:
        task = AggregationTask.from_fields(fields)
    except ValueError as e:
        queue.dead_letter(entry_id, str(e))
        log.error("dead-lettered %s: %s", entry_id, e)
        return
    deliveries = queue.delivery_count(entry_id)
    if deliveries > options.max_deliveries:
        reason = (
            f"aggregation of round {task.round_id} shard {task.shard} was delivered {deliveries} times "
            f"(limit {options.max_deliveries}) without finishing"
        )
        dead_letter_round(deps, task.round_id, reason, f"aggregator:{consumer}")  # database first: retried if it fails
        queue.dead_letter(entry_id, reason)
        metrics.AGGREGATION_JOBS.labels("dead_letter").inc()
        return
    with _Heartbeat(queue, consumer, entry_id, interval_s=max(0.05, options.reclaim_idle_s / 4)):
        try:
            outcome = runner(deps, task.round_id, task.shard, f"aggregator:{consumer}")
        except Exception:  # leave it pending: a later reclaim retries it, up to max_deliveries
            log.exception("aggregation task %s (delivery %d) failed", fields, deliveries)
            metrics.AGGREGATION_JOBS.labels("error").inc()
            return
    metrics.AGGREGATION_JOBS.labels(outcome).inc()
    queue.ack(entry_id)


class _Heartbeat:
    """Keeps a task's pending entry fresh while it is computed, so `reclaim` elsewhere never
    takes over a live task however long the merge runs. A worker that dies stops beating and
    its task is reclaimed `reclaim_idle_s` later."""

    def __init__(self, queue: JobQueue, consumer: str, entry_id: str, interval_s: float) -> None:
        self.queue, self.consumer, self.entry_id, self.interval_s = queue, consumer, entry_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{entry_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.queue.touch(self.consumer, self.entry_id):
                    log.warning("task %s is no longer pending with %s", self.entry_id, self.consumer)
                    return
            except Exception as e:  # Redis away: keep trying; the entry may be reclaimed meanwhile
                log.warning("heartbeat of task %s failed: %s", self.entry_id, e)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def serve_worker(settings: Settings, consumer: str | None = None) -> None:
    if settings.redis_url is None:
        raise WorkerConfigError(
            "the aggregator worker consumes tasks from Redis: set FEDHL_REDIS_URL "
            "(without Redis the coordinator aggregates in-process)"
        )
    engine = settings.engine()
    if not schema_is_current(engine):
        raise RuntimeError("the database schema is not at the latest migration: run `fedhl migrate` first")
    device = pick_device(settings.aggregator_device)
    fix_mmap_threshold()  # freed tensors go back to the kernel (aggregation/allocator.py)
    deps = Deps(
        session_factory(engine),
        open_blob_store(resolve_blob_url(settings.blob_url), settings.s3),
        settings.coordination(),
        device,
    )
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    metrics.AGGREGATOR_DEVICE.labels(device).set(1)
    if settings.aggregator_metrics_port:
        start_http_server(settings.aggregator_metrics_port, registry=metrics.REGISTRY)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # finish the task in hand, then exit
    log.info("aggregator %s on %s: waiting for tasks", name, device)
    try:
        run_worker(deps, name, stop, settings.worker_options)
    finally:
        deps.coordination.close()
        engine.dispose()
