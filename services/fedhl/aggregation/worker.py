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

from prometheus_client import start_http_server

from .. import metrics
from ..backends import AggregationTask, Deps
from ..settings import Settings, SettingsError
from ..storage.blobs import open_blob_store, resolve_blob_url
from ..storage.coordination import open_coordination
from ..storage.db import make_engine, schema_is_current, session_factory
from .commit import run_task
from .inputs import pick_device

log = logging.getLogger(__name__)


class WorkerConfigError(SettingsError):
    """The worker cannot run with these settings."""


def run_worker(
    deps: Deps, consumer: str, stop: threading.Event, reclaim_idle_s: float = 60.0, block_s: float = 1.0
) -> None:
    """Consume aggregation tasks until `stop` is set; first reclaim entries that a dead worker
    left pending longer than `reclaim_idle_s`."""
    queue = deps.coordination.queue
    while not stop.is_set():
        reclaimed = queue.reclaim(consumer, reclaim_idle_s)
        if reclaimed:
            metrics.RECLAIMED_JOBS.inc(len(reclaimed))
            log.info("reclaimed %d aggregation task(s) left pending by another worker", len(reclaimed))
        for entry_id, fields in reclaimed or queue.consume(consumer, block_s):
            try:
                task = AggregationTask.from_fields(fields)
                outcome = run_task(deps, task.round_id, task.shard, worker=f"aggregator:{consumer}")
            except Exception:  # leave it pending: a later reclaim retries it
                log.exception("aggregation task %s failed unexpectedly", fields)
                metrics.AGGREGATION_JOBS.labels("error").inc()
                continue
            metrics.AGGREGATION_JOBS.labels(outcome).inc()
            queue.ack(entry_id)


def serve_worker(settings: Settings, consumer: str | None = None) -> None:
    if settings.redis_url is None:
        raise WorkerConfigError(
            "the aggregator worker consumes tasks from Redis: set FEDHL_REDIS_URL "
            "(without Redis the coordinator aggregates in-process)"
        )
    engine = make_engine(settings.database_url)
    if not schema_is_current(engine):
        raise RuntimeError("the database schema is not at the latest migration: run `fedhl migrate` first")
    device = pick_device(settings.aggregator_device)
    deps = Deps(
        session_factory(engine),
        open_blob_store(resolve_blob_url(settings.blob_url), settings.s3),
        open_coordination(settings.redis_url),
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
        run_worker(deps, name, stop, settings.aggregator_reclaim_idle_s)
    finally:
        deps.coordination.close()
        engine.dispose()
