"""The aggregation worker: shards merge exactly what one job merges, a worker killed mid-merge
is replaced without double-applying anything, a poisoned upload fails the round cleanly, and
the merge runs on CUDA when present (CPU here)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from sqlalchemy import select

from crew import crew, token, wait_agents, wait_round
from fedhl.agent.scripted import ScriptedAgent
from fedhl.aggregation.commit import run_task
from fedhl.aggregation.compute import compute_shard, compute_shard_file
from fedhl.aggregation.inputs import RoundInputs, load_inputs
from fedhl.aggregation.shards import assemble, get_shard, publish, put_shard
from fedhl.artifacts import (
    CHANGE_KEY,
    get_spectra,
    initial_state,
    next_round_artifacts,
    put_spectra,
    put_start_packages,
    put_state,
    start_meta,
)
from fedhl.codec import (
    START_HASHES,
    ShardResult,
    UploadFactors,
    decode_change,
    decode_start,
    encode_update,
    load_state,
    read_update_extras,
    state_metadata,
)
from fedhl.coordinator.app import Coordinator
from fedhl.core import ClientUpdate, LoRAFactors, RoundPlan
from fedhl.core.downlink import rebuild, state_hashes
from fedhl.jobspec import JobSpec
from fedhl.storage.db import transaction
from fedhl.storage.models import Checkpoint, RoundState
from stack import env_for, free_port, job_spec, running, settings_for

SPEC = job_spec(
    n_layers=3,
    dim=24,
    ranks=[2, 4, 8],
    rounds=3,
    rank_policy={"kind": "fixed", "fixed": {"agent-0": 2, "agent-1": 4, "agent-2": 8, "agent-3": 4}},
    selection={"count": 4, "min_clients": 4, "deadline_s": 120},
)


@pytest.mark.parametrize("strategy", ["fedhl", "hetlora", "flora"])
def test_module_shards_merge_exactly_what_one_job_merges(strategy: str, tmp_path: Path) -> None:
    settings = settings_for("sqlite+inprocess", tmp_path, inprocess_aggregator=False, aggregation_shards=3)
    with running(settings) as c:
        job = c.jobs.create(JobSpec.model_validate({**SPEC, "strategy": strategy}))
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 4)
        try:
            rnd = wait_round(c, job.id, {RoundState.AGGREGATING})
        finally:
            team.close()
        inp = load_inputs(c.deps, rnd.id)
        assert inp is not None and inp.shards == 3

        sharded, _, _ = assemble([compute_shard(c.deps, inp, k) for k in range(3)])
        one = compute_shard(c.deps, dataclasses.replace(inp, shards=1), 0)
        _same_as_read_back(one, get_shard(c.deps.blobs, put_shard(c.deps.blobs, one)))
        whole, _, _ = assemble([one])

        assert sharded.tensors().keys() == whole.tensors().keys()
        for k, v in whole.tensors().items():
            other = sharded.tensors()[k]
            assert (other.dtype, other.shape) == (v.dtype, v.shape), k
            assert other.contiguous().numpy().tobytes() == v.contiguous().numpy().tobytes(), k
        assert put_state(c.deps.blobs, sharded) == put_state(c.deps.blobs, whole)


def _same_as_read_back(kept: ShardResult, read: ShardResult) -> None:
    """A shard's result survives the blob store: every tensor (shared ones included: FLoRA hands
    each rank the state tensor itself), spectrum and report field reads back as computed."""

    def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), what
        assert a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), what

    assert kept.state.round == read.state.round and json.loads(json.dumps(kept.report)) == read.report
    assert kept.state.tensors().keys() == read.state.tensors().keys()
    for k, v in read.state.tensors().items():
        same(kept.state.tensors()[k], v, k)
    assert kept.spectra.keys() == read.spectra.keys()
    for m, sp in read.spectra.items():
        ks = kept.spectra[m]
        for part in ("U", "S", "Vh"):
            same(getattr(ks, part), getattr(sp, part), f"{m}.{part}")
        assert (ks.total_energy, ks.method, ks.residual) == (sp.total_energy, sp.method, sp.residual)
    assert kept.starts.keys() == read.starts.keys()
    for r, st in read.starts.items():
        assert kept.starts[r].factors.keys() == st.factors.keys()
        for m, f in st.factors.items():
            same(kept.starts[r].factors[m].B, f.B, f"start {r} {m} B")
            same(kept.starts[r].factors[m].A, f.A, f"start {r} {m} A")
        assert kept.starts[r].base_residual.keys() == st.base_residual.keys()


def _same_spectra(c: Coordinator, key: str, ref_key: str) -> None:
    got, ref = get_spectra(c.deps.blobs, key), get_spectra(c.deps.blobs, ref_key)
    assert got.keys() == ref.keys()
    for m, sp in ref.items():
        for part in ("U", "S", "Vh"):
            a, b = getattr(got[m], part), getattr(sp, part)
            assert a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes(), (m, part)
        assert (got[m].total_energy, got[m].method, got[m].residual) == (sp.total_energy, sp.method, sp.residual)


def _published_in_memory(c: Coordinator, inp: RoundInputs) -> tuple[str, str | None, dict[str, str]]:
    """What the worker published before streaming, computed here the same way: the whole state in
    memory, one `aggregate`, next-round artifacts of the whole new state, stock writers."""
    spec = inp.spec
    strategy = spec.build_strategy()
    if inp.state_key is None:
        state = initial_state(strategy, spec)
    else:
        with c.deps.blobs.local_path(inp.state_key) as path:
            state = load_state(path)
    spectra = get_spectra(c.deps.blobs, inp.plan_key) if inp.plan_key else {}
    ranks = {a: dict.fromkeys(spec.module_shapes, inp.rank_of[a]) for a, _, _ in inp.uploads}
    plan = RoundPlan(round=inp.number, ranks=ranks, spectra=spectra)
    with ExitStack() as stack:
        updates = []
        for agent_id, key, n in inp.uploads:
            p = stack.enter_context(c.deps.blobs.local_path(key))
            updates.append(
                ClientUpdate(agent_id, UploadFactors(p, list(state.modules)), n, extras=read_update_extras(p))
            )
        new, _ = strategy.aggregate(state, plan, updates)
    next_spectra, starts = next_round_artifacts(strategy, new, spec.rank_set)
    tensors = {k: v.contiguous() for k, v in sorted(new.tensors().items())}
    state_key = c.deps.blobs.put_bytes(save(tensors, metadata=state_metadata(new.round)))  # the stock writer
    plan_key = put_spectra(c.deps.blobs, next_spectra) if next_spectra else None
    meta = start_meta(inp.job_id, new.round, strategy, spec)
    if strategy.factored_downlink:  # start packages name the hashes of the state agents must hold
        meta[START_HASHES] = json.dumps(state_hashes(new.dense))
    return state_key, plan_key, put_start_packages(c.deps.blobs, starts, new.extras, meta)


def _rebuilds(c: Coordinator, inp: RoundInputs, change_key: str, state_key: str) -> None:
    with c.deps.blobs.local_path(change_key) as p:
        change = decode_change(p.read_bytes())
    with c.deps.blobs.local_path(state_key) as p:
        new = load_state(p)
    if inp.state_key is None:
        old = {m: torch.zeros(s) for m, s in inp.spec.module_shapes.items()}
    else:
        with c.deps.blobs.local_path(inp.state_key) as p:
            old = load_state(p).dense
    assert change.round == inp.number + 1
    assert change.hashes == state_hashes(new.dense)
    assert state_hashes(rebuild(old, [change.changes])) == change.hashes


@pytest.mark.parametrize(
    ("strategy", "view"), [("fedhl", "truncated"), ("fedhl", "full"), ("flora", None), ("hetlora", None)]
)
def test_streamed_shards_publish_the_bytes_of_the_in_memory_merge(
    strategy: str, view: str | None, tmp_path: Path
) -> None:
    """Module by module, over 2 shards, the published state, spectra and start packages have the
    content addresses of the whole-state merge (dense per-rank residuals and FLoRA's shared
    tensors included)."""
    settings = settings_for("sqlite+inprocess", tmp_path, inprocess_aggregator=False, aggregation_shards=2)
    options = {"client_view": view} if view else {}
    with running(settings) as c:
        job = c.jobs.create(JobSpec.model_validate({**SPEC, "strategy": strategy, "strategy_options": options}))
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 4)
        try:
            for number in (0, 1):  # the initial state, then one read from the blob store
                rnd = wait_round(c, job.id, {RoundState.AGGREGATING})
                inp = load_inputs(c.deps, rnd.id)
                assert inp is not None and inp.number == number and inp.shards == 2
                assert number == 0 or inp.state_key is not None
                keys = []
                for k in range(2):
                    path = tmp_path / f"shard{k}.safetensors"
                    compute_shard_file(c.deps, inp, k, path)
                    keys.append(c.deps.blobs.put_file(path))
                meta = start_meta(inp.job_id, inp.number + 1, inp.spec.build_strategy(), inp.spec)
                out = publish(c.deps.blobs, keys, meta)
                state_key, plan_key, start_keys = _published_in_memory(c, inp)
                change_key = out.start_keys.pop(CHANGE_KEY, None)
                assert (out.state_key, out.start_keys) == (state_key, start_keys)
                assert (change_key is not None) == (view == "full")
                if change_key is not None:  # the change rebuilds the published state from the previous one
                    _rebuilds(c, inp, change_key, out.state_key)
                assert (out.plan_key is None) == (plan_key is None)
                if plan_key is not None and out.plan_key is not None:  # the metadata names each SVD's seconds
                    _same_spectra(c, out.plan_key, plan_key)
                assert [run_task(c.deps, rnd.id, k) for k in range(2)] == ["partial", "committed"]
        finally:
            team.close()


class PoisonAgent(ScriptedAgent):
    """Passes every upload check (finite, right shapes) but overflows the merge in float32."""

    def train(self, task, start_bytes):  # type: ignore[no-untyped-def]
        if self.name != "agent-0":
            return super().train(task, start_bytes)
        start = decode_start(start_bytes)
        huge = {
            m: LoRAFactors(torch.full_like(f.B, 1e30), torch.full_like(f.A, 1e30)) for m, f in start.factors.items()
        }
        return encode_update(huge, start.extras)


def test_a_poisoned_upload_is_bounded_and_the_round_commits_a_finite_state(tmp_path: Path) -> None:
    """1e30 factors pass the upload checks (finite, right shapes) but would overflow the merge in
    float32: the update-size bound clips or drops them and the round commits a finite state."""
    settings = settings_for("sqlite+inprocess", tmp_path)
    with running(settings) as c:
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 4, PoisonAgent)
        try:
            wait_agents(c, 4)  # the poisoner is in the first round
            job = c.jobs.create(JobSpec.model_validate(SPEC))
            committed = wait_round(c, job.id, {RoundState.COMMITTED, RoundState.FAILED})
        finally:
            team.close()
        assert committed.state is RoundState.COMMITTED, committed.error
        report = committed.report
        assert report is not None
        poisoner = next(a.agent_id for a in team.agents if a.name == "agent-0")
        named = {d["client"] for d in report["dropped"]} | {x["client"] for x in report["clipped"]}
        assert named == {poisoner}, (report["dropped"], report["clipped"])
        with transaction(c.deps.sessions) as s:  # the state this round committed (later rounds may follow)
            key = s.scalars(
                select(Checkpoint.state_key).where(
                    Checkpoint.job_id == job.id, Checkpoint.round_number == committed.number + 1
                )
            ).one()
        with c.deps.blobs.local_path(key) as path:
            state = load_state(path)
        assert state.round == committed.number + 1
        for name, t in state.tensors().items():
            assert bool(torch.isfinite(t).all()), name


@pytest.mark.gpu
def test_worker_merge_on_cuda_matches_cpu(tmp_path: Path) -> None:
    """Runs on CUDA when a GPU is present, on CPU otherwise; fp32 either way."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = settings_for("sqlite+inprocess", tmp_path, inprocess_aggregator=False)
    with running(settings) as c:
        job = c.jobs.create(JobSpec.model_validate(SPEC))
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 4)
        try:
            rnd = wait_round(c, job.id, {RoundState.AGGREGATING})
        finally:
            team.close()
        inp = load_inputs(c.deps, rnd.id)
        assert inp is not None
        on_device = compute_shard(dataclasses.replace(c.deps, device=device), inp, 0)
        on_cpu = compute_shard(dataclasses.replace(c.deps, device="cpu"), inp, 0)
        assert on_device.report["device"] == device
        for k, v in on_cpu.state.tensors().items():
            torch.testing.assert_close(on_device.state.tensors()[k].cpu(), v, rtol=1e-4, atol=1e-6)


