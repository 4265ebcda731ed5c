"""Top-k singular triplets of one module's dense update: exact for small matrices,
randomized (Halko et al. 2011, with oversampling and power iterations) for large ones.

One `Spectrum` per module per round serves every rank in the round: `trunc(W, r)`, the
truncation error `Σ_{k>r} σ_k²` and the start factors all come from its top `k ≥ r_max`
triplets. A full SVD is never needed on the hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

SVDMethod = Literal["auto", "exact", "randomized"]


@dataclass(frozen=True)
class SVDConfig:
    """How the partial SVD is computed.

    `auto` uses the exact SVD when the smaller side is at most `exact_max_dim` or when
    `k + oversample` is more than a quarter of it (randomized would not save work), else the
    randomized path. The randomized result is checked: every returned triplet must satisfy
    `‖W v_j − σ_j u_j‖ ≤ tol · σ_1`; otherwise the subspace iteration continues (doubling the
    count, up to `max_power_iters`) and, as a last resort, the exact SVD is used.
    """

    method: SVDMethod = "auto"
    exact_max_dim: int = 1024
    oversample: int = 16
    power_iters: int = 2
    max_power_iters: int = 16
    tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.method not in ("auto", "exact", "randomized"):
            raise ValueError(f"unknown SVD method {self.method!r}")
        if self.oversample < 0 or self.power_iters < 0 or self.exact_max_dim < 0:
            raise ValueError("oversample, power_iters and exact_max_dim must be non-negative")
        if self.max_power_iters < self.power_iters:
            raise ValueError("max_power_iters must be at least power_iters")
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")


@dataclass
class Spectrum:
    """Top-k singular triplets of W plus its total energy ‖W‖²_F."""

    U: Tensor  # (d_out, k)
    S: Tensor  # (k,)  descending, non-negative
    Vh: Tensor  # (k, d_in)
    total_energy: float  # ‖W‖²_F, so tail energies need no more than the top k values
    method: str = "exact"
    residual: float = 0.0  # max_j ‖W v_j − σ_j u_j‖ / σ_1 (0 for the exact path)
    seconds: float = field(default=0.0, compare=False)

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    def _check(self, r: int) -> None:
        if r > self.k:
            raise ValueError(f"rank {r} exceeds the {self.k} singular triplets computed")

    def trunc(self, r: int) -> Tensor:
        """Best rank-r approximation (Eckart–Young), dense (d_out, d_in)."""
        self._check(r)
        return (self.U[:, :r] * self.S[:r]) @ self.Vh[:r]

    def head_energy(self, r: int) -> float:
        self._check(r)
        return float((self.S[:r].double() ** 2).sum())

    def tail_energy(self, r: int) -> float:
        """‖W − trunc(W, r)‖²_F = Σ_{k>r} σ_k² = ‖W‖²_F − Σ_{k≤r} σ_k² (clamped at 0)."""
        return max(self.total_energy - self.head_energy(r), 0.0)

    def is_zero(self) -> bool:
        return self.total_energy == 0.0


def _pick_method(shape: tuple[int, int], k: int, cfg: SVDConfig) -> str:
    if cfg.method != "auto":
        return cfg.method
    small = min(shape)
    if small <= cfg.exact_max_dim or 4 * (k + cfg.oversample) > small:
        return "exact"
    return "randomized"


def _exact(W: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def _sketch(W: Tensor, width: int, generator: torch.Generator) -> Tensor:
    omega = torch.randn(W.shape[1], width, generator=generator, device="cpu", dtype=W.dtype)
    Q: Tensor = torch.linalg.qr(W @ omega.to(W.device)).Q  # (d_out, l)
    return Q


def _power(W: Tensor, Q: Tensor, iters: int) -> Tensor:
    for _ in range(iters):  # re-orthonormalise every half step: stable in fp32
        Z = torch.linalg.qr(W.T @ Q).Q  # (d_in, l)
        Q = torch.linalg.qr(W @ Z).Q  # (d_out, l)
    return Q


def _project(W: Tensor, Q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (l, d_in) is small
    return (Q @ Ub)[:, :k], S[:k], Vh[:k]


def _residual(W: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> float:
    """max_j ‖W v_j − σ_j u_j‖ / σ_1: zero for exact singular triplets."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0.0
    R = W @ Vh.T - U * S  # (d_out, k)
    return float(torch.linalg.vector_norm(R, dim=0).max() / S[0])


def partial_svd(W: Tensor, k: int, cfg: SVDConfig | None = None, seed: int = 0) -> Spectrum:
    """Top-k triplets of W (2-D), computed in W's dtype on W's device.

    Deterministic for a given `seed`: the randomized sketch draws from a CPU generator, so
    two workers (or a CPU and a CUDA run) start from the same test matrix.
    """
    cfg = cfg or SVDConfig()
    if W.ndim != 2:
        raise ValueError(f"partial_svd needs a 2-D matrix, got shape {tuple(W.shape)}")
    k = min(k, *W.shape)
    if k < 0:
        raise ValueError("k must be non-negative")
    t0 = time.perf_counter()
    total = float(torch.linalg.vector_norm(W, dtype=torch.float64) ** 2)
    if total == 0.0:  # W = 0: every truncation is exact; U/Vh are never read for products
        d_out, d_in = W.shape
        z = W.new_zeros
        return Spectrum(z(d_out, k), z(k), z(k, d_in), 0.0, "zero", 0.0, time.perf_counter() - t0)
    method = _pick_method((int(W.shape[0]), int(W.shape[1])), k, cfg)
    if method == "exact":
        U, S, Vh = _exact(W, k)
        return Spectrum(U, S, Vh, total, "exact", 0.0, time.perf_counter() - t0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = _sketch(W, min(k + cfg.oversample, *W.shape), gen)
    iters, done = cfg.power_iters, 0
    while True:  # continue the same subspace iteration until the check passes
        Q = _power(W, Q, iters - done)
        done = iters
        U, S, Vh = _project(W, Q, k)
        res = _residual(W, U, S, Vh)
        if res <= cfg.tol:
            return Spectrum(U, S, Vh, total, f"randomized(q={iters})", res, time.perf_counter() - t0)
        if iters >= cfg.max_power_iters:
            break
        iters = min(max(2 * iters, 1), cfg.max_power_iters)
    U, S, Vh = _exact(W, k)  # the sketch did not converge to tolerance: pay for exactness
    return Spectrum(U, S, Vh, total, "exact(fallback)", res, time.perf_counter() - t0)
