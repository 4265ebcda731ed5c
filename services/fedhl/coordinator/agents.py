"""What agents can do, independent of the transport: the gRPC servicer decodes, calls these
methods, and maps `ServiceError.code` to a status. Protobuf types never reach this layer."""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

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
from .batcher import Batcher, Full
from .errors import Code, ServiceError

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a batch item

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
class Accept:
    """A verified upload, staged under `key`, waiting to be accepted (`accept_many`)."""

    agent_id: str
    header: UploadHeader
    key: str
    size: int


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


def not_owned(a: TaskRow | None, agent_id: str, task_id: str) -> ServiceError | None:
    """Why this agent may not act on the task: it does not exist (NOT_FOUND) or is another
    agent's (PERMISSION_DENIED); None when it may."""
    if a is None:
        return ServiceError(Code.NOT_FOUND, f"task {task_id} not found")
    if a.agent_id != agent_id:
        return ServiceError(Code.PERMISSION_DENIED, f"task {task_id} is not this agent's")
    return None


def owned_assignment(s: Session, agent_id: str, task_id: str) -> TaskRow:
    """The task, which must exist and belong to this agent (`not_owned`)."""
    a = RoundRepo(s).task_row(task_id)
    if (e := not_owned(a, agent_id, task_id)) is not None:
        raise e
    assert a is not None
    return a


def only(results: Sequence[T | Exception]) -> T:
    """The one result of a batch method called with one item (its error raised)."""
    (res,) = results
    if isinstance(res, Exception):
        raise res
    return res


