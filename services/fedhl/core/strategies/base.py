"""The contract every aggregation strategy implements.

A round has two halves:

1. `plan_round(state, ranks)` — from the global state and the round's rank assignment
   (client → module → rank) to a `RoundPlan`: one partial SVD per module where the strategy
   needs it. `client_start(state, plan, client)` then gives each client its start factors;
   factors for one (module, rank) are computed once and shared by every client at that rank.
2. `aggregate(state, plan, updates)` — from the global state and the uploads to the new
   state plus an `AggregationReport`. Modules are processed one at a time, so beyond the
   state itself only one module's uploads and working set are in memory.

Subclasses supply the algorithm in a few hooks; the base class guards inputs (ranks, shapes,
finiteness, duplicates), casts to the compute device/dtype, averages non-LoRA parameters by
data size and assembles the report.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..merge import change_norms_sq, lora_init, lowrank_fro_sq, weighted_average
from ..scaling import LoRAScaling
from ..svd import Spectrum, SVDConfig, partial_svd
from ..types import (
    AggregationError,
    AggregationReport,
    ClientId,
    ClientStart,
    ClientUpdate,
    GlobalState,
    LoRAFactors,
    ModuleName,
    RankMap,
    UploadError,
)
from ..weights import data_size_weights, effective_participants


@dataclass
class RoundPlan:
    """What the server decided for one round, before any client trains."""

    round: int
    ranks: dict[ClientId, dict[ModuleName, int]]
    spectra: dict[ModuleName, Spectrum] = field(default_factory=dict)
    _cache: dict[tuple[str, ModuleName, int], Any] = field(default_factory=dict, repr=False)

    def rank(self, client: ClientId, module: ModuleName) -> int:
        return self.ranks[client][module]

    def distinct_ranks(self, module: ModuleName) -> list[int]:
        return sorted({r[module] for r in self.ranks.values()})

    def r_max(self, module: ModuleName) -> int:
        return max(r[module] for r in self.ranks.values())


def module_seed(seed: int, round_: int, module: ModuleName) -> int:
    """Stable across processes (unlike hash()), so every worker draws the same numbers."""
    return (seed * 1_000_003 + round_ * 7919 + zlib.crc32(module.encode())) % (2**63)


def uniform_ranks(
    clients: Sequence[ClientId], modules: Sequence[ModuleName], rank_of: Mapping[ClientId, int]
) -> dict[ClientId, dict[ModuleName, int]]:
    """Client → same rank on every module."""
    return {c: dict.fromkeys(modules, rank_of[c]) for c in clients}


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class Strategy(ABC):
    """One aggregation algorithm. Construct with the job's LoRA scaling convention."""

    name: ClassVar[str]
    dense_state: ClassVar[bool]  # True: state.dense holds W_t; False: state.factors at r_max
    uses_spectrum: ClassVar[bool] = False

    def __init__(
        self,
        scaling: LoRAScaling,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
        svd: SVDConfig | None = None,
    ) -> None:
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
        self.scaling = scaling
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.compute_dtype = compute_dtype
        self.svd = svd or SVDConfig()

    # ------------------------------------------------------------------ options / placement
    def options(self) -> dict[str, Any]:
        """The options that shaped this strategy's results, for logs and reports."""
        return {"alpha": self.scaling.alpha, "scale_rule": self.scaling.rule, "seed": self.seed}

    def _placement(self, t: Tensor) -> tuple[torch.device, torch.dtype]:
        device = self.device or t.device
        dtype = self.compute_dtype or torch.promote_types(t.dtype, torch.float32)
        return device, dtype

    # ------------------------------------------------------------------ state
    def init_state(
        self,
        shapes: Mapping[ModuleName, tuple[int, int]],
        extras: Mapping[str, Tensor] | None = None,
        *,
        max_rank: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> GlobalState:
        """Round-0 state: W_0 = 0 (dense strategies) or B = 0, A random at `max_rank`."""
        state = GlobalState(round=0, extras={k: v.detach().clone() for k, v in (extras or {}).items()})
        for m, (d_out, d_in) in shapes.items():
            if self.dense_state:
                state.dense[m] = torch.zeros(d_out, d_in, dtype=dtype, device=device)
            else:
                if max_rank is None or max_rank <= 0:
                    raise ValueError(f"{self.name} keeps factors at the job's maximum rank: pass max_rank")
                gen = torch.Generator().manual_seed(module_seed(self.seed, -1, m))
                state.factors[m] = lora_init(d_out, d_in, max_rank, gen, device, dtype)
        return state

    def effective_update(self, state: GlobalState, module: ModuleName) -> Tensor:
        """The dense update the served model adds to W0 for `module` (d_out, d_in)."""
        if self.dense_state:
            return state.dense[module]
        f = state.factors[module]
        return self.scaling.scale(f.rank) * (f.B @ f.A)

    # ------------------------------------------------------------------ round planning
    def plan_round(self, state: GlobalState, ranks: Mapping[ClientId, RankMap]) -> RoundPlan:
        modules = state.modules
        if not ranks:
            raise AggregationError("a round needs at least one client")
        plan_ranks: dict[ClientId, dict[ModuleName, int]] = {}
        for c, rm in ranks.items():
            missing = [m for m in modules if m not in rm]
            unknown = [m for m in rm if m not in modules]
            if missing or unknown:
                raise AggregationError(f"client {c!r}: rank map missing {missing} / unknown modules {unknown}")
            bad = {m: r for m, r in rm.items() if not isinstance(r, int) or r <= 0 or r > min(state.shape(m))}
            if bad:
                raise AggregationError(f"client {c!r}: ranks must be integers in [1, min(d_out, d_in)], got {bad}")
            plan_ranks[c] = dict(rm)
        plan = RoundPlan(round=state.round, ranks=plan_ranks)
        self._check_ranks(state, plan)
        if self.uses_spectrum:
            for m in modules:
                W = state.dense[m]
                device, dtype = self._placement(W)
                k = self._spectrum_rank(plan, m)
                plan.spectra[m] = partial_svd(
                    W.to(device, dtype), k, self.svd, seed=module_seed(self.seed, state.round, m)
                )
        return plan

    def _spectrum_rank(self, plan: RoundPlan, module: ModuleName) -> int:
        return plan.r_max(module)

    def _check_ranks(self, state: GlobalState, plan: RoundPlan) -> None:
        """Strategy-specific rank constraints (e.g. FedIT needs one rank); none by default."""
        return None

    def start_factors(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors:
        """Start factors for one (module, rank), computed once per round and cached."""
        key = ("start", module, rank)
        if key not in plan._cache:
            plan._cache[key] = self._start_module(state, plan, module, rank)
        out: LoRAFactors = plan._cache[key]
        return out

    def base_residual(
        self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int
    ) -> Tensor | LoRAFactors | None:
        key = ("residual", module, rank)
        if key not in plan._cache:
            plan._cache[key] = self._residual_module(state, plan, module, rank)
        out: Tensor | LoRAFactors | None = plan._cache[key]
        return out

    def client_start(self, state: GlobalState, plan: RoundPlan, client: ClientId) -> ClientStart:
        if client not in plan.ranks:
            raise KeyError(f"client {client!r} has no assignment in round {plan.round}")
        factors, residual = {}, {}
        for m, r in plan.ranks[client].items():
            factors[m] = self.start_factors(state, plan, m, r)
            res = self.base_residual(state, plan, m, r)
            if res is not None:
                residual[m] = res
        return ClientStart(factors, residual, {k: v.clone() for k, v in state.extras.items()})

    @abstractmethod
    def _start_module(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors: ...

    def _residual_module(
        self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int
    ) -> Tensor | LoRAFactors | None:
        return None

    def _fresh_lora(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors:
        """Standard LoRA init; clients at smaller ranks get the leading rows of one draw."""
        d_out, d_in = state.shape(module)
        gen = torch.Generator().manual_seed(module_seed(self.seed, plan.round, module))
        ref = state.dense[module] if module in state.dense else state.factors[module].A
        f = lora_init(d_out, d_in, plan.r_max(module), gen, ref.device, ref.dtype)
        return LoRAFactors(f.B[:, :rank].clone(), f.A[:rank].clone())

    # ------------------------------------------------------------------ aggregation
    def aggregate(
        self,
        state: GlobalState,
        plan: RoundPlan,
        updates: Sequence[ClientUpdate],
        *,
        inplace: bool = False,
    ) -> tuple[GlobalState, AggregationReport]:
        """New global state and the round's report.

        Raises `UploadError` for an upload that does not match the plan and
        `AggregationError` for a non-finite result; the input state is then unchanged,
        except with `inplace=True` (memory-saving for workers that reload state from the
        blob store), where it must be discarded after an error.
        """
        if plan.round != state.round:
            raise AggregationError(f"plan is for round {plan.round}, state is at round {state.round}")
        if not updates:
            raise AggregationError("no uploads to aggregate")
        clients = [u.client_id for u in updates]
        if len(set(clients)) != len(clients):
            raise AggregationError(f"duplicate uploads in {clients}")
        for u in updates:
            if u.client_id not in plan.ranks:
                raise UploadError(u.client_id, f"no assignment in round {plan.round}")
            self._check_extras(state, u)
        n = torch.tensor([float(u.n_examples) for u in updates], dtype=torch.float64)
        data_p = data_size_weights(n)
        pre = self._round_weights(state, plan, updates, n)

        new = GlobalState(round=state.round + 1) if not inplace else state
        update_sq = dict.fromkeys(clients, 0.0)
        change_sq = 0.0
        module_weights: dict[ModuleName, dict[ClientId, float]] = {}
        for m in state.modules:
            fs = [self._load(u, m, plan.rank(u.client_id, m), state) for u in updates]
            ranks = [f.rank for f in fs]
            p = pre[m] if m in pre else self._module_weights(m, fs, ranks, n)
            module_weights[m] = dict(zip(clients, p.tolist(), strict=True))
            result, change = self._merge_module(state, plan, m, fs, ranks, p.tolist())
            starts = [
                self.start_factors(state, plan, m, r).to(f.B.device, f.B.dtype) for f, r in zip(fs, ranks, strict=True)
            ]
            per_client_sq = change_norms_sq(starts, fs, [self.scaling.scale(r) for r in ranks])
            if isinstance(result, Tensor):
                finite = _finite(result)
            else:  # finite factors can still overflow in the served product s·B@A
                finite = _finite(result.B) and _finite(result.A)
                finite = finite and math.isfinite(lowrank_fro_sq(result.B, result.A))
            if not finite:
                raise AggregationError(
                    f"module {m!r}: merged update is not finite (an upload is poisoned "
                    "or overflowed); previous state kept"
                )
            for c, sq in zip(clients, per_client_sq, strict=True):
                update_sq[c] += sq
            change_sq += change
            self._store(state, new, m, result)
        extras = {k: weighted_average([u.extras[k] for u in updates], data_p.tolist()) for k in state.extras}
        for k, v in extras.items():
            if not _finite(v):
                raise AggregationError(f"non-LoRA parameter {k!r}: average is not finite")
        new.extras = extras
        new.round = state.round + 1

        weights = {c: sum(module_weights[m][c] for m in module_weights) / len(module_weights) for c in clients}
        p_vec = torch.tensor([weights[c] for c in clients], dtype=torch.float64)
        errors = self._errors(plan, clients)
        report = AggregationReport(
            strategy=self.name,
            round=state.round,
            clients=clients,
            weights=weights,
            truncation_errors=errors,
            energy_kept=self._energy_kept(plan),
            update_norms={c: math.sqrt(v) for c, v in update_sq.items()},
            global_update_norm=math.sqrt(change_sq),
            n_eff=effective_participants(p_vec),
            module_weights=module_weights if self._per_module_report() else None,
            options=self.options(),
            svd=self._svd_summary(plan),
        )
        return new, report

    def _check_extras(self, state: GlobalState, u: ClientUpdate) -> None:
        missing = set(state.extras) - set(u.extras)
        unknown = set(u.extras) - set(state.extras)
        if missing or unknown:
            raise UploadError(
                u.client_id,
                f"non-LoRA parameters: missing {sorted(missing)}, unexpected {sorted(unknown)}",
            )
        for k, v in u.extras.items():
            ref = state.extras[k]
            if tuple(v.shape) != tuple(ref.shape):
                raise UploadError(
                    u.client_id,
                    f"parameter {k!r} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}",
                )
            if not v.is_floating_point() or not _finite(v):
                raise UploadError(u.client_id, f"parameter {k!r} must be finite floating point")

    def _load(self, u: ClientUpdate, module: ModuleName, rank: int, state: GlobalState) -> LoRAFactors:
        """Fetch one module's upload, check it against the assignment, cast for compute."""
        try:
            f = u.factors[module]
        except KeyError:
            raise UploadError(u.client_id, "module missing from upload", module) from None
        d_out, d_in = state.shape(module)
        if tuple(f.B.shape) != (d_out, rank) or tuple(f.A.shape) != (rank, d_in):
            raise UploadError(
                u.client_id,
                f"expected B({d_out}, {rank}) A({rank}, {d_in}), got B{tuple(f.B.shape)} A{tuple(f.A.shape)}",
                module,
            )
        if not (f.B.is_floating_point() and f.A.is_floating_point()):
            raise UploadError(u.client_id, "factors must be floating point", module)
        if not (_finite(f.B) and _finite(f.A)):
            raise UploadError(u.client_id, "factors contain NaN or Inf", module)
        ref = state.dense[module] if module in state.dense else state.factors[module].A
        device, dtype = self._placement(ref)
        return f.to(device, dtype)

    def _store(self, old: GlobalState, new: GlobalState, module: ModuleName, result: Tensor | LoRAFactors) -> None:
        if isinstance(result, Tensor):
            ref = old.dense[module]
            new.dense[module] = result.to(ref.device, ref.dtype)
        else:
            refA = old.factors[module].A
            new.factors[module] = result.to(refA.device, refA.dtype)

    # hooks -------------------------------------------------------------------------------
    def _round_weights(
        self, state: GlobalState, plan: RoundPlan, updates: Sequence[ClientUpdate], n: Tensor
    ) -> dict[ModuleName, Tensor]:
        """Weights known before any upload is read (module → (N,)); empty: per-module hook."""
        p = data_size_weights(n)
        return dict.fromkeys(state.modules, p)

    def _module_weights(self, module: ModuleName, fs: Sequence[LoRAFactors], ranks: Sequence[int], n: Tensor) -> Tensor:
        return data_size_weights(n)

    @abstractmethod
    def _merge_module(
        self,
        state: GlobalState,
        plan: RoundPlan,
        module: ModuleName,
        fs: Sequence[LoRAFactors],
        ranks: Sequence[int],
        p: Sequence[float],
    ) -> tuple[Tensor | LoRAFactors, float]:
        """→ (new module state, ‖change‖²). Per-client ‖Δ_i‖² is computed by the base class
        against each client's start factors."""

    def _errors(self, plan: RoundPlan, clients: Sequence[ClientId]) -> dict[ClientId, float]:
        if not plan.spectra:
            return {}
        return {c: sum(plan.spectra[m].tail_energy(r) for m, r in plan.ranks[c].items()) for c in clients}

    def _energy_kept(self, plan: RoundPlan) -> dict[int, float]:
        if not plan.spectra:
            return {}
        total = sum(s.total_energy for s in plan.spectra.values())
        ranks = sorted({r for rm in plan.ranks.values() for r in rm.values()})
        out = {}
        for r in ranks:
            kept = sum(s.head_energy(min(r, s.k)) for s in plan.spectra.values())
            out[r] = 1.0 if total == 0 else kept / total
        return out

    def _per_module_report(self) -> bool:
        return False

    def _svd_summary(self, plan: RoundPlan) -> dict[str, Any]:
        if not plan.spectra:
            return {}
        specs = list(plan.spectra.values())
        return {
            "methods": sorted({s.method for s in specs}),
            "max_residual": max(s.residual for s in specs),
            "seconds": sum(s.seconds for s in specs),
        }
