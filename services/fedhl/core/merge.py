"""The tensor math every strategy is built from: pure functions, tensors in, tensors out.

Cost shape (ALGORITHMS.md): the weighted sum of client products is one GEMM over the
concatenated factors, and the weighted sum of truncations is one rank-`r_max` product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .svd import Spectrum
from .types import LoRAFactors


def stack_factors(factors: Sequence[LoRAFactors], coefs: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FLoRA-style stacking: `L @ R == Σ_i coef_i · B_i @ A_i`, inner size Σ r_i.

    Returns L = [c_1 B_1 | … | c_N B_N] (d_out, Σr) and R = [A_1; …; A_N] (Σr, d_in).
    """
    L = torch.cat([c * f.B for f, c in zip(factors, coefs, strict=True)], dim=1)  # (d_out, Σr)
    R = torch.cat([f.A for f in factors], dim=0)  # (Σr, d_in)
    return L, R


def weighted_product_sum(factors: Sequence[LoRAFactors], coefs: Sequence[float]) -> Tensor:
    """Σ_i coef_i · B_i @ A_i as one GEMM. (d_out, d_in)"""
    L, R = stack_factors(factors, coefs)
    return L @ R


def truncation_coefficients(ranks: Sequence[int], weights: Sequence[float], r_max: int) -> Tensor:
    """c_k = Σ_{i: r_i ≥ k} p_i for k = 1..r_max, so Σ_i p_i trunc(W, r_i) = U diag(σ c) Vh."""
    c = torch.zeros(r_max, dtype=torch.float64)
    for r, p in zip(ranks, weights, strict=True):
        c[:r] += p
    return c


