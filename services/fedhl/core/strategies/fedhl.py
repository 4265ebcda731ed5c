"""FedHL (arXiv 2505.18494): unbiased aggregation on the full-rank global update with
drift-minimising weights. ALGORITHMS.md, steps 1–5."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..downlink import apply_change, exact_factors
from ..merge import stack_factors, truncation_factors
from ..scaling import LoRAScaling
from ..types import ClientUpdate, GlobalState, LoRAFactors, ModuleName
from ..weights import WeightConfig
from .base import RoundPlan
from .spectral import SpectralStart, StartBalance


def parse_client_view(view: str) -> tuple[str, int | None]:
    """'truncated' | 'full' | 'residual:R' → (kind, R)."""
    if view in ("truncated", "full"):
        return view, None
    if view.startswith("residual:"):
        try:
            R = int(view.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"client_view {view!r}: R must be an integer") from None
        if R <= 0:
            raise ValueError(f"client_view {view!r}: R must be positive")
        return "residual", R
    raise ValueError(f"unknown client_view {view!r}; expected 'truncated', 'full' or 'residual:R'")


class FedHL(SpectralStart):
    """`W_{t+1} = W_t + Σ_i p_i c_i (s_i B_i' A_i' − trunc(W_t, r_i))`, p from `WeightConfig`,
    c_i ≤ 1 the update-size scale (1 unless client i's update exceeds the round's bound).

    Under the `full` view a float32 state's change is rounded onto the exact grid of
    core/downlink.py and kept (`round_change`), so agents rebuild W_{t+1} from W_t bit for bit;
    `client_start` still gives the dense residual (in-process users), the published start
    packages do not."""

    name = "fedhl"

    def __init__(
        self,
        scaling: LoRAScaling,
        *,
        weights: WeightConfig | None = None,
        start_balance: StartBalance = "all_in_B",
        client_view: str = "truncated",
        **kw: Any,
    ) -> None:
        if "max_weight_ratio" in kw:
            raise TypeError("fedhl takes max_weight_ratio inside its weight options")
        self.weights = weights or WeightConfig()
        super().__init__(scaling, start_balance=start_balance, max_weight_ratio=self.weights.max_weight_ratio, **kw)
        self.view, self.view_rank = parse_client_view(client_view)
        self.client_view = client_view

    def options(self) -> dict[str, Any]:
        w = self.weights
        return {
            **super().options(),
            "client_view": self.client_view,
            "weights": {
                "rule": w.rule,
                "kappa": w.kappa,
                "eps": w.eps,
                "eps_mode": w.eps_mode,
                "use_data_size": w.use_data_size,
                "per_module": w.per_module,
                "max_weight_ratio": w.max_weight_ratio,
            },
        }

    @property
    def factored_downlink(self) -> bool:
        return self.view == "full"

    def _spectrum_rank(self, plan: RoundPlan, module: ModuleName) -> int:
        r = plan.r_max(module)
        return max(r, self.view_rank) if self.view == "residual" and self.view_rank else r

    # step 1: start point (SpectralStart) and, for the `full`/`residual:R` views, the base residual
    def _residual_module(
        self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int
    ) -> Tensor | LoRAFactors | None:
        spec = plan.spectra[module]
        if self.view == "truncated" or spec.is_zero():
            return None
        if self.view == "full":  # the client's frozen base becomes W0 + (W_t − trunc(W_t, r))
            W = state.dense[module].to(spec.U.device, spec.U.dtype)
            return W - spec.trunc(rank)
        R = min(self.view_rank or rank, spec.k)
        if rank >= R:
            return None
        return LoRAFactors(spec.U[:, rank:R] * spec.S[rank:R], spec.Vh[rank:R].clone())  # scale 1

    # step 4: weights from server-side quantities only ---------------------------------------
    def _round_weights(
        self, state: GlobalState, plan: RoundPlan, updates: Sequence[ClientUpdate], n: Tensor
    ) -> dict[ModuleName, Tensor]:
        # e_i sums over every module of the plan, not only those in `state`: a worker merging a
        # shard of the modules uses the same weights as one merging them all.
        clients = [u.client_id for u in updates]
        per_module = {
            m: torch.tensor([plan.spectra[m].tail_energy(plan.rank(c, m)) for c in clients], dtype=torch.float64)
            for m in plan.spectra
        }
        if self.weights.per_module:
            return {m: self.weights.compute(per_module[m], n) for m in state.modules}
        p = self.weights.compute(torch.stack(list(per_module.values())).sum(0), n)
        return dict.fromkeys(state.modules, p)

    def _per_module_report(self) -> bool:
        return self.weights.per_module

    # step 3: unbiased merge on the full-rank basis -----------------------------------------
    def _merge_module(
        self,
        state: GlobalState,
        plan: RoundPlan,
        module: ModuleName,
        fs: Sequence[LoRAFactors],
        ranks: Sequence[int],
        p: Sequence[float],
        clip: Sequence[float],
    ) -> tuple[Tensor, float]:
        spec = plan.spectra[module]
        scales = [self.scaling.scale(r) for r in ranks]
        L, R = stack_factors(fs, [pi * si for pi, si in zip(p, scales, strict=True)])  # (d_out, Σr), (Σr, d_in)
        if not spec.is_zero():  # subtract Σ p_i c_i trunc(W_t, r_i): one rank-r_max correction
            q = [pi * ci for pi, ci in zip(p, clip, strict=True)] if min(clip) < 1.0 else p
            Lt, Rt = truncation_factors(spec, ranks, q)  # (d_out, r_max), (r_max, d_in)
            L, R = torch.cat([L, -Lt], dim=1), torch.cat([R, Rt], dim=0)
        if self.view == "full" and state.dense[module].dtype == torch.float32:
            # the new state is what an agent rebuilds bit for bit (core/downlink.py); float32 is the
            # state's dtype on the wire; a float64 state (research runs, tests) merges exactly instead
            exact = exact_factors(L, R)  # (d_out, K), (K, d_in) on the exact grid
            W = state.dense[module]
            new = apply_change(W.to(L.device), exact)  # W's dtype
            plan._cache[("change", module, 0)] = exact.to("cpu", torch.float32)
            diff = new.to(torch.float64) - W.to(new.device, torch.float64)
            return new, float(torch.linalg.vector_norm(diff) ** 2)
        D = L @ R  # Σ_i p_i Δ_i, one GEMM  (d_out, d_in)
        change = float(torch.linalg.vector_norm(D, dtype=torch.float64) ** 2)
        D += state.dense[module].to(D.device, D.dtype)
        return D, change