def submit(batcher: Batcher[I, T], item: I) -> concurrent.futures.Future[T]:
    """Queue `item`; a full queue is RESOURCE_EXHAUSTED (the edge adds a retry-after)."""
    try:
        return batcher.submit(item)
    except Full as e:
        raise ServiceError(Code.RESOURCE_EXHAUSTED, f"the server is busy ({e}); retry later") from None


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
        # group commit of the hot writes (`batcher`): a round's claims and accepts share transactions
        self._claims: Batcher[tuple[str, dict[str, int]], TrainTask | None] = Batcher(
            "claim", self.claim_many, workers=settings.db_batch_workers, max_batch=settings.db_batch_max
        )
        self._auths: Batcher[str, str] = Batcher(
            "auth", self.authenticate_many, workers=settings.db_batch_workers, max_batch=settings.db_batch_max
        )
        self._accepts: Batcher[Accept, UploadResult] = Batcher(
            "accept", self.accept_many, workers=settings.db_batch_workers, max_batch=settings.db_batch_max
        )

    def close(self) -> None:
        """Finish the queued claims and accepts and stop their threads."""
        for b in (self._auths, self._claims, self._accepts):
            b.close()

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
        epoch = self.auth_cache.epoch()
        try:
            with transaction(self.deps.sessions) as s:
                agent, credential = AgentRepo(s).redeem(token, name, res)
                AuditRepo(s).record(f"agent:{agent.id}", "agent_registered", name=name)
        except AuthError as e:
            raise ServiceError(Code.PERMISSION_DENIED, str(e)) from None
        self.deps.coordination.liveness.beat(agent.id, self.settings.heartbeat_ttl_s)
        # what this replica now knows: the agent's first calls here need no query (a fleet's
        # enrolment would otherwise read every new agent's row twice)
        self.auth_cache.put(credential, agent.id, epoch)
        self._resources.put(agent.id, tuple(sorted(res.items())))
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
        return only(self.authenticate_many([credential]))

    def authenticate_async(self, credential: str) -> concurrent.futures.Future[str]:
        """`authenticate` through the auth batcher (a fleet reconnecting after a restart checks
        its credentials a batch per query)."""
        return submit(self._auths, credential)

    def authenticate_many(self, credentials: Sequence[str]) -> list[str | Exception]:
        """Each credential's agent id (cached), or UNAUTHENTICATED / PERMISSION_DENIED (revoked):
        one query for the batch."""
        epoch = self.auth_cache.epoch()  # before the read: a revocation during it is not undone
        with transaction(self.deps.sessions, read_only=True) as s:
            checked = AgentRepo(s).authenticate_many(credentials)
        out: list[str | Exception] = []
        for credential, res in zip(credentials, checked, strict=True):
            if isinstance(res, RevokedError):
                out.append(ServiceError(Code.PERMISSION_DENIED, str(res)))
            elif isinstance(res, AuthError):
                out.append(ServiceError(Code.UNAUTHENTICATED, str(res)))
            else:
                self.auth_cache.put(credential, res, epoch)  # only good credentials are cached
                out.append(res)
        return out

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

    def try_claim(self, agent_id: str, held: dict[str, int] | None = None) -> TrainTask | None:
        """The agent's pending task, claimed (blocking callers; the gRPC plane goes through
        `claim`, which batches); None when it has none."""
        return only(self.claim_many([(agent_id, held or {})]))

    def claim(self, agent_id: str, held: dict[str, int]) -> concurrent.futures.Future[TrainTask | None]:
        """`try_claim` through the claim batcher: the claims of a round's wake-up share a few
        transactions (`batcher`). Raises ServiceError RESOURCE_EXHAUSTED when its queue is full."""
        return submit(self._claims, (agent_id, held))

    def claim_many(self, items: Sequence[tuple[str, dict[str, int]]]) -> list[TrainTask | Exception | None]:
        """Each (agent, held)'s pending task, claimed: the first claim moves it ISSUED →
        RUNNING; None for an agent without one. One read-only query for the whole batch (an
        idle agent costs no write, nor SQLite's write lock), then one write transaction for the
        agents that have a task: one query, one UPDATE. A task that cannot be built (its start
        package missing) is that item's ServiceError and is not moved."""
        agents = [a for a, _ in items]
        with transaction(self.deps.sessions, read_only=True) as s:
            found = RoundRepo(s).pending_rows(agents)
        if not found:
            return [None] * len(items)
        out: list[TrainTask | Exception | None] = []
        with transaction(self.deps.sessions) as s:
            rounds = RoundRepo(s)
            rows = rounds.pending_rows(list(found))
            sizes: dict[str, int | None] = {}  # blob key → size, per batch (a round's agents share its blobs)
            claimed: list[str] = []
            for agent_id, held in items:
                a = rows.get(agent_id)
                if a is None:
                    out.append(None)
                    continue
                try:
                    out.append(self._task(s, rounds, a, held, sizes))
                    claimed.append(a.id)
                except ServiceError as e:
                    out.append(e)
            rounds.move_assignments(claimed, [AssignmentState.ISSUED], AssignmentState.RUNNING)
        return out

    def _task(
        self, s: Session, rounds: RoundRepo, a: TaskRow, held: dict[str, int], sizes: dict[str, int | None]
    ) -> TrainTask:
        def size(key: str) -> int | None:
            if key not in sizes:
                sizes[key] = self._size(key)
            return sizes[key]

        spec = JobRepo(s).spec_of(a.job_id)
        key = a.start_keys.get(str(a.rank))
        start = None if key is None else size(key)
        if key is None or start is None:
            raise ServiceError(Code.FAILED_PRECONDITION, f"no start package for rank {a.rank}")
        blobs = [BlobInfo(key, start, "start")]
        if spec.factored_downlink:
            blobs += self._global_blobs(rounds, a.job_id, a.number, a.input_state_key, held.get(a.job_id), size)
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
        self,
        rounds: RoundRepo,
        job_id: str,
        version: int,
        state_key: str | None,
        held: int | None,
        size: Callable[[str], int | None],
    ) -> list[BlobInfo]:
        """Factored downlink: the changes from the version the agent holds (a new agent: from
        version 0, W_0 = 0) when they are all retained and together smaller than the dense
        state, then the dense state as the fallback the agent takes when its rebuilt hashes
        disagree. Nothing at version 0 (every agent makes W_0 itself)."""
        if version == 0 or state_key is None:
            return []
        dense = size(state_key)
        if dense is None:
            raise ServiceError(Code.FAILED_PRECONDITION, f"the global state of version {version} is missing")
        keys = rounds.change_keys(job_id, (held or 0) + 1, version)
        sizes = {n: size(k) for n, k in keys.items()}
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
        return submit(self._accepts, Accept(agent_id, h, key, size)).result()

    def accept_many(self, items: Sequence[Accept]) -> list[UploadResult | Exception]:
        """Accept verified uploads, exactly once each, in one transaction for the batch: one
        read of their tasks, one conditional UPDATE (ISSUED/RUNNING → UPLOADED, RETURNING the
        ids it moved: a task already uploaded, or named twice in the batch, is ALREADY_EXISTS),
        one INSERT of the update rows and one of the audit rows; then one scheduler event per
        round. An item that fails its checks is that item's ServiceError; a constraint violation
        fails the batch, and the batcher runs its items one by one."""
        out: list[UploadResult | Exception | None] = [None] * len(items)
        try:
            with transaction(self.deps.sessions) as s:
                rounds = RoundRepo(s)
                rows = rounds.task_rows([it.header.task_id for it in items])
                now = utcnow()
                ok: list[int] = []
                for i, it in enumerate(items):
                    a = rows.get(it.header.task_id)
                    if (e := not_owned(a, it.agent_id, it.header.task_id)) is not None:
                        out[i] = e
                    elif a is not None and (not a.round_open or now > a.deadline):
                        out[i] = ServiceError(
                            Code.FAILED_PRECONDITION, "the round closed while uploading; late upload rejected"
                        )
                    else:
                        ok.append(i)
                moved = rounds.move_assignments(
                    [items[i].header.task_id for i in ok],
                    [AssignmentState.ISSUED, AssignmentState.RUNNING],
                    AssignmentState.UPLOADED,
                )
                accepted: list[int] = []
                for i in ok:
                    task_id = items[i].header.task_id
                    if task_id in moved:
                        moved.discard(task_id)  # a task named twice: the first item has it
                        accepted.append(i)
                    else:
                        out[i] = ServiceError(Code.ALREADY_EXISTS, f"task {task_id} already has an accepted upload")
                accepted_rows = [rows[items[i].header.task_id] for i in accepted]
                update_ids = rounds.insert_updates(
                    [
                        {
                            "assignment_id": a.id,
                            "round_id": a.round_id,
                            "agent_id": a.agent_id,
                            "blob_key": items[i].key,
                            "sha256": items[i].header.sha256,
                            "size": items[i].size,
                            "n_examples": items[i].header.n_examples,
                            "metrics": dict(items[i].header.metrics),
                        }
                        for i, a in zip(accepted, accepted_rows, strict=True)
                    ]
                )
                # the first upload of a round moves it OPEN → COLLECTING; no round-row write after that
                for round_id in sorted({a.round_id for a in accepted_rows if a.round_state is RoundState.OPEN}):
                    rounds.transition(round_id, [RoundState.OPEN], RoundState.COLLECTING)
                AuditRepo(s).record_many(
                    [
                        (
                            f"agent:{a.agent_id}",
                            "upload_accepted",
                            a.job_id,
                            {"round": a.number, "task_id": a.id, "bytes": items[i].size},
                        )
                        for i, a in zip(accepted, accepted_rows, strict=True)
                    ]
                )
                for i, update_id in zip(accepted, update_ids, strict=True):
                    out[i] = UploadResult(update_id, items[i].size, True)
        except IntegrityError:
            if len(items) > 1:
                raise  # the batcher runs each item alone
            return [ServiceError(Code.ALREADY_EXISTS, f"task {items[0].header.task_id} already has an accepted upload")]
        for job_id, round_id in sorted({(a.job_id, a.round_id) for a in accepted_rows}):
            self.deps.coordination.events.publish(
                SCHEDULER_EVENTS, {"type": "upload", "job_id": job_id, "round_id": round_id}
            )
        assert all(r is not None for r in out)
        return cast(list[UploadResult | Exception], out)

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
