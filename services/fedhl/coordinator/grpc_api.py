"""The gRPC edge of the agent plane (grpc.aio): decode protobuf, admit the call (caps), then
authenticate, call `AgentService` in a bounded thread pool, map domain errors to status codes.
Nothing here decides anything.

An open call costs no thread: PullTask waits on an asyncio event (see `waiters`), downloads
read one chunk at a time in the transfer pool, and only the blocking database and file work of
a call runs in a thread. An idle agent's calls need none: a heartbeat without a task whose
resources are unchanged, and a long-poll that needs no read, are answered on the event loop
(credential from the auth cache, liveness recorded in `beats` and written in batches).

Every call is admitted first (`limits`): past a cap it ends RESOURCE_EXHAUSTED with
`retry-after` trailing metadata (seconds), and every call has a server-side deadline (unary
calls `grpc_call_timeout_s`, streams `grpc_stream_idle_s` between messages)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..settings import Settings
from ..v1 import agent_pb2, agent_pb2_grpc
from .agents import MAX_HELD, AgentService, TrainTask, UploadHeader
from .beats import LivenessBatch
from .errors import Code, ServiceError
from .grpc_errors import AsyncErrorIdInterceptor
from .limits import CallLimits, Kind
from .pacing import Pacing
from .tls import server_credentials
from .waiters import Waiters

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS = {
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    Code.ABORTED: grpc.StatusCode.ABORTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Control messages are tiny; chunks are at most settings.chunk_bytes (≤ 3 MiB).
MAX_MESSAGE_BYTES = 4 << 20


def resources_dict(r: agent_pb2.Resources) -> dict[str, Any]:
    return {
        "device_type": r.device_type,
        "device_name": r.device_name,
        "device_memory_bytes": r.device_memory_bytes,
        "memory_budget_bytes": r.memory_budget_bytes,
        "steps_per_second": r.steps_per_second,
    }


def task_message(task: TrainTask) -> Any:
    return agent_pb2.TrainTask(
        task_id=task.task_id,
        job_id=task.job_id,
        round=task.round,
        ranks=task.ranks,
        strategy=task.strategy,
        lora_alpha=task.lora_alpha,
        scale_rule=task.scale_rule,
        blobs=[agent_pb2.BlobRef(key=b.key, size=b.size, name=b.name) for b in task.blobs],
        base_model=task.base_model,
        base_model_sha256=task.base_model_sha256,
        task_type=task.task_type,
        train_config_json=json.dumps(task.train_config),
        deadline_unix_ms=int(task.deadline.timestamp() * 1000),
    )


def bearer(context: grpc.aio.ServicerContext) -> str:
    md = dict(context.invocation_metadata() or ())
    auth = md.get("authorization", "")
    return auth[7:] if isinstance(auth, str) and auth.startswith("Bearer ") else ""


async def abort(context: grpc.aio.ServicerContext, e: ServiceError) -> NoReturn:
    trailing = (("retry-after", str(e.retry_after_s)),) if e.retry_after_s is not None else ()
    await context.abort(STATUS[e.code], e.message, trailing_metadata=trailing)
    raise AssertionError("unreachable: abort raises")


def deadline_error(what: str, seconds: float) -> ServiceError:
    return ServiceError(Code.DEADLINE_EXCEEDED, f"{what} took longer than the server allows ({seconds:g} s)")


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        service: AgentService,
        limits: CallLimits,
        waiters: Waiters,
        fleet: Callable[[], int],
        db: concurrent.futures.Executor,
        transfers: concurrent.futures.Executor,
        beats: LivenessBatch | None = None,
    ) -> None:
        self.svc = service
        self.beats = beats if beats is not None else LivenessBatch()  # the plane flushes it
        self.limits = limits
        self.waiters = waiters
        self.fleet = fleet  # the fleet's size, refreshed by the plane (pacing scales with it)
        self.db = db  # short blocking work: database reads and writes
        self.transfers = transfers  # blob reads and upload streams
        s = service.settings
        self.pacing = Pacing(s.heartbeat_ttl_s, s.pull_wait_max_s, s.fleet_calls_per_s, s.pull_wait_fleet_max_s)
        self.call_timeout_s = s.grpc_call_timeout_s
        self.idle_s = s.grpc_stream_idle_s
        self.queue_s = s.grpc_queue_s
        self.db_backlog_max = s.grpc_max_db_backlog
        self._db_backlog = 0  # calls waiting for or holding a database thread (this loop only)

    # ---------------------------------------------------------------- plumbing
    async def _in(self, pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
        if pool is not self.db:
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
        # Database work queues for the pool's threads. Past `db_backlog_max` queued calls (about
        # a second of work) a call is refused at once with a retry-after spread over the fleet's
        # pacing period, instead of queueing into a client timeout: a reconnect storm (every
        # agent of a restarted coordinator at once) is spread out instead of feeding on itself.
        if self._db_backlog >= self.db_backlog_max:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"the server is busy ({self._db_backlog} database calls queued); retry later",
                retry_after_s=self.pacing.spread_retry_after_s(self.fleet()),
            )
        self._db_backlog += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
        finally:
            self._db_backlog -= 1

    @asynccontextmanager
    async def _admitted(self, context: grpc.aio.ServicerContext, kind: Kind) -> AsyncIterator[str]:
        """A slot of `kind` (a burst of calls or transfers queues up to `grpc_queue_s` for one),
        then the authenticated agent id and one of its own slots."""
        async with self.limits.queued(kind, 0.0 if kind is Kind.WAIT else self.queue_s):
            credential = bearer(context)
            # a credential checked within the auth cache's TTL costs no thread and no query
            agent = self.svc.cached_agent(credential)
            if agent is None:
                agent = await asyncio.wrap_future(self.svc.authenticate_async(credential))
            with self.limits.agent_slot(agent):
                yield agent

    async def _unary(self, context: grpc.aio.ServicerContext, kind: Kind, body: Callable[[str], Any]) -> Any:
        """Admit, authenticate and run `body(agent)` (a coroutine) under the call deadline."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                async with self._admitted(context, kind) as agent:
                    return await body(agent)
        except TimeoutError:
            await abort(context, deadline_error("the call", self.call_timeout_s))
        except ServiceError as e:
            await abort(context, e)

    async def _next(self, requests: AsyncIterator[Any]) -> Any:
        """The next message of a client stream (None at its end), within the idle deadline."""
        try:
            async with asyncio.timeout(self.idle_s):
                return await anext(requests, None)
        except TimeoutError:
            raise deadline_error("waiting for the next message", self.idle_s) from None

    # ---------------------------------------------------------------- identity / liveness
    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(self.call_timeout_s):
                with self.limits.slot(Kind.CALL):
                    register = functools.partial(
                        self.svc.register,
                        request.enrolment_token,
                        request.name,
                        resources_dict(request.resources),
                        peer=context.peer(),
                    )
                    agent_id, cred = await self._in(self.db, register)
        except TimeoutError:
            await abort(context, deadline_error("the call", self.call_timeout_s))
        except ServiceError as e:
            await abort(context, e)
        return agent_pb2.RegisterResponse(agent_id=agent_id, credential=cred)

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def body(agent: str) -> Any:
            fleet = self.fleet()
            resources = resources_dict(request.resources)
            if not request.task_id and self.svc.resources_unchanged(agent, resources):
                # an idle agent with nothing new to say: no thread, no query, liveness batched
                self.beats.beat(agent, self.pacing.liveness_ttl_s(fleet))
                self.svc.seen(agent)
                return agent_pb2.HeartbeatResponse(
                    action=agent_pb2.HeartbeatResponse.Action.CONTINUE,
                    interval_seconds=self.pacing.idle_heartbeat_interval_s(fleet),
                )
            action = await self._in(
                self.db,
                self.svc.heartbeat,
                agent,
                resources,
                request.task_id,
                request.progress,
                self.pacing.liveness_ttl_s(fleet),
            )
            interval = self.pacing.heartbeat_interval_s if request.task_id else self.pacing.idle_heartbeat_interval_s
            return agent_pb2.HeartbeatResponse(
                action=agent_pb2.HeartbeatResponse.Action.Value(action), interval_seconds=interval(fleet)
            )

        return await self._unary(context, Kind.CALL, body)

    # ---------------------------------------------------------------- tasks
    async def PullTask(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Long-poll without a thread: a database read at the start only when a round may have
        named this agent since its last read (`Waiters.needs_read`), then one per wake-up (a
        round event or the plane's sweep named it); an open wait keeps the agent alive."""
        wait_s = max(0.0, min(float(request.wait_seconds), self.pacing.pull_wait_s(self.fleet())))
        # up to a fifth shorter, at random: a fleet that connected together (a restart) would
        # otherwise end its waits together, wave after wave
        wait_s *= 1.0 - 0.2 * random.random()
        try:
            async with asyncio.timeout(wait_s + self.call_timeout_s):
                async with self._admitted(context, Kind.WAIT) as agent:
                    held = {h.job_id[:64]: int(h.round) for h in list(request.held)[:MAX_HELD]}
                    task = await self._wait_for_task(agent, wait_s, held)
        except TimeoutError:
            await abort(context, deadline_error("the wait", wait_s + self.call_timeout_s))
        except ServiceError as e:
            await abort(context, e)
        if task is not None:
            return agent_pb2.PullTaskResponse(task=task_message(task))
        fleet = self.fleet()
        return agent_pb2.PullTaskResponse(
            no_task=agent_pb2.NoTask(
                retry_after_seconds=self.pacing.pull_pause_s(wait_s, fleet),
                wait_seconds=self.pacing.pull_wait_s(fleet),
            )
        )

    async def _wait_for_task(self, agent: str, wait_s: float, held: dict[str, int]) -> TrainTask | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        # registered before the first read: a round opening during that read still wakes us
        waiter = self.waiters.register(agent)
        try:
            ttl = self.pacing.wait_ttl_s(wait_s, self.fleet())
            task: TrainTask | None = None
            # no read when this agent's last one found nothing and no round event or sweep has
            # named it since: then the wait starts on this loop, with no thread and no query
            mark = self.waiters.read_mark()
            self.beats.beat(agent, ttl)  # an open wait is liveness
            self.svc.seen(agent)
            if self.waiters.needs_read(agent, loop.time()):
                task = await self._claim(agent, held)
                if task is None:
                    self.waiters.note_empty(agent, mark)
            while task is None and not waiter.superseded:
                left = deadline - loop.time()
                if left <= 0:
                    break
                recheck = self.waiters.recheck_s(loop.time())  # None while the sweep works
                try:
                    async with asyncio.timeout(left if recheck is None else min(left, recheck)):
                        await waiter.event.wait()
                except TimeoutError:
                    if recheck is None:
                        continue  # the wait is over (no event, and the sweep named no one)
                if waiter.superseded:
                    break
                waiter.event.clear()
                mark = self.waiters.read_mark()
                task = await self._claim(agent, held)
                if task is None:
                    self.waiters.note_empty(agent, mark)
            return task
        finally:
            self.waiters.unregister(agent, waiter)

    async def _claim(self, agent: str, held: dict[str, int]) -> TrainTask | None:
        """The agent's task, claimed through the claim batcher (a round's wake-up shares a few
        transactions); the wait holds no thread meanwhile."""
        try:
            return await asyncio.wrap_future(self.svc.claim(agent, held))
        except ServiceError as e:
            if e.code is Code.RESOURCE_EXHAUSTED and e.retry_after_s is None:
                e.retry_after_s = self.pacing.spread_retry_after_s(self.fleet())
            raise

    # ---------------------------------------------------------------- blobs
    async def DownloadBlob(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Chunks are read one at a time in the transfer pool; a reader that stops reading ends
        with DEADLINE_EXCEEDED after `grpc_stream_idle_s` (flow control blocks the write)."""
        try:
            async with self._admitted(context, Kind.TRANSFER) as agent:
                opened = await asyncio.wait_for(
                    self._in(self.db, self.svc.open_blob, agent, request.key, request.offset), self.call_timeout_s
                )
                size, sha, chunks = opened
                try:
                    header = agent_pb2.BlobHeader(size=size, sha256=sha, chunk_size=self.svc.settings.chunk_bytes)
                    await self._write(context, agent_pb2.BlobChunk(header=header))
                    while (chunk := await self._in(self.transfers, next, chunks, None)) is not None:
                        await self._write(context, agent_pb2.BlobChunk(data=chunk))
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        with contextlib.suppress(ValueError):  # still running in a pool thread after a timeout
                            close()
        except TimeoutError:
            await abort(context, deadline_error("opening the blob", self.call_timeout_s))
        except ServiceError as e:
            await abort(context, e)

    async def _write(self, context: grpc.aio.ServicerContext, message: Any) -> None:
        try:
            async with asyncio.timeout(self.idle_s):
                await context.write(message)
        except TimeoutError:
            raise deadline_error("sending the next chunk", self.idle_s) from None

    # ---------------------------------------------------------------- uploads
    async def UploadUpdate(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """The header is read here; the chunks are handed to the service in a transfer thread,
        which pulls each message from this loop (bounded by the idle deadline)."""
        try:
            async with self._admitted(context, Kind.TRANSFER) as agent:
                first = await self._next(request_iterator)
                if first is None or first.WhichOneof("part") != "header":
                    raise ServiceError(Code.INVALID_ARGUMENT, "the first message must be an UploadHeader")
                h = first.header
                header = UploadHeader(
                    task_id=h.task_id,
                    job_id=h.job_id,
                    round=h.round,
                    size=h.size,
                    sha256=h.sha256,
                    offset=h.offset,
                    n_examples=h.n_examples,
                    metrics=dict(h.metrics),
                )
                chunks = self._bridge(request_iterator, asyncio.get_running_loop())
                res = await self._in(self.transfers, self.svc.upload, agent, header, chunks)
        except ServiceError as e:
            await abort(context, e)
        return agent_pb2.UploadResponse(update_id=res.update_id, received=res.received, accepted=res.accepted)

    def _bridge(self, requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
        """The data chunks of a client stream, for a pool thread: each message is awaited on the
        plane's loop; the thread never waits longer than the idle deadline."""
        while True:
            fut = asyncio.run_coroutine_threadsafe(self._next(requests), loop)
            try:
                msg = fut.result(timeout=self.idle_s + 5)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                raise deadline_error("waiting for the next chunk", self.idle_s) from None
            except concurrent.futures.CancelledError:
                raise ServiceError(Code.ABORTED, "the upload stream was cancelled") from None
            if msg is None:
                return
            if msg.WhichOneof("part") != "data":
                raise ServiceError(Code.INVALID_ARGUMENT, "only data chunks may follow the header")
            yield msg.data

    async def UploadStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def body(agent: str) -> Any:
            received = await self._in(self.db, self.svc.upload_status, agent, request.task_id)
            return agent_pb2.UploadStatusResponse(received=received)

        return await self._unary(context, Kind.CALL, body)

    async def ReportMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def body(agent: str) -> Any:
            report = self.svc.report_metrics
            await self._in(self.db, report, agent, request.task_id, dict(request.metrics), request.step)
            return agent_pb2.ReportMetricsResponse()

        return await self._unary(context, Kind.CALL, body)


def longest_wait_s(settings: Settings) -> float:
    """The longest long-poll the plane may grant (a large fleet's)."""
    return max(settings.pull_wait_max_s, settings.pull_wait_fleet_max_s)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Message sizes, keepalive and idle-connection settings of the agent plane."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # the server pings a quiet connection and drops it when the ping goes unanswered
        ("grpc.keepalive_time_ms", ms(settings.grpc_keepalive_s)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # agents may ping every 10 s (the client's keepalive is 30 s); more often is a strike
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", ms(settings.grpc_max_connection_idle_s)),
        # recycled connections rebalance agents over replicas; a wait in progress may finish
        ("grpc.max_connection_age_ms", ms(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(longest_wait_s(settings) + settings.grpc_call_timeout_s)),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
    ]


async def build_server(servicer: AgentServicer, settings: Settings) -> tuple[grpc.aio.Server, int]:
    """An asyncio gRPC server (call it on the loop that will run it) with the AgentService,
    health checking and (if `settings.grpc_reflection`) reflection; unexpected errors answer
    INTERNAL with an error id only; (server, port), not yet started."""
    caps = servicer.limits.caps
    server = grpc.aio.server(
        interceptors=[AsyncErrorIdInterceptor()],
        options=server_options(settings),
        # a backstop behind the caps of `limits` (which answer with a retry-after)
        maximum_concurrent_rpcs=sum(caps.values()) + 64,
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if settings.grpc_reflection:
        reflection.enable_server_reflection((name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    creds = server_credentials(settings)  # None: plaintext (development, or FEDHL_ALLOW_INSECURE)
    port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC on {address}")
    return server, port
