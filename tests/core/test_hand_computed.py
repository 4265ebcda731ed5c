"""Small cases whose expected values are worked out by hand in the comments.

The running example: W_t = diag(3, 2, 1) (3×3), alpha = 2 (so s(1) = 2, s(2) = 1) and two
clients, `a` at rank 1 and `b` at rank 2. Their truncation errors are
e_a = 2² + 1² = 5 and e_b = 1² = 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from naive_core import F64, dense_state

from fedhl.core import (
    ClientUpdate,
    FedHL,
    FlexLoRA,
    FLoRA,
    LoRAFactors,
    LoRAScaling,
    WeightConfig,
    cap_weights,
    data_size_weights,
    drift_weights,
    effective_participants,
    partial_svd,
    start_factors,
)

E = torch.tensor([5.0, 1.0], dtype=F64)  # e_a, e_b
W3 = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------ drift weights

DRIFT_CASES = [
    # (n, options, expected p) — p_i ∝ n_i / (e_i^κ + ε)
    # κ=1, ε = mean(5, 1) = 3: 1/8 : 1/4 → 1/3, 2/3
    ([1, 1], {}, [1 / 3, 2 / 3]),
    # with data size n = (3, 1): 3/8 : 1/4 → 3/5, 2/5
    ([3, 1], {}, [3 / 5, 2 / 5]),
    # data size off: back to 1/3, 2/3
    ([3, 1], {"use_data_size": False}, [1 / 3, 2 / 3]),
    # κ=2: e² = (25, 1), ε = 13: 1/38 : 1/14 → 14/52, 38/52
    ([1, 1], {"kappa": 2.0}, [7 / 26, 19 / 26]),
    # relative ε = 0.5·3 = 1.5: 1/6.5 : 1/2.5 → 5/18, 13/18
    ([1, 1], {"eps": 0.5}, [5 / 18, 13 / 18]),
    # absolute ε = 1, κ=1: 1/6 : 1/2 → 1/4, 3/4
    ([1, 1], {"eps": 1.0, "eps_mode": "absolute"}, [1 / 4, 3 / 4]),
    # absolute ε = 1, κ=2: 1/26 : 1/2 → 1/14, 13/14
    ([1, 1], {"kappa": 2.0, "eps": 1.0, "eps_mode": "absolute"}, [1 / 14, 13 / 14]),
    # absolute ε = 1, κ=2, n = (13, 1): 13/26 : 1/2 → 1/2, 1/2
    ([13, 1], {"kappa": 2.0, "eps": 1.0, "eps_mode": "absolute"}, [1 / 2, 1 / 2]),
    # paper-literal (κ=2, ε=1e-6 absolute, no n): (1+1e-6) : (25+1e-6)
    (
        [1, 99],
        {"kappa": 2.0, "eps": 1e-6, "eps_mode": "absolute", "use_data_size": False},
        [(1 + 1e-6) / (26 + 2e-6), (25 + 1e-6) / (26 + 2e-6)],
    ),
]


@pytest.mark.parametrize(("n", "opts", "expected"), DRIFT_CASES)
def test_drift_weights_by_hand(n, opts, expected) -> None:
    p = drift_weights(E, torch.tensor(n, dtype=F64), **opts)
    assert p.tolist() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize(("use_n", "expected"), [(True, [3 / 4, 1 / 4]), (False, [1 / 2, 1 / 2])])
def test_drift_weights_all_zero_errors_fall_back_to_data_size(use_n: bool, expected) -> None:
    p = drift_weights(torch.zeros(2, dtype=F64), t(3.0, 1.0), use_data_size=use_n)
    assert p.tolist() == pytest.approx(expected, rel=1e-15)


def test_weight_config_paper_literal_by_hand() -> None:
    p = WeightConfig.paper_literal().compute(E, t(1.0, 99.0))
    assert p.tolist() == pytest.approx([(1 + 1e-6) / (26 + 2e-6), (25 + 1e-6) / (26 + 2e-6)], rel=1e-13)


# ------------------------------------------------------------------ cap


CAP_CASES = [
    # The cap is max_ratio / N, whatever the clients report (not max_ratio × data share).
    # N = 3, ratio 1.2 → cap 0.4: a capped, (0.3, 0.1)·1.5 = (0.45, 0.15); b capped, c gets 0.2
    ([0.6, 0.3, 0.1], 1.2, [0.4, 0.4, 0.2]),
    # N = 4, ratio 2 → cap 1/2: a capped, the other 1/2 goes to (0.2, 0.05, 0.05) pro rata
    ([0.7, 0.2, 0.05, 0.05], 2.0, [1 / 2, 1 / 3, 1 / 12, 1 / 12]),
    # nothing over its cap: unchanged
    ([0.3, 0.3, 0.4], 1.5, [0.3, 0.3, 0.4]),
    # N ≤ ratio: the cap is ≥ 1 and binds nothing
    ([0.99, 0.01], 4.0, [0.99, 0.01]),
    # ratio 1 forces uniform weights
    ([0.9, 0.1], 1.0, [0.5, 0.5]),
    # the others all weigh zero (HetLoRA with zero updates): the excess is shared equally
    ([1.0, 0.0, 0.0], 1.5, [0.5, 0.25, 0.25]),
]


@pytest.mark.parametrize(("p", "ratio", "expected"), CAP_CASES)
def test_cap_weights_by_hand(p, ratio, expected) -> None:
    q = cap_weights(torch.tensor(p, dtype=F64), ratio)
    assert q.tolist() == pytest.approx(expected, rel=1e-12)


def test_cap_weights_rejects_ratio_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        cap_weights(t(0.5, 0.5), 0.5)


def test_weight_config_caps_drift_weights_by_hand() -> None:
    # errors (0, 4, 4), equal n, ε = 8/3: p ∝ 3/8 : 3/20 : 3/20 → 5/9, 2/9, 2/9;
    # cap at 1.5 × 1/3 = 1/2 → (1/2, 1/4, 1/4)
    p = WeightConfig(max_weight_ratio=1.5).compute(t(0.0, 4.0, 4.0), t(1.0, 1.0, 1.0))
    assert p.tolist() == pytest.approx([1 / 2, 1 / 4, 1 / 4], rel=1e-12)
    uncapped = WeightConfig(max_weight_ratio=None).compute(t(0.0, 4.0, 4.0), t(1.0, 1.0, 1.0))
    assert uncapped.tolist() == pytest.approx([5 / 9, 2 / 9, 2 / 9], rel=1e-12)


@pytest.mark.parametrize(
    ("p", "expected"),
    [([0.5, 0.5], 2.0), ([1.0, 0.0], 1.0), ([0.25] * 4, 4.0), ([1 / 3, 2 / 3], 9 / 5)],
)
def test_effective_participants_by_hand(p, expected) -> None:
    assert effective_participants(torch.tensor(p, dtype=F64)) == pytest.approx(expected)


def test_data_size_weights_by_hand() -> None:
    assert data_size_weights(t(1.0, 3.0, 4.0)).tolist() == pytest.approx([0.125, 0.375, 0.5])


# ------------------------------------------------------------------ start factors


def test_start_factors_2x2_by_hand() -> None:
    # W = diag(2, 5): σ = (5, 2), trunc(W, 1) = 5·e₂e₂ᵀ; alpha 2, rank 1 → s = 2
    W = torch.diag(t(2.0, 5.0))
    spec = partial_svd(W, 2)
    assert spec.S.tolist() == pytest.approx([5.0, 2.0])
    f = start_factors(spec, 1, 2.0, "all_in_B")  # B = U₁σ₁/s = ±(0, 2.5), A = ±(0, 1)
    assert f.B.abs().flatten().tolist() == pytest.approx([0.0, 2.5])
    assert f.A.abs().flatten().tolist() == pytest.approx([0.0, 1.0])
    g = start_factors(spec, 1, 2.0, "balanced")  # B = ±(0, √2.5), A = ±(0, √2.5)
    assert g.B.abs().flatten().tolist() == pytest.approx([0.0, math.sqrt(2.5)])
    assert g.A.abs().flatten().tolist() == pytest.approx([0.0, math.sqrt(2.5)])
    for h in (f, g):
        assert torch.allclose(2.0 * h.B @ h.A, t([0.0, 0.0], [0.0, 5.0]), atol=1e-15)
    assert spec.tail_energy(1) == pytest.approx(4.0) and spec.tail_energy(0) == pytest.approx(29.0)


# ------------------------------------------------------------------ one FedHL round


def hand_uploads() -> list[ClientUpdate]:
    # a (rank 1, s=2): B = (2,0,0)ᵀ, A = (1,0,0) → P_a = 4·e₁e₁ᵀ
    a = LoRAFactors(t([2.0], [0.0], [0.0]), t([1.0, 0.0, 0.0]))
    # b (rank 2, s=1): B = [[3,0],[0,2],[0,0]], A = [[1,0,0],[0,0,1]] → P_b = 3·e₁e₁ᵀ + 2·e₂e₃ᵀ
    b = LoRAFactors(t([3.0, 0.0], [0.0, 2.0], [0.0, 0.0]), t([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]))
    return [ClientUpdate("a", {"m": a}, n_examples=1), ClientUpdate("b", {"m": b}, n_examples=1)]


RANKS = {"a": {"m": 1}, "b": {"m": 2}}


def test_fedhl_round_on_diagonal_case_by_hand() -> None:
    # Prepare
    strategy = FedHL(LoRAScaling(2.0))
    state = dense_state(strategy, {"m": W3})
    plan = strategy.plan_round(state, RANKS)
    # Execute
    new, report = strategy.aggregate(state, plan, hand_uploads())
    # Assert
    # p = (1/3, 2/3) (first drift case above). Δ_a = 4e₁₁ − 3e₁₁ = e₁₁;
    # Δ_b = P_b − diag(3,2,0) = 2e₂₃ − 2e₂₂. W + Δ_a/3 + 2Δ_b/3:
    expected = t([10 / 3, 0.0, 0.0], [0.0, 2 / 3, 4 / 3], [0.0, 0.0, 1.0])
    assert torch.allclose(new.dense["m"], expected, rtol=0, atol=1e-14)
    assert report.weights == pytest.approx({"a": 1 / 3, "b": 2 / 3}, rel=1e-14)
    assert report.truncation_errors == pytest.approx({"a": 5.0, "b": 1.0}, rel=1e-14)
    assert report.energy_kept == pytest.approx({1: 9 / 14, 2: 13 / 14}, rel=1e-14)
    assert report.update_norms == pytest.approx({"a": 1.0, "b": math.sqrt(8.0)}, rel=1e-12)
    assert report.global_update_norm == pytest.approx(math.sqrt(33) / 3, rel=1e-12)  # 1/9+16/9+16/9
    assert report.n_eff == pytest.approx(9 / 5, rel=1e-14)
    assert report.round == 1 and new.round == 2
    assert report.svd["methods"] == ["exact"]
    d = report.to_dict()
    assert d["strategy"] == "fedhl" and d["energy_kept"]["1"] == pytest.approx(9 / 14)


def test_fedhl_round_on_diagonal_case_with_uniform_weights_by_hand() -> None:
    # p = (1/2, 1/2): W + Δ_a/2 + Δ_b/2 = [[3.5,0,0],[0,1,1],[0,0,1]]
    strategy = FedHL(LoRAScaling(2.0), weights=WeightConfig(rule="uniform"))
    state = dense_state(strategy, {"m": W3})
    new, _ = strategy.aggregate(state, strategy.plan_round(state, RANKS), hand_uploads())
    expected = t([3.5, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    assert torch.allclose(new.dense["m"], expected, rtol=0, atol=1e-14)


def test_flexlora_and_flora_on_diagonal_case_by_hand() -> None:
    # data-size p = (1/2, 1/2): Σ p P = 3.5e₁₁ + e₂₃
    flex, flora = FlexLoRA(LoRAScaling(2.0)), FLoRA(LoRAScaling(2.0))
    state = dense_state(flex, {"m": W3})
    new_f, _ = flex.aggregate(state, flex.plan_round(state, RANKS), hand_uploads())
    new_s, rep_s = flora.aggregate(state, flora.plan_round(state, RANKS), hand_uploads())
    # FlexLoRA discards W_t; FLoRA adds the stacked update to it
    assert torch.allclose(new_f.dense["m"], t([3.5, 0, 0], [0, 0, 1.0], [0, 0, 0]), atol=1e-14)
    assert torch.allclose(new_s.dense["m"], t([6.5, 0, 0], [0, 2.0, 1.0], [0, 0, 1.0]), atol=1e-14)
    # FLoRA: ‖Δ_a‖ = ‖P_a‖ = 4, ‖P_b‖ = √13, change ‖3.5e₁₁ + e₂₃‖ = √13.25
    assert rep_s.update_norms == pytest.approx({"a": 4.0, "b": math.sqrt(13.0)}, rel=1e-12)
    assert rep_s.global_update_norm == pytest.approx(math.sqrt(13.25), rel=1e-12)


@pytest.mark.parametrize(
    ("view", "rank", "expected"),
    [
        ("full", 1, torch.diag(t(0.0, 2.0, 1.0))),  # W − trunc(W, 1)
        ("full", 2, torch.diag(t(0.0, 0.0, 1.0))),
        ("residual:2", 1, torch.diag(t(0.0, 2.0, 0.0))),  # trunc(W, 2) − trunc(W, 1)
        ("residual:3", 1, torch.diag(t(0.0, 2.0, 1.0))),
        ("residual:3", 2, torch.diag(t(0.0, 0.0, 1.0))),
    ],
)
def test_client_view_residuals_on_diagonal_case_by_hand(view: str, rank: int, expected) -> None:
    # Prepare
    strategy = FedHL(LoRAScaling(2.0), client_view=view)
    state = dense_state(strategy, {"m": W3})
    plan = strategy.plan_round(state, {"c": {"m": rank}})
    # Execute
    start = strategy.client_start(state, plan, "c")
    # Assert
    res = start.base_residual["m"]
    dense = res if isinstance(res, torch.Tensor) else res.B @ res.A
    assert torch.allclose(dense, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(("view", "rank"), [("truncated", 1), ("residual:2", 2), ("residual:1", 2)])
def test_client_view_without_residual(view: str, rank: int) -> None:
    strategy = FedHL(LoRAScaling(2.0), client_view=view)
    state = dense_state(strategy, {"m": W3})
    start = strategy.client_start(state, strategy.plan_round(state, {"c": {"m": rank}}), "c")
    assert start.base_residual == {}
    assert start.downlink_values() == rank * 6
