"""Aggregation jobs: the code path shared by the coordinator's in-process runner and the
`fedhl aggregator` workers.

A round that closes becomes `shards` jobs on the queue; job i merges every `shards`-th module
(FedHL's weights come from the round's spectra of *all* modules, so a shard merges exactly what
an unsharded job would) and leaves a partial result in the blob store plus one `round_shards`
row. Whoever records the last shard assembles the new state and the next round's start
packages and commits the round with a conditional transition (AGGREGATING → COMMITTED): a
redelivered, reclaimed or duplicated job can never apply an update twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .. import metrics
from ..backends import SCHEDULER_EVENTS, AggregationTask, Deps
from ..core import AggregationError, ClientStart, ClientUpdate, GlobalState, RoundPlan, Spectrum
from ..jobspec import JobSpec
from ..storage.db import transaction
from ..storage.models import JobStatus, RoundShard, RoundState, utcnow
from ..storage.repos import AuditRepo, CheckpointRepo, JobRepo, RoundRepo
from ..storage.state_file import load_state
from .artifacts import (
    BlobFactors,
    ShardResult,
    get_shard,
    get_spectra,
    initial_state,
    next_round_artifacts,
    put_shard,
    put_spectra,
    put_start_packages,
    put_state,
    read_extras,
    start_meta,
    subset,
)

log = logging.getLogger(__name__)

Outcome = Literal["committed", "failed", "skipped", "partial"]


def pick_device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def shard_modules(modules: list[str], shard: int, shards: int) -> list[str]:
    """Strided, so equally shaped layers spread evenly over the shards."""
    return modules[shard::shards]


@dataclass(frozen=True)
class RoundInputs:
    round_id: int
    job_id: str
    number: int
    spec: JobSpec
    uploads: list[tuple[str, str, int]]  # (agent id, blob key, n_examples), in agent order
    rank_of: dict[str, int]
    state_key: str | None
    plan_key: str | None
    shards: int


def load_inputs(deps: Deps, round_id: int, *, aggregating_only: bool = True) -> RoundInputs | None:
    """The round's inputs, or None unless it is AGGREGATING (when `aggregating_only`)."""
    with transaction(deps.sessions, read_only=True) as s:
        rnd = RoundRepo(s).get(round_id)
        if aggregating_only and rnd.state is not RoundState.AGGREGATING:
            return None
        return RoundInputs(
            round_id=round_id,
            job_id=rnd.job_id,
            number=rnd.number,
            spec=JobSpec.model_validate(rnd.job.config),
            uploads=[(u.agent_id, u.blob_key, u.n_examples) for u in RoundRepo(s).updates(round_id)],
            rank_of={a.agent_id: a.rank for a in rnd.assignments},
            state_key=rnd.input_state_key,
            plan_key=rnd.input_plan_key,
            shards=rnd.shards,
        )


def compute_shard(deps: Deps, inp: RoundInputs, shard: int) -> ShardResult:
    """Merge the shard's modules and prepare their part of the next round. Pure function of
    the round's inputs: any worker computes the same bytes."""
    t0 = time.perf_counter()
    spec = inp.spec
    device = pick_device(deps.device)
    strategy = spec.build_strategy()
    strategy.device = torch.device(device)
    all_modules = list(spec.module_shapes)
    modules = shard_modules(all_modules, shard, inp.shards)
    if inp.state_key is None:
        full = initial_state(strategy, spec)
        state = subset(full, modules)
    else:
        with deps.blobs.local_path(inp.state_key) as path:
            state = load_state(path, modules)
    if shard != 0:
        state.extras = {}  # non-LoRA parameters are averaged once, by shard 0
    if state.round != inp.number:
        raise AggregationError(f"stored state is at round {state.round}, the round starts from {inp.number}")
    if not inp.uploads:
        raise AggregationError("no accepted uploads")
    spectra: dict[str, Spectrum] = {}
    if strategy.uses_spectrum:
        if inp.plan_key is None:
            raise AggregationError("the round's spectra are missing")
        spectra = {
            m: Spectrum(sp.U.to(device), sp.S.to(device), sp.Vh.to(device), sp.total_energy, sp.method, sp.residual)
            for m, sp in get_spectra(deps.blobs, inp.plan_key).items()
        }
    ranks = {a: dict.fromkeys(all_modules, inp.rank_of[a]) for a, _, _ in inp.uploads}
    plan = RoundPlan(round=inp.number, ranks=ranks, spectra=spectra)  # every module: weights see all of them
    t_load = time.perf_counter()
    with ExitStack() as stack:
        updates = []
        for agent_id, key, n in inp.uploads:
            path = stack.enter_context(deps.blobs.local_path(key))
            extras = read_extras(path) if shard == 0 else {}
            updates.append(ClientUpdate(agent_id, BlobFactors(path, modules), n_examples=n, extras=extras))
        new_state, report = strategy.aggregate(state, plan, updates, inplace=True)
    t_merge = time.perf_counter()
    next_spectra, starts = next_round_artifacts(strategy, new_state, spec.rank_set)
    t_next = time.perf_counter()
    partial = {
        "strategy": report.strategy,
        "round": report.round,
        "clients": report.clients,
        "n_modules": len(modules),
        "weights_sum": {c: w * len(modules) for c, w in report.weights.items()},
        "update_sq": {c: v * v for c, v in report.update_norms.items()},
        "change_sq": report.global_update_norm**2,
        "truncation_errors": report.truncation_errors,
        "energy_kept": {str(k): v for k, v in report.energy_kept.items()},
        "module_weights": report.module_weights,
        "options": report.options,
        "svd": report.svd,
        "timings": {"load_s": t_load - t0, "merge_s": t_merge - t_load, "next_round_s": t_next - t_merge},
        "device": device,
    }
    return ShardResult(new_state, next_spectra, starts, partial)


