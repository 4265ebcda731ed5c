"""Round artifacts in the blob store (content-addressed; layouts in `fedhl.codec`): the global
state, a round's spectra (one partial SVD per module, which every rank's start point comes
from) and one start package per rank of the job's rank set.

Shared by the coordinator (round 0, when a job is created) and the aggregation workers (every
later round), so it lives outside both services."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .codec import START_HASHES, encode_spectra, encode_start, load_spectra, save_state
from .core import ClientStart, GlobalState, LoRAFactors, RoundPlan, Spectrum, Strategy
from .core.downlink import Change, factors_cheaper, module_sha256, state_hashes
from .jobspec import JobSpec
from .storage.blobs import BlobStore
from .storage.models import CHANGE_KEY as CHANGE_KEY  # re-exported for the aggregation service


def pseudo_client(rank: int) -> str:
    return f"rank:{rank}"


def put_state(blobs: BlobStore, state: GlobalState) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "state.safetensors"
        save_state(state, path)
        return blobs.put_file(path)


def initial_state(strategy: Strategy, spec: JobSpec) -> GlobalState:
    extras = {k: torch.zeros(*shape) for k, shape in spec.extra_shapes.items()}
    return strategy.init_state(spec.module_shapes, extras, max_rank=max(spec.rank_set))


def subset(state: GlobalState, modules: Sequence[str]) -> GlobalState:
    """A view of `state` restricted to `modules` (tensors shared, not copied)."""
    return GlobalState(
        round=state.round,
        dense={m: state.dense[m] for m in modules if m in state.dense},
        factors={m: state.factors[m] for m in modules if m in state.factors},
        extras=state.extras,
    )


def put_spectra(blobs: BlobStore, spectra: Mapping[str, Spectrum]) -> str:
    return blobs.put_bytes(encode_spectra(spectra))


def get_spectra(blobs: BlobStore, key: str) -> dict[str, Spectrum]:
    with blobs.local_path(key) as path:
        return load_spectra(path)


def next_round_artifacts(
    strategy: Strategy, state: GlobalState, rank_set: Sequence[int]
) -> tuple[dict[str, Spectrum], dict[int, ClientStart]]:
    """For the modules in `state`: the spectra of the round `state` starts (one partial SVD per
    module at the largest rank) and each rank's start factors/residuals, computed once per rank."""
    modules = state.modules
    plan = strategy.plan_round(state, {pseudo_client(r): dict.fromkeys(modules, r) for r in rank_set})
    residuals = not strategy.factored_downlink  # agents rebuild theirs from the global update
    starts = {r: strategy.client_start(state, plan, pseudo_client(r), residuals=residuals) for r in rank_set}
    return plan.spectra, starts


def downlink_parts(
    strategy: Strategy, plan: RoundPlan, module: str, merged: Tensor | LoRAFactors
) -> tuple[dict[str, Change], dict[str, str]]:
    """After a merge, under a factored downlink: module -> its change (factors, or the merged
    value where that is smaller) and module -> sha256 of the merged value; else empty."""
    change = strategy.round_change(plan, module)
    if not strategy.factored_downlink or not isinstance(merged, Tensor):
        return {}, {}
    shape = (int(merged.shape[0]), int(merged.shape[1]))
    out: Change = change if change is not None and factors_cheaper(shape, change.rank) else merged
    return {module: out}, {module: module_sha256(merged)}


def put_start_packages(
    blobs: BlobStore, starts: Mapping[int, ClientStart], extras: Mapping[str, Tensor], meta: Mapping[str, str]
) -> dict[str, str]:
    """rank (str) -> key of that rank's start package (factors, residuals, global extras)."""
    keys = {}
    for r, start in sorted(starts.items()):
        package = ClientStart(start.factors, start.base_residual, dict(extras))
        keys[str(r)] = blobs.put_bytes(encode_start(package, {**meta, "rank": str(r)}))
    return keys


def publish_round_artifacts(
    blobs: BlobStore, strategy: Strategy, state: GlobalState, spec: JobSpec, job_id: str
) -> tuple[str | None, dict[str, str]]:
    """(spectra key or None, rank -> start package key) for the round `state` starts."""
    spectra, starts = next_round_artifacts(strategy, state, spec.rank_set)
    plan_key = put_spectra(blobs, spectra) if spectra else None
    meta = start_meta(job_id, state.round, strategy, spec)
    if strategy.factored_downlink:
        meta[START_HASHES] = json.dumps(state_hashes(state.dense))
    return plan_key, put_start_packages(blobs, starts, state.extras, meta)


def start_meta(job_id: str, round_: int, strategy: Strategy, spec: JobSpec) -> dict[str, str]:
    return {
        "job_id": job_id,
        "round": str(round_),
        "strategy": strategy.name,
        "lora_alpha": repr(spec.lora_alpha),
        "scale_rule": spec.scale_rule,
    }
