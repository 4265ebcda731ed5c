"""HetLoRA (Cho et al., 2024): self-pruning regulariser, pruned rank, norm-proportional
weights. Invariant 9 (padding, FedIT equivalence) lives in test_invariants.py."""

from __future__ import annotations

import pytest
import torch
from naive_core import F64, gen, randn

from fedhl.core import (
    ClientUpdate,
    ClipConfig,
    HetLoRA,
    LoRAFactors,
    LoRAScaling,
    hetlora_pruned_rank,
    hetlora_tail_penalty,
)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# B (2, 4) and A (4, 3); the tail from column/row ⌊γr⌋ on is what the penalty sees.
B = t([9.0, 9.0, 3.0, 0.0], [9.0, 9.0, 0.0, 4.0])
A = t([7.0, 7.0, 7.0], [7.0, 7.0, 7.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0])

PENALTY_CASES = [
    # (gamma, lam, expected): r = 4
    (0.5, 0.1, 0.1 * 5.0 * 3.0),  # ⌊2⌋ = 2: ‖(3,0;0,4)‖ = 5, ‖(1,2,2;0,0,0)‖ = 3
    (0.6, 2.0, 2.0 * 5.0 * 3.0),  # ⌊2.4⌋ = 2
    (0.75, 1.0, 0.0),  # ⌊3⌋ = 3: ‖(0;4)‖ = 4, ‖A[3:]‖ = 0
    (0.25, 1.0, (81 + 9 + 81 + 16) ** 0.5 * (3 * 49 + 9) ** 0.5),  # ⌊1⌋ = 1
]


@pytest.mark.parametrize(("gamma", "lam", "expected"), PENALTY_CASES)
def test_tail_penalty_by_hand(gamma: float, lam: float, expected: float) -> None:
    assert float(hetlora_tail_penalty(B, A, gamma, lam)) == pytest.approx(expected, rel=1e-14)


