"""Property-based tests (hypothesis) over shapes, client counts and per-module ranks.

Random W_t has a controlled spectrum (σ ∈ [0.5, 3], rank drawn, 0 = round 0) so that real
truncation errors are well above rounding noise. Examples are kept few and small so the
suite stays fast.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_core import (
    F64,
    dense_state,
    gen,
    matrix_with_spectrum,
    naive_drift_weights,
    naive_fedhl,
    naive_tail,
    naive_weighted_products,
    noop_uploads,
    random_uploads,
    rel_err,
)

from fedhl.core import (
    ClipConfig,
    FedHL,
    FLoRA,
    LoRAFactors,
    LoRAScaling,
    WeightConfig,
    cap_weights,
    stack_factors,
)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
ALPHA = 8.0


@st.composite
def rounds(draw, max_modules: int = 3, max_clients: int = 5):
    """(W per module, shapes, ranks per client per module, n_examples, seed)."""
    n_mod = draw(st.integers(1, max_modules))
    shapes = {f"m{j}": (draw(st.integers(2, 24)), draw(st.integers(2, 24))) for j in range(n_mod)}
    n_cli = draw(st.integers(1, max_clients))
    ranks = {f"c{i}": {m: draw(st.integers(1, min(s))) for m, s in shapes.items()} for i in range(n_cli)}
    n = {c: draw(st.integers(1, 1000)) for c in ranks}
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    W = {}
    for m, s in shapes.items():
        rank_W = draw(st.integers(0, min(s)))
        sig = sorted((0.5 + 2.5 * torch.rand(rank_W, generator=g, dtype=F64)).tolist(), reverse=True)
        W[m] = matrix_with_spectrum(*s, sig, g)
    return W, shapes, ranks, n, seed


WEIGHT_CONFIGS = st.sampled_from(
    [
        WeightConfig(),
        WeightConfig(max_weight_ratio=None),
        WeightConfig(kappa=2.0),
        WeightConfig.paper_literal(),
        WeightConfig(eps=0.1, eps_mode="absolute", use_data_size=False),
        WeightConfig(rule="uniform", max_weight_ratio=None),
        WeightConfig(per_module=True),
    ]
)


@SETTINGS
@given(
    case=rounds(),
    cfg=WEIGHT_CONFIGS,
    balance=st.sampled_from(["all_in_B", "balanced"]),
    view=st.sampled_from(["truncated", "full", "residual:3"]),
)
def test_prop_fedhl_noop_round_is_identity(case, cfg, balance, view) -> None:
    # Prepare
    W, _, ranks, n, _ = case
    strategy = FedHL(LoRAScaling(ALPHA), weights=cfg, start_balance=balance, client_view=view)
    state = dense_state(strategy, W)
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, noop_uploads(strategy, state, plan, n))
    # Assert
    for m, w in W.items():
        assert torch.allclose(new.dense[m], w, rtol=0, atol=1e-12)
    assert sum(report.weights.values()) == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(case=rounds(), cfg=WEIGHT_CONFIGS)
def test_prop_fedhl_decomposition_matches_naive_reference(case, cfg) -> None:
    # Prepare
    W, shapes, ranks, n, seed = case
    strategy = FedHL(LoRAScaling(ALPHA), weights=cfg, clip=ClipConfig.off())  # the math, no update bound
    state = dense_state(strategy, W)
    uploads = random_uploads(ranks, shapes, n, gen(seed + 1))
    plan = strategy.plan_round(state, ranks)
    # Execute
    new, report = strategy.aggregate(state, plan, uploads)
    # Assert: weights from the naive formula (with the library's tested cap), then the merge
    clients = list(ranks)
    nn = [n[c] for c in clients]

    def expected_weights(errors: list[float]) -> list[float]:
        if cfg.rule == "uniform":
            p = [1 / len(clients)] * len(clients)
        else:
            p = naive_drift_weights(
                errors,
                nn,
                kappa=cfg.kappa,
                eps=cfg.eps,
                relative=cfg.eps_mode == "relative",
                use_n=cfg.use_data_size,
            )
        if cfg.max_weight_ratio is not None:
            p = cap_weights(torch.tensor(p, dtype=F64), cfg.max_weight_ratio).tolist()
        return p

    tails = {c: {m: naive_tail(W[m], r) for m, r in ranks[c].items()} for c in clients}
    if cfg.per_module:
        p = {m: dict(zip(clients, expected_weights([tails[c][m] for c in clients]), strict=True)) for m in W}
    else:
        scalar = expected_weights([sum(tails[c].values()) for c in clients])
        p = {m: dict(zip(clients, scalar, strict=True)) for m in W}
    for m in W:
        got = report.module_weights[m] if cfg.per_module else report.weights
        assert got == pytest.approx(p[m], rel=1e-8, abs=1e-12)
    expected = naive_fedhl(W, uploads, p, ALPHA)
    for m in W:
        scale = 1.0 + float(torch.linalg.norm(expected[m]))
        assert float(torch.linalg.norm(new.dense[m] - expected[m])) <= 1e-10 * scale


@SETTINGS
@given(case=rounds())
def test_prop_flora_stacking_is_exact_with_rank_sum(case) -> None:
    # Prepare
    W, shapes, ranks, n, seed = case
    strategy = FLoRA(LoRAScaling(ALPHA), max_weight_ratio=None, clip=ClipConfig.off())  # the paper's merge
    state = dense_state(strategy, W)
    uploads = random_uploads(ranks, shapes, n, gen(seed + 2))
    p = {c: n[c] / sum(n.values()) for c in ranks}
    # Execute
    new, report = strategy.aggregate(state, strategy.plan_round(state, ranks), uploads)
    # Assert
    assert report.weights == pytest.approx(p, rel=1e-12)
    for m in W:
        fs = [u.factors[m] for u in uploads]
        L, R = stack_factors(fs, [p[u.client_id] for u in uploads])
        assert L.shape[1] == R.shape[0] == sum(f.rank for f in fs)
        dense = sum(p[u.client_id] * u.factors[m].B @ u.factors[m].A for u in uploads)
        assert rel_err(L @ R, dense) <= 1e-12
        update = naive_weighted_products(uploads, m, p, ALPHA)
        assert float(torch.linalg.norm(new.dense[m] - W[m] - update)) <= 1e-10 * (
            1.0 + float(torch.linalg.norm(update))
        )


ERRORS = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=6)


@SETTINGS
@given(errors=ERRORS, data=st.data(), cfg=WEIGHT_CONFIGS)
def test_prop_weights_are_a_distribution_and_permutation_equivariant(errors, data, cfg) -> None:
    # Prepare
    n = data.draw(st.lists(st.integers(1, 1000), min_size=len(errors), max_size=len(errors)))
    perm = data.draw(st.permutations(range(len(errors))))
    e, nn = torch.tensor(errors, dtype=F64), torch.tensor(n, dtype=F64)
    idx = torch.tensor(perm)
    # Execute
    p = cfg.compute(e, nn)
    q = cfg.compute(e[idx], nn[idx])
    # Assert
    assert bool((p >= 0).all())
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(q, p[idx], rtol=1e-12, atol=1e-15)
    if cfg.max_weight_ratio is not None:
        assert bool((p <= cfg.max_weight_ratio / len(p) * (1 + 1e-9)).all())  # relative to uniform


@SETTINGS
@given(errors=ERRORS, n=st.integers(1, 1000), cfg=WEIGHT_CONFIGS)
def test_prop_weights_monotone_in_error_at_equal_data(errors, n, cfg) -> None:
    # equal n_i: smaller error (higher rank) ⇒ weight at least as large
    p = cfg.compute(torch.tensor(errors, dtype=F64), torch.full((len(errors),), float(n)))
    for i, ei in enumerate(errors):
        for j, ej in enumerate(errors):
            if ei < ej:
                assert float(p[i]) >= float(p[j]) * (1 - 1e-12)
            if ei == ej:
                assert float(p[i]) == pytest.approx(float(p[j]), rel=1e-12)


@SETTINGS
@given(
    errors=st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=5),
    n=st.lists(st.integers(1, 1000), min_size=6, max_size=6),
)
def test_prop_zero_error_client_share_is_bounded_under_default(errors, n) -> None:
    # Client 0 has e = 0, the others positive errors. Uncapped default rule:
    # p_0/p_j = (n_0/n_j)(e_j + ē)/ē ≤ (N + 1) n_0/n_j; capped: p_0 ≤ 4/N.
    e = torch.tensor([0.0, *errors], dtype=F64)
    nn = torch.tensor(n[: len(e)], dtype=F64)
    N = len(e)
    uncapped = WeightConfig(max_weight_ratio=None).compute(e, nn)
    for j in range(1, N):
        assert float(uncapped[0] / uncapped[j]) <= (N + 1) * float(nn[0] / nn[j]) * (1 + 1e-12)
    capped = WeightConfig().compute(e, nn)
    assert float(capped[0]) <= 4 / N * (1 + 1e-12)


@SETTINGS
@given(case=rounds(max_modules=2))
def test_prop_start_factors_reproduce_truncation(case) -> None:
    # invariant 1 over random shapes/ranks, both balances
    W, _, ranks, _, _ = case
    for balance in ("all_in_B", "balanced"):
        strategy = FedHL(LoRAScaling(ALPHA, "rslora"), start_balance=balance)
        state = dense_state(strategy, W)
        plan = strategy.plan_round(state, ranks)
        for c, rm in ranks.items():
            start = strategy.client_start(state, plan, c)
            for m, r in rm.items():
                f: LoRAFactors = start.factors[m]
                expected = plan.spectra[m].trunc(r) if not plan.spectra[m].is_zero() else 0 * W[m]
                got = strategy.scaling.scale(r) * f.B @ f.A
                assert float(torch.linalg.norm(got - expected)) <= 1e-12 * (1 + float(torch.linalg.norm(W[m])))
                assert tail_matches(W[m], r, plan.spectra[m].tail_energy(r))


def tail_matches(W: torch.Tensor, r: int, tail: float) -> bool:
    return abs(tail - naive_tail(W, r)) <= 1e-10 * (1 + float((W**2).sum()))
