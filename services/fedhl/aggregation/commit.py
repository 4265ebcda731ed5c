"""Run one aggregation task (one shard of one round), then commit the round once every shard
is in, with a conditional transition (AGGREGATING → COMMITTED) so nothing applies twice."""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Literal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import metrics
from ..artifacts import start_meta
from ..backends import SCHEDULER_EVENTS, Deps
from ..codec import CodecError, load_state
from ..core import AggregationError
from ..round_report import RoundReport, downlink_summary
from ..storage.db import transaction
from ..storage.models import JobStatus, RoundState, utcnow
from ..storage.repos import AgentRepo, AuditRepo, CheckpointRepo, JobRepo, RoundRepo, ShardRepo
from .compute import compute_shard_file
from .evaluate import evaluate_state
from .inputs import RoundInputs, load_inputs
from .shards import publish

log = logging.getLogger(__name__)

Outcome = Literal["committed", "failed", "skipped", "partial"]


def run_task(deps: Deps, round_id: int, shard: int = 0, worker: str = "aggregator") -> Outcome:
    """Idempotent: safe to run again after a crash or a redelivery."""
    inp = load_inputs(deps, round_id)
    if inp is None:
        return "skipped"
    if not 0 <= shard < inp.shards:
        log.warning("round %s has %d shards; ignoring shard %d", round_id, inp.shards, shard)
        return "skipped"
    with transaction(deps.sessions, read_only=True) as s:
        done = ShardRepo(s).get(round_id, shard) is not None
    if not done:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "shard.safetensors"
            try:
                compute_shard_file(deps, inp, shard, path)
            except (AggregationError, CodecError) as e:  # the round's inputs cannot be merged
                fail_round(deps, round_id, inp.job_id, f"aggregation failed: {e}", worker)
                return "failed"
            key = deps.blobs.put_file(path)
        try:
            with transaction(deps.sessions) as s:
                ShardRepo(s).add(round_id, shard, key, worker, time.perf_counter() - t0)
        except IntegrityError:
            pass  # another worker recorded the same shard (same bytes): nothing to do
    with transaction(deps.sessions, read_only=True) as s:
        shard_keys = [(r.blob_key, r.seconds) for r in ShardRepo(s).for_round(round_id)]
    if len(shard_keys) < inp.shards:
        return "partial"
    return commit_round(deps, inp, shard_keys, worker)


def commit_round(deps: Deps, inp: RoundInputs, shard_keys: list[tuple[str, float]], worker: str) -> Outcome:
    t0 = time.perf_counter()
    strategy = inp.spec.build_strategy()
    meta = start_meta(inp.job_id, inp.number + 1, strategy, inp.spec)
    out = publish(deps.blobs, [k for k, _ in shard_keys], meta)
    if out.round != inp.number + 1:
        raise RuntimeError(f"shard results of round {inp.round_id} are for version {out.round}, not {inp.number + 1}")
    new_key, plan_key, start_keys = out.state_key, out.plan_key, out.start_keys
    report = RoundReport.combine(out.reports, [sec for _, sec in shard_keys])
    report.downlink = downlink_summary(strategy, out.sizes)
    report.timings["publish_s"] = time.perf_counter() - t0
    ev = inp.spec.evaluation
    if ev.path is not None and out.round % ev.every == 0:  # the state is read only when evaluated
        with deps.blobs.local_path(new_key) as path:
            report.evaluation = evaluate_state(strategy, load_state(path), inp.spec)
    report.timings["total_s"] = sum(sec for _, sec in shard_keys) + report.timings["publish_s"]
    with transaction(deps.sessions) as s:
        rounds = RoundRepo(s)
        if not rounds.transition(
            inp.round_id, [RoundState.AGGREGATING], RoundState.COMMITTED, committed_at=utcnow(), report=report.to_dict()
        ):
            return "skipped"  # another worker committed it first: nothing applied twice
        job = JobRepo(s).get(inp.job_id, lock=True)
        if job.current_round != inp.number:  # never advance a job twice from one version
            raise RuntimeError(
                f"job {inp.job_id} is at version {job.current_round}, round {inp.round_id} started from {inp.number}"
            )
        job.current_round = inp.number + 1
        job.state_key, job.plan_key, job.start_keys = new_key, plan_key, start_keys
        if job.current_round >= inp.spec.rounds and job.status in (JobStatus.RUNNING, JobStatus.PAUSED):
            job.status = JobStatus.COMPLETED
        CheckpointRepo(s).add(inp.job_id, inp.number + 1, new_key)
        for u in rounds.updates(inp.round_id):
            u.weight = report.weights.get(u.agent_id)
        attribute(s, inp, report, worker)
        AuditRepo(s).record(
            worker,
            "round_committed",
            inp.job_id,
            round_id=inp.round_id,
            round=inp.number,
            participants=len(inp.uploads),
            shards=len(shard_keys),
        )
    metrics.ROUNDS.labels("committed").inc()
    for d in report.dropped:
        metrics.DEFENCE_ACTIONS.labels("dropped", d["reason"]).inc()
    metrics.DEFENCE_ACTIONS.labels("clipped", "update_norm_above_bound").inc(len(report.clipped))
    metrics.DEFENCE_ACTIONS.labels("size_bounded", "n_examples_above_median_bound").inc(len(report.sizes_bounded))
    metrics.AGGREGATION_SECONDS.observe(report.timings["total_s"])
    deps.coordination.events.publish(
        SCHEDULER_EVENTS, {"type": "round_committed", "job_id": inp.job_id, "round_id": inp.round_id}
    )
    log.info(
        "round %s of job %s committed: %d uploads in %d shard(s)",
        inp.number,
        inp.job_id,
        len(inp.uploads),
        len(shard_keys),
    )
    return "committed"