def truncation_factors(spec: Spectrum, ranks: Sequence[int], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Factors (L, R) with L @ R == Σ_i p_i trunc(W, r_i): rank r_max, not one per client."""
    r_max = max(ranks)
    c = truncation_coefficients(ranks, weights, r_max).to(spec.S.device, spec.S.dtype)
    return spec.U[:, :r_max] * (spec.S[:r_max] * c), spec.Vh[:r_max]  # (d_out, r_max), (r_max, d_in)


def start_factors(spec: Spectrum, rank: int, scale: float, balance: str = "all_in_B") -> LoRAFactors:
    """LoRA factors with `scale · B @ A == trunc(W, rank)` (FedHL/FlexLoRA step 1).

    `all_in_B`: B = U_r Σ_r / s, A = Vh_r (rows of A orthonormal);
    `balanced`: B = U_r Σ_r^½ / √s, A = Σ_r^½ Vh_r / √s.
    """
    U, S, Vh = spec.U[:, :rank], spec.S[:rank], spec.Vh[:rank]
    if balance == "all_in_B":
        return LoRAFactors((U * S) / scale, Vh.clone())
    if balance == "balanced":
        root = S.sqrt() / math.sqrt(scale)
        return LoRAFactors(U * root, root[:, None] * Vh)
    raise ValueError(f"unknown start_balance {balance!r}; expected 'all_in_B' or 'balanced'")


def lora_init(
    d_out: int,
    d_in: int,
    rank: int,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype,
) -> LoRAFactors:
    """Standard LoRA init (B = 0, A ~ kaiming-uniform(a=√5), as peft does): update is 0."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on (r, d_in) gives U(±1/√d_in)
    A = (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return LoRAFactors(torch.zeros(d_out, rank, device=device, dtype=dtype), A.to(device, dtype))


def lowrank_fro_sq(L: Tensor, R: Tensor) -> float:
    """‖L @ R‖²_F without forming the (d_out, d_in) product: with L = Q T (thin QR),
    ‖L R‖_F = ‖T R‖_F. (The Gram form Σ (LᵀL) ⊙ (R Rᵀ) cancels catastrophically when
    L R is small next to ‖L‖‖R‖, e.g. Δ_i = s B'A' − trunc(W_t, r): in float32 it misses a
    1e-3 relative change by ~20% and reports a 1e-4 one as 0.)"""
    if L.shape[1] == 0:
        return 0.0
    T = torch.linalg.qr(L, mode="r").R  # (min(d_out, k), k)
    return float(torch.linalg.vector_norm(T @ R, dtype=torch.float64) ** 2)  # T @ R: (·, d_in)


def change_norms_sq(
    starts: Sequence[LoRAFactors], trained: Sequence[LoRAFactors], scales: Sequence[float]
) -> list[float]:
    """‖s_i (B'_i A'_i − B⁰_i A⁰_i)‖²_F per client: each client's change against its start.

    Written as s[(B' − B⁰) A' + B⁰ (A' − A⁰)] so the Gram form Σ (LᵀL) ⊙ (R Rᵀ) sees no
    cancellation (a small change is not the difference of two large products), and batched
    over the clients of one rank: a few bmm calls instead of one small kernel per client.
    Factors may come in any float dtype: computed in float64, one rank group at a time, so
    at most one group's widened operands exist at once (never a float64 copy of every upload).
    """
    out = [0.0] * len(trained)
    by_rank: dict[int, list[int]] = {}
    for i, f in enumerate(trained):
        by_rank.setdefault(f.rank, []).append(i)
    for r, idx in by_rank.items():
        L, R = _change_operands([starts[i] for i in idx], [trained[i] for i in idx], [scales[i] for i in idx], r)
        sq = ((L.mT @ L) * (R @ R.mT)).sum((1, 2))  # (k,)  L: (k, d_out, 2r), R: (k, 2r, d_in)
        del L, R
        for i, v in zip(idx, sq.tolist(), strict=True):
            out[i] = max(float(v), 0.0)
    return out


def _change_operands(
    starts: Sequence[LoRAFactors], trained: Sequence[LoRAFactors], scales: Sequence[float], r: int
) -> tuple[Tensor, Tensor]:
    """L = [s_i [B'_i − B⁰_i | B⁰_i]] (k, d_out, 2r), R = [[A'_i; A'_i − A⁰_i]] (k, 2r, d_in) in
    float64, filled in place (the values `stack(cat(…))` of the widened factors would hold)."""
    d_out, d_in = trained[0].B.shape[0], trained[0].A.shape[1]
    dev, wide = trained[0].B.device, torch.float64
    L = torch.empty(len(trained), d_out, 2 * r, dtype=wide, device=dev)  # (k, d_out, 2r)
    R = torch.empty(len(trained), 2 * r, d_in, dtype=wide, device=dev)  # (k, 2r, d_in)
    for j, (s0, f, s) in enumerate(zip(starts, trained, scales, strict=True)):
        B0, A0 = s0.B.to(dev, wide), s0.A.to(dev, wide)  # (d_out, r), (r, d_in)
        torch.sub(f.B.to(dev, wide), B0, out=L[j, :, :r])
        L[j, :, r:] = B0
        L[j].mul_(s)
        R[j, :r] = f.A
        torch.sub(f.A.to(dev, wide), A0, out=R[j, r:])
    return L, R


def factor_change_sq(start: LoRAFactors, f: LoRAFactors) -> float:
    """‖B' − B⁰‖²_F + ‖A' − A⁰‖²_F, in float64 whatever the factors' dtype."""
    wide = torch.float64
    dB = f.B.to(wide) - start.B.to(f.B.device, wide)
    dA = f.A.to(wide) - start.A.to(f.A.device, wide)
    return float((dB**2).sum() + (dA**2).sum())


def pad_factors(f: LoRAFactors, r_max: int) -> LoRAFactors:
    """Zero-pad B's columns and A's rows to r_max: the product is unchanged."""
    r = f.rank
    if r > r_max:
        raise ValueError(f"rank {r} exceeds the padding target {r_max}")
    if r == r_max:
        return f
    B = torch.nn.functional.pad(f.B, (0, r_max - r))  # (d_out, r_max)
    A = torch.nn.functional.pad(f.A, (0, 0, 0, r_max - r))  # (r_max, d_in)
    return LoRAFactors(B, A)


def average_padded(factors: Sequence[LoRAFactors], weights: Sequence[float], r_max: int) -> LoRAFactors:
    """B̄ = Σ w_i pad(B_i), Ā = Σ w_i pad(A_i) (FedIT / zero-padding / HetLoRA)."""
    padded = [pad_factors(f, r_max) for f in factors]
    B = sum((w * f.B for f, w in zip(padded, weights, strict=True)), torch.zeros_like(padded[0].B))
    A = sum((w * f.A for f, w in zip(padded, weights, strict=True)), torch.zeros_like(padded[0].A))
    return LoRAFactors(B, A)


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i x_i for non-LoRA parameters (heads, norms)."""
    out = torch.zeros_like(tensors[0], dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    for x, w in zip(tensors, weights, strict=True):
        out += w * x
    return out.to(tensors[0].dtype)
