"""Aggregation weights. Pure functions over small float64 vectors.

FedHL's default is the inverse-variance rule `p_i ∝ n_i / (e_i^κ + ε)` that minimises a
drift bound of the form `Σ p_i² (L² e_i + σ²)`, with ε on the scale of the errors
(`ε = mean_j e_j^κ`), then a cap at `max_weight_ratio ×` the uniform share `1/N`.
The cap is relative to uniform over the round's participants, never to a client-reported
size: `n_i` is what a client claims, so a cap computed from it moves weight to a liar.
See ALGORITHMS.md, step 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

WeightRule = Literal["drift", "data_size", "uniform"]
EpsMode = Literal["relative", "absolute"]


def normalise(w: Tensor) -> Tensor:
    total = w.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError(f"weights must have a positive finite sum, got {w.tolist()}")
    return w / total


def data_size_weights(n_examples: Tensor) -> Tensor:
    """p_i ∝ n_i."""
    return normalise(n_examples.to(torch.float64))


def uniform_weights(count: int) -> Tensor:
    if count <= 0:
        raise ValueError("no clients to weight")
    return torch.full((count,), 1.0 / count, dtype=torch.float64)


def drift_weights(
    errors: Tensor,
    n_examples: Tensor,
    *,
    kappa: float = 1.0,
    eps: float = 1.0,
    eps_mode: EpsMode = "relative",
    use_data_size: bool = True,
) -> Tensor:
    """p_i ∝ n_i^[use_data_size] / (e_i^κ + ε); ε = eps · mean(e^κ) when relative.

    When every error is zero (round 0, or all ranks cover rank(W_t)) the rule degenerates
    to data-size weights (uniform without the data-size factor).
    """
    e = errors.to(torch.float64).clamp_min(0.0) ** kappa  # (N,)
    n = n_examples.to(torch.float64) if use_data_size else torch.ones_like(e)
    if bool((e == 0).all()):
        return normalise(n)
    floor = eps * float(e.mean()) if eps_mode == "relative" else eps
    return normalise(n / (e + floor))


def cap_weights(p: Tensor, max_ratio: float) -> Tensor:
    """Cap every p_i at `max_ratio / N` (N = the round's participants), redistributing the
    excess to the uncapped clients in proportion to their weights, or equally when those
    all weigh zero (water-filling; exact after ≤ N passes). The cap uses nothing a client
    reports, so a client claiming a huge `n_examples` cannot exceed it under any rule.
    With `N ≤ max_ratio` the cap is 1 and binds nothing."""
    if max_ratio < 1.0:
        raise ValueError(f"max_weight_ratio must be at least 1, got {max_ratio}")
    cap = max_ratio / p.numel()
    p = p.clone()
    capped = torch.zeros_like(p, dtype=torch.bool)
    for _ in range(p.numel()):
        over = (p > cap * (1 + 1e-12)) & ~capped
        if not bool(over.any()):
            break
        capped |= over
        p[capped] = cap
        free = 1.0 - float(p[capped].sum())
        rest = p[~capped]
        if rest.numel() == 0:
            break
        total = float(rest.sum())
        p[~capped] = rest * (free / total) if total > 0 else free / rest.numel()
    return p


def capped_data_size_weights(n_examples: Tensor, max_ratio: float | None) -> Tensor:
    """Data-size weights under the uniform-relative cap (every strategy's default for the
    factors it averages by data size, and for non-LoRA parameters)."""
    p = data_size_weights(n_examples)
    return cap_weights(p, max_ratio) if max_ratio is not None else p


def effective_participants(p: Tensor | Sequence[float]) -> float:
    """N_eff = 1 / Σ p_i²: N for uniform weights, 1 when one client takes everything."""
    t = p.to(torch.float64) if isinstance(p, Tensor) else torch.tensor(list(p), dtype=torch.float64)
    return float(1.0 / (t**2).sum())


@dataclass(frozen=True)
class WeightConfig:
    """FedHL's weight options (ALGORITHMS.md step 4).

    `max_weight_ratio`: no client's weight exceeds `max_weight_ratio / N` (N participants of
    the round), under every rule; the excess is water-filled onto the others. It bounds
    the reach of a client-reported `n_examples`; `None` turns it off.
    """

    rule: WeightRule = "drift"
    kappa: float = 1.0
    eps: float = 1.0  # a multiplier of mean(e^κ) when eps_mode is relative
    eps_mode: EpsMode = "relative"
    use_data_size: bool = True
    per_module: bool = False
    max_weight_ratio: float | None = 4.0

    def __post_init__(self) -> None:
        if self.rule not in ("drift", "data_size", "uniform"):
            raise ValueError(f"unknown weight rule {self.rule!r}")
        if self.kappa not in (1.0, 2.0):
            raise ValueError(f"kappa must be 1 or 2, got {self.kappa}")
        if self.eps_mode not in ("relative", "absolute"):
            raise ValueError(f"eps_mode must be 'relative' or 'absolute', got {self.eps_mode!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.max_weight_ratio is not None and self.max_weight_ratio < 1:
            raise ValueError(f"max_weight_ratio must be ≥ 1 or None, got {self.max_weight_ratio}")

    @classmethod
    def paper_literal(cls) -> WeightConfig:
        """The third-party reading of the paper's Eq. (15): κ=2, ε=1e-6 absolute, no n_i.
        Kept for comparison; it collapses onto the highest-rank clients (ALGORITHMS.md)."""
        return cls(kappa=2.0, eps=1e-6, eps_mode="absolute", use_data_size=False, max_weight_ratio=None)

    def compute(self, errors: Tensor, n_examples: Tensor) -> Tensor:
        """errors (N,) → weights (N,), summing to 1."""
        if self.rule == "uniform":
            p = uniform_weights(int(errors.numel()))
        elif self.rule == "data_size":
            p = data_size_weights(n_examples)
        else:
            p = drift_weights(
                errors,
                n_examples,
                kappa=self.kappa,
                eps=self.eps,
                eps_mode=self.eps_mode,
                use_data_size=self.use_data_size,
            )
        if self.max_weight_ratio is not None:
            p = cap_weights(p, self.max_weight_ratio)
        return p
