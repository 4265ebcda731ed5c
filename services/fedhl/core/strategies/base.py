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
duplicates), screens uploads (non-finite or overflowing ones are left out by name, update
sizes bounded: core/defence.py), bounds every reported data size by the round's median
(core/defence.py `bounded_sizes`) before any weight sees it, casts to the compute
device/dtype, averages non-LoRA parameters by capped data size and assembles the report.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..defence import (
    DIRECTION_REASON,
    ClipConfig,
    bounded_sizes,
    check_min_cosine,
    check_size_k,
    clip_bound,
    clip_scale,
    cosines_to_others,
    direction_outliers,
    direction_threshold,
    lowrank_cosines_to_others,
    max_abs,
    overflow_limit,
    product_may_overflow,
    vector_gram,
)
from ..merge import change_norms_sq, factor_change_sq, lora_init, lowrank_fro_sq, weighted_average
from ..scaling import LoRAScaling
from ..svd import Spectrum, SVDConfig, partial_svd
from ..types import (
    AggregationError,
    AggregationReport,
    ClientId,
    ClientStart,
    ClientUpdate,
    ClipRecord,
    DropRecord,
    GlobalState,
    LoRAFactors,
    ModuleName,
    RankMap,
    SizeRecord,
    UploadError,
)
from ..weights import capped_data_size_weights, effective_participants


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

    def forget(self, module: ModuleName) -> None:
        """Drop what was computed and cached for `module` (start factors, residuals); it is
        computed again if asked for."""
        for key in [k for k in self._cache if k[1] == module]:
            del self._cache[key]


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


def _factor_change(start: LoRAFactors, f: LoRAFactors, r_max: int) -> Tensor:
    """[B' − B⁰ | (A' − A⁰)ᵀ] zero-padded to `r_max` columns, flattened, float64: the factor
    strategies' update as one vector ((d_out + d_in) · r_max,)."""
    r = f.rank
    dB = torch.zeros(f.B.shape[0], r_max, dtype=torch.float64, device=f.B.device)  # (d_out, r_max)
    dA = torch.zeros(r_max, f.A.shape[1], dtype=torch.float64, device=f.B.device)  # (r_max, d_in)
    dB[:, :r] = f.B.double() - start.B.to(f.B.device).double()
    dA[:r] = f.A.double() - start.A.to(f.B.device).double()
    return torch.cat([dB.reshape(-1), dA.reshape(-1)])


def _reasons(dropped: Sequence[DropRecord], module: str) -> str:
    return "; ".join(f"{d.client}: {d.reason}" for d in dropped if d.module == module) or "none dropped"


@dataclass
class _Screened:
    """One module's uploads after screening, aligned lists over the kept clients."""

    index: list[int]  # positions in the round's uploads
    factors: list[LoRAFactors]  # in the compute dtype; clipped where `clip` < 1
    ranks: list[int]
    clip: list[float]  # update-size scale per kept client (1.0 within the bound)
    update_sq: dict[int, float]  # ‖Δ_i‖²_F as sent (product space), by position


class ModuleStream(Protocol):
    """Lets `aggregate` run with one module of the state in memory at a time: `load` puts the
    module's current value into `state` just before its merge (the state may hold placeholders
    until then), `emit` receives the merged module in `new` right after it is stored, and may
    write it out and release it."""

    def load(self, state: GlobalState, module: ModuleName) -> None: ...

    def emit(self, new: GlobalState, module: ModuleName) -> None: ...


