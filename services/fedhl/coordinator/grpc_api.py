"""The gRPC edge: decode protobuf, authenticate, call `AgentService`, map domain errors to
status codes. Nothing here decides anything."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..settings import Settings
from ..v1 import agent_pb2, agent_pb2_grpc
from .agents import MAX_HELD, AgentService, UploadHeader
from .errors import Code, ServiceError
from .grpc_errors import ErrorIdInterceptor
from .tls import server_credentials

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


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(self, service: AgentService) -> None:
        self.svc = service

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ServiceError as e:
            if e.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
            context.abort(STATUS[e.code], e.message)
            raise  # unreachable: abort raises

    def _agent(self, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        credential = auth[7:] if auth.startswith("Bearer ") else ""
        return self._call(context, lambda: self.svc.authenticate(credential))

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        agent_id, cred = self._call(
            context,
            lambda: self.svc.register(
                request.enrolment_token, request.name, resources_dict(request.resources), peer=context.peer()
            ),
        )
        return agent_pb2.RegisterResponse(agent_id=agent_id, credential=cred)

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        agent = self._agent(context)
        action = self._call(
            context,
            lambda: self.svc.heartbeat(agent, resources_dict(request.resources), request.task_id, request.progress),
        )
        return agent_pb2.HeartbeatResponse(
            action=agent_pb2.HeartbeatResponse.Action.Value(action),
            interval_seconds=max(1, int(self.svc.settings.heartbeat_ttl_s / 3)),
        )

    def PullTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        agent = self._agent(context)
        held = {h.job_id[:64]: int(h.round) for h in list(request.held)[:MAX_HELD]}
        task = self._call(context, lambda: self.svc.pull_task(agent, float(request.wait_seconds), held))
        if task is None:
            # after a long poll the agent may pull again at once; a zero-wait poller is paced
            pause = 0 if request.wait_seconds > 0 else 1
            return agent_pb2.PullTaskResponse(no_task=agent_pb2.NoTask(retry_after_seconds=pause))
        return agent_pb2.PullTaskResponse(
            task=agent_pb2.TrainTask(
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
        )

    def DownloadBlob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        agent = self._agent(context)
        size, sha, chunks = self._call(context, lambda: self.svc.open_blob(agent, request.key, request.offset))
        yield agent_pb2.BlobChunk(
            header=agent_pb2.BlobHeader(size=size, sha256=sha, chunk_size=self.svc.settings.chunk_bytes)
        )
        for c in chunks:
            yield agent_pb2.BlobChunk(data=c)

    def UploadUpdate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        agent = self._agent(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be an UploadHeader")
            raise AssertionError("unreachable: abort raises")
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

        def chunks() -> Iterator[bytes]:
            for msg in request_iterator:
                if msg.WhichOneof("part") != "data":
                    raise ServiceError(Code.INVALID_ARGUMENT, "only data chunks may follow the header")
                yield msg.data

        res = self._call(context, lambda: self.svc.upload(agent, header, chunks()))
        return agent_pb2.UploadResponse(update_id=res.update_id, received=res.received, accepted=res.accepted)

    def UploadStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        agent = self._agent(context)
        received = self._call(context, lambda: self.svc.upload_status(agent, request.task_id))
        return agent_pb2.UploadStatusResponse(received=received)

    def ReportMetrics(self, request: Any, context: grpc.ServicerContext) -> Any:
        agent = self._agent(context)
        self._call(
            context, lambda: self.svc.report_metrics(agent, request.task_id, dict(request.metrics), request.step)
        )
        return agent_pb2.ReportMetricsResponse()


def build_server(service: AgentService, settings: Settings) -> tuple[grpc.Server, int]:
    """A gRPC server with the AgentService, health checking and (if `settings.grpc_reflection`)
    reflection; unexpected errors answer INTERNAL with an error id only; (server, port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers, thread_name_prefix="grpc"),
        interceptors=[ErrorIdInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if settings.grpc_reflection:
        reflection.enable_server_reflection((name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    creds = server_credentials(settings)  # None: plaintext (development, or FEDHL_ALLOW_INSECURE)
    port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC on {address}")
    return server, port