def attribute(s: Session, inp: RoundInputs, report: RoundReport, worker: str) -> None:
    """Every dropped or clipped upload goes to the audit log by agent and reason. A drop of an
    unsound upload counts a strike (repeated offenders are quarantined, JobSpec.defence); a clip
    or reject by the update-size bound counts only above `reject_k × median` (an honest agent
    at a larger rank can sit above k × median round after round; core/defence.py `is_strike`),
    a direction leave-out only in most of the round's modules (`direction_strike`).
    A round without a strike clears the count."""
    d = inp.spec.defence
    agents, audit = AgentRepo(s), AuditRepo(s)
    offences = report.offences()
    struck = report.struck(d.clip_k, d.reject_k, modules=len(inp.spec.module_shapes))
    until = utcnow() + timedelta(seconds=d.quarantine_window_s(inp.spec.selection.deadline_s))
    for agent_id, reasons in offences.items():
        strike = agent_id in struck
        audit.record(
            worker, "upload_bounded", inp.job_id, agent_id=agent_id, round=inp.number, reasons=reasons, strike=strike
        )
        if strike and agents.strike(agent_id, d.quarantine_after, d.quarantine_rounds, until):
            audit.record(
                worker,
                "agent_quarantined",
                inp.job_id,
                agent_id=agent_id,
                rounds=d.quarantine_rounds,
                until=until.isoformat(),
            )
            metrics.QUARANTINES.inc()
    agents.clear_strikes([c for c in report.clients if c not in struck])


def fail_round(deps: Deps, round_id: int, job_id: str, reason: str, actor: str) -> None:
    """The round fails with its reason; the previous global state stays published."""
    with transaction(deps.sessions) as s:
        if RoundRepo(s).transition(
            round_id, [RoundState.AGGREGATING], RoundState.FAILED, error=reason, closed_at=utcnow()
        ):
            AuditRepo(s).record(actor, "round_failed", job_id, round_id=round_id, reason=reason)
    metrics.ROUNDS.labels("failed").inc()
    deps.coordination.events.publish(SCHEDULER_EVENTS, {"type": "round_failed", "job_id": job_id, "round_id": round_id})
    log.warning("round %s failed: %s", round_id, reason)


def dead_letter_round(deps: Deps, round_id: int, reason: str, actor: str) -> None:
    """A task that keeps failing: its round fails and its job pauses with `reason` (shown in
    the job's `error`), until an admin resumes it. Nothing else changes."""
    with transaction(deps.sessions) as s:
        rounds = RoundRepo(s)
        job_id = rounds.get(round_id).job_id
        failed = rounds.transition(
            round_id, [RoundState.AGGREGATING], RoundState.FAILED, error=reason, closed_at=utcnow()
        )
        paused = JobRepo(s).transition(job_id, [JobStatus.RUNNING], JobStatus.PAUSED, error=reason)
        AuditRepo(s).record(actor, "task_dead_lettered", job_id, round_id=round_id, reason=reason, paused=paused)
    if failed:
        metrics.ROUNDS.labels("failed").inc()
    deps.coordination.events.publish(SCHEDULER_EVENTS, {"type": "round_failed", "job_id": job_id, "round_id": round_id})
    log.error("round %s failed and job %s paused: %s", round_id, job_id, reason)