def combine_reports(parts: list[dict[str, Any]], shards_s: list[float]) -> dict[str, Any]:
    """One round report from the shards' partial ones (weights averaged over all modules)."""
    first = parts[0]
    n_modules = sum(p["n_modules"] for p in parts)
    clients = first["clients"]
    weights = {c: sum(p["weights_sum"][c] for p in parts) / n_modules for c in clients}
    module_weights: dict[str, Any] | None = None
    if first["module_weights"] is not None:
        module_weights = {}
        for p in parts:
            module_weights.update(p["module_weights"])
    timings = {k: sum(p["timings"][k] for p in parts) for k in first["timings"]}
    return {
        "strategy": first["strategy"],
        "round": first["round"],
        "clients": clients,
        "weights": weights,
        "truncation_errors": first["truncation_errors"],
        "energy_kept": first["energy_kept"],
        "update_norms": {c: math.sqrt(sum(p["update_sq"][c] for p in parts)) for c in clients},
        "global_update_norm": math.sqrt(sum(p["change_sq"] for p in parts)),
        "n_eff": 1.0 / sum(w * w for w in weights.values()),
        "module_weights": module_weights,
        "options": first["options"],
        "svd": first["svd"],
        "timings": {**timings, "shards": len(parts), "max_shard_s": max(shards_s), "device": first["device"]},
    }


def assemble(parts: list[ShardResult]) -> tuple[GlobalState, dict[str, Spectrum], dict[int, ClientStart]]:
    state = GlobalState(round=parts[0].state.round)
    spectra: dict[str, Spectrum] = {}
    starts: dict[int, ClientStart] = {}
    for p in parts:
        state.dense.update(p.state.dense)
        state.factors.update(p.state.factors)
        state.extras.update(p.state.extras)
        spectra.update(p.spectra)
        for r, st in p.starts.items():
            agg = starts.setdefault(r, ClientStart({}, {}, {}))
            agg.factors.update(st.factors)
            agg.base_residual.update(st.base_residual)
    return state, spectra, starts


def process(deps: Deps, round_id: int, shard: int = 0, worker: str = "aggregator") -> Outcome:
    """Run one aggregation job (one shard of one round), then commit the round if every shard
    is in. Idempotent: safe to run again after a crash or a redelivery."""
    inp = load_inputs(deps, round_id)
    if inp is None:
        return "skipped"
    if not 0 <= shard < inp.shards:
        log.warning("round %s has %d shards; ignoring shard %d", round_id, inp.shards, shard)
        return "skipped"
    with transaction(deps.sessions, read_only=True) as s:
        done = s.scalars(select(RoundShard).where(RoundShard.round_id == round_id, RoundShard.shard == shard)).first()
    if done is None:
        t0 = time.perf_counter()
        try:
            result = compute_shard(deps, inp, shard)
        except (AggregationError, ValueError) as e:
            fail_round(deps, round_id, inp.job_id, f"aggregation failed: {e}", worker)
            return "failed"
        key = put_shard(deps.blobs, result)
        try:
            with transaction(deps.sessions) as s:
                s.add(
                    RoundShard(
                        round_id=round_id, shard=shard, blob_key=key, worker=worker, seconds=time.perf_counter() - t0
                    )
                )
        except IntegrityError:
            pass  # another worker recorded the same shard (same bytes): nothing to do
    with transaction(deps.sessions, read_only=True) as s:
        rows = s.scalars(select(RoundShard).where(RoundShard.round_id == round_id).order_by(RoundShard.shard)).all()
        shard_keys = [(r.blob_key, r.seconds) for r in rows]
    if len(shard_keys) < inp.shards:
        return "partial"
    return finish(deps, inp, shard_keys, worker)


