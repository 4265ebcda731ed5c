"""What agents can do, independent of the transport: the gRPC servicer decodes, calls these
methods, and maps `ServiceError.code` to a status. Protobuf types never reach this layer."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import Counter
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import metrics as prom
from ..backends import SCHEDULER_EVENTS, TASK_EVENTS, Deps
from ..codec import Expected, PayloadError, validate_update_file
from ..core.downlink import choose_chain
from ..jobspec import INT64_MAX
from ..settings import Settings
from ..storage.blobs import BlobIntegrityError, BlobNotFound, BlobTooLarge, OffsetMismatch, UploadInProgress
from ..storage.db import transaction
from ..storage.models import AssignmentState, JobStatus, RoundState, utcnow
from ..storage.repos import AgentRepo, AuditRepo, AuthError, JobRepo, RevokedError, RoundRepo, TaskRow
from .authcache import AuthCache, TtlLru
from .errors import Code, ServiceError

MAX_HELD = 16  # held global-update versions an agent may report per pull
LAST_SEEN_EVERY_S = 30.0  # agents.last_seen_at is informational (REST); liveness has its own TTL keys
TOUCH_BATCH = 500  # agent ids per UPDATE when last_seen_at is flushed
# ReportMetrics: bounded so one agent cannot grow a round's row without limit
MAX_METRICS = 32
MAX_METRIC_KEY = 64
RESOURCES_CACHE_TTL_S = 300.0  # an unchanged heartbeat re-reads the agent row at least this often
REGISTER_WINDOW_S = 60.0  # Register calls per peer / per token are counted per minute (settings)
RESOURCE_KEYS = {
    "device_type": str,
    "device_name": str,
    "device_memory_bytes": int,
    "memory_budget_bytes": int,
    "steps_per_second": float,
}


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    name: str


@dataclass(frozen=True)
class TrainTask:
    """What an agent is told to do for its assignment (the `Assignment` row's id is `task_id`);
    the gRPC edge copies it field by field into the wire message of the same name."""

    task_id: str
    job_id: str
    round: int
    rank: int
    ranks: dict[str, int]
    strategy: str
    lora_alpha: float
    scale_rule: str
    blobs: list[BlobInfo]
    base_model: str
    base_model_sha256: str
    task_type: str
    train_config: dict[str, Any]
    deadline: datetime


@dataclass(frozen=True)
class UploadHeader:
    task_id: str
    job_id: str
    round: int
    size: int
    sha256: str
    offset: int
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadResult:
    update_id: str
    received: int
    accepted: bool


def clean_resources(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, kind in RESOURCE_KEYS.items():
        v = raw.get(k)
        if v in (None, "", 0):
            continue
        try:
            val = kind(v)
        except (TypeError, ValueError):
            raise ServiceError(Code.INVALID_ARGUMENT, f"resources.{k}: not a {kind.__name__}") from None
        if isinstance(val, (int, float)) and (val < 0 or (isinstance(val, float) and not math.isfinite(val))):
            raise ServiceError(Code.INVALID_ARGUMENT, f"resources.{k}: must be finite and non-negative")
        out[k] = val
    return out


def peer_host(peer: str) -> str:
    """gRPC's peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`, `unix:...`) without the
    port, which changes per connection."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        rest = rest.rsplit(":", 1)[0]
    return f"{kind}:{rest}"[:200]


def owned_assignment(s: Session, agent_id: str, task_id: str) -> TaskRow:
    """The task, which must exist (NOT_FOUND) and belong to this agent (PERMISSION_DENIED)."""
    a = RoundRepo(s).task_row(task_id)
    if a is None:
        raise ServiceError(Code.NOT_FOUND, f"task {task_id} not found")
    if a.agent_id != agent_id:
        raise ServiceError(Code.PERMISSION_DENIED, f"task {task_id} is not this agent's")
    return a


VALIDATION_QUEUE_S = 2.0  # how long an upload waits for a validation slot before RESOURCE_EXHAUSTED
VALIDATION_RETRY_S = 5


def _counted(chunks: Iterable[bytes], counter: Counter) -> Iterator[bytes]:
    for c in chunks:
        counter.inc(len(c))
        yield c


def _validate_file(path: Path, exp: Expected) -> None:
    validate_update_file(path, exp)  # tensor by tensor from the file, never the whole payload


class AgentService:
    def __init__(self, deps: Deps, settings: Settings) -> None:
        self.deps = deps
        self.settings = settings
        self._validations = threading.BoundedSemaphore(settings.max_concurrent_validations)
        # agents seen since the last flush of agents.last_seen_at (calls, open waits): one
        # batched UPDATE every LAST_SEEN_EVERY_S instead of a write transaction per call
        self._seen_lock = threading.Lock()
        self._seen: set[str] = set()
        # hot-path caches (see `authcache`): revocation empties the first at once in this
        # process (deps.on_revoked) and on other replicas by event (the plane's relay)
        self.auth_cache = AuthCache(settings.auth_cache_size, settings.auth_cache_ttl_s)
        self._resources: TtlLru[tuple[tuple[str, Any], ...]] = TtlLru(settings.auth_cache_size, RESOURCES_CACHE_TTL_S)
        deps.on_revoked.append(self.forget)

    # ---------------------------------------------------------------- identity
    def register(self, token: str, name: str, resources: dict[str, Any], peer: str = "") -> tuple[str, str]:
        if not token:
            raise ServiceError(Code.INVALID_ARGUMENT, "enrolment_token is required")
        if len(token) > 200:
            raise ServiceError(Code.INVALID_ARGUMENT, "enrolment_token longer than 200 characters")
        if len(name) > 200:
            raise ServiceError(Code.INVALID_ARGUMENT, "name longer than 200 characters")
        res = clean_resources(resources)
        # after the cheap checks; one bucket per peer and one per token (hashed: never a plaintext
        # key), so one caller spends only its own budget and cannot block others' enrolment
        limiter = self.deps.coordination.rate_limiter
        token_key = hashlib.sha256(token.encode()).hexdigest()[:32]
        per_peer, per_token = self.settings.register_per_peer, self.settings.register_per_token
        if not limiter.allow(f"register:peer:{peer_host(peer)}", per_peer, REGISTER_WINDOW_S) or not limiter.allow(
            f"register:token:{token_key}", per_token, REGISTER_WINDOW_S
        ):
            raise ServiceError(Code.RESOURCE_EXHAUSTED, "too many registrations from this peer or token; retry later")
        try:
            with transaction(self.deps.sessions) as s:
                agent, credential = AgentRepo(s).redeem(token, name, res)
                AuditRepo(s).record(f"agent:{agent.id}", "agent_registered", name=name)
        except AuthError as e:
            raise ServiceError(Code.PERMISSION_DENIED, str(e)) from None
        self.deps.coordination.liveness.beat(agent.id, self.settings.heartbeat_ttl_s)
        return agent.id, credential

    def cached_agent(self, credential: str | None) -> str | None:
        """The agent id of a credential checked within `auth_cache_ttl_s` (no I/O: safe on the
        event loop); None when it must be checked against the database (`authenticate`)."""
        if not credential:
            raise ServiceError(Code.UNAUTHENTICATED, "missing credential (authorization: Bearer <credential>)")
        return self.auth_cache.get(credential)

    def authenticate(self, credential: str | None) -> str:
        cached = self.cached_agent(credential)
        if cached is not None:
            return cached
        assert credential  # cached_agent refused an empty one
        epoch = self.auth_cache.epoch()
        try:
            with transaction(self.deps.sessions, read_only=True) as s:
                agent_id = AgentRepo(s).authenticate(credential).id
        except RevokedError as e:
            raise ServiceError(Code.PERMISSION_DENIED, str(e)) from None
        except AuthError as e:
            raise ServiceError(Code.UNAUTHENTICATED, str(e)) from None
        self.auth_cache.put(credential, agent_id, epoch)  # only good credentials are cached
        return agent_id

    def forget(self, agent_ids: Sequence[str]) -> None:
        """Revoked: these agents' next calls are checked against the database (and refused)."""
        self.auth_cache.forget(agent_ids)
        for a in agent_ids:
            self._resources.discard(a)

    # ---------------------------------------------------------------- liveness
    def heartbeat(
        self, agent_id: str, resources: dict[str, Any], task_id: str, progress: float, ttl_s: float | None = None
    ) -> str:
        """→ "CONTINUE" or "CANCEL_TASK" (the task's round closed or its job stopped). `ttl_s`:
        how long this call keeps the agent alive (default: the configured TTL)."""
        res = clean_resources(resources)
        self.deps.coordination.liveness.beat(agent_id, ttl_s or self.settings.heartbeat_ttl_s)
        self.seen(agent_id)
        # liveness lives in the coordination store and last_seen_at is flushed in batches; the
        # row is read only when the resources differ from what this agent last reported here
        # (or that memory expired), and written only when they differ from the row
        reported = tuple(sorted(res.items()))
        if self._resources.get(agent_id) == reported:
            if not task_id:
                return "CONTINUE"
            with transaction(self.deps.sessions, read_only=True) as s:
                return self._task_answer(s, agent_id, task_id)
        with transaction(self.deps.sessions, read_only=True) as s:
            agent = AgentRepo(s).find(agent_id)
            changed = agent is not None and {**agent.resources, **res} != agent.resources
            answer = self._task_answer(s, agent_id, task_id) if task_id else "CONTINUE"
        if changed:
            with transaction(self.deps.sessions) as s:
                AgentRepo(s).touch(agent_id, res, utcnow())
        if agent is not None:
            self._resources.put(agent_id, reported)
        return answer

    def resources_unchanged(self, agent_id: str, resources: dict[str, Any]) -> bool:
        """True when these resources are what this agent last reported here (no I/O: safe on
        the event loop); then a heartbeat without a task needs no database work at all."""
        reported = tuple(sorted(clean_resources(resources).items()))
        return self._resources.get(agent_id) == reported

    def sweep(self) -> set[str]:
        """The agent plane's periodic sweep, one read-only transaction: forget the credentials
        of revoked agents (this bounds a lost revocation event to one sweep, so the auth cache
        can keep a credential long), and → every agent that has a task to claim or resume."""
        with transaction(self.deps.sessions, read_only=True) as s:
            revoked = AgentRepo(s).revoked_ids()
            pending = RoundRepo(s).pending_agents()
        self.auth_cache.forget(revoked)
        return pending

    def seen(self, agent_id: str) -> None:
        """Note a sign of life for the next `flush_seen` (no database work here)."""
        with self._seen_lock:
            self._seen.add(agent_id)

    def flush_seen(self) -> int:
        """Write last_seen_at = now for every agent seen since the last flush, in batched
        UPDATEs; returns how many. Called every LAST_SEEN_EVERY_S by the agent plane."""
        with self._seen_lock:
            ids, self._seen = sorted(self._seen), set()
        now = utcnow()
        for i in range(0, len(ids), TOUCH_BATCH):
            with transaction(self.deps.sessions) as s:
                AgentRepo(s).touch_many(ids[i : i + TOUCH_BATCH], now)
        return len(ids)

    def fleet_size(self) -> int:
        """Active (enrolled, not revoked) agents: what pacing scales with."""
        with transaction(self.deps.sessions, read_only=True) as s:
            return AgentRepo(s).count_active()

    @staticmethod
    def _task_answer(s: Session, agent_id: str, task_id: str) -> str:
        a = RoundRepo(s).task_row(task_id)
        if a is None:
            return "CANCEL_TASK"
        if a.agent_id != agent_id:
            raise ServiceError(Code.PERMISSION_DENIED, f"task {task_id} is not this agent's")
        alive = a.state in (AssignmentState.ISSUED, AssignmentState.RUNNING, AssignmentState.UPLOADED)
        if not (alive and a.round_open and a.job_status is JobStatus.RUNNING):
            return "CANCEL_TASK" if a.state is not AssignmentState.UPLOADED else "CONTINUE"
        return "CONTINUE"

    # ---------------------------------------------------------------- tasks
    def pull_task(self, agent_id: str, wait_s: float, held: dict[str, int] | None = None) -> TrainTask | None:
        """Blocking long-poll for in-process callers (the gRPC plane waits on events instead,
        see `begin_wait` / `try_claim`): a task as soon as a round assigns this agent one,
        else None at the timeout. `held`: job id -> the global-update version the agent holds
        (the full view's factored downlink)."""
        wait_s = max(0.0, min(wait_s, self.settings.pull_wait_max_s))
        deadline = time.monotonic() + wait_s
        with self.deps.coordination.events.subscribe(TASK_EVENTS) as sub:
            task = self.begin_wait(agent_id, wait_s + self.settings.heartbeat_ttl_s, held)
            while task is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sub.get(timeout_s=min(left, self.settings.pull_recheck_s))
                task = self.try_claim(agent_id, held)
            return task

    def begin_wait(
        self, agent_id: str, ttl_s: float, held: dict[str, int] | None = None, read: bool = True
    ) -> TrainTask | None:
        """The start of a PullTask: an open wait counts as liveness for `ttl_s`; then one read
        (`read=False`: none, the caller knows no round has named the agent since its last one)."""
        self.deps.coordination.liveness.beat(agent_id, ttl_s)
        self.seen(agent_id)
        return self.try_claim(agent_id, held) if read else None

    def try_claim(self, agent_id: str, held: dict[str, int] | None = None, named: bool = False) -> TrainTask | None:
        """The agent's pending task, claimed; None without a write (or the write lock) when it
        has none, which is the common case for an idle agent. `named`: a round event or the
        sweep named this agent, so it most likely has one: claim without the read first."""
        if named:
            return self._claim(agent_id, held or {})
        with transaction(self.deps.sessions, read_only=True) as s:
            pending = RoundRepo(s).pending_id_for_agent(agent_id)
        return None if pending is None else self._claim(agent_id, held or {})

    def _claim(self, agent_id: str, held: dict[str, int]) -> TrainTask | None:
        """The agent's pending task; the first claim moves it ISSUED → RUNNING."""
        with transaction(self.deps.sessions) as s:
            rounds = RoundRepo(s)
            a = rounds.pending_row(agent_id)
            if a is None:
                return None
            rounds.move_assignment(a.id, [AssignmentState.ISSUED], AssignmentState.RUNNING)
            spec = JobRepo(s).spec_of(a.job_id)
            key = a.start_keys.get(str(a.rank))
            if key is None:
                raise ServiceError(Code.FAILED_PRECONDITION, f"no start package for rank {a.rank}")
            blobs = [BlobInfo(key, self.deps.blobs.size(key), "start")]
            if spec.factored_downlink:
                blobs += self._global_blobs(rounds, a.job_id, a.number, a.input_state_key, held.get(a.job_id))
            return TrainTask(
                task_id=a.id,
                job_id=a.job_id,
                round=a.number,
                rank=a.rank,
                ranks=dict.fromkeys(spec.module_shapes, a.rank),
                strategy=spec.strategy,
                lora_alpha=spec.lora_alpha,
                scale_rule=spec.scale_rule,
                blobs=blobs,
                base_model=spec.base_model,
                base_model_sha256=spec.base_model_sha256 or "",
                task_type=spec.task_type,
                train_config={
                    **spec.train.model_dump(),
                    "extra_shapes": spec.extra_shapes,
                    "num_labels": spec.num_labels,
                    "seed": spec.seed,
                },
                deadline=a.deadline,
            )

    def _size(self, key: str) -> int | None:
        try:
            return self.deps.blobs.size(key)
        except BlobNotFound:
            return None

    def _global_blobs(
        self, rounds: RoundRepo, job_id: str, version: int, state_key: str | None, held: int | None
    ) -> list[BlobInfo]:
        """Factored downlink: the changes from the version the agent holds (a new agent: from
        version 0, W_0 = 0) when they are all retained and together smaller than the dense
        state, then the dense state as the fallback the agent takes when its rebuilt hashes
        disagree. Nothing at version 0 (every agent makes W_0 itself)."""
        if version == 0 or state_key is None:
            return []
        dense = self._size(state_key)
        if dense is None:
            raise ServiceError(Code.FAILED_PRECONDITION, f"the global state of version {version} is missing")
        keys = rounds.change_keys(job_id, (held or 0) + 1, version)
        sizes = {n: self._size(k) for n, k in keys.items()}
        chain = choose_chain(held, version, sizes, dense) or []
        out = [BlobInfo(keys[n], sizes[n] or 0, "change") for n in chain]
        return [*out, BlobInfo(state_key, dense, "state")]

    # ---------------------------------------------------------------- blobs
    def open_blob(self, agent_id: str, key: str, offset: int) -> tuple[int, str, Iterator[bytes]]:
        """(size, sha256, chunks from offset) for a blob this agent's open task references."""
        with transaction(self.deps.sessions, read_only=True) as s:
            a = RoundRepo(s).pending_row(agent_id)
            allowed = a is not None and key in a.start_keys.values()
            if a is not None and not allowed and JobRepo(s).spec_of(a.job_id).factored_downlink:
                # the global update and the changes leading to it: only where the view sends them
                allowed = key == a.input_state_key or key in RoundRepo(s).change_keys(a.job_id, 1, a.number).values()
            if not allowed:
                raise ServiceError(Code.PERMISSION_DENIED, "blob is not part of an open task of this agent")
        try:
            size = self.deps.blobs.size(key)
        except BlobNotFound:
            raise ServiceError(Code.NOT_FOUND, f"blob {key} not found") from None
        if not 0 <= offset <= size:
            raise ServiceError(Code.OUT_OF_RANGE, f"offset {offset} outside [0, {size}]")
        return (
            size,
            key,
            _counted(self.deps.blobs.read_chunks(key, offset, self.settings.chunk_bytes), prom.DOWNLOAD_BYTES),
        )

    # ---------------------------------------------------------------- uploads
    def upload_status(self, agent_id: str, task_id: str) -> int:
        self._own_task(agent_id, task_id)
        return self.deps.blobs.staging_size(task_id)

    def _own_task(self, agent_id: str, task_id: str) -> None:
        with transaction(self.deps.sessions, read_only=True) as s:
            owned_assignment(s, agent_id, task_id)

    def _check_open(self, agent_id: str, h: UploadHeader) -> Expected:
        """The assignment this header names must be this agent's, current, and not yet uploaded
        (checked again, under the write lock, when the upload is accepted); the data size it
        claims must be within the job's bound (JobSpec.defence)."""
        with transaction(self.deps.sessions, read_only=True) as s:
            a = owned_assignment(s, agent_id, h.task_id)
            if h.job_id != a.job_id or h.round != a.number:
                raise ServiceError(
                    Code.INVALID_ARGUMENT,
                    f"header names job {h.job_id} round {h.round}; the task is job {a.job_id} round {a.number}",
                )
            if a.state is AssignmentState.UPLOADED:
                raise ServiceError(Code.ALREADY_EXISTS, f"task {h.task_id} already has an accepted upload")
            if a.state not in (AssignmentState.ISSUED, AssignmentState.RUNNING) or not a.round_open:
                raise ServiceError(
                    Code.FAILED_PRECONDITION,
                    f"round {a.number} is closed ({a.round_state.value}); late upload rejected",
                )
            if utcnow() > a.deadline:
                raise ServiceError(Code.FAILED_PRECONDITION, "the round's deadline has passed; late upload rejected")
            spec = JobRepo(s).spec_of(a.job_id)
            # the agent's name matters only where an admin set sizes by name
            name = AgentRepo(s).get(agent_id).name if spec.defence.expected_examples else ""
            bound, what = spec.defence.examples_bound(agent_id, name)
            job_id, number = a.job_id, a.number
            exp = Expected(spec.module_shapes, a.rank, {k: tuple(v) for k, v in spec.extra_shapes.items()})
        if h.n_examples > bound:
            message = f"n_examples {h.n_examples} exceeds {what} = {bound}"
            self._refuse(agent_id, job_id, number, "n_examples_above_bound", message)
        return exp

    def _refuse(self, agent_id: str, job_id: str, number: int, reason: str, message: str) -> NoReturn:
        """Refuse an upload at the edge: nothing stored; the refusal is audit-logged by agent and
        reason, counted, and counts a strike (JobSpec.defence quarantine)."""
        with transaction(self.deps.sessions) as s:
            spec = JobRepo(s).spec(JobRepo(s).get(job_id))
            d = spec.defence
            until = utcnow() + timedelta(seconds=d.quarantine_window_s(spec.selection.deadline_s))
            audit = AuditRepo(s)
            audit.record(f"agent:{agent_id}", "upload_refused", job_id, round=number, reason=reason, detail=message)
            if AgentRepo(s).strike(agent_id, d.quarantine_after, d.quarantine_rounds, until):
                audit.record(
                    "coordinator",
                    "agent_quarantined",
                    job_id,
                    agent_id=agent_id,
                    rounds=d.quarantine_rounds,
                    until=until.isoformat(),
                )
                prom.QUARANTINES.inc()
        prom.DEFENCE_ACTIONS.labels("refused", reason).inc()
        raise ServiceError(Code.INVALID_ARGUMENT, message)

    def upload(self, agent_id: str, h: UploadHeader, chunks: Iterable[bytes]) -> UploadResult:
        try:
            res = self._upload(agent_id, h, chunks)
        except ServiceError as e:
            prom.UPLOADS.labels(e.code.value.lower()).inc()
            raise
        prom.UPLOADS.labels("accepted" if res.accepted else "partial").inc()
        return res

    def _upload(self, agent_id: str, h: UploadHeader, chunks: Iterable[bytes]) -> UploadResult:
        """Append chunks to the task's staging area; when complete, verify, validate and accept
        exactly once. Any rejection leaves the database and the global state unchanged."""
        if not 0 < h.n_examples <= INT64_MAX:  # the wire's uint64 goes beyond what the database holds
            raise ServiceError(Code.INVALID_ARGUMENT, f"n_examples must be in [1, {INT64_MAX}], got {h.n_examples}")
        if not 0 <= h.offset <= INT64_MAX:
            raise ServiceError(Code.INVALID_ARGUMENT, f"offset must be in [0, {INT64_MAX}]")
        if len(h.sha256) != 64 or any(c not in "0123456789abcdef" for c in h.sha256):
            raise ServiceError(Code.INVALID_ARGUMENT, "sha256 must be 64 lowercase hex characters")
        check_metrics(h.metrics)
        t0 = time.perf_counter()
        exp = self._check_open(agent_id, h)
        limit = min(exp.max_bytes(), self.settings.max_upload_bytes)
        if h.size <= 0 or h.size > limit:
            raise ServiceError(
                Code.INVALID_ARGUMENT, f"declared size {h.size} outside (0, {limit}] for rank {exp.rank}"
            )
        blobs = self.deps.blobs
        have = blobs.staging_size(h.task_id)
        if h.offset == 0 and have > 0:
            # an agent that restarted mid-upload starts over (its bytes may differ): drop the
            # stale staged part, unless another stream is writing it right now
            try:
                blobs.staging_discard(h.task_id)
            except UploadInProgress:
                raise ServiceError(Code.ABORTED, "another stream is uploading this task; retry") from None
            have = 0
        if h.offset != have:
            raise ServiceError(Code.FAILED_PRECONDITION, f"resume from offset {have}, not {h.offset}")
        t1 = time.perf_counter()
        prom.UPLOAD_STAGE_SECONDS.labels("check").observe(t1 - t0)
        try:
            received = blobs.staging_append(h.task_id, h.offset, _counted(chunks, prom.UPLOAD_BYTES), max_size=h.size)
        except UploadInProgress:
            raise ServiceError(Code.ABORTED, "another stream is uploading this task; retry") from None
        except BlobTooLarge:
            blobs.staging_discard(h.task_id)
            raise ServiceError(Code.INVALID_ARGUMENT, f"stream exceeds the declared size {h.size}") from None
        except OffsetMismatch as e:  # a concurrent stream moved the staged size
            raise ServiceError(Code.FAILED_PRECONDITION, str(e)) from None
        t2 = time.perf_counter()
        prom.UPLOAD_STAGE_SECONDS.labels("stage").observe(t2 - t1)  # includes waiting for the agent's chunks
        if received < h.size:
            return UploadResult("", received, False)  # resumable: the agent continues from `received`
        # Bounded: hashing and validating a large upload costs memory and CPU; past the bound the
        # agent retries later and the staged bytes stay (it resumes at offset == size).
        if not self._validations.acquire(timeout=VALIDATION_QUEUE_S):
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"too many uploads are being validated; retry in {VALIDATION_RETRY_S} s (received bytes are kept)",
                retry_after_s=VALIDATION_RETRY_S,
            )
        try:
            key = blobs.staging_commit(h.task_id, h.sha256, validate=lambda p: _validate_file(p, exp))
        except BlobIntegrityError:
            raise ServiceError(
                Code.DATA_LOSS,
                "sha256 of the received bytes does not match the header; "
                "staged data discarded, upload again from offset 0",
            ) from None
        except PayloadError as e:
            self._refuse(agent_id, h.job_id, h.round, "invalid_payload", str(e))
        except UploadInProgress:
            raise ServiceError(Code.ABORTED, "another stream is uploading this task; retry") from None
        finally:
            self._validations.release()
        t3 = time.perf_counter()
        prom.UPLOAD_STAGE_SECONDS.labels("verify").observe(t3 - t2)
        res = self._accept(agent_id, h, key, received)
        prom.UPLOAD_STAGE_SECONDS.labels("accept").observe(time.perf_counter() - t3)
        return res

    def _accept(self, agent_id: str, h: UploadHeader, key: str, size: int) -> UploadResult:
        try:
            with transaction(self.deps.sessions) as s:
                rounds = RoundRepo(s)
                a = owned_assignment(s, agent_id, h.task_id)
                if not a.round_open or utcnow() > a.deadline:
                    raise ServiceError(
                        Code.FAILED_PRECONDITION, "the round closed while uploading; late upload rejected"
                    )
                if not rounds.move_assignment(
                    h.task_id, [AssignmentState.ISSUED, AssignmentState.RUNNING], AssignmentState.UPLOADED
                ):
                    raise ServiceError(Code.ALREADY_EXISTS, f"task {h.task_id} already has an accepted upload")
                update_id = rounds.insert_update(
                    assignment_id=a.id,
                    round_id=a.round_id,
                    agent_id=agent_id,
                    blob_key=key,
                    sha256=h.sha256,
                    size=size,
                    n_examples=h.n_examples,
                    metrics=dict(h.metrics),
                )
                if a.round_state is RoundState.OPEN:  # the first upload only: no round-row write after that
                    rounds.transition(a.round_id, [RoundState.OPEN], RoundState.COLLECTING)
                AuditRepo(s).record(
                    f"agent:{agent_id}", "upload_accepted", a.job_id, round=a.number, task_id=a.id, bytes=size
                )
                job_id, round_id = a.job_id, a.round_id
        except IntegrityError:
            raise ServiceError(Code.ALREADY_EXISTS, f"task {h.task_id} already has an accepted upload") from None
        self.deps.coordination.events.publish(
            SCHEDULER_EVENTS, {"type": "upload", "job_id": job_id, "round_id": round_id}
        )
        return UploadResult(update_id, size, True)

    # ---------------------------------------------------------------- metrics
    def report_metrics(self, agent_id: str, task_id: str, values: dict[str, float], step: int) -> None:
        """Progress of a running task: bounded, refused once the round is closed, and written
        under a row lock on the round so concurrent reports never lose each other's keys."""
        check_metrics(values)
        if not 0 <= step <= INT64_MAX:
            raise ServiceError(Code.INVALID_ARGUMENT, f"step must be in [0, {INT64_MAX}]")
        with transaction(self.deps.sessions) as s:
            a = owned_assignment(s, agent_id, task_id)
            rnd = RoundRepo(s).get(a.round_id, lock=True)
            if rnd.state not in (RoundState.OPEN, RoundState.COLLECTING) or a.state not in (
                AssignmentState.ISSUED,
                AssignmentState.RUNNING,
                AssignmentState.UPLOADED,
            ):
                raise ServiceError(Code.FAILED_PRECONDITION, f"round {rnd.number} is closed ({rnd.state.value})")
            rnd.metrics = {**rnd.metrics, agent_id: {"step": step, **values}}


def check_metrics(values: dict[str, float]) -> None:
    """At most MAX_METRICS finite values under short printable keys (INVALID_ARGUMENT)."""
    if len(values) > MAX_METRICS:
        raise ServiceError(Code.INVALID_ARGUMENT, f"at most {MAX_METRICS} metrics, got {len(values)}")
    bad = [k[:MAX_METRIC_KEY] for k, v in values.items() if not (0 < len(k) <= MAX_METRIC_KEY and k.isprintable())]
    if bad:
        raise ServiceError(
            Code.INVALID_ARGUMENT, f"metric keys must be 1..{MAX_METRIC_KEY} printable characters: {bad[:3]}"
        )
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ServiceError(Code.INVALID_ARGUMENT, f"metric values must be finite: {bad[:5]}")
