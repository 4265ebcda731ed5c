"""FlexLoRA (Bai et al., NeurIPS 2024): `W_g = Σ p_i s_i B_i A_i` with p ∝ n_i; every client
starts from `trunc(W_g, r_i)`. The residual `W_g − trunc(W_g, r_i)` is lost each round."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..merge import stack_factors, truncation_factors
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
        clip: Sequence[float],
    ) -> tuple[Tensor, float]:
        scales = [self.scaling.scale(r) for r in ranks]
        L, R = stack_factors(fs, [pi * si for pi, si in zip(p, scales, strict=True)])
        spec = plan.spectra[module]
        if min(clip) < 1.0 and not spec.is_zero():
            # a clipped client contributes trunc(W_t, r_i) + c_i Δ_i; its product carries c_i,
            # so add back (1 − c_i) of its start point
            Lt, Rt = truncation_factors(spec, ranks, [pi * (1.0 - ci) for pi, ci in zip(p, clip, strict=True)])
            L, R = torch.cat([L, Lt], dim=1), torch.cat([R, Rt], dim=0)
        Wg = L @ R  # Σ p_i s_i B_i A_i  (d_out, d_in)
        W = state.dense[module].to(Wg.device, Wg.dtype)
        change = float(torch.linalg.vector_norm(Wg - W, dtype=torch.float64) ** 2)
        return Wg, change
