"""Job lifecycle for the admin API: create (validated spec + round-0 artifacts), pause,
resume, cancel. One transaction per transition."""

from __future__ import annotations

from typing import Any

from ..artifacts import initial_state, publish_round_artifacts, put_state
from ..backends import SCHEDULER_EVENTS, Deps
from ..jobspec import JobSpec
from ..modeling import resolve_shapes
from ..storage.db import transaction
from ..storage.models import AssignmentState, Job, JobStatus, RoundState, new_id, utcnow
from ..storage.repos import AuditRepo, JobRepo, RoundRepo
from .errors import Code, ServiceError


class JobService:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def create(self, spec: JobSpec, actor: str = "admin") -> Job:
        if not spec.module_shapes:
            try:
                shapes, extras = resolve_shapes(spec.base_model, spec.target_modules, spec.task_type, spec.num_labels)
            except (OSError, ValueError) as e:
                raise ServiceError(
                    Code.INVALID_ARGUMENT,
                    f"cannot resolve module shapes from {spec.base_model!r} ({e}); give module_shapes explicitly",
                ) from None
            spec = JobSpec.model_validate(
                {**spec.model_dump(), "module_shapes": shapes, "extra_shapes": spec.extra_shapes or extras}
            )
        strategy = spec.build_strategy()
        job_id = new_id()
        state = initial_state(strategy, spec)
        # W_0 = 0 is implicit for dense strategies; factor strategies store their random A.
        state_key = None if strategy.dense_state else put_state(self.deps.blobs, state)
        plan_key, start_keys = publish_round_artifacts(self.deps.blobs, strategy, state, spec, job_id)
        with transaction(self.deps.sessions) as s:
            job = JobRepo(s).add(
                Job(
                    id=job_id,
                    name=spec.name,
                    status=JobStatus.RUNNING,
                    strategy=spec.strategy,
                    base_model=spec.base_model,
                    base_model_sha256=spec.base_model_sha256,
                    config=spec.model_dump(mode="json"),
                    state_key=state_key,
                    plan_key=plan_key,
                    start_keys=start_keys,
                )
            )
            AuditRepo(s).record(actor, "job_created", job.id, name=spec.name, strategy=spec.strategy)
        self.deps.coordination.events.publish(SCHEDULER_EVENTS, {"type": "job_created", "job_id": job.id})
        return job

    def pause(self, job_id: str, actor: str = "admin") -> None:
        self._transition(job_id, [JobStatus.RUNNING], JobStatus.PAUSED, "job_paused", actor)

    def resume(self, job_id: str, actor: str = "admin") -> None:
        # Clears the pause reason; the failed-round count starts again from here (scheduler).
        self._transition(job_id, [JobStatus.PAUSED], JobStatus.RUNNING, "job_resumed", actor, error=None)

    def cancel(self, job_id: str, actor: str = "admin") -> None:
        with transaction(self.deps.sessions) as s:
            JobRepo(s).get(job_id, lock=True)
            if not JobRepo(s).transition(
                job_id, [JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED], JobStatus.CANCELLED
            ):
                raise ServiceError(Code.FAILED_PRECONDITION, f"job {job_id} has already ended")
            rounds = RoundRepo(s)
            active = rounds.active(job_id)
            if active is not None and active.state is not RoundState.AGGREGATING:
                rounds.transition(
                    active.id,
                    [RoundState.PENDING, RoundState.OPEN, RoundState.COLLECTING],
                    RoundState.FAILED,
                    error="job cancelled",
                    closed_at=utcnow(),
                )
                for a in active.assignments:
                    rounds.set_assignment_state(
                        a.id, [AssignmentState.ISSUED, AssignmentState.RUNNING], AssignmentState.CANCELLED
                    )
            AuditRepo(s).record(actor, "job_cancelled", job_id)
        self.deps.coordination.events.publish(SCHEDULER_EVENTS, {"type": "job_cancelled", "job_id": job_id})

    def _transition(
        self, job_id: str, allowed: list[JobStatus], to: JobStatus, action: str, actor: str, **values: Any
    ) -> None:
        with transaction(self.deps.sessions) as s:
            job = JobRepo(s).get(job_id, lock=True)
            if not JobRepo(s).transition(job_id, allowed, to, **values):
                raise ServiceError(
                    Code.FAILED_PRECONDITION, f"job {job_id} is {job.status.value}; cannot move to {to.value}"
                )
            AuditRepo(s).record(actor, action, job_id)
        self.deps.coordination.events.publish(SCHEDULER_EVENTS, {"type": action, "job_id": job_id})
