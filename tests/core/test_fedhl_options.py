"""FedHL's fast path (one GEMM over stacked factors, one rank-r_max truncation correction)
against the naive reference, and every option ALGORITHMS.md marks configurable."""

from __future__ import annotations

import pytest
import torch
from naive_core import (
    F64,
    dense_state,
    gen,
    lora_scale,
    naive_drift_weights,
    naive_fedhl,
    naive_tail,
    naive_trunc,
    noop_uploads,
    randn,
    random_uploads,
    rel_err,
)

from fedhl.core import (
    WEIGHT_PRESETS,
    FedHL,
    LoRAScaling,
    SVDConfig,
    WeightConfig,
    build_strategy,
)
from fedhl.core.downlink import apply_change, choose_chain, exact_factors, module_sha256

ALPHA = 16.0
SHAPES = {"tall": (11, 4), "wide": (5, 13), "square": (8, 8)}
RANKS = {  # ranks differ per module and per client
    "a": {"tall": 1, "wide": 5, "square": 2},
    "b": {"tall": 4, "wide": 2, "square": 7},
    "c": {"tall": 2, "wide": 1, "square": 3},
}
N = {"a": 40, "b": 25, "c": 35}


def random_W(seed: int) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {m: randn(*s, g=g) for m, s in SHAPES.items()}


def errors_of(W, ranks) -> dict[str, float]:
    return {c: sum(naive_tail(W[m], r) for m, r in rm.items()) for c, rm in ranks.items()}


