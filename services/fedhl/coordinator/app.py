"""Wiring: one `Coordinator` owns the dependencies, the services and the threads of one
coordinator process (the agent plane's gRPC server, scheduler, in-process aggregation worker). The worker loop
is passed in (`aggregator`) by whoever starts the process: the coordinator never imports the
aggregation service."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..backends import Deps, WorkerLoop
from ..settings import Settings
from ..storage.blobs import open_blob_store, resolve_blob_url
from ..storage.db import migrate, schema_is_current, session_factory
from ..storage.gc import collect
from ..supervise import LoopRegistry, LoopState, supervise
from .agents import AgentService
from .jobs import JobService
from .plane import AgentPlane
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class Coordinator:
    settings: Settings
    deps: Deps
    agents: AgentService
    jobs: JobService
    scheduler: Scheduler
    aggregator: WorkerLoop | None = None  # run in a thread when settings.inprocess_aggregator
    stop: threading.Event = field(default_factory=threading.Event)
    plane: AgentPlane | None = None  # the gRPC agent plane (asyncio, on its own thread)
    grpc_port: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    loops: LoopRegistry = field(default_factory=LoopRegistry)  # what /readyz checks

    @classmethod
    def from_settings(
        cls, settings: Settings, *, auto_migrate: bool = False, aggregator: WorkerLoop | None = None
    ) -> Coordinator:
        settings.require_admin_token()  # the admin API refuses every call without one
        engine = settings.engine()
        if auto_migrate:
            migrate(settings.database_url)
        elif not schema_is_current(engine):
            raise RuntimeError("the database schema is not at the latest migration: run `fedhl migrate` first")
        deps = Deps(
            session_factory(engine),
            open_blob_store(resolve_blob_url(settings.blob_url), settings.s3),
            settings.coordination(),
            settings.aggregator_device,
        )
        return cls(
            settings,
            deps,
            AgentService(deps, settings),
            JobService(deps),
            Scheduler(
                deps,
                settings.scheduler_interval_s,
                settings.aggregation_shards,
                max_round_attempts=settings.max_round_attempts,
                stale_after_s=settings.loop_stale_s,
            ),
            aggregator,
        )

    def start(self) -> None:
        """Start gRPC, the scheduler and (if configured) the in-process aggregation worker."""
        if self.settings.inprocess_aggregator and self.aggregator is None:
            raise RuntimeError("inprocess_aggregator is set but no worker loop was given (Coordinator aggregator=)")
        self.plane = AgentPlane(self.agents, self.settings, self.loops)
        self.grpc_port = self.plane.start()
        events_loop = self.deps.coordination.events.health
        if events_loop is not None:
            self.loops.add(events_loop)
        self._thread("scheduler", lambda: self.scheduler.run(self.stop, self.loops))
        if self.settings.blob_gc_interval_s > 0:
            gc_loop = self.loops.register(
                "blob-gc", max(self.settings.loop_stale_s, 2 * self.settings.blob_gc_interval_s)
            )
            self._thread("blob-gc", lambda: supervise(gc_loop, self._collect_blobs, self.stop))
        if self.settings.inprocess_aggregator and self.aggregator is not None:
            loop, consumer = self.aggregator, f"{socket.gethostname()}-inproc-{id(self):x}"
            options = self.settings.worker_options
            self._thread("aggregator", lambda: loop(self.deps, consumer, self.stop, options, self.loops))
        log.info("coordinator: gRPC on port %d", self.grpc_port)

    def _collect_blobs(self, state: LoopState) -> None:
        """Blob GC on the scheduler leader only (one collector per cluster)."""
        while not self.stop.is_set():
            if self.scheduler.role == "leader":
                collect(self.deps.sessions, self.deps.blobs, self.settings.retention)
            state.tick()
            self.stop.wait(self.settings.blob_gc_interval_s)

    def _thread(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def shutdown(self, grace_s: float = 5.0) -> None:
        self.stop.set()
        if self.plane is not None:
            self.plane.stop(grace_s)
        for t in self.threads:
            t.join(timeout=grace_s)
        self.agents.close()  # the queued claims and accepts finish before the stores close
        self.deps.coordination.close()
        self.deps.sessions.kw["bind"].dispose()
