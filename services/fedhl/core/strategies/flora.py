"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors so that
`B_stack @ A_stack = Σ p_i s_i B_i A_i` exactly, merge it into the (dense) global update,
and let every client start a fresh LoRA on `W0 + W_t` next round. Its downlink is dense."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..merge import stack_factors
from ..types import GlobalState, LoRAFactors, ModuleName
from .base import RoundPlan, Strategy


class FLoRA(Strategy):
    name = "flora"
    dense_state = True

    def _start_module(self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int) -> LoRAFactors:
        return self._fresh_lora(state, plan, module, rank)

    def _residual_module(
        self, state: GlobalState, plan: RoundPlan, module: ModuleName, rank: int
    ) -> Tensor | LoRAFactors | None:
        W = state.dense[module]
        return None if not bool(W.any()) else W  # the merged stack the client's base must include

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
        # clients start from B = 0, so Δ_i = s_i B_i A_i and the clip is already in the factors
        scales = [self.scaling.scale(r) for r in ranks]
        L, R = stack_factors(fs, [pi * si for pi, si in zip(p, scales, strict=True)])  # stacked rank Σ r_i
        D = L @ R  # (d_out, d_in)
        change = float(torch.linalg.vector_norm(D, dtype=torch.float64) ** 2)
        D += state.dense[module].to(D.device, D.dtype)
        return D, change
