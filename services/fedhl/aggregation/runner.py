"""One aggregation job = one round: the code path shared by the coordinator's in-process
runner and the `fedhl aggregator` worker. Safe to run twice for the same round: the commit
is a conditional transition (AGGREGATING → COMMITTED), so a redelivered job never applies an
update twice."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

import torch
from sqlalchemy.orm import Session, sessionmaker

from .. import metrics
from ..core import AggregationError, ClientUpdate, RoundPlan, Spectrum
from ..jobspec import JobSpec
from ..storage.blobs import BlobStore
from ..storage.coordination import Coordination
from ..storage.db import transaction
from ..storage.models import JobStatus, RoundState, utcnow
from ..storage.repos import AuditRepo, CheckpointRepo, JobRepo, RoundRepo
from .artifacts import BlobFactors, get_spectra, get_state, publish_round_artifacts, put_state, read_extras

log = logging.getLogger(__name__)

ROUND_EVENTS = "rounds"
AGGREGATION_STREAM_FIELD = "round_id"

Outcome = Literal["committed", "failed", "skipped"]


@dataclass
class Deps:
    sessions: sessionmaker[Session]
    blobs: BlobStore
    coord: Coordination
    device: str | None = None  # None: CUDA when present, else CPU


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def aggregate_round(deps: Deps, round_id: int, actor: str = "aggregator") -> Outcome:
    """Merge a round that is AGGREGATING and commit it; no-op for any other state."""
    t_start = time.perf_counter()
    with transaction(deps.sessions) as s:
        rnd = RoundRepo(s).get(round_id)
        if rnd.state is not RoundState.AGGREGATING:
            return "skipped"
        job = rnd.job
        spec = JobSpec.model_validate(job.config)
        rank_of = {a.agent_id: a.rank for a in rnd.assignments}
        uploads = [(u.agent_id, u.blob_key, u.n_examples) for u in RoundRepo(s).updates(round_id)]
        job_id, number, state_key, plan_key = job.id, rnd.number, job.state_key, job.plan_key
        if job.current_round != number:
            raise RuntimeError(f"round {round_id} starts from version {number}, job is at {job.current_round}")

    device = pick_device(deps.device)
    strategy = spec.build_strategy()
    strategy.device = torch.device(device)
    modules = list(spec.module_shapes)
    try:
        state = get_state(deps.blobs, state_key, strategy, spec)
        if state.round != number:
            raise AggregationError(f"stored state is at round {state.round}, round expects {number}")
        spectra = get_spectra(deps.blobs, plan_key) if strategy.uses_spectrum and plan_key else {}
        if strategy.uses_spectrum and not spectra:
            raise AggregationError("the round's spectra are missing from the blob store")
        on_device = {
            m: Spectrum(sp.U.to(device), sp.S.to(device), sp.Vh.to(device), sp.total_energy, sp.method, sp.residual)
            for m, sp in spectra.items()
        }
        ranks = {a: dict.fromkeys(modules, rank_of[a]) for a, _, _ in uploads}
        plan = RoundPlan(round=number, ranks=ranks, spectra=on_device)
        t_load = time.perf_counter()
        with ExitStack() as stack:
            updates = []
            for agent_id, key, n in uploads:
                path = stack.enter_context(deps.blobs.local_path(key))
                updates.append(
                    ClientUpdate(agent_id, BlobFactors(path, modules), n_examples=n, extras=read_extras(path))
                )
            new_state, report = strategy.aggregate(state, plan, updates, inplace=True)
        t_merge = time.perf_counter()
    except (AggregationError, ValueError) as e:
        _fail(deps, round_id, job_id, f"aggregation failed: {e}", actor)
        metrics.ROUNDS.labels("failed").inc()
        return "failed"

    new_key = put_state(deps.blobs, new_state)
    next_plan_key, start_keys, _ = publish_round_artifacts(deps.blobs, strategy, new_state, spec, job_id)
    t_publish = time.perf_counter()
    timings = {
        "load_s": t_load - t_start,
        "merge_s": t_merge - t_load,
        "publish_s": t_publish - t_merge,
        "total_s": t_publish - t_start,
        "device": device,
    }
    with transaction(deps.sessions) as s:
        rounds = RoundRepo(s)
        report_dict = {**report.to_dict(), "timings": timings}
        if not rounds.transition(
            round_id, [RoundState.AGGREGATING], RoundState.COMMITTED, committed_at=utcnow(), report=report_dict
        ):
            return "skipped"  # another worker committed it first: nothing applied twice
        job = JobRepo(s).get(job_id, lock=True)
        job.current_round = number + 1
        job.state_key, job.plan_key, job.start_keys = new_key, next_plan_key, start_keys
        if job.current_round >= spec.rounds and job.status in (JobStatus.RUNNING, JobStatus.PAUSED):
            job.status = JobStatus.COMPLETED
        CheckpointRepo(s).add(job_id, number + 1, new_key)
        for u in rounds.updates(round_id):
            u.weight = report.weights.get(u.agent_id)
        AuditRepo(s).record(
            actor,
            "round_committed",
            job_id,
            round_id=round_id,
            round=number,
            participants=len(uploads),
            merge_s=round(t_merge - t_load, 4),
        )
    metrics.ROUNDS.labels("committed").inc()
    metrics.AGGREGATION_SECONDS.observe(t_publish - t_start)
    deps.coord.events.publish(ROUND_EVENTS, {"type": "round_committed", "job_id": job_id, "round_id": round_id})
    log.info("round %s of job %s committed: %d uploads, merge %.3fs", number, job_id, len(uploads), t_merge - t_load)
    return "committed"


def _fail(deps: Deps, round_id: int, job_id: str, reason: str, actor: str) -> None:
    with transaction(deps.sessions) as s:
        if RoundRepo(s).transition(round_id, [RoundState.AGGREGATING], RoundState.FAILED, error=reason):
            AuditRepo(s).record(actor, "round_failed", job_id, round_id=round_id, reason=reason)
    deps.coord.events.publish(ROUND_EVENTS, {"type": "round_failed", "job_id": job_id, "round_id": round_id})
    log.warning("round %s failed: %s", round_id, reason)


def run_worker(
    deps: Deps, consumer: str, stop: threading.Event, reclaim_idle_s: float = 60.0, block_s: float = 1.0
) -> None:
    """Consume aggregation jobs until `stop` is set; reclaim entries a dead worker left pending."""
    queue = deps.coord.queue
    while not stop.is_set():
        entries = queue.reclaim(consumer, reclaim_idle_s) or queue.consume(consumer, block_s)
        for entry_id, fields in entries:
            try:
                aggregate_round(deps, int(fields[AGGREGATION_STREAM_FIELD]), actor=f"aggregator:{consumer}")
            except Exception:  # leave it pending: another attempt (or worker) will reclaim it
                log.exception("aggregation job %s failed unexpectedly", fields)
                continue
            queue.ack(entry_id)