@pytest.mark.parametrize("rule", ["standard", "rslora"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_matches_naive_reference(rule: str, seed: int) -> None:
    # Prepare
    strategy = FedHL(LoRAScaling(ALPHA, rule), weights=WeightConfig(max_weight_ratio=None))
    W = random_W(100 + seed)
    state = dense_state(strategy, W)
    uploads = random_uploads(RANKS, SHAPES, N, gen(200 + seed))
    plan = strategy.plan_round(state, RANKS)
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert
    e = errors_of(W, RANKS)
    p = dict(zip(RANKS, naive_drift_weights([e[c] for c in RANKS], [N[c] for c in RANKS]), strict=True))
    assert report.weights == pytest.approx(p, rel=1e-10)
    expected = naive_fedhl(W, uploads, dict.fromkeys(SHAPES, p), ALPHA, rule)
    for m in SHAPES:
        assert rel_err(new.dense[m], expected[m]) <= 1e-12
    # per-client ‖Δ_i‖ and the global change, computed densely
    for u in uploads:
        sq = sum(
            float(torch.linalg.norm(lora_scale(ALPHA, f.rank, rule) * f.B @ f.A - naive_trunc(W[m], f.rank)) ** 2)
            for m, f in u.factors.items()
        )
        assert report.update_norms[u.client_id] == pytest.approx(sq**0.5, rel=1e-10)
    change = sum(float(torch.linalg.norm(new.dense[m] - W[m]) ** 2) for m in SHAPES)
    assert report.global_update_norm == pytest.approx(change**0.5, rel=1e-10)


def test_fast_path_with_partial_participation() -> None:
    # Prepare: the plan assigns three clients, only two upload; weights use the uploaders only
    strategy = FedHL(LoRAScaling(ALPHA))
    W = random_W(3)
    state = dense_state(strategy, W)
    plan = strategy.plan_round(state, RANKS)
    uploads = random_uploads({c: RANKS[c] for c in ("a", "c")}, SHAPES, N, gen(4))
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert
    e = errors_of(W, {c: RANKS[c] for c in ("a", "c")})
    p = dict(zip(("a", "c"), naive_drift_weights([e["a"], e["c"]], [N["a"], N["c"]]), strict=True))
    assert report.clients == ["a", "c"]
    assert report.weights == pytest.approx(p, rel=1e-10)
    expected = naive_fedhl(W, uploads, dict.fromkeys(SHAPES, p), ALPHA)
    for m in SHAPES:
        assert rel_err(new.dense[m], expected[m]) <= 1e-12


def test_start_balance_gives_the_same_product_and_the_same_round() -> None:
    # Prepare
    W = random_W(5)
    uploads = random_uploads(RANKS, SHAPES, N, gen(6))
    out = {}
    for balance in ("all_in_B", "balanced"):
        strategy = FedHL(LoRAScaling(ALPHA), start_balance=balance)
        state = dense_state(strategy, W)
        plan = strategy.plan_round(state, RANKS)
        # Execute
        starts = {c: strategy.client_start(state, plan, c) for c in RANKS}
        out[balance] = (starts, strategy.aggregate(state, plan, uploads)[0])
    # Assert
    (s1, new1), (s2, new2) = out["all_in_B"], out["balanced"]
    for c, rm in RANKS.items():
        for m, r in rm.items():
            f1, f2 = s1[c].factors[m], s2[c].factors[m]
            assert rel_err(f2.B @ f2.A, f1.B @ f1.A) <= 1e-12
            assert not torch.allclose(f1.B, f2.B)  # the factors themselves differ
            assert rel_err(lora_scale(ALPHA, r) * f1.B @ f1.A, naive_trunc(W[m], r)) <= 1e-12
    for m in SHAPES:  # the update rule ignores how the start point was factored
        assert torch.equal(new1.dense[m], new2.dense[m])


def test_client_view_full_gives_the_global_model() -> None:
    # Prepare
    strategy = FedHL(LoRAScaling(ALPHA), client_view="full")
    W = random_W(7)
    state = dense_state(strategy, W)
    plan = strategy.plan_round(state, RANKS)
    for c, rm in RANKS.items():
        # Execute
        start = strategy.client_start(state, plan, c)
        # Assert: frozen base residual + start product == W_t, so the client starts at W0 + W_t
        lora = sum(r * sum(SHAPES[m]) for m, r in rm.items())
        assert start.downlink_values() == lora + sum(d_out * d_in for d_out, d_in in SHAPES.values())
        for m, r in rm.items():
            res = start.base_residual[m]
            assert isinstance(res, torch.Tensor) and res.shape == SHAPES[m]
            f = start.factors[m]
            assert rel_err(res + lora_scale(ALPHA, r) * f.B @ f.A, W[m]) <= 1e-12
            gap = torch.linalg.norm(res - (W[m] - naive_trunc(W[m], r)))  # res may be ~0 at full rank
            assert float(gap) <= 1e-12 * float(torch.linalg.norm(W[m]))


@pytest.mark.parametrize("R", [3, 5, 50])
def test_client_view_residual_is_the_rank_R_band(R: int) -> None:
    # Prepare
    strategy = FedHL(LoRAScaling(ALPHA), client_view=f"residual:{R}")
    W = random_W(8)
    state = dense_state(strategy, W)
    plan = strategy.plan_round(state, RANKS)
    for c, rm in RANKS.items():
        # Execute
        start = strategy.client_start(state, plan, c)
        # Assert: residual factors (scale 1) == trunc(W, R) − trunc(W, r); downlink R·(d_in+d_out)
        expected_downlink = 0
        for m, r in rm.items():
            R_eff = min(R, *SHAPES[m])
            expected_downlink += max(r, R_eff) * sum(SHAPES[m])
            if R_eff <= r:
                assert m not in start.base_residual
                continue
            res = start.base_residual[m]
            assert res.rank == R_eff - r
            band = naive_trunc(W[m], R_eff) - naive_trunc(W[m], r)
            assert rel_err(res.B @ res.A, band) <= 1e-12
        assert start.downlink_values() == expected_downlink


@pytest.mark.parametrize("view", ["truncated", "full", "residual:6"])
def test_client_view_does_not_change_the_update_rule(view: str) -> None:
    # Prepare
    W = random_W(9)
    uploads = random_uploads(RANKS, SHAPES, N, gen(10))
    base = FedHL(LoRAScaling(ALPHA))
    strategy = FedHL(LoRAScaling(ALPHA), client_view=view)
    state = dense_state(strategy, W)
    # Execute
    new, _ = strategy.aggregate(state, strategy.plan_round(state, RANKS), uploads)
    ref, _ = base.aggregate(state, base.plan_round(state, RANKS), uploads)
    # Assert
    for m in SHAPES:
        assert torch.allclose(new.dense[m], ref.dense[m], rtol=0, atol=1e-12)


def test_full_view_float32_rounds_the_change_finely() -> None:
    # Prepare: a float32 state, whose change the full view puts on the exact grid
    W = {m: w.float() for m, w in random_W(9).items()}
    uploads = random_uploads(RANKS, SHAPES, N, gen(10))
    base = FedHL(LoRAScaling(ALPHA), compute_dtype=torch.float64)
    strategy = FedHL(LoRAScaling(ALPHA), client_view="full", compute_dtype=torch.float64)
    state = dense_state(strategy, W)
    # Execute
    new, _ = strategy.aggregate(state, strategy.plan_round(state, RANKS), uploads)
    ref, _ = base.aggregate(state, base.plan_round(state, RANKS), uploads)
    # Assert: the same update to a few float32 ulps of the state (grid of 2^-23 for these K)
    for m in SHAPES:
        scale = float(state.dense[m].abs().max() + (ref.dense[m] - state.dense[m]).abs().max())
        assert torch.allclose(new.dense[m], ref.dense[m], rtol=0, atol=scale * 2.0**-19)


def test_full_view_state_is_what_an_agent_rebuilds() -> None:
    # Prepare
    W = {m: w.float() for m, w in random_W(9).items()}
    uploads = random_uploads(RANKS, SHAPES, N, gen(10))
    strategy = FedHL(LoRAScaling(ALPHA), client_view="full")
    state = dense_state(strategy, W)
    plan = strategy.plan_round(state, RANKS)
    held = {m: w.clone() for m, w in state.dense.items()}
    # Execute
    new, _ = strategy.aggregate(state, plan, uploads)
    changes = {m: strategy.round_change(plan, m) for m in SHAPES}
    # Assert: W_{t+1} is exactly apply_change(W_t, change), the agent's computation
    for m in SHAPES:
        c = changes[m]
        assert c is not None and c.B.dtype == torch.float32
        rebuilt = apply_change(held[m], c)
        assert module_sha256(rebuilt) == module_sha256(new.dense[m])
        assert strategy.round_change(plan, m) is None  # handed out once


def test_exact_factors_make_the_product_order_free() -> None:
    # Prepare: terms of very different sizes, as the stacked merge factors have
    g = gen(3)
    L = torch.randn(40, 70, generator=g, dtype=torch.float64) * torch.logspace(2, -6, 70, dtype=torch.float64)
    R = torch.randn(70, 30, generator=g, dtype=torch.float64)
    # Execute
    c = exact_factors(L, R)
    perm = torch.randperm(70, generator=g)
    P = c.B.double() @ c.A.double()
    P_perm = c.B.double()[:, perm] @ c.A.double()[perm]
    P_loop = torch.zeros_like(P)
    for k in range(70):  # one rank-1 term at a time, in another order
        P_loop += c.B.double()[:, k : k + 1] * c.A.double()[k : k + 1]
    # Assert: every summation order gives the same bits, and the rounding is small
    assert torch.equal(P, P_perm) and torch.equal(P, P_loop)
    assert float((P - L @ R).abs().max()) <= 2.0**-20 * float((L @ R).abs().max()) * 70


def test_choose_chain_by_bytes() -> None:
    assert choose_chain(None, 0, {}, 100) == []  # W_0 = 0: made locally
    assert choose_chain(3, 3, {}, 100) == []  # up to date
    assert choose_chain(1, 3, {2: 30, 3: 30}, 100) == [2, 3]
    assert choose_chain(1, 3, {2: 60, 3: 60}, 100) is None  # the chain costs more than the state
    assert choose_chain(1, 3, {3: 10}, 100) is None  # a change is gone
    assert choose_chain(None, 2, {1: 10, 2: 10}, 100) == [1, 2]  # a new agent starts from W_0 = 0
    assert choose_chain(5, 3, {1: 1, 2: 1, 3: 1}, 100) == [1, 2, 3]  # holds a version ahead: from 0


def test_client_view_has_no_residual_at_round_zero() -> None:
    for view in ("full", "residual:4"):
        strategy = FedHL(LoRAScaling(ALPHA), client_view=view)
        state = strategy.init_state(SHAPES, dtype=F64)
        start = strategy.client_start(state, strategy.plan_round(state, RANKS), "a")
        assert start.base_residual == {}
        assert all(not f.B.any() for f in start.factors.values())  # standard LoRA init: B = 0


def test_per_module_weights_use_each_modules_own_errors() -> None:
    # Prepare
    cfg = WeightConfig(per_module=True, max_weight_ratio=None)
    strategy = FedHL(LoRAScaling(ALPHA), weights=cfg)
    W = random_W(11)
    state = dense_state(strategy, W)
    uploads = random_uploads(RANKS, SHAPES, N, gen(12))
    # Execute
    new, report = strategy.aggregate(state, strategy.plan_round(state, RANKS), uploads)
    # Assert
    clients = list(RANKS)
    expected_w = {}
    for m in SHAPES:
        e = [naive_tail(W[m], RANKS[c][m]) for c in clients]
        expected_w[m] = dict(zip(clients, naive_drift_weights(e, [N[c] for c in clients]), strict=True))
    assert report.module_weights is not None
    for m in SHAPES:
        assert report.module_weights[m] == pytest.approx(expected_w[m], rel=1e-10)
    for c in clients:  # the scalar report weight is the mean over modules
        mean = sum(expected_w[m][c] for m in SHAPES) / len(SHAPES)
        assert report.weights[c] == pytest.approx(mean, rel=1e-10)
    expected = naive_fedhl(W, uploads, expected_w, ALPHA)
    for m in SHAPES:
        assert rel_err(new.dense[m], expected[m]) <= 1e-12
    # and they differ from the one-scalar-per-client rule on this example
    scalar, _ = FedHL(LoRAScaling(ALPHA)).aggregate(state, strategy.plan_round(state, RANKS), uploads)
    assert any(rel_err(new.dense[m], scalar.dense[m]) > 1e-6 for m in SHAPES)


def test_scalar_weights_report_has_no_module_weights() -> None:
    strategy = FedHL(LoRAScaling(ALPHA))
    state = dense_state(strategy, random_W(13))
    _, report = strategy.aggregate(state, strategy.plan_round(state, RANKS), random_uploads(RANKS, SHAPES, N, gen(14)))
    assert report.module_weights is None
    assert report.options["weights"]["rule"] == "drift"
    assert report.options["client_view"] == "truncated"


PRESET_CASES = [
    ("uniform", lambda e, n: [1 / 3] * 3),
    ("data-size", lambda e, n: [x / sum(n) for x in n]),
    ("default", lambda e, n: naive_drift_weights(e, n)),
    (
        "paper-literal",
        lambda e, n: naive_drift_weights(e, n, kappa=2.0, eps=1e-6, relative=False, use_n=False),
    ),
]


@pytest.mark.parametrize(("preset", "rule"), PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_weight_presets_via_build_strategy(preset: str, rule) -> None:
    # Prepare
    strategy = build_strategy("fedhl", alpha=ALPHA, weights=preset)
    W = random_W(15)
    state = dense_state(strategy, W)
    uploads = random_uploads(RANKS, SHAPES, N, gen(16))
    # Execute
    new, report = strategy.aggregate(state, strategy.plan_round(state, RANKS), uploads)
    # Assert
    assert strategy.weights == WEIGHT_PRESETS[preset]
    e = errors_of(W, RANKS)
    p = dict(zip(RANKS, rule([e[c] for c in RANKS], [N[c] for c in RANKS]), strict=True))
    assert report.weights == pytest.approx(p, rel=1e-10)
    expected = naive_fedhl(W, uploads, dict.fromkeys(SHAPES, p), ALPHA)
    for m in SHAPES:
        assert rel_err(new.dense[m], expected[m]) <= 1e-12


def test_build_strategy_accepts_weight_dicts_and_svd_dicts() -> None:
    s = build_strategy(
        "fedhl",
        alpha=4,
        scale_rule="rslora",
        weights={"kappa": 2.0, "per_module": True},
        svd={"method": "exact"},
        seed=3,
        start_balance="balanced",
    )
    assert isinstance(s, FedHL)
    assert s.weights == WeightConfig(kappa=2.0, per_module=True)
    assert s.svd == SVDConfig(method="exact")
    assert s.scaling == LoRAScaling(4, "rslora") and s.seed == 3 and s.start_balance == "balanced"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("fedavg", {}, "unknown strategy"),
        ("fedhl", {"weights": "optimal"}, "unknown weight preset"),
        ("flexlora", {"weights": "uniform"}, "'fedhl' only"),
        ("hetlora", {"client_view": "full"}, "hetlora"),
        ("fedhl", {"client_view": "sideways"}, "client_view"),
        ("fedhl", {"client_view": "residual:x"}, "integer"),
        ("fedhl", {"client_view": "residual:0"}, "positive"),
        ("fedhl", {"start_balance": "all_in_A"}, "start_balance"),
        ("flexlora", {"start_balance": "all_in_A"}, "start_balance"),
        ("fedhl", {"weights": {"kappa": 3.0}}, "kappa"),
        ("fedhl", {"weights": {"eps": 0.0}}, "eps"),
        ("fedhl", {"weights": {"eps_mode": "scaled"}}, "eps_mode"),
        ("fedhl", {"weights": {"rule": "best"}}, "rule"),
        ("fedhl", {"weights": {"max_weight_ratio": 0.5}}, "max_weight_ratio"),
        ("fedhl", {"svd": {"method": "lanczos"}}, "SVD method"),
        ("fedhl", {"svd": {"power_iters": 5, "max_power_iters": 2}}, "max_power_iters"),
        ("fedhl", {"compute_dtype": torch.float16}, "compute_dtype"),
        ("fedhl", {"scale_rule": "sqrt"}, "scale rule"),
    ],
)
def test_build_strategy_rejects_bad_options(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_strategy(name, alpha=ALPHA, **kwargs)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_build_strategy_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        build_strategy("fedhl", alpha=alpha)


def test_plan_round_rejects_bad_rank_maps() -> None:
    strategy = FedHL(LoRAScaling(ALPHA))
    state = dense_state(strategy, random_W(17))
    good = {"tall": 1, "wide": 1, "square": 1}
    with pytest.raises(ValueError, match="at least one client"):
        strategy.plan_round(state, {})
    with pytest.raises(ValueError, match="missing"):
        strategy.plan_round(state, {"a": {"tall": 1}})
    with pytest.raises(ValueError, match="unknown modules"):
        strategy.plan_round(state, {"a": {**good, "extra": 1}})
    for bad in (0, 5, 2.0):  # "tall" is (11, 4): rank 5 exceeds min(d_out, d_in)
        with pytest.raises(ValueError, match="ranks must be integers"):
            strategy.plan_round(state, {"a": {**good, "tall": bad}})


def test_noop_round_over_several_rounds_keeps_W() -> None:
    # Prepare: three consecutive no-op rounds with changing rank assignments
    strategy = FedHL(LoRAScaling(ALPHA), weights=WeightConfig(per_module=True))
    W = random_W(18)
    state = dense_state(strategy, W)
    for i, ranks in enumerate([RANKS, {"x": {"tall": 4, "wide": 5, "square": 8}}, {"a": RANKS["c"], "b": RANKS["a"]}]):
        plan = strategy.plan_round(state, ranks)
        # Execute
        state, report = strategy.aggregate(state, plan, noop_uploads(strategy, state, plan, dict.fromkeys(ranks, 3)))
        # Assert
        assert report.round == i + 1
        for m in SHAPES:
            assert torch.allclose(state.dense[m], W[m], rtol=0, atol=1e-12)
