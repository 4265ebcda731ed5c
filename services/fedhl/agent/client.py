"""A typed client for the coordinator's AgentService: credentials in metadata, chunked and
sha256-checked downloads, resumable chunked uploads. Protobuf stays inside this module."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ..v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")

DEFAULT_HEARTBEAT_INTERVAL_S = 3.0  # until the first heartbeat response says otherwise
CHUNK = 1 << 20
MAX_RETRY_AFTER_S = 300.0  # a server's retry-after is honoured up to this
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
}


@dataclass(frozen=True)
class Task:
    task_id: str
    job_id: str
    round: int
    ranks: dict[str, int]
    strategy: str
    lora_alpha: float
    scale_rule: str
    blobs: list[tuple[str, int, str]]  # (key, size, name)
    base_model: str
    base_model_sha256: str
    task_type: str
    train_config: dict[str, Any]
    deadline_unix_ms: int  # the round's deadline: an upload after it is refused

    @property
    def expired(self) -> bool:
        return self.deadline_unix_ms > 0 and time.time() * 1000 >= self.deadline_unix_ms

    @property
    def rank(self) -> int:
        return max(self.ranks.values())


@dataclass(frozen=True)
class TLS:
    root_ca: Path | None = None
    client_cert: Path | None = None  # mTLS
    client_key: Path | None = None


@dataclass
class Resources:
    device_type: str = "cpu"
    device_name: str = ""
    device_memory_bytes: int = 0
    memory_budget_bytes: int = 0
    steps_per_second: float = 0.0

    def pb(self) -> Any:
        return agent_pb2.Resources(**self.__dict__)


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The server's `retry-after` trailing metadata (seconds) of a refused call, if any."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        items = trailing() if callable(trailing) else None
    except Exception:
        return None
    for key, value in items or ():
        if key == "retry-after":
            try:
                seconds = float(value)
            except (TypeError, ValueError):
                return None
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None


def backoff_s(error: grpc.RpcError, base_s: float, attempt: int) -> float:
    """How long to wait before retrying: the server's retry-after when it gave one (plus up to
    50% jitter, so refused agents do not return in step), else exponential backoff."""
    asked = retry_after_s(error)
    if asked is not None:
        return asked * (1.0 + 0.5 * random.random())
    return float(base_s * 2**attempt)


@dataclass
class TransferStats:
    """What this client moved and retried (read by bench/control_plane.py)."""

    bytes_down: int = 0
    bytes_up: int = 0
    retries: int = 0


def open_channel(address: str, tls: TLS | None = None) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", 8 << 20),
        ("grpc.max_send_message_length", 8 << 20),
        ("grpc.keepalive_time_ms", 30_000),
        # one connection per agent, as on a real fleet: channels of one process to the same
        # address would otherwise share one connection and its stream limit (the server's
        # FEDHL_GRPC_MAX_STREAMS_PER_CONNECTION, 100)
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.root_ca.read_bytes() if tls.root_ca else None,
        private_key=tls.client_key.read_bytes() if tls.client_key else None,
        certificate_chain=tls.client_cert.read_bytes() if tls.client_cert else None,
    )
    return grpc.secure_channel(address, creds, options=options)


class AgentClient:
    def __init__(
        self,
        address: str,
        credential: str | None = None,
        tls: TLS | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        self.channel = open_channel(address, tls)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.credential = credential
        self.retries = retries
        self.backoff_s = backoff_s
        self.stats = TransferStats()
        # What the server last asked for: seconds between heartbeats, before the next pull, and
        # the long-poll length to request (None: the server did not say)
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.retry_after_s = 0.0
        self.pull_wait_s: int | None = None

    def close(self) -> None:
        self.channel.close()

    def _md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.credential}")] if self.credential else []

    def _retry(self, fn: Callable[[], T]) -> T:
        """Retry transient failures with exponential backoff; everything else is final."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                self.stats.retries += 1
                time.sleep(backoff_s(e, self.backoff_s, attempt))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ identity / liveness
    def register(self, token: str, name: str, resources: Resources | None = None) -> tuple[str, str]:
        res = self._retry(
            lambda: self.stub.Register(
                agent_pb2.RegisterRequest(
                    enrolment_token=token, name=name, resources=(resources or Resources()).pb(), agent_version="0.1.0"
                )
            )
        )
        self.credential = res.credential
        return str(res.agent_id), str(res.credential)

    def heartbeat(self, resources: Resources | None = None, task_id: str = "", progress: float = 0.0) -> str:
        res = self._retry(
            lambda: self.stub.Heartbeat(
                agent_pb2.HeartbeatRequest(
                    resources=(resources or Resources()).pb(), task_id=task_id, progress=progress
                ),
                metadata=self._md(),
            )
        )
        if res.interval_seconds > 0:
            self.heartbeat_interval_s = float(res.interval_seconds)
        return str(agent_pb2.HeartbeatResponse.Action.Name(res.action))

    def pull_task(self, wait_s: int = 10) -> Task | None:
        """The next task, or None after `wait_s`; then `retry_after_s` says how long the server
        wants the agent to wait before pulling again."""
        res = self._retry(
            lambda: self.stub.PullTask(
                agent_pb2.PullTaskRequest(wait_seconds=wait_s), metadata=self._md(), timeout=wait_s + 30
            )
        )
        if res.WhichOneof("result") != "task":
            self.retry_after_s = float(res.no_task.retry_after_seconds)
            self.pull_wait_s = int(res.no_task.wait_seconds) or None
            return None
        self.retry_after_s = 0.0
        t = res.task
        return Task(
            task_id=t.task_id,
            job_id=t.job_id,
            round=t.round,
            ranks=dict(t.ranks),
            strategy=t.strategy,
            lora_alpha=t.lora_alpha,
            scale_rule=t.scale_rule,
            blobs=[(b.key, b.size, b.name) for b in t.blobs],
            base_model=t.base_model,
            base_model_sha256=t.base_model_sha256,
            task_type=t.task_type,
            train_config=json.loads(t.train_config_json or "{}"),
            deadline_unix_ms=t.deadline_unix_ms,
        )

    # ------------------------------------------------------------------ transfers
    def download(self, key: str) -> bytes:
        """The whole blob, resuming from the bytes already received after a dropped stream."""
        buf = bytearray()
        expected: tuple[int, str] | None = None
        for attempt in range(self.retries + 1):
            try:
                for msg in self.stub.DownloadBlob(
                    agent_pb2.DownloadBlobRequest(key=key, offset=len(buf)), metadata=self._md()
                ):
                    if msg.WhichOneof("part") == "header":
                        expected = (msg.header.size, msg.header.sha256)
                    else:
                        buf += msg.data
                        self.stats.bytes_down += len(msg.data)
                break
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                self.stats.retries += 1
                time.sleep(backoff_s(e, self.backoff_s, attempt))
        if expected is None or len(buf) != expected[0] or hashlib.sha256(buf).hexdigest() != expected[1]:
            raise OSError(f"blob {key}: size or sha256 mismatch after download")
        return bytes(buf)

    def upload(
        self, task: Task, payload: bytes, n_examples: int, metrics: dict[str, float] | None = None, chunk: int = CHUNK
    ) -> str:
        """Upload an update; after a dropped stream, ask how far it got and continue."""
        sha = hashlib.sha256(payload).hexdigest()
        offset = 0
        for attempt in range(self.retries + 1):
            try:
                res = self.stub.UploadUpdate(
                    self._upload_stream(task, payload, sha, offset, n_examples, metrics or {}, chunk),
                    metadata=self._md(),
                )
                if res.accepted:
                    return str(res.update_id)
                offset = int(res.received)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                self.stats.retries += 1
                time.sleep(backoff_s(e, self.backoff_s, attempt))
                offset = self.upload_status(task.task_id)
        raise OSError(f"task {task.task_id}: upload incomplete after {self.retries} retries")

    def _upload_stream(
        self, task: Task, payload: bytes, sha: str, offset: int, n: int, metrics: dict[str, float], chunk: int
    ) -> Iterator[Any]:
        yield agent_pb2.UploadMessage(
            header=agent_pb2.UploadHeader(
                task_id=task.task_id,
                job_id=task.job_id,
                round=task.round,
                size=len(payload),
                sha256=sha,
                offset=offset,
                n_examples=n,
                metrics=metrics,
            )
        )
        for i in range(offset, len(payload), chunk):
            part = payload[i : i + chunk]
            self.stats.bytes_up += len(part)
            yield agent_pb2.UploadMessage(data=part)

    def upload_status(self, task_id: str) -> int:
        res = self._retry(
            lambda: self.stub.UploadStatus(agent_pb2.UploadStatusRequest(task_id=task_id), metadata=self._md())
        )
        return int(res.received)
