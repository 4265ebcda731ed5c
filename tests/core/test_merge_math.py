"""The pure tensor functions in `fedhl.core.merge` / `scaling` against dense references."""

from __future__ import annotations

import math

import pytest
import torch
from naive_core import gen, matrix_with_spectrum, naive_trunc, randn, rel_err

from fedhl.core import (
    AggregationReport,
    LoRAFactors,
    LoRAScaling,
    lowrank_fro_sq,
    partial_svd,
    start_factors,
    truncation_factors,
    uniform_ranks,
    weighted_product_sum,
)


@pytest.mark.parametrize(
    ("alpha", "rule", "rank", "expected"),
    [
        (16, "standard", 8, 2.0),
        (16, "rslora", 4, 8.0),
        (2, "standard", 1, 2.0),
        (8, "rslora", 16, 2.0),
    ],
)
def test_scaling_by_hand(alpha, rule, rank, expected) -> None:
    assert LoRAScaling(alpha, rule).scale(rank) == expected


def test_scaling_rejects_non_positive_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRAScaling(8).scale(0)


def test_weighted_product_sum_is_one_gemm_of_the_stack() -> None:
    g = gen(1)
    fs = [LoRAFactors(randn(9, r, g=g), randn(r, 6, g=g)) for r in (2, 1, 4)]
    coefs = [0.5, -1.5, 2.0]
    expected = sum(c * f.B @ f.A for c, f in zip(coefs, fs, strict=True))
    assert rel_err(weighted_product_sum(fs, coefs), expected) <= 1e-14


@pytest.mark.parametrize(
    ("ranks", "p"),
    [([1, 3, 2], [0.2, 0.3, 0.5]), ([4], [1.0]), ([2, 2], [0.6, 0.4]), ([5, 1], [0.1, 0.9])],
)
def test_truncation_factors_equal_weighted_sum_of_truncations(ranks, p) -> None:
    # Σ_i p_i trunc(W, r_i) = U diag(σ c) Vh with c_k = Σ_{r_i ≥ k} p_i: one rank-r_max product
    W = randn(8, 7, g=gen(2))
    spec = partial_svd(W, max(ranks))
    L, R = truncation_factors(spec, ranks, p)
    assert L.shape == (8, max(ranks)) and R.shape == (max(ranks), 7)
    expected = sum(pi * naive_trunc(W, r) for pi, r in zip(p, ranks, strict=True))
    assert rel_err(L @ R, expected) <= 1e-13


def test_start_factors_rejects_unknown_balance() -> None:
    spec = partial_svd(randn(4, 4, g=gen(3)), 2)
    with pytest.raises(ValueError, match="start_balance"):
        start_factors(spec, 1, 1.0, "all_in_A")


def test_lowrank_fro_sq_matches_dense_norm() -> None:
    g = gen(4)
    L, R = randn(30, 5, g=g), randn(5, 20, g=g)
    assert lowrank_fro_sq(L, R) == pytest.approx(float(torch.linalg.norm(L @ R) ** 2), rel=1e-13)
    assert lowrank_fro_sq(torch.zeros(3, 0), torch.zeros(0, 4)) == 0.0
    assert lowrank_fro_sq(torch.zeros(3, 2), torch.ones(2, 4)) == 0.0


@pytest.mark.parametrize("rel", [1e-2, 1e-3, 1e-4])
def test_lowrank_fro_sq_is_accurate_for_small_differences_in_float32(rel: float) -> None:
    # Prepare: Δ = (B + dB) A − B A with ‖Δ‖ ≈ rel·‖BA‖, evaluated as ‖[B+dB, −B] [A; A]‖,
    # the shape of FedHL's per-client update norm. The Gram form Σ(LᵀL)⊙(RRᵀ) cancels
    # catastrophically here (20% off at 1e-3, exactly 0 at 1e-4 in float32).
    g = gen(5)
    P = matrix_with_spectrum(256, 128, [1.0 - 0.05 * j for j in range(16)], g)
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    B, A = U[:, :16] * S[:16], Vh[:16]  # (256, 16), (16, 128)
    dB = randn(256, 16, g=g)
    dB *= rel * float(torch.linalg.norm(B @ A)) / float(torch.linalg.norm(dB @ A))
    L = torch.cat([B + dB, -B], dim=1).float()  # (256, 32)
    R = torch.cat([A, A], dim=0).float()  # (32, 128)
    # Execute
    got = math.sqrt(lowrank_fro_sq(L, R))
    # Assert
    true = float(torch.linalg.norm(dB @ A))
    assert got == pytest.approx(true, rel=1e-3)


def test_uniform_ranks() -> None:
    assert uniform_ranks(["a", "b"], ["q", "v"], {"a": 2, "b": 8}) == {
        "a": {"q": 2, "v": 2},
        "b": {"q": 8, "v": 8},
    }


def test_report_to_dict_is_json_safe() -> None:
    r = AggregationReport("fedhl", 0, ["a"], {"a": 1.0}, {"a": 0.0}, {4: 1.0}, {"a": 0.5}, float("nan"), 1.0)
    d = r.to_dict()
    assert d["global_update_norm"] is None
    assert d["energy_kept"] == {"4": 1.0}


def test_spectrum_rejects_rank_beyond_k() -> None:
    spec = partial_svd(randn(6, 5, g=gen(6)), 2)
    with pytest.raises(ValueError, match="exceeds"):
        spec.trunc(3)
    with pytest.raises(ValueError, match="2-D"):
        partial_svd(torch.zeros(2, 2, 2), 1)
    assert partial_svd(randn(6, 5, g=gen(6)), 99).k == 5  # k clipped at min(d_out, d_in)