def _worker(settings_env: dict[str, str], name: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedhl.cli", "aggregator", "--name", name],
            env=settings_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def redis_world(tmp_path: Path) -> Iterator[tuple[Coordinator, dict[str, str]]]:
    settings = settings_for(
        "postgres+redis", tmp_path, inprocess_aggregator=False, aggregator_reclaim_idle_s=1.0, grpc_port=free_port()
    )
    with running(settings) as c:
        yield c, env_for(settings)


def test_a_worker_killed_mid_merge_is_replaced_and_the_state_is_bit_identical(
    redis_world: tuple[Coordinator, dict[str, str]], tmp_path: Path
) -> None:
    c, env = redis_world
    big = job_spec(
        n_layers=4,
        dim=256,
        ranks=[8, 16, 32],
        rounds=2,
        rank_policy={"kind": "fixed", "fixed": {"agent-0": 8, "agent-1": 16, "agent-2": 32}},
        selection={"count": 3, "min_clients": 3, "deadline_s": 120},
    )
    job = c.jobs.create(JobSpec.model_validate(big))
    team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 3)
    first = _worker(env, "doomed", tmp_path / "w1.log")
    try:
        rnd = wait_round(c, job.id, {RoundState.AGGREGATING}, timeout=90)
        end = time.monotonic() + 30
        while c.deps.coordination.queue.pending_count() == 0 and time.monotonic() < end:
            time.sleep(0.01)  # the doomed worker has taken the job (delivered, not acked)
        assert c.deps.coordination.queue.pending_count() > 0
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _worker(env, "rescuer", tmp_path / "w2.log")
        try:
            done = wait_round(c, job.id, {RoundState.COMMITTED}, timeout=90)
            assert done.id == rnd.id
        finally:
            second.terminate()
            second.wait(15)
    finally:
        team.close()
        if first.poll() is None:
            first.kill()
    inp = load_inputs(c.deps, rnd.id, aggregating_only=False)
    assert inp is not None
    reference, _, _ = assemble([compute_shard(c.deps, dataclasses.replace(inp, shards=1), 0)])
    with transaction(c.deps.sessions) as s:
        cp = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.round_number == 1)).one()
        assert cp.state_key == put_state(c.deps.blobs, reference)  # content address: bit-identical
    assert "reclaimed" in (tmp_path / "w2.log").read_text()
    assert os.path.exists(tmp_path / "w1.log")
