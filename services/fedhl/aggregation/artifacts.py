"""Round artifacts in the blob store (all safetensors, sha256-addressed): the global state, a
round's spectra (one partial SVD per module, which every rank's start point comes from), one
start package per rank of the job's rank set, and the per-shard partial results a round's
aggregation jobs leave before the round commits."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import Tensor

from ..core import ClientStart, GlobalState, LoRAFactors, Spectrum, Strategy
from ..jobspec import JobSpec
from ..storage.blobs import BlobStore
from ..storage.state_file import load_state, save_state
from ..wire.payloads import encode_start


def pseudo_client(rank: int) -> str:
    return f"rank:{rank}"


def put_state(blobs: BlobStore, state: GlobalState) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "state.safetensors"
        save_state(state, path)
        return blobs.put_file(path)


def get_state(blobs: BlobStore, key: str | None, strategy: Strategy, spec: JobSpec) -> GlobalState:
    """The stored state, or the strategy's round-0 state when none was stored (W_0 = 0 is
    never written densely)."""
    if key is None:
        return initial_state(strategy, spec)
    with blobs.local_path(key) as path:
        return load_state(path)


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


def spectra_tensors(spectra: Mapping[str, Spectrum]) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for m, s in spectra.items():
        tensors[f"U::{m}"] = s.U.contiguous().cpu()
        tensors[f"S::{m}"] = s.S.contiguous().cpu()
        tensors[f"Vh::{m}"] = s.Vh.contiguous().cpu()
        meta[f"spectrum::{m}"] = json.dumps([s.total_energy, s.method, s.residual, s.seconds])
    return tensors, meta


def read_spectra(h: Any, meta: Mapping[str, str], prefix: str = "") -> dict[str, Spectrum]:
    out = {}
    for name in h.keys():  # noqa: SIM118 (safe_open handles are not mappings)
        if name.startswith(prefix + "U::"):
            m = name[len(prefix) + 3 :]
            total, method, residual, seconds = json.loads(meta[f"spectrum::{m}"])
            out[m] = Spectrum(
                h.get_tensor(f"{prefix}U::{m}"),
                h.get_tensor(f"{prefix}S::{m}"),
                h.get_tensor(f"{prefix}Vh::{m}"),
                total,
                method,
                residual,
                seconds,
            )
    return out


def put_spectra(blobs: BlobStore, spectra: Mapping[str, Spectrum]) -> str:
    tensors, meta = spectra_tensors(spectra)
    return blobs.put_bytes(save(tensors, metadata=meta))


def get_spectra(blobs: BlobStore, key: str) -> dict[str, Spectrum]:
    with blobs.local_path(key) as path, safe_open(str(path), framework="pt") as h:
        return read_spectra(h, h.metadata() or {})


def next_round_artifacts(
    strategy: Strategy, state: GlobalState, rank_set: Sequence[int]
) -> tuple[dict[str, Spectrum], dict[int, ClientStart]]:
    """For the modules in `state`: the spectra of the round `state` starts (one partial SVD per
    module at the largest rank) and each rank's start factors/residuals, computed once per rank."""
    modules = state.modules
    plan = strategy.plan_round(state, {pseudo_client(r): dict.fromkeys(modules, r) for r in rank_set})
    starts = {r: strategy.client_start(state, plan, pseudo_client(r)) for r in rank_set}
    return plan.spectra, starts


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
    return plan_key, put_start_packages(blobs, starts, state.extras, start_meta(job_id, state.round, strategy, spec))


def start_meta(job_id: str, round_: int, strategy: Strategy, spec: JobSpec) -> dict[str, str]:
    return {
        "job_id": job_id,
        "round": str(round_),
        "strategy": strategy.name,
        "lora_alpha": repr(spec.lora_alpha),
        "scale_rule": spec.scale_rule,
    }


# ---------------------------------------------------------------------------------- shards
@dataclass
class ShardResult:
    """What one aggregation job computed for its modules."""

    state: GlobalState  # new state of the shard's modules (+ extras on shard 0)
    spectra: dict[str, Spectrum]  # next round's spectra of those modules
    starts: dict[int, ClientStart]  # next round's start factors of those modules, per rank
    report: dict[str, Any] = field(default_factory=dict)  # partial report (JSON-safe)


