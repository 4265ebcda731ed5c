"""Round artifacts in the blob store: global state, the next round's spectra, and one start
package per rank of the job's rank set (computed once per rank, from one partial SVD per
module)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from ..core import GlobalState, LoRAFactors, RoundPlan, Spectrum, Strategy
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


def put_spectra(blobs: BlobStore, spectra: Mapping[str, Spectrum]) -> str:
    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for m, s in spectra.items():
        tensors[f"U::{m}"] = s.U.contiguous().cpu()
        tensors[f"S::{m}"] = s.S.contiguous().cpu()
        tensors[f"Vh::{m}"] = s.Vh.contiguous().cpu()
        meta[f"total::{m}"] = repr(s.total_energy)
        meta[f"method::{m}"] = s.method
        meta[f"residual::{m}"] = repr(s.residual)
    return blobs.put_bytes(save(tensors, metadata=meta))


def get_spectra(blobs: BlobStore, key: str) -> dict[str, Spectrum]:
    out = {}
    with blobs.local_path(key) as path, safe_open(str(path), framework="pt") as h:
        meta = h.metadata() or {}
        for name in h.keys():  # noqa: SIM118 (safe_open handles are not mappings)
            if name.startswith("U::"):
                m = name[3:]
                out[m] = Spectrum(
                    h.get_tensor(f"U::{m}"),
                    h.get_tensor(f"S::{m}"),
                    h.get_tensor(f"Vh::{m}"),
                    float(meta[f"total::{m}"]),
                    meta[f"method::{m}"],
                    float(meta[f"residual::{m}"]),
                )
    return out


def publish_round_artifacts(
    blobs: BlobStore, strategy: Strategy, state: GlobalState, spec: JobSpec, job_id: str
) -> tuple[str | None, dict[str, str], RoundPlan]:
    """(spectra key or None, rank -> start package key, the plan) for the round `state` starts."""
    modules = list(spec.module_shapes)
    ranks = {pseudo_client(r): dict.fromkeys(modules, r) for r in spec.rank_set}
    plan = strategy.plan_round(state, ranks)
    plan_key = put_spectra(blobs, plan.spectra) if plan.spectra else None
    start_keys = {}
    for r in spec.rank_set:
        start = strategy.client_start(state, plan, pseudo_client(r))
        meta = {
            "job_id": job_id,
            "round": str(state.round),
            "rank": str(r),
            "strategy": strategy.name,
            "lora_alpha": repr(spec.lora_alpha),
            "scale_rule": spec.scale_rule,
        }
        start_keys[str(r)] = blobs.put_bytes(encode_start(start, meta))
    return plan_key, start_keys, plan


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
