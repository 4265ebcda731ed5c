"""The validation screen's pure parts: the decision rule (leave-one-out effects in, positions
out) by hand, and `Strategy.aggregate(left_out=...)`, which leaves an upload out whole as if it
had not taken part (issue 12; aggregation/validate.py measures the effects)."""

from __future__ import annotations

import math

import pytest
import torch
from naive_core import F64, gen, matrix_with_spectrum, randn

from fedhl.core import AggregationError, ClientUpdate, DropRecord, LoRAFactors, build_strategy
from fedhl.core.defence import (
    VALIDATION_REASON,
    check_validation_rule,
    is_strike,
    validation_outliers,
    validation_threshold,
)
from fedhl.round_report import RoundReport

ALPHA = 8.0
SHAPES = {"q": (8, 6), "v": (5, 7)}
ALL = ["fedhl", "flexlora", "flora", "hetlora", "zeropad", "fedit"]


# ------------------------------------------------------------------ the rule, by hand
def test_threshold_is_the_larger_of_margin_and_k_times_the_median_effect() -> None:
    # |e| sorted: 0.001 0.002 0.002 0.003 0.004 0.1 → lower median 0.002; 4 × 0.002 = 0.008 < margin 0.01
    effects = [0.002, -0.001, 0.003, -0.002, 0.1, -0.004]
    assert validation_threshold(effects, 0.01, 4.0) == pytest.approx(0.01)
    assert validation_outliers(effects, 0.01, 4.0) == [4]
    # margin 0: k × median decides (0.008); 0.1 is above, nothing else
    assert validation_threshold(effects, 0.0, 4.0) == pytest.approx(0.008)
    assert validation_outliers(effects, 0.0, 4.0) == [4]
    # k = 1: 0.003 > 0.002 too; largest effect first
    assert validation_outliers(effects, 0.0, 1.0) == [4, 2]


def test_only_harm_counts_a_helpful_outlier_stays() -> None:
    # leaving client 1 out *raises* the loss by 0.5: it helps the round, it stays
    assert validation_outliers([0.001, -0.5, 0.002, 0.0], 0.01, 4.0) == []


def test_one_and_two_uploads_are_never_screened() -> None:
    assert validation_threshold([0.9], 0.0, 1.0) == math.inf
    assert validation_outliers([0.9], 0.0, 1.0) == []
    assert validation_outliers([0.9, -0.9], 0.0, 1.0) == []
    assert validation_outliers([], 0.0, 1.0) == []


def test_a_tie_with_the_threshold_stays_in() -> None:
    # lower median of |e| = 0.01 → threshold 0.04 = e of client 3: not strictly above
    assert validation_threshold([0.01, 0.01, 0.02, 0.04], 0.0, 4.0) == pytest.approx(0.04)
    assert validation_outliers([0.01, 0.01, 0.02, 0.04], 0.0, 4.0) == []
    assert validation_outliers([0.01, 0.01, 0.02, 0.0401], 0.0, 4.0) == [3]
    # equal effects above the threshold: by position
    assert validation_outliers([0.5, 0.0, 0.5, 0.0, 0.0, 0.0], 0.01, 4.0) == [0, 2]


def test_never_more_than_a_minority() -> None:
    # 5 uploads: at most 2 left out, the largest effects
    assert validation_outliers([0.3, 0.0, 0.5, 0.4, 0.001], 0.01, 1.0) == [2, 3]
    # 4 uploads: at most 1; 3 uploads: at most 1
    assert validation_outliers([0.3, 0.5, 0.0, 0.0], 0.01, 1.0) == [1]
    assert validation_outliers([0.3, 0.0, 0.0], 0.01, 1.0) == [0]
    # a harmful half: the lower median of |e| is still an honest 0, and two of the three go
    assert validation_outliers([0.3, 0.4, 0.5, 0.0, 0.0, 0.0], 0.01, 4.0) == [2, 1]
    # a harmful majority sets the median itself: 4 × 0.3 = 1.2, nobody is above
    assert validation_outliers([0.3, 0.4, 0.5, 0.3, 0.0, 0.0], 0.01, 4.0) == []


def test_an_effect_that_is_not_finite_turns_the_screen_off_for_the_round() -> None:
    assert validation_threshold([0.5, 0.0, math.nan, 0.0], 0.01, 4.0) == math.inf
    assert validation_outliers([0.5, 0.0, math.nan, 0.0], 0.01, 4.0) == []


