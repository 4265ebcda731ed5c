"""`fedhl aggregator`: a worker process that consumes aggregation jobs from the Redis Stream
consumer group, merges on CUDA when present (else CPU), and commits rounds exactly once.
Run as many as you like; each takes jobs (round shards) as they come."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from prometheus_client import start_http_server

from .. import metrics
from ..backends import Deps
from ..settings import Settings
from ..storage.blobs import open_blob_store
from ..storage.coordination import open_coordination
from ..storage.db import make_engine, schema_is_current, session_factory
from .runner import pick_device, run_worker

log = logging.getLogger(__name__)


def resolve_blob_url(url: str) -> str:
    """`file://./x` → an absolute file URL, so every process agrees on the directory."""
    if url.startswith("file://"):
        return "file://" + str(Path(url[len("file://") :]).resolve())
    return url


def serve_worker(settings: Settings, consumer: str | None = None) -> None:
    if settings.redis_url is None:
        raise ValueError(
            "the aggregator worker consumes jobs from Redis: set FEDHL_REDIS_URL "
            "(without Redis the coordinator aggregates in-process)"
        )
    engine = make_engine(settings.database_url)
    if not schema_is_current(engine):
        raise RuntimeError("the database schema is not at the latest migration: run `fedhl migrate` first")
    device = pick_device(settings.aggregator_device)
    deps = Deps(
        session_factory(engine),
        open_blob_store(resolve_blob_url(settings.blob_url)),
        open_coordination(settings.redis_url),
        device,
    )
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    metrics.AGGREGATOR_DEVICE.labels(device).set(1)
    if settings.aggregator_metrics_port:
        start_http_server(settings.aggregator_metrics_port, registry=metrics.REGISTRY)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # finish the job in hand, then exit
    log.info("aggregator %s on %s: waiting for jobs", name, device)
    try:
        run_worker(deps, name, stop, settings.aggregator_reclaim_idle_s)
    finally:
        deps.coord.close()
        engine.dispose()
