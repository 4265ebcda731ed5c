"""FlexLoRA (Bai et al., NeurIPS 2024): `W_g = Σ p_i s_i B_i A_i` with p ∝ n_i; every client
starts from `trunc(W_g, r_i)`. The residual `W_g − trunc(W_g, r_i)` is lost each round."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..merge import stack_factors
from ..types import GlobalState, LoRAFactors, ModuleName
from .base import RoundPlan
from .spectral import SpectralStart


class FlexLoRA(SpectralStart):
    name = "flexlora"

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
