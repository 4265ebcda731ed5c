"""Naive reference implementations and small builders for the `fedhl.core` tests.

Written for clarity, not speed: full `torch.linalg.svd`, one dense product per client, plain
Python loops. Nothing here calls the fast paths under test (only the value types), so the
tests can compare the two. Everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedhl.core import ClientUpdate, GlobalState, LoRAFactors, RoundPlan, Strategy

F64 = torch.float64

# A truncation error below this fraction of ‖W‖²_F is rounding noise (the tail of a
# rank-deficient W); the naive reference counts it as exactly zero.
NOISE_FLOOR = 1e-20


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def matrix_with_spectrum(d_out: int, d_in: int, sigmas: Sequence[float], g: torch.Generator) -> Tensor:
    """U diag(σ) Vᵀ with random orthonormal U (d_out, k), V (d_in, k); rank = #nonzero σ."""
    k = len(sigmas)
    if k == 0:
        return torch.zeros(d_out, d_in, dtype=F64)
    U = torch.linalg.qr(randn(d_out, k, g=g)).Q  # (d_out, k)
    V = torch.linalg.qr(randn(d_in, k, g=g)).Q  # (d_in, k)
    return (U * torch.tensor(sigmas, dtype=F64)) @ V.T


def lora_scale(alpha: float, rank: int, rule: str = "standard") -> float:
    return alpha / (math.sqrt(rank) if rule == "rslora" else rank)


def naive_trunc(W: Tensor, r: int) -> Tensor:
    """Best rank-r approximation from a full SVD. (d_out, d_in)"""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def naive_tail(W: Tensor, r: int) -> float:
    """Σ_{k>r} σ_k² from the full spectrum (rounding noise counted as zero)."""
    S = torch.linalg.svdvals(W)
    tail = float((S[r:] ** 2).sum())
    return 0.0 if tail <= NOISE_FLOOR * float((S**2).sum()) else tail


def naive_drift_weights(
    errors: Sequence[float],
    n: Sequence[float],
    *,
    kappa: float = 1.0,
    eps: float = 1.0,
    relative: bool = True,
    use_n: bool = True,
) -> list[float]:
    """p_i ∝ n_i / (e_i^κ + ε), written out with Python floats (ALGORITHMS.md step 4)."""
    e = [max(x, 0.0) ** kappa for x in errors]
    num = [float(x) if use_n else 1.0 for x in n]
    if all(x == 0.0 for x in e):
        raw = num
    else:
        floor = eps * sum(e) / len(e) if relative else eps
        raw = [a / (b + floor) for a, b in zip(num, e, strict=True)]
    total = sum(raw)
    return [x / total for x in raw]


def naive_product(alpha: float, f: LoRAFactors, rule: str = "standard") -> Tensor:
    """P_i = s_i B_i A_i, dense. (d_out, d_in)"""
    return lora_scale(alpha, f.rank, rule) * (f.B.to(F64) @ f.A.to(F64))


def naive_fedhl(
    W: Mapping[str, Tensor],
    uploads: Sequence[ClientUpdate],
    weights: Mapping[str, Mapping[str, float]],
    alpha: float,
    rule: str = "standard",
) -> dict[str, Tensor]:
    """W_{t+1} = Σ p_i P_i + Σ p_i (W_t − trunc(W_t, r_i)), per module (invariant 3 form).

    `weights[module][client]` — one weight vector per module.
    """
    out = {}
    for m, Wm in W.items():
        acc = torch.zeros_like(Wm, dtype=F64)
        for u in uploads:
            f = u.factors[m]
            p = weights[m][u.client_id]
            acc += p * naive_product(alpha, f, rule)
            acc += p * (Wm.to(F64) - naive_trunc(Wm.to(F64), f.rank))
        out[m] = acc
    return out


def naive_weighted_products(
    uploads: Sequence[ClientUpdate], module: str, weights: Mapping[str, float], alpha: float
) -> Tensor:
    """Σ p_i s_i B_i A_i for one module, one dense product per client."""
    return sum(weights[u.client_id] * naive_product(alpha, u.factors[module]) for u in uploads)


# ---------------------------------------------------------------------------------- builders


def dense_state(strategy: Strategy, W: Mapping[str, Tensor], round_: int = 1) -> GlobalState:
    """A dense-strategy state holding the given W_t (cloned), at `round_`."""
    state = strategy.init_state({m: tuple(w.shape) for m, w in W.items()}, dtype=W[next(iter(W))].dtype)
    state.round = round_
    for m, w in W.items():
        state.dense[m] = w.clone()
    return state


def random_uploads(
    ranks: Mapping[str, Mapping[str, int]],
    shapes: Mapping[str, tuple[int, int]],
    n: Mapping[str, int],
    g: torch.Generator,
    dtype: torch.dtype = F64,
    scale: float = 1.0,
) -> list[ClientUpdate]:
    """One upload per client with random factors at its assigned ranks."""
    out = []
    for c, rm in ranks.items():
        factors = {}
        for m, r in rm.items():
            d_out, d_in = shapes[m]
            factors[m] = LoRAFactors(
                (scale * randn(d_out, r, g=g)).to(dtype),  # (d_out, r)
                (scale * randn(r, d_in, g=g)).to(dtype),
            )  # (r, d_in)
        out.append(ClientUpdate(c, factors, n_examples=n[c]))
    return out


def noop_uploads(strategy: Strategy, state: GlobalState, plan: RoundPlan, n: Mapping[str, int]) -> list[ClientUpdate]:
    """Every client returns exactly the start factors it was given (a no-op round)."""
    out = []
    for c in plan.ranks:
        start = strategy.client_start(state, plan, c)
        factors = {m: LoRAFactors(f.B.clone(), f.A.clone()) for m, f in start.factors.items()}
        out.append(ClientUpdate(c, factors, n_examples=n[c]))
    return out


def snapshot(state: GlobalState) -> tuple[int, dict[str, Tensor]]:
    return state.round, {k: v.clone() for k, v in state.tensors().items()}


def assert_unchanged(state: GlobalState, snap: tuple[int, dict[str, Tensor]]) -> None:
    round_, tensors = snap
    assert state.round == round_
    now = state.tensors()
    assert set(now) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(now[k], v), f"state tensor {k} changed"


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖_F / max(‖b‖_F, 1e-300)."""
    a, b = a.to(F64).cpu(), b.to(F64).cpu()
    return float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(b)), 1e-300))
