"""One aggregation task's computation: merge a shard's modules and prepare their part of the
next round (spectra, per-rank start factors). A pure function of the round's inputs: any
worker computes the same bytes.

Streamed module by module: the stored state is read one module at a time, and each merged
module is written to the shard file with its next-round spectrum and start factors before the
next one is read, so beyond the process itself a worker holds one module of the state, that
module's uploads and the merge's working set (on CUDA: one module on the device at a time)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..artifacts import downlink_parts, get_spectra, next_round_artifacts
from ..backends import Deps
from ..codec import ShardResult, ShardWriter, StateReader, UploadFactors, load_shard, read_update_extras
from ..core import AggregationError, ClientUpdate, GlobalState, LoRAFactors, RoundPlan, Spectrum, Strategy
from ..round_report import partial
from .allocator import release_free_memory
from .inputs import RoundInputs, pick_device, shard_modules
from .validate import Screen, validation_screen, window_history

Module = Tensor | LoRAFactors


def compute_shard(deps: Deps, inp: RoundInputs, shard: int) -> ShardResult:
    """The shard's result read back into memory (for tests and small jobs; the worker keeps it
    on disk: `compute_shard_file`)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard.safetensors"
        compute_shard_file(deps, inp, shard, path)
        return load_shard(path)


def compute_shard_file(deps: Deps, inp: RoundInputs, shard: int, path: Path) -> dict[str, Any]:
    """Write the shard's result to `path` (layout: `fedhl.codec`, shard result); return its
    partial report. Raises AggregationError when the round cannot be merged (the round then
    fails)."""
    t0 = time.perf_counter()
    spec = inp.spec
    device = pick_device(deps.device)
    strategy = spec.build_strategy()
    strategy.device = torch.device(device)
    all_modules = list(spec.module_shapes)
    modules = shard_modules(all_modules, shard, inp.shards)
    if not inp.uploads:
        raise AggregationError("no accepted uploads")
    if spec.defence.validation is not None and inp.shards > 1:
        raise AggregationError(
            f"defence.validation needs the whole model in one aggregation task; this round has {inp.shards} "
            "shards (the scheduler gives a screened job one shard)"
        )
    with ExitStack() as stack:
        if inp.state_key is None:
            state, source = _initial(strategy, inp, modules)
        else:
            reader = StateReader(stack.enter_context(deps.blobs.local_path(inp.state_key)))
            keep = set(modules)
            state = GlobalState(round=reader.round, extras=reader.extras())
            for m in (m for m in reader.modules if m in keep):  # the file's order, as a whole load
                _put(state, m, reader.placeholder(m))
            source = reader.module
        if shard != 0:
            state.extras = {}  # non-LoRA parameters are averaged once, by shard 0
        if state.round != inp.number:
            raise AggregationError(f"stored state is at round {state.round}, the round starts from {inp.number}")
        spectra: dict[str, Spectrum] = {}
        if strategy.uses_spectrum:
            if inp.plan_key is None:
                raise AggregationError("the round's spectra are missing")
            spectra = {
                m: Spectrum(
                    sp.U.to(device),
                    sp.S.to(device),
                    sp.Vh.to(device),
                    sp.total_energy,
                    sp.method,
                    sp.residual,
                    sp.seconds,
                )
                for m, sp in get_spectra(deps.blobs, inp.plan_key).items()
            }
        ranks = {a: dict.fromkeys(all_modules, inp.rank_of[a]) for a, _, _ in inp.uploads}
        plan = RoundPlan(round=inp.number, ranks=ranks, spectra=spectra)  # every module: weights see all of them
        updates = []
        for agent_id, key, n in inp.uploads:
            upath = stack.enter_context(deps.blobs.local_path(key))
            extras = read_update_extras(upath) if shard == 0 else {}
            updates.append(ClientUpdate(agent_id, UploadFactors(upath, modules), n_examples=n, extras=extras))
        screen, validate_s = Screen(), 0.0
        if spec.defence.validation is not None:  # one shard (above): every module, every upload's extras
            t_val = time.perf_counter()
            whole = GlobalState(round=state.round, extras=dict(state.extras))
            for m in modules:
                _put(whole, m, source(m))
            screen = validation_screen(
                strategy, whole, plan, updates, spec, history=window_history(inp.screened), device=device
            )
            del whole
            validate_s = time.perf_counter() - t_val
        out = ShardWriter(path, inp.number + 1, spec.rank_set)
        try:
            stream = _ShardStream(strategy, plan, source, out, spec.rank_set, inp.number + 1)
            t_load = time.perf_counter()
            new_state, report = strategy.aggregate(
                state, plan, updates, inplace=True, stream=stream, left_out=screen.left_out
            )
            if new_state.extras:
                out.add(GlobalState(round=new_state.round, extras=new_state.extras), {}, {})
            t_end = time.perf_counter()
            timings = {
                "load_s": t_load - t0 + stream.load_s - validate_s,
                "merge_s": t_end - t_load - stream.load_s - stream.next_s,
                "next_round_s": stream.next_s,
            }
            if screen.summary is not None:
                timings["validate_s"] = validate_s
            result = partial(report, len(modules), timings, device, validation=screen.summary)
            out.close(result)
        except BaseException:
            out.discard()
            raise
    return result


