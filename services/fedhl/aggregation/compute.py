"""One aggregation task's computation: merge a shard's modules and prepare their part of the
next round (spectra, per-rank start factors). A pure function of the round's inputs: any
worker computes the same bytes."""

from __future__ import annotations

import time
from contextlib import ExitStack

import torch

from ..artifacts import get_spectra, initial_state, next_round_artifacts, subset
from ..backends import Deps
from ..codec import ShardResult, UploadFactors, load_state, read_update_extras
from ..core import AggregationError, ClientUpdate, RoundPlan, Spectrum
from ..round_report import partial
from .inputs import RoundInputs, pick_device, shard_modules


def compute_shard(deps: Deps, inp: RoundInputs, shard: int) -> ShardResult:
    """Raises AggregationError when the round cannot be merged (the round then fails)."""
    t0 = time.perf_counter()
    spec = inp.spec
    device = pick_device(deps.device)
    strategy = spec.build_strategy()
    strategy.device = torch.device(device)
    all_modules = list(spec.module_shapes)
    modules = shard_modules(all_modules, shard, inp.shards)
    if inp.state_key is None:
        state = subset(initial_state(strategy, spec), modules)
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
            m: Spectrum(
                sp.U.to(device), sp.S.to(device), sp.Vh.to(device), sp.total_energy, sp.method, sp.residual, sp.seconds
            )
            for m, sp in get_spectra(deps.blobs, inp.plan_key).items()
        }
    ranks = {a: dict.fromkeys(all_modules, inp.rank_of[a]) for a, _, _ in inp.uploads}
    plan = RoundPlan(round=inp.number, ranks=ranks, spectra=spectra)  # every module: weights see all of them
    t_load = time.perf_counter()
    with ExitStack() as stack:
        updates = []
        for agent_id, key, n in inp.uploads:
            path = stack.enter_context(deps.blobs.local_path(key))
            extras = read_update_extras(path) if shard == 0 else {}
            updates.append(ClientUpdate(agent_id, UploadFactors(path, modules), n_examples=n, extras=extras))
        new_state, report = strategy.aggregate(state, plan, updates, inplace=True)
    t_merge = time.perf_counter()
    next_spectra, starts = next_round_artifacts(strategy, new_state, spec.rank_set)
    t_next = time.perf_counter()
    timings = {"load_s": t_load - t0, "merge_s": t_merge - t_load, "next_round_s": t_next - t_merge}
    return ShardResult(new_state, next_spectra, starts, partial(report, len(modules), timings, device))