class Strategy(ABC):
    """One aggregation algorithm. Construct with the job's LoRA scaling convention."""

    name: ClassVar[str]
    dense_state: ClassVar[bool]  # True: state.dense holds W_t; False: state.factors at r_max
    uses_spectrum: ClassVar[bool] = False

    @property
    def factored_downlink(self) -> bool:
        """True when clients rebuild the global update from each round's factored change
        (`round_change`) rather than receiving a dense base residual (FedHL's `full` view)."""
        return False

    def __init__(
        self,
        scaling: LoRAScaling,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
        svd: SVDConfig | None = None,
        max_weight_ratio: float | None = 4.0,
        clip: ClipConfig | None = None,
        size_k: float | None = None,
        min_cosine: float | None = None,
    ) -> None:
        """`max_weight_ratio`: no client weighs more than `max_weight_ratio / N` (N uploads in
        the round; None: no cap), for the factors and the non-LoRA parameters alike.
        `clip`: the update-size bound (default `ClipConfig()`: k = 3, clip; `ClipConfig.off()`
        turns it off). `size_k`: every reported `n_examples` counts at most `size_k ×` the
        lower median of the round's reported sizes (None, the core's default: sizes as
        reported, the algorithms as ALGORITHMS.md writes them; a job's `defence.size_k` sets it,
        default `SIZE_K` = 1). `min_cosine`: the direction screen (core/defence.py): an upload
        whose update has a cosine below it to the sum of the other uploads' unit-normalised
        updates is left out of that module (None, the core's default: off; a job's
        `defence.min_cosine` sets it)."""
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
        if max_weight_ratio is not None and not max_weight_ratio >= 1:
            raise ValueError(f"max_weight_ratio must be ≥ 1 or None, got {max_weight_ratio}")
        self.max_weight_ratio = max_weight_ratio
        self.clip = clip if clip is not None else ClipConfig()
        self.size_k = check_size_k(size_k)
        self.min_cosine = check_min_cosine(min_cosine)
        self.scaling = scaling
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.compute_dtype = compute_dtype
        self.svd = svd or SVDConfig()

    # ------------------------------------------------------------------ options / placement
    def options(self) -> dict[str, Any]:
        """The options that shaped this strategy's results, for logs and reports."""
        return {
            "alpha": self.scaling.alpha,
            "scale_rule": self.scaling.rule,
            "seed": self.seed,
            "max_weight_ratio": self.max_weight_ratio,
            "size_k": self.size_k,
            "min_cosine": self.min_cosine,
            "clip": {"k": self.clip.k, "action": self.clip.action, "reject_k": self.clip.reject_k},
        }

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

    def client_start(
        self, state: GlobalState, plan: RoundPlan, client: ClientId, *, residuals: bool = True
    ) -> ClientStart:
        """The client's start factors and, with `residuals`, its base residuals (left out where
        the client rebuilds them itself: `factored_downlink`)."""
        if client not in plan.ranks:
            raise KeyError(f"client {client!r} has no assignment in round {plan.round}")
        factors: dict[ModuleName, LoRAFactors] = {}
        residual: dict[ModuleName, Tensor | LoRAFactors] = {}
        for m, r in plan.ranks[client].items():
            factors[m] = self.start_factors(state, plan, m, r)
            res = self.base_residual(state, plan, m, r) if residuals else None
            if res is not None:
                residual[m] = res
        return ClientStart(factors, residual, {k: v.clone() for k, v in state.extras.items()})

    def round_change(self, plan: RoundPlan, module: ModuleName) -> LoRAFactors | None:
        """After `aggregate`: the factors of `module`'s change W_{t+1} − W_t, exact in the sense
        of core/downlink.py (handed out once, then released), or None for strategies without a
        factored downlink."""
        out: LoRAFactors | None = plan._cache.pop(("change", module, 0), None)
        return out

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
        stream: ModuleStream | None = None,
        left_out: Sequence[DropRecord] = (),
    ) -> tuple[GlobalState, AggregationReport]:
        """New global state and the round's report.

        Per module, an upload whose factors or update norm are not finite, or whose
        contribution could overflow the compute dtype, is left out of that module and the
        rest are merged with their weights recomputed over who is left; with the update-size
        bound on (`clip`), updates above `k × median` are scaled down or left out
        (core/defence.py). Reported sizes above `size_k ×` the round's median size count as
        that (once per round, over every upload). The report names every such upload
        (`dropped`, `clipped`, `sizes_bounded`).

        Raises `UploadError` for an upload that does not match the plan (shapes, dtype,
        parameters) and `AggregationError` when a module has no upload left or its merge is
        not finite; the input state is then unchanged, except with `inplace=True`
        (memory-saving for workers that reload state from the blob store), where it must be
        discarded after an error. With `stream`, modules are loaded and handed out one at a
        time (`ModuleStream`); the merge is the same.

        `left_out`: uploads a screen outside the merge judged whole (the validation screen,
        aggregation/validate.py), one record per client: left out of every module and every
        non-LoRA parameter as any leave-out is (weights over who is left; reported sizes still
        bounded over every upload), and reported first in `dropped`.
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
        excluded = {d.client for d in left_out}
        unknown = excluded - set(clients)
        if unknown:
            raise AggregationError(f"left_out names clients without an upload: {sorted(unknown)}")
        if len(excluded) >= len(clients):
            raise AggregationError("left_out leaves no upload to merge")
        counted, size_bound = bounded_sizes([u.n_examples for u in updates], self.size_k)
        sizes_bounded = [
            SizeRecord(u.client_id, u.n_examples, c, size_bound)
            for u, c in zip(updates, counted, strict=True)
            if c < u.n_examples
        ]
        n = torch.tensor(counted, dtype=torch.float64)  # (N,) the sizes every weight below sees
        pre = self._round_weights(state, plan, updates, n)

        new = GlobalState(round=state.round + 1) if not inplace else state
        update_sq = dict.fromkeys(clients, 0.0)
        change_sq = 0.0
        module_weights: dict[ModuleName, dict[ClientId, float]] = {}
        module_effective: dict[ModuleName, dict[ClientId, float]] = {}
        dropped: list[DropRecord] = list(left_out)
        clipped: list[ClipRecord] = []
        cosines: dict[str, dict[ClientId, float]] = {}
        for m in state.modules:
            if stream is not None:
                stream.load(state, m)
            sc = self._screen_module(state, plan, m, updates, dropped, clipped, cosines, excluded)
            if not sc.index:
                raise AggregationError(f"module {m!r}: no upload left to merge ({_reasons(dropped, m)})")
            if len(sc.index) == len(updates):
                p = pre[m] if m in pre else self._module_weights(m, sc.factors, sc.ranks, n)
            else:  # weights over who is left, as if the others had not taken part
                n_kept = n[sc.index]
                kept = [updates[i] for i in sc.index]
                sub = self._round_weights(state, plan, kept, n_kept)
                p = sub[m] if m in sub else self._module_weights(m, sc.factors, sc.ranks, n_kept)
            result, change = self._merge_module(state, plan, m, sc.factors, sc.ranks, p.tolist(), sc.clip)
            if isinstance(result, Tensor):
                finite = _finite(result)
            else:  # finite factors can still overflow in the served product s·B@A
                finite = _finite(result.B) and _finite(result.A)
                finite = finite and math.isfinite(lowrank_fro_sq(result.B, result.A))
            if not finite:
                raise AggregationError(
                    f"module {m!r}: merged update is not finite (uploads merged: "
                    f"{[clients[i] for i in sc.index]}); previous state kept"
                )
            module_weights[m] = dict.fromkeys(clients, 0.0)
            module_effective[m] = dict.fromkeys(clients, 0.0)
            for i, pi, ci in zip(sc.index, p.tolist(), sc.clip, strict=True):
                module_weights[m][clients[i]] = pi
                module_effective[m][clients[i]] = pi * ci
                update_sq[clients[i]] += sc.update_sq[i]
            change_sq += change
            self._store(state, new, m, result)
            del result, sc  # not kept into the next module's merge
            if stream is not None:
                stream.emit(new, m)
                plan.forget(m)  # its start factors (and residuals) served this module only
        new.extras = {
            k: self._merge_extra(state, k, updates, n, dropped, clipped, cosines, excluded) for k in state.extras
        }
        new.round = state.round + 1

        n_mod = max(len(module_weights), 1)
        weights = {c: sum(module_weights[m][c] for m in module_weights) / n_mod for c in clients}
        effective = {c: sum(module_effective[m][c] for m in module_effective) / n_mod for c in clients}
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
            n_eff=effective_participants(p_vec) if module_weights else float(len(clients)),
            module_weights=module_weights if self._per_module_report() else None,
            options=self.options(),
            svd=self._svd_summary(plan),
            effective_weights=effective,
            dropped=dropped,
            clipped=clipped,
            sizes_bounded=sizes_bounded,
            cosines=cosines,
        )
        return new, report

    def _screen_module(
        self,
        state: GlobalState,
        plan: RoundPlan,
        module: ModuleName,
        updates: Sequence[ClientUpdate],
        dropped: list[DropRecord],
        clipped: list[ClipRecord],
        cosines: dict[str, dict[ClientId, float]],
        excluded: set[ClientId],
    ) -> _Screened:
        """Read one module's uploads, leave out the unsound ones, apply the update-size bound.

        Norms are taken in float64 from the factors (no dense product), so an upload that
        would overflow the compute dtype is still measured, then bounded or named.
        """
        ref = state.dense[module] if module in state.dense else state.factors[module].A
        device, dtype = self._placement(ref)
        raw: dict[int, LoRAFactors] = {}
        for i, u in enumerate(updates):
            if u.client_id in excluded:
                continue  # left out whole (`left_out`): neither read nor screened here
            f = self._load(u, module, plan.rank(u.client_id, module), state)
            if _finite(f.B) and _finite(f.A):
                raw[i] = f
            else:
                dropped.append(DropRecord(u.client_id, module, "non_finite_factors", "factors contain NaN or Inf"))
        idx = list(raw)
        # norms in float64 from the factors as read: widened one rank group (or one client) at a
        # time inside the norm helpers, never a float64 copy of every upload at once
        starts = {r: self.start_factors(state, plan, module, r).to(device) for r in {raw[i].rank for i in idx}}
        scales = {i: self.scaling.scale(raw[i].rank) for i in idx}
        onto = {i: raw[i].to(device) for i in idx}  # as sent, on the compute device
        product_sq = change_norms_sq(
            [starts[onto[i].rank] for i in idx], [onto[i] for i in idx], [scales[i] for i in idx]
        )
        report_sq = dict(zip(idx, product_sq, strict=True))  # ‖Δ_i‖²: s_i(B'A' − B⁰A⁰)
        # factor strategies merge factors: for them the bounded update is the factor change
        bound_sq = report_sq if self.dense_state else {i: factor_change_sq(starts[onto[i].rank], onto[i]) for i in idx}
        for i in list(idx):
            if not (math.isfinite(bound_sq[i]) and math.isfinite(report_sq[i])):
                dropped.append(
                    DropRecord(updates[i].client_id, module, "non_finite_update", "update norm overflows float64")
                )
                idx.remove(i)
        norms = {i: math.sqrt(bound_sq[i]) for i in idx}
        clip = self._apply_bound(updates, module, norms, idx, dropped, clipped, "update norm")
        if self.min_cosine is not None and idx:
            if self.dense_state:  # Δ_i = s_i (B'A' − B⁰A⁰) = s_i [B' − B⁰ | B⁰] @ [A'; A' − A⁰]
                Ls, Rs = [], []
                for i in idx:
                    s0, f, s = starts[onto[i].rank], onto[i], scales[i]
                    Ls.append(s * torch.cat([f.B.double() - s0.B.double(), s0.B.double()], 1))  # (d_out, 2r)
                    Rs.append(torch.cat([f.A.double(), f.A.double() - s0.A.double()], 0))  # (2r, d_in)
                cos = lowrank_cosines_to_others(Ls, Rs)
                del Ls, Rs
            else:  # the factor change, zero-padded to the module's largest rank
                r_max = max(onto[i].rank for i in idx)
                cos = cosines_to_others(
                    vector_gram([_factor_change(starts[onto[i].rank], onto[i], r_max) for i in idx])
                )
            self._screen_direction(updates, module, cos, idx, dropped, cosines)
        limit = overflow_limit(dtype, len(updates))
        out = _Screened([], [], [], [], {})
        for i in idx:
            # within the bound: the factors as sent (their max magnitudes are those of a float64
            # copy: widening is exact); clipped: scaled in float64, one client at a time
            f = onto[i] if clip[i] == 1.0 else self._clipped(onto[i], starts[onto[i].rank], clip[i])
            if product_may_overflow(f.B, f.A, scales[i], limit):
                detail = f"factor magnitudes could overflow {dtype} in the merge"
                dropped.append(DropRecord(updates[i].client_id, module, "overflow", detail))
                continue
            out.index.append(i)
            out.factors.append(f.to(device, dtype))
            out.ranks.append(raw[i].rank)
            out.clip.append(clip[i])
            out.update_sq[i] = report_sq[i]
        raw.clear()
        onto.clear()
        return out

    def _screen_direction(
        self,
        updates: Sequence[ClientUpdate],
        name: str,
        cos: list[float],
        idx: list[int],
        dropped: list[DropRecord],
        cosines: dict[str, dict[ClientId, float]],
        act: bool = True,
    ) -> None:
        """The direction screen over the uploads still in `idx` (`cos`: their cosines to the
        others, in `idx` order): every cosine is recorded under `name`; with `act`, the ones
        below the module's threshold leave `idx`, named with their cosine (core/defence.py)."""
        cosines[name] = {updates[i].client_id: c for i, c in zip(idx, cos, strict=True)}
        out = direction_outliers(cos, self.min_cosine) if act else []
        t = direction_threshold(cos, self.min_cosine)
        for j in out:
            i, c = idx[j], cos[j]
            detail = f"cosine {c:.3f} to the other uploads' direction < {t:g} (the module's median cosine > {abs(t):g})"
            dropped.append(DropRecord(updates[i].client_id, name, DIRECTION_REASON, detail, cosine=c))
        for i in [idx[j] for j in out]:
            idx.remove(i)

    def _clipped(self, f: LoRAFactors, start: LoRAFactors, c: float) -> LoRAFactors:
        """Client update scaled by the clip factor `c < 1`, computed in float64. Dense
        strategies: Δ_i → c·Δ_i, the product carries c (√c on B and on A), the merge the rest;
        factor strategies: the factor change scaled by c."""
        wide = f.to(f.B.device, torch.float64)
        if self.dense_state:
            root = math.sqrt(c)
            return LoRAFactors(wide.B * root, wide.A * root)
        s0 = start.to(f.B.device, torch.float64)
        return LoRAFactors(s0.B + c * (wide.B - s0.B), s0.A + c * (wide.A - s0.A))

    def _apply_bound(
        self,
        updates: Sequence[ClientUpdate],
        name: str,
        norms: dict[int, float],
        idx: list[int],
        dropped: list[DropRecord],
        clipped: list[ClipRecord],
        what: str,
    ) -> dict[int, float]:
        """The update-size bound (k × the median of `norms` over `idx`): the clip scale of every
        upload still in `idx` (1.0 when within the bound); rejected uploads leave `idx`, named."""
        scales = dict.fromkeys(idx, 1.0)
        if self.clip.k is None or not idx:
            return scales
        k = self.clip.k
        bound = clip_bound([norms[i] for i in idx], k)
        r = self.clip.reject_k if self.clip.reject_k is not None else math.inf
        far = bound * r / k  # reject_k × median (inf: no such limit)
        for i in list(idx):
            if norms[i] <= bound:
                continue
            c = updates[i].client_id
            if self.clip.action == "reject" or norms[i] > far:
                limit, over = (k, bound) if norms[i] <= far else (r, far)
                detail = f"{what} {norms[i]:.4g} > {limit:g} × median = {over:.4g}"
                dropped.append(DropRecord(c, name, "update_norm_above_bound", detail, norms[i], bound))
                idx.remove(i)
                del scales[i]
            else:
                scales[i] = clip_scale(norms[i], bound)
                clipped.append(ClipRecord(c, name, norms[i], bound, scales[i]))
        return scales

    def _merge_extra(
        self,
        state: GlobalState,
        key: str,
        updates: Sequence[ClientUpdate],
        n: Tensor,
        dropped: list[DropRecord],
        clipped: list[ClipRecord],
        cosines: dict[str, dict[ClientId, float]],
        excluded: set[ClientId],
    ) -> Tensor:
        """One non-LoRA parameter: capped data-size average of the sound uploads, each change
        `x_i − g` under the same update-size bound as the LoRA modules."""
        name = f"extra::{key}"
        g = state.extras[key].to(torch.float64)
        idx: list[int] = []
        for i, u in enumerate(updates):
            if u.client_id in excluded:
                continue
            if _finite(u.extras[key]):
                idx.append(i)
            else:
                dropped.append(DropRecord(u.client_id, name, "non_finite_extras", "parameter contains NaN or Inf"))
        xs = {i: updates[i].extras[key] for i in idx}
        norms = {i: float(torch.linalg.vector_norm(xs[i].to(torch.float64) - g)) for i in idx}
        for i, scale in self._apply_bound(updates, name, norms, idx, dropped, clipped, "change norm").items():
            if scale < 1.0:
                xs[i] = (g + scale * (xs[i].to(torch.float64) - g)).to(xs[i].dtype)
        if self.min_cosine is not None and idx:
            # measured, never acted on: a small head's change follows each client's label skew (a
            # 2-class bias moves along one line: honest cosines of ±1, bench/README.md)
            cos = cosines_to_others(vector_gram([xs[i].to(torch.float64) - g for i in idx]))
            self._screen_direction(updates, name, cos, idx, dropped, cosines, act=False)
        ref = state.extras[key]
        limit = overflow_limit(torch.promote_types(ref.dtype, torch.float32), len(updates))
        for i in list(idx):
            if max_abs(xs[i]) > limit:
                dropped.append(DropRecord(updates[i].client_id, name, "overflow", "values could overflow the average"))
                idx.remove(i)
        if not idx:
            raise AggregationError(f"non-LoRA parameter {key!r}: no upload left to merge ({_reasons(dropped, name)})")
        p = capped_data_size_weights(n[idx], self.max_weight_ratio)
        out = weighted_average([xs[i] for i in idx], p.tolist())
        if not _finite(out):
            raise AggregationError(f"non-LoRA parameter {key!r}: average is not finite")
        return out

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
            if not v.is_floating_point():
                raise UploadError(u.client_id, f"parameter {k!r} must be floating point")

    def _load(self, u: ClientUpdate, module: ModuleName, rank: int, state: GlobalState) -> LoRAFactors:
        """Fetch one module's upload as sent and check it against the assignment."""
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
        return f

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
        """Weights known before any upload is read (module → (N,)); empty: per-module hook.
        Called again with the remaining uploads when a module leaves some out."""
        p = capped_data_size_weights(n, self.max_weight_ratio)
        return dict.fromkeys(state.modules, p)

    def _module_weights(self, module: ModuleName, fs: Sequence[LoRAFactors], ranks: Sequence[int], n: Tensor) -> Tensor:
        """Weights that depend on the (screened, clipped) uploads of one module."""
        return capped_data_size_weights(n, self.max_weight_ratio)

    @abstractmethod
    def _merge_module(
        self,
        state: GlobalState,
        plan: RoundPlan,
        module: ModuleName,
        fs: Sequence[LoRAFactors],
        ranks: Sequence[int],
        p: Sequence[float],
        clip: Sequence[float],
    ) -> tuple[Tensor | LoRAFactors, float]:
        """→ (new module state, ‖change‖²). Per-client ‖Δ_i‖² is computed by the base class
        against each client's start factors.

        `clip[i] ≤ 1` is client i's update-size scale. Dense strategies: `fs[i]` already
        carries it in its product (`√c` on B and on A), and the strategy scales whatever
        start-point term it pairs with the product (FedHL's `trunc(W_t, r_i)`) by the same
        factor, so client i contributes `c_i Δ_i`. Factor strategies receive factors whose
        change is already scaled (`B⁰ + c (B' − B⁰)`) and need not use it.
        """

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