def finish(deps: Deps, inp: RoundInputs, shard_keys: list[tuple[str, float]], worker: str) -> Outcome:
    t0 = time.perf_counter()
    parts = [get_shard(deps.blobs, k) for k, _ in shard_keys]
    state, spectra, starts = assemble(parts)
    strategy = inp.spec.build_strategy()
    new_key = put_state(deps.blobs, state)
    plan_key = put_spectra(deps.blobs, spectra) if spectra else None
    start_keys = put_start_packages(
        deps.blobs, starts, state.extras, start_meta(inp.job_id, state.round, strategy, inp.spec)
    )
    report = combine_reports([p.report for p in parts], [sec for _, sec in shard_keys])
    report["timings"]["publish_s"] = time.perf_counter() - t0
    evaluation = evaluate_state(strategy, state, inp.spec)
    if evaluation is not None:
        report["evaluation"] = evaluation
    report["timings"]["total_s"] = sum(sec for _, sec in shard_keys) + report["timings"]["publish_s"]
    with transaction(deps.sessions) as s:
        rounds = RoundRepo(s)
        if not rounds.transition(
            inp.round_id, [RoundState.AGGREGATING], RoundState.COMMITTED, committed_at=utcnow(), report=report
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
            u.weight = report["weights"].get(u.agent_id)
        AuditRepo(s).record(
            worker,
            "round_committed",
            inp.job_id,
            round_id=inp.round_id,
            round=inp.number,
            participants=len(inp.uploads),
            shards=len(parts),
        )
    metrics.ROUNDS.labels("committed").inc()
    metrics.AGGREGATION_SECONDS.observe(report["timings"]["total_s"])
    deps.coord.events.publish(
        SCHEDULER_EVENTS, {"type": "round_committed", "job_id": inp.job_id, "round_id": inp.round_id}
    )
    log.info(
        "round %s of job %s committed: %d uploads in %d shard(s)", inp.number, inp.job_id, len(inp.uploads), len(parts)
    )
    return "committed"


_EVAL_CACHE: dict[tuple[str, str, int], tuple[Any, Any, list[Any]]] = {}


def evaluate_state(strategy: Any, state: GlobalState, spec: JobSpec) -> dict[str, Any] | None:
    """Accuracy/loss (classification) or loss/perplexity (causal LM) of W0 + W_t on the job's
    held-out split, every `evaluation.every` rounds; never fails the round."""
    ev = spec.evaluation
    if ev.path is None or state.round % ev.every != 0:
        return None
    t0 = time.perf_counter()
    try:
        from ..data import load_examples
        from ..evaluation import evaluate
        from ..modeling import load_base

        key = (spec.base_model, ev.path, spec.num_labels)
        if key not in _EVAL_CACHE:
            _EVAL_CACHE.clear()  # one base model in memory at a time
            model, tok = load_base(spec.base_model, spec.task_type, spec.num_labels, init_seed=spec.seed)
            _EVAL_CACHE[key] = (model, tok, load_examples(ev.path, spec.task_type, spec.num_labels))
        model, tok, examples = _EVAL_CACHE[key]
        updates = {m: strategy.effective_update(state, m) for m in state.modules}
        out: dict[str, Any] = evaluate(
            (model, tok),
            spec.task_type,
            spec.num_labels,
            updates,
            state.extras,
            examples,
            max_seq_len=spec.train.max_seq_len,
        )
    except Exception as e:  # evaluation is a measurement: report the error, keep the round
        log.exception("evaluation of round %d failed", state.round)
        return {"error": f"{type(e).__name__}: {e}"}
    return {**out, "examples": len(examples), "seconds": time.perf_counter() - t0}


def fail_round(deps: Deps, round_id: int, job_id: str, reason: str, actor: str) -> None:
    """The round fails with its reason; the previous global state stays published."""
    with transaction(deps.sessions) as s:
        if RoundRepo(s).transition(
            round_id, [RoundState.AGGREGATING], RoundState.FAILED, error=reason, closed_at=utcnow()
        ):
            AuditRepo(s).record(actor, "round_failed", job_id, round_id=round_id, reason=reason)
    metrics.ROUNDS.labels("failed").inc()
    deps.coord.events.publish(SCHEDULER_EVENTS, {"type": "round_failed", "job_id": job_id, "round_id": round_id})
    log.warning("round %s failed: %s", round_id, reason)


def run_worker(
    deps: Deps, consumer: str, stop: threading.Event, reclaim_idle_s: float = 60.0, block_s: float = 1.0
) -> None:
    """Consume aggregation jobs until `stop` is set; first reclaim entries that a dead worker
    left pending longer than `reclaim_idle_s`."""
    queue = deps.coord.queue
    while not stop.is_set():
        reclaimed = queue.reclaim(consumer, reclaim_idle_s)
        if reclaimed:
            metrics.RECLAIMED_JOBS.inc(len(reclaimed))
            log.info("reclaimed %d aggregation job(s) left pending by another worker", len(reclaimed))
        for entry_id, fields in reclaimed or queue.consume(consumer, block_s):
            try:
                task = AggregationTask.from_fields(fields)
                outcome = process(deps, task.round_id, task.shard, worker=f"aggregator:{consumer}")
            except Exception:  # leave it pending: a later reclaim retries it
                log.exception("aggregation job %s failed unexpectedly", fields)
                metrics.AGGREGATION_JOBS.labels("error").inc()
                continue
            metrics.AGGREGATION_JOBS.labels(outcome).inc()
            queue.ack(entry_id)
