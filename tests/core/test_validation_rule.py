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
    validation_evidence,
    validation_outliers,
    validation_threshold,
    validation_window_outliers,
    validation_window_scores,
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


# ------------------------------------------------------------------ the window rule, by hand
# six uploads; the four `c`s sit at ±0.25 (within the margin 0.3: no evidence) and set the lower
# median |effect| to 0.25 as long as the other two are at least that large: 0.5 is 2 medians,
# 0.75 is 3, 2.5 is 10 (every figure exact in binary)
M, SCORE, CAP = 0.3, 5.0, 3.0


def rnd(**effects: float) -> dict[str, float]:
    return {**effects, "c1": 0.25, "c2": -0.25, "c3": 0.25, "c4": -0.25}


def test_evidence_is_the_effect_in_round_medians_clipped_and_zero_within_the_margin() -> None:
    assert validation_evidence(rnd(h=2.5, a=-0.5), M, CAP) == {
        "h": 3.0,  # 10 medians, counted as cap
        "a": -2.0,  # a helpful round is evidence the other way
        "c1": 0.0,
        "c2": 0.0,
        "c3": 0.0,
        "c4": 0.0,
    }
    assert validation_evidence({"a": 0.5, "b": 0.0, "c": 0.0}, 0.01, CAP) == {"a": 3.0, "b": 0.0, "c": 0.0}  # median 0
    assert validation_evidence({"a": 0.5, "b": 0.0}, 0.01, CAP) == {}  # not screened: two uploads
    assert validation_evidence({"a": 0.5, "b": 0.0, "c": math.nan}, 0.01, CAP) == {}


def test_one_bad_round_stays_in_and_harm_round_after_round_is_left_out() -> None:
    # an honest agent's worst round (10 medians) counts `cap`, below `score`: in, whatever came before
    assert validation_window_outliers(rnd(h=2.5, a=0.25), [], M, SCORE, CAP) == []
    assert validation_window_outliers(rnd(h=2.5, a=0.25), [rnd(h=0.25, a=0.25)] * 4, M, SCORE, CAP) == []
    # the same round after helpful ones: the window sums to 3 − 2 − 2 < 5
    assert validation_window_scores(rnd(h=2.5, a=0.25), [rnd(h=-0.5, a=0.25)] * 2, M, CAP)["h"] == -1.0
    # 3 medians in two rounds running: 6 > 5, out; in its first such round (3): in
    hurt = rnd(a=0.75, h=0.25)
    assert validation_window_outliers(hurt, [], M, SCORE, CAP) == []
    assert validation_window_outliers(hurt, [hurt], M, SCORE, CAP) == ["a"]
    assert validation_window_scores(hurt, [hurt, hurt], M, CAP)["a"] == 9.0


def test_a_tie_with_the_score_stays_in() -> None:
    now = rnd(a=0.75, h=0.25)  # 3
    assert validation_window_scores(now, [rnd(a=0.5, h=0.25)], M, CAP)["a"] == 5.0
    assert validation_window_outliers(now, [rnd(a=0.5, h=0.25)], M, SCORE, CAP) == []
    assert validation_window_outliers(now, [rnd(a=0.5, h=0.25)], M, 4.999, CAP) == ["a"]


def test_an_upload_that_does_no_harm_now_is_not_left_out_for_its_past() -> None:
    past = [rnd(a=0.75, h=0.25)] * 4  # 12 medians of harm before
    assert validation_window_outliers(rnd(a=-0.5, h=0.25), past, M, SCORE, CAP) == []  # helpful now
    assert validation_window_outliers(rnd(a=0.26, h=0.25), past, M, SCORE, CAP) == []  # within the margin
    assert validation_window_scores(rnd(a=0.26, h=0.25), past, M, CAP)["a"] == 12.0  # yet its score is high


def test_missing_rounds_and_new_agents_add_no_evidence() -> None:
    hurt = rnd(a=0.75, h=0.25)
    skipped = {k: v for k, v in hurt.items() if k != "a"}  # a took no part
    unscreened = {"a": 0.75, "h": 0.25}  # a round of two uploads is not screened
    for gap in (skipped, unscreened, {}):
        assert validation_window_scores(hurt, [gap, gap], M, CAP)["a"] == 3.0
        assert validation_window_outliers(hurt, [gap, gap], M, SCORE, CAP) == []
        assert validation_window_outliers(hurt, [hurt, gap], M, SCORE, CAP) == ["a"]  # the rounds it took part in
    # a new agent is judged on the rounds it has: one round at 10 medians counts `cap`
    assert validation_window_outliers({**hurt, "new": 2.5}, [hurt, hurt], M, SCORE, CAP) == ["a"]


def test_never_half_the_round_largest_score_first_ties_in_upload_order() -> None:
    now = rnd(a=0.75, b=0.75, d=0.75)  # seven uploads: at most 3 left out
    assert validation_window_outliers(now, [now], M, SCORE, CAP) == ["a", "b", "d"]  # 6 each: upload order
    later = [now, rnd(d=0.75, a=0.25, b=0.25)]  # d: 9, a and b: 6
    assert validation_window_outliers(now, later, M, SCORE, CAP) == ["d", "a", "b"]
    six = {"a": 0.75, "b": 0.75, "d": 0.75, "c1": 0.25, "c2": -0.25, "c3": 0.25}  # six uploads: at most 2
    assert validation_window_outliers(six, [six], M, SCORE, CAP) == ["a", "b"]
    assert validation_window_outliers({"a": 0.75, "b": 0.25}, [{"a": 0.75, "b": 0.25}], M, SCORE, CAP) == []
    assert validation_window_outliers({**now, "c1": math.nan}, [now], M, SCORE, CAP) == []


@pytest.mark.parametrize(
    "effects",
    [[0.001, -0.002, 0.002, 0.003, 0.004, 0.1], [0.3, 0.0, 0.5, 0.4, 0.001], [0.01, 0.01, 0.02, 0.0401], [0.9, -0.9]],
)
def test_no_history_and_a_cap_above_the_score_is_the_one_round_rule(effects: list[float]) -> None:
    named = {f"u{i}": e for i, e in enumerate(effects)}
    for margin, k in [(0.01, 4.0), (0.0, 4.0), (0.01, 1.0)]:
        one = [f"u{i}" for i in validation_outliers(effects, margin, k)]
        assert validation_window_outliers(named, [], margin, k, cap=1e6) == one


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
