"""Strategies whose global state is a pair of factors at the job's maximum rank:
zero-padding (FedIT on padded factors), homogeneous FedIT, and HetLoRA (Cho et al., 2024).
Clients at rank r receive `B_g[:, :r]`, `A_g[:r]` and train them with their own scale."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..defence import clip_bound
from ..merge import average_padded, lowrank_fro_sq
from ..types import AggregationError, GlobalState, LoRAFactors, ModuleName
from ..weights import cap_weights, normalise
from .base import RoundPlan, Strategy


class ZeroPadding(Strategy):
    """Pad every client to r_max and average the factors with p ∝ n_i."""

    name = "zeropad"
    dense_state = False

    def _check_ranks(self, state: GlobalState, plan: RoundPlan) -> None:
        for c, rm in plan.ranks.items():
            for m, r in rm.items():
                if r > state.factors[m].rank:
                    raise AggregationError(
                        f"client {c!r}: rank {r} on {m!r} exceeds the state's rank {state.factors[m].rank}"
                    )

    def _start_module(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors:
        g = state.factors[module]
        return LoRAFactors(g.B[:, :rank].clone(), g.A[:rank].clone())

    def _merge_module(
        self,
        state: GlobalState,
        plan: RoundPlan,
        module: ModuleName,
        fs: Sequence[LoRAFactors],
        ranks: Sequence[int],
        p: Sequence[float],
        clip: Sequence[float],
    ) -> tuple[LoRAFactors, float]:
        g = state.factors[module]  # fs arrive with their factor change already clipped
        new = average_padded(fs, p, g.rank)
        gB, gA = g.B.to(new.B.device, new.B.dtype), g.A.to(new.A.device, new.A.dtype)
        change = float(((new.B - gB) ** 2).sum() + ((new.A - gA) ** 2).sum())  # factor-space change
        return new, change


class FedIT(ZeroPadding):
    """FedAvg on LoRA factors; every client must hold the state's rank (homogeneous)."""

    name = "fedit"

    def _check_ranks(self, state: GlobalState, plan: RoundPlan) -> None:
        for c, rm in plan.ranks.items():
            for m, r in rm.items():
                if r != state.factors[m].rank:
                    raise AggregationError(
                        f"fedit needs homogeneous ranks: client {c!r} has rank {r} on {m!r}, "
                        f"the state has {state.factors[m].rank} (use 'zeropad' or 'hetlora')"
                    )


class HetLoRA(ZeroPadding):
    """Zero-pad, weight each client by ‖B_i A_i‖_F (per module; uniform if all are zero)."""

    name = "hetlora"

    def _round_weights(
        self, state: GlobalState, plan: RoundPlan, updates: Sequence[object], n: Tensor
    ) -> dict[ModuleName, Tensor]:
        return {}  # weights depend on the uploads: computed per module

    def _module_weights(self, module: ModuleName, fs: Sequence[LoRAFactors], ranks: Sequence[int], n: Tensor) -> Tensor:
        """ω_i ∝ ‖B_i A_i‖_F of the screened (clipped) factors; with the update-size bound on,
        each norm is also capped at k × the module's median norm, so scaling up cannot buy
        weight; then the `max_weight_ratio / N` cap."""
        norms = [math.sqrt(lowrank_fro_sq(f.B, f.A)) for f in fs]
        norms = [
            v if math.isfinite(v) else math.sqrt(lowrank_fro_sq(f.B.double(), f.A.double()))
            for v, f in zip(norms, fs, strict=True)
        ]
        if self.clip.k is not None:
            bound = clip_bound(norms, self.clip.k)
            norms = [min(v, bound) for v in norms]
        w = torch.tensor(norms, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise AggregationError(f"module {module!r}: an upload's ‖B A‖_F is not finite; previous state kept")
        p = torch.full_like(w, 1.0 / w.numel()) if float(w.sum()) == 0.0 else normalise(w)
        return cap_weights(p, self.max_weight_ratio) if self.max_weight_ratio is not None else p

    def _per_module_report(self) -> bool:
        return True


def hetlora_tail_penalty(B: Tensor, A: Tensor, gamma: float, lam: float) -> Tensor:
    """HetLoRA's rank self-pruning regulariser `λ ‖B[:, ⌊γr⌋:]‖_F · ‖A[⌊γr⌋:]‖_F`.

    Differentiable; the agent adds it to its training loss for every adapted module.
    B (d_out, r), A (r, d_in).
    """
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    k = math.floor(gamma * A.shape[0])
    penalty: Tensor = lam * torch.linalg.vector_norm(B[:, k:]) * torch.linalg.vector_norm(A[k:])
    return penalty


def hetlora_pruned_rank(rank: int, gamma: float, tail_norm: float, previous_tail_norm: float | None) -> int:
    """Shrink to ⌊γr⌋ (at least 1) when the tail norm shrank since the last check."""
    if previous_tail_norm is not None and tail_norm < previous_tail_norm:
        return max(1, math.floor(gamma * rank))
    return rank
