"""The 12 invariants of ALGORITHMS.md ("Invariants a test can assert"), one block each.

float64, small seeded random matrices; every expectation comes from `naive_core` (full SVDs,
dense per-client products) or is written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from naive_core import (
    F64,
    assert_unchanged,
    dense_state,
    gen,
    lora_scale,
    matrix_with_spectrum,
    naive_drift_weights,
    naive_fedhl,
    naive_product,
    naive_tail,
    naive_trunc,
    naive_weighted_products,
    noop_uploads,
    randn,
    random_uploads,
    rel_err,
    snapshot,
)

from fedhl.core import (
    STRATEGIES,
    WEIGHT_PRESETS,
    ClientUpdate,
    ClipConfig,
    FedHL,
    FedIT,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    LoRAFactors,
    LoRAScaling,
    SVDConfig,
    WeightConfig,
    average_padded,
    build_strategy,
    cap_weights,
    drift_weights,
    pad_factors,
    partial_svd,
    stack_factors,
    start_factors,
    uniform_ranks,
)

ALPHA = 8.0
SHAPES = {"q": (7, 5), "v": (6, 9)}  # min sides 5 and 6: random W is full rank on both


def full_rank_W(seed: int) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {m: randn(*s, g=g) for m, s in SHAPES.items()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return rel_err(a, b) <= tol


# ------------------------------------------------------------------ 1. start point == trunc


@pytest.mark.parametrize("balance", ["all_in_B", "balanced"])
@pytest.mark.parametrize("rule", ["standard", "rslora"])
@pytest.mark.parametrize("rank", [1, 2, 4, 5])
def test_inv01_start_factors_reproduce_truncation(balance: str, rule: str, rank: int) -> None:
    # Prepare
    W = randn(7, 5, g=gen(1))
    spec = partial_svd(W, 5)
    s = lora_scale(ALPHA, rank, rule)
    # Execute
    f = start_factors(spec, rank, s, balance)
    # Assert
    assert f.B.shape == (7, rank) and f.A.shape == (rank, 5)
    assert close(s * f.B @ f.A, naive_trunc(W, rank))
    if balance == "all_in_B":  # rows of A orthonormal
        assert torch.allclose(f.A @ f.A.T, torch.eye(rank, dtype=F64), atol=1e-12)
    else:  # balanced: BᵀB == AAᵀ == diag(σ)/s
        assert torch.allclose(f.B.T @ f.B, f.A @ f.A.T, atol=1e-12)
        assert torch.allclose(torch.diagonal(f.A @ f.A.T), spec.S[:rank] / s, atol=1e-12)


@pytest.mark.parametrize("cls", [FedHL, FlexLoRA])
@pytest.mark.parametrize("balance", ["all_in_B", "balanced"])
def test_inv01_client_start_through_strategy(cls: type, balance: str) -> None:
    # Prepare
    strategy = cls(LoRAScaling(ALPHA), start_balance=balance)
    W = full_rank_W(2)
    state = dense_state(strategy, W)
    ranks = {"a": {"q": 1, "v": 3}, "b": {"q": 4, "v": 2}}
    plan = strategy.plan_round(state, ranks)
    for c, rm in ranks.items():
        # Execute
        start = strategy.client_start(state, plan, c)
        # Assert
        for m, r in rm.items():
            f = start.factors[m]
            assert close(lora_scale(ALPHA, r) * f.B @ f.A, naive_trunc(W[m], r))


# ------------------------------------------------------------------ 2. no-op round


@pytest.mark.parametrize("preset", sorted(WEIGHT_PRESETS))
@pytest.mark.parametrize("balance", ["all_in_B", "balanced"])
@pytest.mark.parametrize("view", ["truncated", "full", "residual:4"])
def test_inv02_fedhl_noop_round_is_identity(preset: str, balance: str, view: str) -> None:
    # Prepare
    strategy = build_strategy("fedhl", alpha=ALPHA, weights=preset, start_balance=balance, client_view=view)
    W = full_rank_W(3)
    state = dense_state(strategy, W)
    ranks = {"a": {"q": 1, "v": 2}, "b": {"q": 3, "v": 1}, "c": {"q": 5, "v": 6}}
    plan = strategy.plan_round(state, ranks)
    uploads = noop_uploads(strategy, state, plan, {"a": 10, "b": 300, "c": 7})
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert
    for m in SHAPES:
        assert torch.allclose(new.dense[m], W[m], rtol=0, atol=1e-12)
    assert report.global_update_norm < 1e-12
    assert all(v < 1e-12 for v in report.update_norms.values())
    assert new.round == state.round + 1


@pytest.mark.parametrize(
    "weights",
    [WeightConfig(), WeightConfig(rule="uniform"), WeightConfig(kappa=2.0, per_module=True)],
)
def test_inv02_fedhl_noop_round_zero_is_exactly_zero(weights: WeightConfig) -> None:
    # Prepare: W_0 = 0, clients get the standard LoRA init (B = 0)
    strategy = FedHL(LoRAScaling(ALPHA), weights=weights)
    state = strategy.init_state(SHAPES, dtype=F64)
    plan = strategy.plan_round(state, {"a": {"q": 2, "v": 3}, "b": {"q": 5, "v": 1}})
    uploads = noop_uploads(strategy, state, plan, {"a": 1, "b": 2})
    # Execute
    new, _ = strategy.aggregate(state, plan, uploads)
    # Assert
    for m in SHAPES:
        assert torch.equal(new.dense[m], torch.zeros(SHAPES[m], dtype=F64))


def test_inv02_flexlora_noop_round_is_not_identity_when_rank_exceeds_min_rank() -> None:
    # Prepare: rank(W_t) = 5 (q) and 6 (v) > min r_i
    strategy = FlexLoRA(LoRAScaling(ALPHA))
    W = full_rank_W(4)
    state = dense_state(strategy, W)
    ranks = {"a": {"q": 2, "v": 2}, "b": {"q": 3, "v": 4}}
    n = {"a": 1, "b": 3}
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, _ = strategy.aggregate(state, plan, noop_uploads(strategy, state, plan, n))
    # Assert: FlexLoRA lands on Σ p_i trunc(W, r_i), losing the residuals
    for m in SHAPES:
        expected = 0.25 * naive_trunc(W[m], ranks["a"][m]) + 0.75 * naive_trunc(W[m], ranks["b"][m])
        assert close(new.dense[m], expected)
        lost = float(torch.linalg.norm(W[m] - new.dense[m]))
        assert lost > 0.1 * float(torch.linalg.norm(W[m]))
    # ... while FedHL on the same no-op round keeps W_t
    fedhl = FedHL(LoRAScaling(ALPHA))
    plan_h = fedhl.plan_round(state, ranks)
    new_h, _ = fedhl.aggregate(state, plan_h, noop_uploads(fedhl, state, plan_h, n))
    for m in SHAPES:
        assert torch.allclose(new_h.dense[m], W[m], rtol=0, atol=1e-12)


def test_inv02_flexlora_noop_round_is_identity_when_ranks_cover_rank_of_W() -> None:
    # Prepare: rank(W_t) = 2 ≤ min r_i = 2
    strategy = FlexLoRA(LoRAScaling(ALPHA))
    g = gen(5)
    W = {m: matrix_with_spectrum(*s, [3.0, 1.0], g) for m, s in SHAPES.items()}
    state = dense_state(strategy, W)
    plan = strategy.plan_round(state, {"a": {"q": 2, "v": 2}, "b": {"q": 4, "v": 5}})
    # Execute
    new, _ = strategy.aggregate(state, plan, noop_uploads(strategy, state, plan, {"a": 1, "b": 1}))
    # Assert
    for m in SHAPES:
        assert close(new.dense[m], W[m], 1e-12)


# ------------------------------------------------------------------ 3. decomposition


DECOMP_CASES = [  # (ranks per client per module, n_examples, weight config)
    ({"a": {"q": 1, "v": 6}, "b": {"q": 5, "v": 1}}, {"a": 10, "b": 20}, WeightConfig()),
    (
        {"a": {"q": 2, "v": 2}, "b": {"q": 2, "v": 3}, "c": {"q": 4, "v": 5}},
        {"a": 5, "b": 5, "c": 90},
        WeightConfig(kappa=2.0),
    ),
    (
        {"a": {"q": 3, "v": 1}, "b": {"q": 1, "v": 3}},
        {"a": 1, "b": 1},
        WeightConfig(eps=1e-3, eps_mode="absolute", use_data_size=False, max_weight_ratio=None),
    ),
    (
        {
            "a": {"q": 1, "v": 1},
            "b": {"q": 2, "v": 4},
            "c": {"q": 3, "v": 2},
            "d": {"q": 5, "v": 6},
        },
        {"a": 100, "b": 1, "c": 1, "d": 1},
        WeightConfig(max_weight_ratio=1.5),
    ),
]


@pytest.mark.parametrize(("ranks", "n", "weights"), DECOMP_CASES)
def test_inv03_fedhl_decomposition_matches_naive_reference(ranks, n, weights) -> None:
    # Prepare (update-size bound off: this is the merge identity; the bound has its own tests)
    strategy = FedHL(LoRAScaling(ALPHA), weights=weights, clip=ClipConfig.off())
    W = full_rank_W(6)
    state = dense_state(strategy, W)
    uploads = random_uploads(ranks, SHAPES, n, gen(7))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert: weights from server-side errors only, then the merge
    clients = list(ranks)
    errors = [sum(naive_tail(W[m], ranks[c][m]) for m in SHAPES) for c in clients]
    p = naive_drift_weights(
        errors,
        [n[c] for c in clients],
        kappa=weights.kappa,
        eps=weights.eps,
        relative=weights.eps_mode == "relative",
        use_n=weights.use_data_size,
    )
    p_t = torch.tensor(p, dtype=F64)
    if weights.max_weight_ratio is not None:
        p_t = cap_weights(p_t, weights.max_weight_ratio)
    expected_p = dict(zip(clients, p_t.tolist(), strict=True))
    assert report.weights == pytest.approx(expected_p, rel=1e-10)
    expected = naive_fedhl(W, uploads, dict.fromkeys(SHAPES, expected_p), ALPHA)
    for m in SHAPES:
        assert close(new.dense[m], expected[m], 1e-11)


# ------------------------------------------------------------------ 4. e_i = 0 ⇒ data-size


def low_rank_W(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = gen(seed)
    sig = [4.0, 2.0, 1.0][:rank]
    return {m: matrix_with_spectrum(*s, sig, g) for m, s in SHAPES.items()}


@pytest.mark.parametrize("w_rank", [0, 1, 2], ids=["W=0", "rank1", "rank2"])
def test_inv04_zero_errors_give_data_size_weights_and_fedhl_equals_flexlora(w_rank: int) -> None:
    # Prepare: rank(W_t) ≤ min r_i = 2 (W_t = 0 is round 0)
    W = low_rank_W(w_rank, 8)
    ranks = {"a": {"q": 2, "v": 3}, "b": {"q": 4, "v": 2}, "c": {"q": 5, "v": 6}}
    n = {"a": 10, "b": 30, "c": 60}
    uploads = random_uploads(ranks, SHAPES, n, gen(9))
    fedhl, flex = FedHL(LoRAScaling(ALPHA)), FlexLoRA(LoRAScaling(ALPHA))
    state = dense_state(fedhl, W, round_=0 if w_rank == 0 else 3)
    # Execute
    plan_h = fedhl.plan_round(state, ranks)
    new_h, report = fedhl.aggregate(state, plan_h, uploads)
    plan_f = flex.plan_round(state, ranks)
    new_f, _ = flex.aggregate(state, plan_f, uploads)
    # Assert
    assert all(e <= 1e-12 for e in report.truncation_errors.values())
    assert report.weights == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6}, abs=1e-12)
    for m in SHAPES:
        assert close(new_h.dense[m], new_f.dense[m], 1e-11)
        assert close(new_f.dense[m], naive_weighted_products(uploads, m, report.weights, ALPHA))


def test_inv04_paper_literal_zero_errors_give_uniform_weights() -> None:
    # Prepare: W_0 = 0, very unequal data sizes
    strategy = build_strategy("fedhl", alpha=ALPHA, weights="paper-literal")
    state = strategy.init_state(SHAPES, dtype=F64)
    ranks = {
        "a": {"q": 1, "v": 1},
        "b": {"q": 3, "v": 4},
        "c": {"q": 5, "v": 2},
        "d": {"q": 2, "v": 2},
    }
    uploads = random_uploads(ranks, SHAPES, {"a": 1, "b": 10, "c": 100, "d": 1000}, gen(10))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert
    assert report.weights == pytest.approx(dict.fromkeys(ranks, 0.25), abs=1e-15)
    for m in SHAPES:
        expected = naive_weighted_products(uploads, m, dict.fromkeys(ranks, 0.25), ALPHA)
        assert close(new.dense[m], expected)


# ------------------------------------------------------------------ 5. weight properties

WEIGHT_TABLE = [  # (errors, n_examples)
    ([5.0, 1.0, 0.0], [1, 1, 1]),
    ([2.0, 2.0, 2.0, 2.0], [1, 2, 3, 4]),
    ([0.0, 0.0], [7, 3]),
    ([1e-8, 3.0, 1e4], [100, 1, 50]),
    ([4.0], [9]),
]
CONFIGS = [
    WeightConfig(),
    WeightConfig.paper_literal(),
    WeightConfig(kappa=2.0),
    WeightConfig(eps=0.5, eps_mode="absolute"),
    WeightConfig(use_data_size=False, max_weight_ratio=None),
    WeightConfig(rule="uniform", max_weight_ratio=None),
    WeightConfig(rule="data_size"),
]


@pytest.mark.parametrize(("errors", "n"), WEIGHT_TABLE)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_inv05_weights_nonnegative_sum_to_one_and_permutation_equivariant(errors, n, cfg) -> None:
    # Prepare
    e, nn = torch.tensor(errors, dtype=F64), torch.tensor(n, dtype=F64)
    perm = torch.arange(len(errors)).flip(0)
    # Execute
    p = cfg.compute(e, nn)
    p_perm = cfg.compute(e[perm], nn[perm])
    # Assert
    assert bool((p >= 0).all())
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-14)
    assert torch.allclose(p_perm, p[perm], rtol=1e-14, atol=0)


def test_inv05_equal_errors_give_data_size_weights() -> None:
    p = drift_weights(torch.full((4,), 2.5, dtype=F64), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(p, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64), rtol=1e-14)


@pytest.mark.parametrize("preset", ["default", "paper-literal"])
def test_inv05_weights_monotone_in_rank(preset: str) -> None:
    # Prepare: four clients, equal data, ranks 1..4 on every module
    strategy = build_strategy("fedhl", alpha=ALPHA, weights=preset)
    state = dense_state(strategy, full_rank_W(11))
    ranks = uniform_ranks(["r1", "r2", "r3", "r4"], list(SHAPES), {"r1": 1, "r2": 2, "r3": 3, "r4": 4})
    plan = strategy.plan_round(state, ranks)
    uploads = random_uploads(ranks, SHAPES, dict.fromkeys(ranks, 5), gen(12))
    # Execute
    _, report = strategy.aggregate(state, plan, uploads)
    # Assert: higher rank ⇒ smaller error ⇒ larger weight
    e = [report.truncation_errors[c] for c in ranks]
    p = [report.weights[c] for c in ranks]
    assert e == sorted(e, reverse=True) and len(set(e)) == 4
    assert p == sorted(p) and len(set(p)) == 4


def test_inv05_zero_error_client_gets_bounded_share_under_default() -> None:
    # Prepare: client 0 has e=0, the others positive errors; equal data
    errors = torch.tensor([0.0, 1.0, 3.0, 8.0], dtype=F64)
    n = torch.ones(4, dtype=F64)
    # Execute
    uncapped = WeightConfig(max_weight_ratio=None).compute(errors, n)
    capped = WeightConfig().compute(errors, n)
    # Assert: p_0/p_j = (e_j + ē)/ē ≤ N + 1 without the cap; ≤ 4 × 1/N with it
    assert float(uncapped[0] / uncapped[1:].min()) <= 5.0
    assert float(uncapped[0] / uncapped[3]) == pytest.approx((8.0 + 3.0) / 3.0, rel=1e-14)
    assert float(capped[0]) <= 4 * 0.25 + 1e-15
    # ... whereas paper-literal puts (nearly) everything on the zero-error client
    literal = WeightConfig.paper_literal().compute(errors, n)
    assert float(literal[0]) > 0.999


@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 4.0])
def test_inv05_max_weight_ratio_cap_holds_and_renormalises(ratio: float) -> None:
    # The cap is relative to uniform over the round's participants (max_ratio / N), not to
    # the data-size share: changed deliberately (issue 12), since n_i is client-reported and
    # a cap computed from it moved weight to a client lying about it.
    # Prepare: paper-literal-like concentrated weights
    p = torch.tensor([0.90, 0.06, 0.03, 0.01], dtype=F64)
    cap = ratio / 4
    # Execute
    q = cap_weights(p, ratio)
    # Assert
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-14)
    assert bool((q <= cap * (1 + 1e-12)).all())
    assert bool((q >= 0).all())
    free = q < cap * (1 - 1e-12)  # uncapped clients keep their relative weights
    if int(free.sum()) >= 2:
        assert torch.allclose(q[free] / q[free].sum(), p[free] / p[free].sum(), rtol=1e-12)
    if ratio == 1.0:  # a cap at 1/N everywhere is the uniform rule
        assert torch.allclose(q, torch.full_like(p, 0.25), rtol=1e-12)


def test_inv05_fedhl_report_respects_cap() -> None:
    # Prepare: one client at full rank (e = 0) among low-rank ones, cap 1.5
    strategy = FedHL(LoRAScaling(ALPHA), weights=WeightConfig(max_weight_ratio=1.5))
    state = dense_state(strategy, full_rank_W(13))
    ranks = {"hi": {"q": 5, "v": 6}, "lo1": {"q": 1, "v": 1}, "lo2": {"q": 2, "v": 1}}
    n = {"hi": 1, "lo1": 1, "lo2": 1}
    plan = strategy.plan_round(state, ranks)
    # Execute
    _, report = strategy.aggregate(state, plan, random_uploads(ranks, SHAPES, n, gen(14)))
    # Assert
    assert report.weights["hi"] == pytest.approx(0.5, rel=1e-12)
    assert sum(report.weights.values()) == pytest.approx(1.0, abs=1e-14)
    assert report.n_eff == pytest.approx(1 / sum(p**2 for p in report.weights.values()))


# ------------------------------------------------------------------ 6. tail energy


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (12, 3)])
def test_inv06_tail_energy_equals_frobenius_error_exact(shape: tuple[int, int]) -> None:
    # Prepare
    W = randn(*shape, g=gen(15))
    k = min(shape)
    # Execute
    spec = partial_svd(W, k, SVDConfig(method="exact"))
    # Assert
    assert spec.method == "exact"
    for r in range(0, k + 1):
        direct = float(torch.linalg.norm(W - naive_trunc(W, r)) ** 2)
        assert spec.tail_energy(r) == pytest.approx(direct, rel=1e-10, abs=1e-12)
        assert spec.tail_energy(r) == pytest.approx(naive_tail(W, r), rel=1e-10, abs=1e-12)
        via_spec = float(torch.linalg.norm(W - spec.trunc(r)) ** 2)
        assert spec.tail_energy(r) == pytest.approx(via_spec, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("power_iters", [0, 1, 3])
def test_inv06_tail_energy_matches_the_randomized_truncation_actually_used(
    power_iters: int,
) -> None:
    # Prepare: a flat-ish spectrum and a lax tolerance, so the sketch really is approximate
    W = randn(60, 40, g=gen(16))
    cfg = SVDConfig(
        method="randomized",
        oversample=2,
        power_iters=power_iters,
        max_power_iters=power_iters,
        tol=10.0,
    )
    # Execute
    spec = partial_svd(W, 8, cfg, seed=3)
    # Assert
    assert spec.method == f"randomized(q={power_iters})"
    for r in (1, 4, 8):
        used = float(torch.linalg.norm(W - spec.trunc(r)) ** 2)
        assert spec.tail_energy(r) == pytest.approx(used, rel=1e-10)
        assert spec.tail_energy(r) >= naive_tail(W, r) * (1 - 1e-12)  # Eckart–Young


def test_inv06_report_errors_sum_tail_energies_over_modules() -> None:
    # Prepare
    strategy = FedHL(LoRAScaling(ALPHA))
    W = full_rank_W(17)
    state = dense_state(strategy, W)
    ranks = {"a": {"q": 1, "v": 4}, "b": {"q": 3, "v": 6}}
    plan = strategy.plan_round(state, ranks)
    # Execute
    _, report = strategy.aggregate(state, plan, random_uploads(ranks, SHAPES, {"a": 1, "b": 1}, gen(18)))
    # Assert
    for c, rm in ranks.items():
        direct = sum(float(torch.linalg.norm(W[m] - naive_trunc(W[m], r)) ** 2) for m, r in rm.items())
        assert report.truncation_errors[c] == pytest.approx(direct, rel=1e-10)
    total = sum(float((w**2).sum()) for w in W.values())
    kept1 = sum(float((torch.linalg.svdvals(W[m])[:1] ** 2).sum()) for m in SHAPES) / total
    assert report.energy_kept[1] == pytest.approx(kept1, rel=1e-10)


# ------------------------------------------------------------------ 7. randomized vs exact


def decaying_W(seed: int, shape: tuple[int, int] = (80, 60), decay: float = 0.5) -> torch.Tensor:
    k = min(shape)
    return matrix_with_spectrum(*shape, [decay**j for j in range(k)], gen(seed))


# Stated tolerance: with σ_k = 2^-k and the default oversampling/power iterations the sketch
# captures the top subspace to ~machine precision; 1e-8 relative leaves ample margin.
RANDOMIZED_TOL = 1e-8


@pytest.mark.parametrize("k", [1, 4, 10])
def test_inv07_randomized_svd_agrees_with_exact(k: int) -> None:
    # Prepare
    W = decaying_W(19)
    cfg = SVDConfig(method="randomized")
    # Execute
    rnd = partial_svd(W, k, cfg, seed=1)
    ex = partial_svd(W, k, SVDConfig(method="exact"))
    # Assert
    assert rnd.method.startswith("randomized(")
    assert rnd.residual <= cfg.tol
    assert torch.allclose(rnd.S, ex.S, rtol=RANDOMIZED_TOL, atol=0)
    for r in range(1, k + 1):
        assert rel_err(rnd.trunc(r), ex.trunc(r)) <= RANDOMIZED_TOL
        assert rnd.tail_energy(r) == pytest.approx(ex.tail_energy(r), rel=RANDOMIZED_TOL)
    assert rnd.total_energy == pytest.approx(ex.total_energy, rel=1e-14)


def test_inv07_randomized_is_deterministic_for_a_seed() -> None:
    W = decaying_W(20)
    cfg = SVDConfig(method="randomized", power_iters=0, max_power_iters=0, tol=10.0)
    a, b = partial_svd(W, 5, cfg, seed=7), partial_svd(W, 5, cfg, seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_inv07_exact_fallback_when_tolerance_cannot_be_met() -> None:
    # Prepare: a flat spectrum (Gaussian matrix), no oversampling, no power iterations
    W = randn(120, 100, g=gen(21))
    cfg = SVDConfig(method="randomized", oversample=0, power_iters=0, max_power_iters=1, tol=1e-6)
    # Execute
    spec = partial_svd(W, 5, cfg)
    # Assert: the sketch's residual was reported and the exact triplets returned
    assert spec.method == "exact(fallback)"
    assert spec.residual > cfg.tol
    ex = partial_svd(W, 5, SVDConfig(method="exact"))
    assert torch.allclose(spec.S, ex.S, rtol=1e-12)
    assert rel_err(spec.trunc(5), ex.trunc(5)) <= 1e-12


def test_inv07_auto_picks_exact_for_small_and_randomized_for_large() -> None:
    W = decaying_W(22, (64, 64))
    assert partial_svd(W, 4).method == "exact"  # min side ≤ exact_max_dim
    spec = partial_svd(W, 4, SVDConfig(exact_max_dim=8, oversample=4))  # 4·(4+4) ≤ 64
    assert spec.method.startswith("randomized(")
    assert partial_svd(W, 20, SVDConfig(exact_max_dim=8, oversample=4)).method == "exact"
    zero = partial_svd(torch.zeros(5, 4, dtype=F64), 3)
    assert zero.method == "zero" and zero.is_zero() and zero.tail_energy(1) == 0.0


def test_inv07_fedhl_round_on_randomized_path_matches_exact_path() -> None:
    # Prepare
    shapes = {"q": (80, 60), "v": (70, 90)}
    W = {m: decaying_W(23 + i, s) for i, (m, s) in enumerate(shapes.items())}
    ranks = {"a": {"q": 2, "v": 6}, "b": {"q": 8, "v": 3}}
    uploads = random_uploads(ranks, shapes, {"a": 3, "b": 4}, gen(25))
    results = {}
    for method in ("exact", "randomized"):
        strategy = FedHL(LoRAScaling(ALPHA), svd=SVDConfig(method=method))
        state = dense_state(strategy, W)
        # Execute
        plan = strategy.plan_round(state, ranks)
        results[method] = strategy.aggregate(state, plan, uploads)
    # Assert
    (new_e, rep_e), (new_r, rep_r) = results["exact"], results["randomized"]
    assert rep_r.svd["methods"][0].startswith("randomized(")
    for m in shapes:
        assert rel_err(new_r.dense[m], new_e.dense[m]) <= RANDOMIZED_TOL
    assert rep_r.weights == pytest.approx(rep_e.weights, rel=1e-6)


# ------------------------------------------------------------------ 8. FlexLoRA


def test_inv08_flexlora_aggregate_is_weighted_product_sum() -> None:
    # Prepare
    strategy = FlexLoRA(LoRAScaling(ALPHA))
    state = dense_state(strategy, full_rank_W(26))
    ranks = {"a": {"q": 1, "v": 2}, "b": {"q": 2, "v": 1}}
    uploads = random_uploads(ranks, SHAPES, {"a": 1, "b": 2}, gen(27))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert: W_g = Σ p_i s_i B_i A_i, p ∝ n_i (W_t is discarded)
    p = {"a": 1 / 3, "b": 2 / 3}
    assert report.weights == pytest.approx(p, rel=1e-14)
    for m in SHAPES:
        assert close(new.dense[m], naive_weighted_products(uploads, m, p, ALPHA))
    # Execute: next round, ranks ≥ rank(W_g) = 3 are lossless; rank 2 is trunc(W_g, 2)
    plan2 = strategy.plan_round(new, {"full": {"q": 3, "v": 3}, "low": {"q": 2, "v": 2}})
    full = strategy.client_start(new, plan2, "full")
    low = strategy.client_start(new, plan2, "low")
    # Assert
    for m in SHAPES:
        assert torch.linalg.matrix_rank(new.dense[m]) == 3
        assert close(lora_scale(ALPHA, 3) * full.factors[m].B @ full.factors[m].A, new.dense[m], 1e-11)
        got = lora_scale(ALPHA, 2) * low.factors[m].B @ low.factors[m].A
        assert close(got, naive_trunc(new.dense[m], 2), 1e-11)
        assert not close(got, new.dense[m], 1e-3)


# ------------------------------------------------------------------ 9. HetLoRA padding


@pytest.mark.parametrize(("r", "r_max"), [(1, 4), (3, 4), (4, 4)])
def test_inv09_padding_preserves_products(r: int, r_max: int) -> None:
    # Prepare
    g = gen(28)
    f = LoRAFactors(randn(6, r, g=g), randn(r, 5, g=g))
    # Execute
    padded = pad_factors(f, r_max)
    # Assert
    assert padded.rank == r_max
    assert torch.equal(padded.B @ padded.A, f.B @ f.A) or close(padded.B @ padded.A, f.B @ f.A)
    assert torch.equal(padded.B[:, :r], f.B) and torch.equal(padded.A[:r], f.A)
    assert not padded.B[:, r:].any() and not padded.A[r:].any()


def test_inv09_padding_beyond_target_raises() -> None:
    g = gen(29)
    with pytest.raises(ValueError, match="exceeds"):
        pad_factors(LoRAFactors(randn(4, 3, g=g), randn(3, 4, g=g)), 2)


def factor_state(strategy, max_rank: int, seed: int):
    """A factor-strategy state with random (non-zero) B and A at max_rank."""
    state = strategy.init_state(SHAPES, max_rank=max_rank, dtype=F64)
    g = gen(seed)
    for m, (d_out, d_in) in SHAPES.items():
        state.factors[m] = LoRAFactors(randn(d_out, max_rank, g=g), randn(max_rank, d_in, g=g))
    state.round = 2
    return state


def test_inv09_hetlora_homogeneous_equal_norms_equals_fedit() -> None:
    # Prepare: rank 3 everywhere; every client's ‖B_i A_i‖_F scaled to 2 on every module
    rank = 3
    ranks = uniform_ranks(["a", "b", "c"], list(SHAPES), dict.fromkeys("abc", rank))
    uploads = random_uploads(ranks, SHAPES, dict.fromkeys("abc", 4), gen(30))
    normed = []
    for u in uploads:
        fs = {m: LoRAFactors(2 * f.B / torch.linalg.norm(f.B @ f.A), f.A) for m, f in u.factors.items()}
        normed.append(ClientUpdate(u.client_id, fs, n_examples=u.n_examples))
    het, fedit = HetLoRA(LoRAScaling(ALPHA)), FedIT(LoRAScaling(ALPHA))
    state = factor_state(het, rank, 31)
    # Execute
    new_h, rep_h = het.aggregate(state, het.plan_round(state, ranks), normed)
    new_f, _ = fedit.aggregate(state, fedit.plan_round(state, ranks), normed)
    # Assert
    assert rep_h.weights == pytest.approx(dict.fromkeys("abc", 1 / 3), rel=1e-12)
    for m in SHAPES:
        assert close(new_h.factors[m].B, new_f.factors[m].B)
        assert close(new_h.factors[m].A, new_f.factors[m].A)
        mean_B = sum(u.factors[m].B for u in normed) / 3
        assert close(new_f.factors[m].B, mean_B)


def test_inv09_hetlora_aggregates_padded_factors() -> None:
    # Prepare: heterogeneous ranks under a rank-4 state
    het = HetLoRA(LoRAScaling(ALPHA))
    state = factor_state(het, 4, 32)
    ranks = {"a": {"q": 1, "v": 4}, "b": {"q": 3, "v": 2}}
    uploads = random_uploads(ranks, SHAPES, {"a": 1, "b": 1}, gen(33))
    plan = het.plan_round(state, ranks)
    # Execute
    new, report = het.aggregate(state, plan, uploads)
    # Assert
    for m in SHAPES:
        w = report.module_weights[m]
        fs = [u.factors[m] for u in uploads]
        expected = average_padded(fs, [w["a"], w["b"]], 4)
        assert close(new.factors[m].B, expected.B) and close(new.factors[m].A, expected.A)
        manual_B = sum(w[u.client_id] * pad_factors(u.factors[m], 4).B for u in uploads)
        assert close(new.factors[m].B, manual_B)


# ------------------------------------------------------------------ 10. FLoRA stacking


def test_inv10_stacked_factors_reproduce_weighted_sum_with_rank_sum() -> None:
    # Prepare
    g = gen(34)
    fs = [LoRAFactors(randn(12, r, g=g), randn(r, 10, g=g)) for r in (1, 3, 2)]
    p = [0.2, 0.5, 0.3]
    # Execute
    L, R = stack_factors(fs, p)
    # Assert
    assert L.shape == (12, 6) and R.shape == (6, 10)
    expected = sum(pi * f.B @ f.A for pi, f in zip(p, fs, strict=True))
    assert close(L @ R, expected)
    assert int(torch.linalg.matrix_rank(L @ R)) == 6


def test_inv10_flora_merges_stacked_update_into_dense_state() -> None:
    # Prepare
    strategy = FLoRA(LoRAScaling(ALPHA))
    W = full_rank_W(35)
    state = dense_state(strategy, W)
    ranks = {"a": {"q": 1, "v": 2}, "b": {"q": 2, "v": 1}, "c": {"q": 1, "v": 1}}
    n = {"a": 1, "b": 1, "c": 2}
    uploads = random_uploads(ranks, SHAPES, n, gen(36))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert
    p = {"a": 0.25, "b": 0.25, "c": 0.5}
    assert report.weights == pytest.approx(p, rel=1e-14)
    for m in SHAPES:
        update = naive_weighted_products(uploads, m, p, ALPHA)
        assert close(new.dense[m], W[m] + update)
        stacked = sum(ranks[c][m] for c in ranks)
        assert int(torch.linalg.matrix_rank(new.dense[m] - W[m])) == stacked
    assert report.global_update_norm == pytest.approx(
        float(sum(torch.linalg.norm(new.dense[m] - W[m]) ** 2 for m in SHAPES)) ** 0.5, rel=1e-10
    )


# ------------------------------------------------------------------ 11. one client


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("fedhl", {}),
        ("fedhl", {"client_view": "full", "start_balance": "balanced"}),
        ("fedhl", {"weights": "paper-literal"}),
        ("flexlora", {}),
        ("flora", {}),
    ],
)
def test_inv11_one_client_dense_strategies(name: str, opts: dict) -> None:
    # Prepare
    strategy = build_strategy(name, alpha=ALPHA, **opts)
    W = full_rank_W(37)
    state = dense_state(strategy, W)
    ranks = {"solo": {"q": 2, "v": 3}}
    (upload,) = random_uploads(ranks, SHAPES, {"solo": 17}, gen(38))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, [upload])
    # Assert
    assert report.weights == {"solo": 1.0}
    assert report.n_eff == 1.0
    for m, r in ranks["solo"].items():
        own = naive_product(ALPHA, upload.factors[m])
        expected = {
            "fedhl": own + (W[m] - naive_trunc(W[m], r)),
            "flexlora": own,
            "flora": W[m] + own,
        }[name]
        assert close(new.dense[m], expected)


@pytest.mark.parametrize("name", ["hetlora", "zeropad", "fedit"])
def test_inv11_one_client_factor_strategies(name: str) -> None:
    # Prepare
    strategy = build_strategy(name, alpha=ALPHA)
    state = factor_state(strategy, 4, 39)
    rank = 4 if name == "fedit" else 2
    ranks = {"solo": dict.fromkeys(SHAPES, rank)}
    (upload,) = random_uploads(ranks, SHAPES, {"solo": 5}, gen(40))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, [upload])
    # Assert: the state becomes the client's factors (zero-padded to the state's rank)
    assert report.weights == pytest.approx({"solo": 1.0}, rel=1e-15)
    for m in SHAPES:
        own = pad_factors(upload.factors[m], 4)
        assert torch.equal(new.factors[m].B, own.B) and torch.equal(new.factors[m].A, own.A)
        if rank == 4:
            assert close(strategy.effective_update(new, m), naive_product(ALPHA, upload.factors[m]))


# ------------------------------------------------------------------ 12. upload size


@pytest.mark.parametrize("name", ["fedhl", "flexlora", "hetlora", "flora", "zeropad"])
def test_inv12_upload_size_is_rank_times_dims(name: str) -> None:
    # Prepare
    strategy = STRATEGIES[name](LoRAScaling(ALPHA))
    state = dense_state(strategy, full_rank_W(41)) if strategy.dense_state else factor_state(strategy, 5, 41)
    ranks = {"a": {"q": 1, "v": 5}, "b": {"q": 4, "v": 2}}
    plan = strategy.plan_round(state, ranks)
    for c, rm in ranks.items():
        # Execute
        start = strategy.client_start(state, plan, c)
        # Assert: what the client trains (and uploads) is r_i (d_in + d_out) values per module
        for m, r in rm.items():
            d_out, d_in = SHAPES[m]
            f = start.factors[m]
            assert f.B.numel() + f.A.numel() == r * (d_in + d_out)
    # and an upload of exactly that size is accepted
    uploads = random_uploads(ranks, SHAPES, {"a": 1, "b": 1}, gen(42))
    snap = snapshot(state)
    new, _ = strategy.aggregate(state, plan, uploads)
    assert new.round == state.round + 1
    assert_unchanged(state, snap)


def test_inv12_flora_downlink_counts_the_dense_update() -> None:
    strategy = FLoRA(LoRAScaling(ALPHA))
    fresh = strategy.init_state(SHAPES, dtype=F64)
    later = dense_state(strategy, full_rank_W(43))
    ranks = {"a": {"q": 2, "v": 3}}
    lora = 2 * (7 + 5) + 3 * (6 + 9)
    assert strategy.client_start(fresh, strategy.plan_round(fresh, ranks), "a").downlink_values() == lora
    dense = 7 * 5 + 6 * 9
    start = strategy.client_start(later, strategy.plan_round(later, ranks), "a")
    assert start.downlink_values() == lora + dense