class _ShardStream:
    """Feeds the merge one stored module at a time; writes each merged module, its next-round
    spectrum and its start factors to the shard file, then drops it."""

    def __init__(
        self,
        strategy: Strategy,
        plan: RoundPlan,
        source: Callable[[str], Module],
        out: ShardWriter,
        rank_set: Sequence[int],
        next_round: int,
    ) -> None:
        self.strategy, self.plan, self.source, self.out = strategy, plan, source, out
        self.rank_set, self.next_round = rank_set, next_round
        self.load_s = 0.0
        self.next_s = 0.0

    def load(self, state: GlobalState, module: str) -> None:
        t0 = time.perf_counter()
        release_free_memory()  # what the previous module's merge freed goes back to the kernel
        _put(state, module, self.source(module))
        self.load_s += time.perf_counter() - t0

    def emit(self, new: GlobalState, module: str) -> None:
        t0 = time.perf_counter()
        merged: Module = new.dense[module] if module in new.dense else new.factors[module]
        part = GlobalState(round=self.next_round)
        _put(part, module, merged)
        spectra, starts = next_round_artifacts(self.strategy, part, self.rank_set)  # seeds: the next round's
        changes, hashes = downlink_parts(self.strategy, self.plan, module, merged)
        self.out.add(part, spectra, starts, changes, hashes)
        _put(new, module, _meta_like(merged))  # released: only its shape stays
        self.next_s += time.perf_counter() - t0


def _put(state: GlobalState, module: str, value: Module) -> None:
    if isinstance(value, Tensor):
        state.dense[module] = value
    else:
        state.factors[module] = value


def _meta_like(value: Module) -> Module:
    def meta(t: Tensor) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    return meta(value) if isinstance(value, Tensor) else LoRAFactors(meta(value.B), meta(value.A))


def _initial(strategy: Strategy, inp: RoundInputs, modules: list[str]) -> tuple[GlobalState, Callable[[str], Module]]:
    """Round 0 without a stored state: W_0 / the initial factors, made module by module."""
    spec = inp.spec
    extras = {k: torch.zeros(*shape) for k, shape in spec.extra_shapes.items()}
    max_rank = max(spec.rank_set)

    def make(m: str) -> Module:
        one = strategy.init_state({m: spec.module_shapes[m]}, max_rank=max_rank)
        return one.dense[m] if one.dense else one.factors[m]

    state = strategy.init_state({}, extras, max_rank=max_rank)
    for m in modules:
        d_out, d_in = spec.module_shapes[m]
        if strategy.dense_state:
            _put(state, m, torch.empty(d_out, d_in, device="meta"))
        else:
            B, A = torch.empty(d_out, max_rank, device="meta"), torch.empty(max_rank, d_in, device="meta")
            _put(state, m, LoRAFactors(B, A))
    return state, make
