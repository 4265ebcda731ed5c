"""`fedhl coordinator`: gRPC AgentService + REST admin API + scheduler in one process."""

from __future__ import annotations

import logging

import uvicorn

from ..backends import WorkerLoop
from ..gcpause import TICK_S, bound_full_collections, observe_pauses
from ..settings import Settings
from ..supervise import supervise
from .api import create_app
from .app import Coordinator
from .tls import require_tls

log = logging.getLogger(__name__)


def serve(settings: Settings, *, auto_migrate: bool = False, aggregator: WorkerLoop | None = None) -> None:
    """`aggregator`: the in-process aggregation worker loop (wired by `fedhl.cli`). Production
    refuses to start without TLS on both planes (see `tls.require_tls`)."""
    require_tls(settings)
    coordinator = Coordinator.from_settings(settings, auto_migrate=auto_migrate, aggregator=aggregator)
    coordinator.start()
    observe_pauses()
    every = settings.gc_full_every_s
    if every > 0:  # the process's collector: once, here, not per Coordinator (tests build many)
        state = coordinator.loops.register("gc-full", max(settings.loop_stale_s, 3 * min(TICK_S, every)))
        stop = coordinator.stop
        body = lambda st: bound_full_collections(st, every, stop)  # noqa: E731
        coordinator._thread("gc-full", lambda: supervise(state, body, stop))
    config = uvicorn.Config(
        create_app(coordinator),
        host=settings.http_host,
        port=settings.http_port,
        log_level="info",
        ssl_certfile=settings.http_tls_cert,
        ssl_keyfile=settings.http_tls_key,
    )
    server = uvicorn.Server(config)
    try:
        server.run()  # returns on SIGINT/SIGTERM
    finally:
        coordinator.shutdown()
