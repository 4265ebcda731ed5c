"""FlexLoRA (Bai et al., NeurIPS 2024): `W_g = Σ p_i s_i B_i A_i` with p ∝ n_i; every client
starts from `trunc(W_g, r_i)`. The residual `W_g − trunc(W_g, r_i)` is lost each round."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..merge import stack_factors, start_factors
from ..scaling import LoRAScaling
from ..types import GlobalState, LoRAFactors, ModuleName
from .base import RoundPlan, Strategy


class FlexLoRA(Strategy):
    name = "flexlora"
    dense_state = True
    uses_spectrum = True

    def __init__(
        self,
        scaling: LoRAScaling,
        *,
        start_balance: Literal["all_in_B", "balanced"] = "all_in_B",
        **kw: Any,
    ) -> None:
        super().__init__(scaling, **kw)
        if start_balance not in ("all_in_B", "balanced"):
            raise ValueError(f"unknown start_balance {start_balance!r}")
        self.start_balance = start_balance

    def options(self) -> dict[str, Any]:
        return {**super().options(), "start_balance": self.start_balance}

    def _start_module(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors:
        spec = plan.spectra[module]
        if spec.is_zero():
            return self._fresh_lora(state, plan, module, rank)
        return start_factors(spec, rank, self.scaling.scale(rank), self.start_balance)

    def _merge_module(
        self,
        state: GlobalState,
        plan: RoundPlan,
        module: ModuleName,
        fs: Sequence[LoRAFactors],
        ranks: Sequence[int],
        p: Sequence[float],
    ) -> tuple[Tensor, float]:
        scales = [self.scaling.scale(r) for r in ranks]
        L, R = stack_factors(fs, [pi * si for pi, si in zip(p, scales, strict=True)])
        Wg = L @ R  # Σ p_i s_i B_i A_i  (d_out, d_in)
        W = state.dense[module].to(Wg.device, Wg.dtype)
        change = float(torch.linalg.vector_norm(Wg - W, dtype=torch.float64) ** 2)
        return Wg, change
