"""The start point FedHL and FlexLoRA share: clients start from `trunc(W_t, r_i)`, factored
from one partial SVD per module that serves every rank (ALGORITHMS.md step 1)."""

from __future__ import annotations

from typing import Any, Literal

from ..merge import start_factors
from ..scaling import LoRAScaling
from ..types import GlobalState, LoRAFactors, ModuleName
from .base import RoundPlan, Strategy

StartBalance = Literal["all_in_B", "balanced"]


class SpectralStart(Strategy):
    """Dense state W_t; rank-r start factors with `s · B @ A == trunc(W_t, r)`."""

    dense_state = True
    uses_spectrum = True

    def __init__(self, scaling: LoRAScaling, *, start_balance: StartBalance = "all_in_B", **kw: Any) -> None:
        super().__init__(scaling, **kw)
        if start_balance not in ("all_in_B", "balanced"):
            raise ValueError(f"unknown start_balance {start_balance!r}")
        self.start_balance: StartBalance = start_balance

    def options(self) -> dict[str, Any]:
        return {**super().options(), "start_balance": self.start_balance}

    def _start_module(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors:
        spec = plan.spectra[module]
        if spec.is_zero():  # W_t = 0 (round 0): standard LoRA init, trunc(W_t, r) = 0
            return self._fresh_lora(state, plan, module, rank)
        return start_factors(spec, rank, self.scaling.scale(rank), self.start_balance)