def test_tail_penalty_is_differentiable_and_touches_only_the_tail() -> None:
    # Prepare
    g = gen(1)
    Bp = randn(5, 6, g=g).requires_grad_(True)
    Ap = randn(6, 4, g=g).requires_grad_(True)
    # Execute
    loss = hetlora_tail_penalty(Bp, Ap, 0.5, 0.3)
    loss.backward()
    # Assert: the head (first ⌊γr⌋ = 3 columns/rows) gets no gradient, the tail does
    assert loss.requires_grad
    assert not Bp.grad[:, :3].any() and not Ap.grad[:3].any()
    assert Bp.grad[:, 3:].abs().sum() > 0 and Ap.grad[3:].abs().sum() > 0
    # d/dB_tail (λ‖B_t‖‖A_t‖) = λ‖A_t‖ B_t / ‖B_t‖
    Bt, At = Bp.detach()[:, 3:], Ap.detach()[3:]
    expected = 0.3 * torch.linalg.norm(At) * Bt / torch.linalg.norm(Bt)
    assert torch.allclose(Bp.grad[:, 3:], expected, rtol=1e-12)
    # and the analytic gradient matches finite differences
    assert torch.autograd.gradcheck(
        lambda b, a: hetlora_tail_penalty(b, a, 0.5, 0.3),
        (Bp.detach().clone().requires_grad_(True), Ap.detach().clone().requires_grad_(True)),
    )


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, 1.5])
def test_tail_penalty_rejects_gamma_outside_open_unit_interval(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        hetlora_tail_penalty(B, A, gamma, 1.0)


@pytest.mark.parametrize(
    ("rank", "gamma", "tail", "prev", "expected"),
    [
        (8, 0.5, 1.0, 2.0, 4),  # tail shrank: ⌊0.5·8⌋
        (8, 0.5, 2.0, 1.0, 8),  # tail grew: keep
        (8, 0.5, 1.0, 1.0, 8),  # unchanged: keep
        (8, 0.5, 1.0, None, 8),  # first check: keep
        (7, 0.9, 0.1, 0.2, 6),  # ⌊6.3⌋
        (1, 0.5, 0.1, 1.0, 1),  # never below 1
        (3, 0.2, 0.1, 1.0, 1),  # ⌊0.6⌋ = 0 → 1
    ],
)
def test_pruned_rank_by_hand(rank, gamma, tail, prev, expected) -> None:
    assert hetlora_pruned_rank(rank, gamma, tail, prev) == expected


def hetlora_round(uploads, max_rank: int = 2):
    strategy = HetLoRA(LoRAScaling(2.0))
    state = strategy.init_state({"m": (2, 2)}, max_rank=max_rank, dtype=F64)
    plan = strategy.plan_round(state, {u.client_id: {"m": u.factors["m"].rank} for u in uploads})
    return strategy.aggregate(state, plan, uploads)


def test_weights_proportional_to_product_norms_by_hand() -> None:
    # Prepare: a: B=(1,0)ᵀ A=(3,4) → ‖BA‖ = 5; b: B=(0,2)ᵀ A=(0,5) → ‖BA‖ = 10; ω = (1/3, 2/3)
    a = ClientUpdate("a", {"m": LoRAFactors(t([1.0], [0.0]), t([3.0, 4.0]))}, n_examples=100)
    b = ClientUpdate("b", {"m": LoRAFactors(t([0.0], [2.0]), t([0.0, 5.0]))}, n_examples=1)
    # Execute
    new, report = hetlora_round([a, b])
    # Assert: data size plays no part; the padded factors are averaged with ω
    assert report.weights == pytest.approx({"a": 1 / 3, "b": 2 / 3}, rel=1e-14)
    assert report.module_weights == {"m": pytest.approx({"a": 1 / 3, "b": 2 / 3}, rel=1e-14)}
    # B̄ = (1/3)(1,0) + (2/3)(0,2) = (1/3, 4/3); Ā = (1/3)(3,4) + (2/3)(0,5) = (1, 14/3)
    assert torch.allclose(new.factors["m"].B, t([1 / 3, 0.0], [4 / 3, 0.0]), atol=1e-15)
    assert torch.allclose(new.factors["m"].A, t([1.0, 14 / 3], [0.0, 0.0]), atol=1e-15)


def test_weights_uniform_when_all_products_are_zero() -> None:
    # Prepare: B = 0 for every client (e.g. an untrained round-0 upload)
    ups = [
        ClientUpdate(c, {"m": LoRAFactors(torch.zeros(2, r, dtype=F64), randn(r, 2, g=gen(r)))}, n_examples=n)
        for c, r, n in (("a", 1, 1), ("b", 2, 50), ("c", 2, 7))
    ]
    # Execute
    new, report = hetlora_round(ups)
    # Assert
    assert report.weights == pytest.approx(dict.fromkeys("abc", 1 / 3), rel=1e-15)
    expected_A = sum(torch.nn.functional.pad(u.factors["m"].A, (0, 0, 0, 2 - u.factors["m"].rank)) for u in ups) / 3
    assert torch.allclose(new.factors["m"].A, expected_A, rtol=1e-14)


def test_weights_per_module_differ() -> None:
    # Prepare: a dominates module x, b dominates module y (norms 3 vs 1 and 1 vs 4: the
    # update-size bound, 3 × the lower median, would clamp 4 to 3; this test is the paper's rule)
    strategy = HetLoRA(LoRAScaling(2.0), clip=ClipConfig.off())
    shapes = {"x": (3, 3), "y": (3, 3)}
    state = strategy.init_state(shapes, max_rank=1, dtype=F64)
    e1 = t([1.0], [0.0], [0.0])
    row = t([1.0, 0.0, 0.0])
    a = ClientUpdate("a", {"x": LoRAFactors(3 * e1, row), "y": LoRAFactors(e1, row)}, 1)
    b = ClientUpdate("b", {"x": LoRAFactors(e1, row), "y": LoRAFactors(4 * e1, row)}, 1)
    plan = strategy.plan_round(state, {"a": {"x": 1, "y": 1}, "b": {"x": 1, "y": 1}})
    # Execute
    _, report = strategy.aggregate(state, plan, [a, b])
    # Assert: x: (3, 1)/4; y: (1, 4)/5; scalar = mean over modules
    assert report.module_weights["x"] == pytest.approx({"a": 0.75, "b": 0.25})
    assert report.module_weights["y"] == pytest.approx({"a": 0.2, "b": 0.8})
    assert report.weights == pytest.approx({"a": 0.475, "b": 0.525})


def test_clients_receive_leading_slices_of_the_global_factors() -> None:
    strategy = HetLoRA(LoRAScaling(2.0))
    state = strategy.init_state({"m": (5, 4)}, max_rank=3, dtype=F64)
    g = gen(3)
    state.factors["m"] = LoRAFactors(randn(5, 3, g=g), randn(3, 4, g=g))
    plan = strategy.plan_round(state, {"a": {"m": 1}, "b": {"m": 3}})
    for c, r in (("a", 1), ("b", 3)):
        f = strategy.client_start(state, plan, c).factors["m"]
        assert torch.equal(f.B, state.factors["m"].B[:, :r])
        assert torch.equal(f.A, state.factors["m"].A[:r])
