"""The agent plane of one coordinator process: the asyncio gRPC server on its own event loop
(in a thread, beside the scheduler threads and the REST server), the two bounded thread pools
its calls run blocking work in, the waiter registry with the thread that relays round events
to it, and the periodic work: the sweep that finds every agent with a task in one query, the
batched liveness writes of idle agents' calls, the batched `last_seen_at` writes and the fleet
size (pacing).

Every background part is supervised and registered in the coordinator's `LoopRegistry`, so
/readyz names it when it stops ticking."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

import grpc

from ..settings import Settings
from ..supervise import LoopRegistry, LoopState
from .agents import LAST_SEEN_EVERY_S, AgentService
from .beats import LIVENESS_FLUSH_S, LivenessBatch
from .grpc_api import AgentServicer, build_server
from .limits import CallLimits, Kind
from .waiters import Waiters, WakeRelay

log = logging.getLogger(__name__)

FLEET_REFRESH_S = 10.0  # how often the fleet size (pacing) is re-read


class AgentPlane:
    def __init__(self, service: AgentService, settings: Settings, loops: LoopRegistry) -> None:
        self.svc = service
        self.settings = settings
        self.loops = loops
        self.limits = CallLimits(
            {
                Kind.CALL: settings.grpc_max_calls,
                Kind.WAIT: settings.grpc_max_waits,
                Kind.TRANSFER: settings.grpc_max_transfers,
            },
            settings.grpc_max_calls_per_agent,
            settings.grpc_retry_after_s,
        )
        self.waiters = Waiters(sweep_s=settings.pull_recheck_s)
        self.beats = LivenessBatch()
        self.db = concurrent.futures.ThreadPoolExecutor(settings.grpc_max_workers, thread_name_prefix="agent-db")
        self.transfers = concurrent.futures.ThreadPoolExecutor(
            settings.grpc_max_transfers, thread_name_prefix="agent-transfer"
        )
        self.fleet = 0
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: grpc.aio.Server | None = None
        self.relay: WakeRelay | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 30.0) -> int:
        """Start the loop thread and the server; → the bound port. Raises what startup raised."""
        self._thread = threading.Thread(target=self._run, name="agent-plane", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the agent plane did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the agent plane did not start: {self._error}") from self._error
        return self.port

    def stop(self, grace_s: float = 5.0) -> None:
        if self.relay is not None:
            self.relay.close()  # no wake-ups during the grace period: the waits end with the server
        loop, stopped = self.loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(grace_s), loop)
                fut.result(timeout=grace_s + 10)
            except (RuntimeError, concurrent.futures.TimeoutError) as e:
                log.warning("agent plane: unclean stop (%s)", e)
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 10)
        self.db.shutdown(wait=False, cancel_futures=True)
        self.transfers.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # startup failed: start() reports it
            self._error = e
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.fleet = await loop.run_in_executor(self.db, self.svc.fleet_size)
        servicer = AgentServicer(
            self.svc, self.limits, self.waiters, lambda: self.fleet, self.db, self.transfers, self.beats
        )
        self.server, self.port = await build_server(servicer, self.settings)
        self.relay = WakeRelay(
            self.svc.deps.coordination.events,
            self.waiters,
            loop,
            self.loops.register("agent-wakeups", self.settings.loop_stale_s),
            on_revoked=self.svc.forget,
        )
        await loop.run_in_executor(None, self.relay.start)
        await self.server.start()
        stale_s = self.settings.loop_stale_s
        housekeeping = self.loops.register("agent-plane", max(stale_s, 2 * FLEET_REFRESH_S))
        sweep = self.loops.register("agent-sweep", max(stale_s, 3 * self.settings.pull_recheck_s))
        liveness = self.loops.register("agent-liveness", stale_s)
        tasks = [
            asyncio.create_task(self._housekeeping(housekeeping)),
            asyncio.create_task(self._every(sweep, self.settings.pull_recheck_s, self._sweep)),
            asyncio.create_task(self._every(liveness, LIVENESS_FLUSH_S, self._flush_liveness)),
        ]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            for t in tasks:
                t.cancel()

    async def _shutdown(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
        # the last sightings are not lost at a clean stop
        await asyncio.get_running_loop().run_in_executor(self.db, self._flush_quietly)
        with contextlib.suppress(Exception):
            await self._flush_liveness()
        assert self._stopped is not None
        self._stopped.set()

    # ---------------------------------------------------------------- periodic work
    async def _every(self, state: LoopState, period_s: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` every `period_s`, forever: a failure is logged, counted on `state` (so
        /readyz names the loop once it stops ticking) and retried at the next period."""
        while True:
            try:
                await step()
                state.tick()
            except Exception as e:  # a backend may be away: keep going
                state.failures += 1
                state.error = f"{type(e).__name__}: {e}"[:500]
                if state.failures == 1 or state.failures % 100 == 0:  # not 4 lines a second
                    log.warning("agent plane: %s failed %d× (%s); retrying", state.name, state.failures, state.error)
            await asyncio.sleep(period_s)

    async def _sweep(self) -> None:
        """One query for every agent with a task to claim (and one for the revoked); wake
        those waiting here."""
        loop = asyncio.get_running_loop()
        started, mark = loop.time(), self.waiters.read_mark()
        pending = await loop.run_in_executor(self.db, self.svc.sweep)
        self.waiters.swept(pending, started, mark)  # its age and event mark count from before its query

    async def _flush_liveness(self) -> None:
        """Write the idle calls' liveness beats recorded since the last flush, in one round trip."""
        beats = self.beats.take()
        if not beats:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.db, self.svc.deps.coordination.liveness.beat_many, beats
            )
        except Exception:
            self.beats.restore(beats)
            raise

    async def _housekeeping(self, state: LoopState) -> None:
        """Every few seconds: flush last_seen_at (every LAST_SEEN_EVERY_S) and refresh the fleet
        size (every FLEET_REFRESH_S). Failures are logged and retried; the loop never ends."""
        loop = asyncio.get_running_loop()
        last_flush = last_fleet = loop.time()
        while True:
            await asyncio.sleep(min(5.0, self.settings.loop_stale_s / 3))
            now = loop.time()
            try:
                if now - last_flush >= LAST_SEEN_EVERY_S:
                    await loop.run_in_executor(self.db, self.svc.flush_seen)
                    last_flush = now
                if now - last_fleet >= FLEET_REFRESH_S:
                    self.fleet = await loop.run_in_executor(self.db, self.svc.fleet_size)
                    last_fleet = now
                state.tick()
            except Exception as e:  # the database may be away: keep going, /readyz tells
                state.failures += 1
                state.error = f"{type(e).__name__}: {e}"[:500]
                log.warning("agent plane housekeeping failed (%s); retrying", state.error)

    def _flush_quietly(self) -> None:
        try:
            self.svc.flush_seen()
        except Exception as e:
            log.warning("agent plane: last_seen_at not flushed at stop (%s)", e)