def put_shard(blobs: BlobStore, res: ShardResult) -> str:
    tensors = {f"state::{k}": v.detach().contiguous().cpu() for k, v in res.state.tensors().items()}
    spec_t, meta = spectra_tensors(res.spectra)
    tensors.update({f"next::{k}": v for k, v in spec_t.items()})
    for r, start in res.starts.items():
        for m, f in start.factors.items():
            tensors[f"start::{r}::B::{m}"] = f.B.contiguous().cpu()
            tensors[f"start::{r}::A::{m}"] = f.A.contiguous().cpu()
        for m, res_ in start.base_residual.items():
            if isinstance(res_, Tensor):
                tensors[f"start::{r}::R::{m}"] = res_.contiguous().cpu()
            else:
                tensors[f"start::{r}::RB::{m}"] = res_.B.contiguous().cpu()
                tensors[f"start::{r}::RA::{m}"] = res_.A.contiguous().cpu()
    tensors, aliases = _store_shared_once(tensors)
    meta["aliases"] = json.dumps(aliases)
    meta["report"] = json.dumps(res.report)
    meta["round"] = str(res.state.round)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard.safetensors"
        save_file(tensors, str(path), metadata=meta)
        return blobs.put_file(path)


def _store_shared_once(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors to write, name -> name it is stored under). A tensor that is a view of the same
    memory as one already kept (FLoRA hands every rank the global state itself as its base
    residual) is recorded as an alias: safetensors refuses shared memory, and a copy per rank
    would multiply the shard's size."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        view = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
        else:
            seen[view] = name
            kept[name] = t
    return kept, aliases


def get_shard(blobs: BlobStore, key: str) -> ShardResult:
    with blobs.local_path(key) as path, safe_open(str(path), framework="pt") as h:
        meta = h.metadata() or {}
        aliases: dict[str, str] = json.loads(meta.get("aliases", "{}"))
        loaded: dict[str, Tensor] = {}

        def get(name: str) -> Tensor:  # an alias is the same tensor, as it was before storing
            stored = aliases.get(name, name)
            if stored not in loaded:
                loaded[stored] = h.get_tensor(stored)
            return loaded[stored]

        state = GlobalState(round=int(meta["round"]))
        starts: dict[int, ClientStart] = {}
        B: dict[str, Tensor] = {}
        for name in [*h.keys(), *aliases]:
            kind, _, rest = name.partition("::")
            if kind == "state":
                sub, _, m = rest.partition("::")
                t = get(name)
                if sub == "dense":
                    state.dense[m] = t
                elif sub == "lora_B":
                    B[m] = t
                elif sub == "extra":
                    state.extras[m] = t
            elif kind == "start":
                r_s, part, m = rest.split("::", 2)
                st = starts.setdefault(int(r_s), ClientStart({}, {}, {}))
                if part == "B":
                    st.factors[m] = LoRAFactors(get(name), get(f"start::{r_s}::A::{m}"))
                elif part == "R":
                    st.base_residual[m] = get(name)
                elif part == "RB":
                    st.base_residual[m] = LoRAFactors(get(name), get(f"start::{r_s}::RA::{m}"))
        for m, b in B.items():
            state.factors[m] = LoRAFactors(b, get(f"state::lora_A::{m}"))
        spectra = read_spectra(h, meta, prefix="next::")
        return ShardResult(state, spectra, starts, json.loads(meta["report"]))


class BlobFactors(Mapping[str, LoRAFactors]):
    """One upload's factors read module by module from its safetensors blob, so the merge
    holds one module of every upload at a time rather than whole uploads."""

    def __init__(self, path: Path, modules: list[str]) -> None:
        self.path, self.modules = path, modules

    def __getitem__(self, module: str) -> LoRAFactors:
        if module not in self.modules:
            raise KeyError(module)
        with safe_open(str(self.path), framework="pt") as f:
            return LoRAFactors(f.get_tensor(f"lora_B::{module}"), f.get_tensor(f"lora_A::{module}"))

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def read_extras(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len("extra::") :]: f.get_tensor(k) for k in f.keys() if k.startswith("extra::")}  # noqa: SIM118