@pytest.mark.parametrize(("margin", "k"), [(-0.1, 4.0), (math.nan, 4.0), (0.01, 0.5), (0.01, math.inf)])
def test_the_rule_is_validated(margin: float, k: float) -> None:
    with pytest.raises(ValueError, match="validation"):
        check_validation_rule(margin, k)


def test_a_validation_leave_out_counts_a_strike() -> None:
    assert is_strike(VALIDATION_REASON, None, 30.0)
    rr = RoundReport(
        strategy="fedhl",
        round=0,
        clients=["a", "b", "x"],
        weights={},
        truncation_errors={},
        energy_kept={},
        update_norms={},
        global_update_norm=0.0,
        n_eff=2.0,
        dropped=[{"client": "x", "module": "*", "reason": VALIDATION_REASON, "effect": 0.2, "threshold": 0.01}],
    )
    assert rr.struck(3.0, 30.0, modules=2) == {"x"}
    assert rr.offences() == {"x": [VALIDATION_REASON]}


# ------------------------------------------------------------------ left_out in the merge
def round_of(name: str):
    """Four clients at ranks 1-3 (one rank for FedIT), equal sizes (the size bound then counts
    the same sizes with or without any one of them), a non-trivial state at round 2."""
    strategy = build_strategy(name, alpha=ALPHA, min_cosine=None)
    state = strategy.init_state(SHAPES, {"head": torch.zeros(3, dtype=F64)}, max_rank=3, dtype=F64)
    g = gen(5)
    for m, (d_out, d_in) in SHAPES.items():
        if strategy.dense_state:
            state.dense[m] = matrix_with_spectrum(d_out, d_in, [2.0, 1.0, 0.5], g).to(F64)
        else:
            state.factors[m] = LoRAFactors(randn(d_out, 3, g=g).to(F64), randn(3, d_in, g=g).to(F64))
    state.round = 2
    clients = ["a", "b", "c", "x"]
    ranks = {c: (3 if name == "fedit" else 1 + i % 3) for i, c in enumerate(clients)}
    plan = strategy.plan_round(state, {c: dict.fromkeys(SHAPES, r) for c, r in ranks.items()})
    ups = []
    for i, c in enumerate(clients):
        start = strategy.client_start(state, plan, c)
        h = gen(30 + i)
        fs = {
            m: LoRAFactors(f.B + 0.1 * randn(*f.B.shape, g=h).to(F64), f.A + 0.1 * randn(*f.A.shape, g=h).to(F64))
            for m, f in start.factors.items()
        }
        head = start.extras["head"] + 0.1 * randn(3, g=h).to(F64)
        ups.append(ClientUpdate(c, fs, n_examples=100, extras={"head": head}))
    return strategy, state, plan, ups


@pytest.mark.parametrize("name", ALL)
def test_left_out_merges_as_if_the_upload_had_not_taken_part(name: str) -> None:
    strategy, state, plan, ups = round_of(name)
    rec = DropRecord("x", "*", VALIDATION_REASON, "by hand", effect=0.3, threshold=0.01)
    new, report = strategy.aggregate(state, plan, ups, left_out=[rec])
    alone, _ = strategy.aggregate(state, plan, ups[:-1])
    for k, v in alone.tensors().items():  # every module and the head
        torch.testing.assert_close(new.tensors()[k], v, rtol=1e-12, atol=1e-12)
    assert report.dropped == [rec]  # named once, as a whole upload, first
    assert report.clients == ["a", "b", "c", "x"]
    assert report.weights["x"] == 0.0 and report.effective_weights["x"] == 0.0


@pytest.mark.parametrize("name", ["fedhl", "flexlora"])
def test_left_out_is_checked(name: str) -> None:
    strategy, state, plan, ups = round_of(name)
    with pytest.raises(AggregationError, match="without an upload"):
        strategy.aggregate(state, plan, ups, left_out=[DropRecord("nobody", "*", VALIDATION_REASON)])
    every = [DropRecord(u.client_id, "*", VALIDATION_REASON) for u in ups]
    with pytest.raises(AggregationError, match="no upload"):
        strategy.aggregate(state, plan, ups, left_out=every)


@pytest.mark.parametrize("name", ["fedhl", "hetlora"])
def test_no_left_out_is_the_plain_merge(name: str) -> None:
    strategy, state, plan, ups = round_of(name)
    a, ra = strategy.aggregate(state, plan, ups)
    b, rb = strategy.aggregate(state, plan, ups, left_out=())
    for k, v in a.tensors().items():
        assert torch.equal(b.tensors()[k], v), k
    assert ra.weights == rb.weights and rb.dropped == []
