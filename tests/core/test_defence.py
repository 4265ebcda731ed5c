"""What one hostile upload can do to a round's math (issue 12): reported sizes bounded by the
round's median, weight caps that ignore client-reported sizes, the per-module update-size
bound, attribution in the report."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from naive_core import F64, gen, matrix_with_spectrum, randn

from fedhl.core import (
    ClientUpdate,
    ClipConfig,
    GlobalState,
    LoRAFactors,
    Strategy,
    WeightConfig,
    build_strategy,
    clip_bound,
    lower_median,
)
from fedhl.core.defence import (
    DIRECTION_REASON,
    MIN_COSINE,
    SIZE_K,
    bound_excess,
    bounded_sizes,
    cosines_to_others,
    direction_outliers,
    direction_threshold,
    is_strike,
    lowrank_cosines_to_others,
    lowrank_gram,
    vector_gram,
)
from fedhl.jobspec import JobSpec
from fedhl.round_report import RoundReport

ALPHA = 8.0
SHAPES = {"q": (8, 6), "v": (5, 7), "o": (6, 6)}
HONEST = ["h1", "h2", "h3", "h4", "h5"]
ALL = ["fedhl", "flexlora", "flora", "hetlora", "zeropad", "fedit"]
DENSE = ["fedhl", "flexlora", "flora"]


# the smallest job spec: the defence block's defaults and their switches
JOB = {
    "name": "j",
    "base_model": "m",
    "target_modules": ["q"],
    "module_shapes": {"q": [8, 6]},
    "rank_set": [2],
    "rounds": 1,
}

def setup(name: str, ranks: dict[str, int], dtype: torch.dtype = F64, **opts):
    """Strategy, a non-trivial state at round 3 with a 'head' extra, and its plan."""
    strategy = build_strategy(name, alpha=ALPHA, **opts)
    state = strategy.init_state(SHAPES, {"head": torch.zeros(4, dtype=dtype)}, max_rank=3, dtype=dtype)
    g = gen(11)
    for m, (d_out, d_in) in SHAPES.items():
        if strategy.dense_state:
            state.dense[m] = matrix_with_spectrum(d_out, d_in, [3.0, 2.0, 1.0, 0.5, 0.25], g).to(dtype)
        else:
            state.factors[m] = LoRAFactors(randn(d_out, 3, g=g).to(dtype), randn(3, d_in, g=g).to(dtype))
    state.round = 3
    plan = strategy.plan_round(state, {c: dict.fromkeys(SHAPES, r) for c, r in ranks.items()})
    return strategy, state, plan


def trained(strategy: Strategy, state: GlobalState, plan, client: str, n: int, seed: int, step: float = 0.1):
    """An honest-looking upload: the client's start factors plus a small random change."""
    start = strategy.client_start(state, plan, client)
    g = gen(seed)
    factors = {
        m: LoRAFactors(
            f.B + step * randn(*f.B.shape, g=g).to(f.B.dtype), f.A + step * randn(*f.A.shape, g=g).to(f.A.dtype)
        )
        for m, f in start.factors.items()
    }
    head = start.extras["head"] + step * randn(4, g=g).to(start.extras["head"].dtype)
    return ClientUpdate(client, factors, n_examples=n, extras={"head": head})


def noop(strategy: Strategy, state: GlobalState, plan, client: str, n: int) -> ClientUpdate:
    start = strategy.client_start(state, plan, client)
    return ClientUpdate(client, dict(start.factors), n_examples=n, extras=dict(start.extras))


def scaled_change(strategy, state, plan, u: ClientUpdate, factor: float) -> ClientUpdate:
    """The same upload with its changes (B' − B⁰, A' − A⁰ and the head's) multiplied by `factor`."""
    start = strategy.client_start(state, plan, u.client_id)
    fs = {
        m: LoRAFactors(s.B + factor * (u.factors[m].B - s.B), s.A + factor * (u.factors[m].A - s.A))
        for m, s in start.factors.items()
    }
    head = start.extras["head"] + factor * (u.extras["head"] - start.extras["head"])
    return replace(u, factors=fs, extras={"head": head})


def honest_round(name: str, dtype=F64, **opts):
    ranks = {c: 1 + i % 3 for i, c in enumerate(HONEST)} if name != "fedit" else dict.fromkeys(HONEST, 3)
    ranks["x"] = 2 if name != "fedit" else 3
    strategy, state, plan = setup(name, ranks, dtype, **opts)
    ups = [trained(strategy, state, plan, c, 100 + 10 * i, seed=20 + i) for i, c in enumerate(HONEST)]
    return strategy, state, plan, ups


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.to(F64)))


# ------------------------------------------------------------------ helpers by hand


def test_lower_median_and_bound_by_hand() -> None:
    assert lower_median([5.0, 1.0, 3.0]) == 3.0
    assert lower_median([1.0, 1000.0]) == 1.0  # one of two cannot move it
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert clip_bound([1.0, 2.0, 100.0], 3.0) == 6.0
    assert clip_bound([0.0, 0.0, 5.0], 3.0) == math.inf  # nobody changed anything: no scale


@pytest.mark.parametrize("bad", [{"k": 0.5}, {"k": float("inf")}, {"action": "drop"}])
def test_clip_config_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="clip"):
        ClipConfig(**bad)
    with pytest.raises(ValueError, match="clip"):
        build_strategy("fedhl", alpha=ALPHA, clip=bad)


def test_max_weight_ratio_goes_inside_fedhl_weights() -> None:
    with pytest.raises(ValueError, match="inside its weight options"):
        build_strategy("fedhl", alpha=ALPHA, max_weight_ratio=2.0)
    assert build_strategy("flexlora", alpha=ALPHA, max_weight_ratio=2.0).max_weight_ratio == 2.0
    assert build_strategy("fedhl", alpha=ALPHA, weights={"max_weight_ratio": 2.0}).max_weight_ratio == 2.0


# ------------------------------------------------------------------ lying data size


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("fedhl", {"weights": {"rule": "drift", "max_weight_ratio": 2.0}}),
        ("fedhl", {"weights": {"rule": "data_size", "max_weight_ratio": 2.0}}),
        ("fedhl", {"weights": {"rule": "uniform", "max_weight_ratio": 2.0}}),
        ("fedhl", {"weights": {"per_module": True, "max_weight_ratio": 2.0}}),
        ("flexlora", {"max_weight_ratio": 2.0}),
        ("flora", {"max_weight_ratio": 2.0}),
        ("zeropad", {"max_weight_ratio": 2.0}),
        ("fedit", {"max_weight_ratio": 2.0}),
        ("hetlora", {"max_weight_ratio": 2.0}),
    ],
)
def test_liar_with_huge_n_gets_at_most_ratio_over_n_and_so_does_its_head(name: str, opts) -> None:
    # Prepare: five honest clients and x, an honest-looking upload claiming 10**12 examples
    strategy, state, plan, ups = honest_round(name, clip="off", size_k=None, **opts)  # the cap alone
    liar = trained(strategy, state, plan, "x", 10**12, seed=99)
    liar = replace(liar, extras={"head": torch.full((4,), 1.0, dtype=F64)})  # honest heads are ~0.1
    cap = 2.0 / 6
    # Execute
    new, report = strategy.aggregate(state, plan, [*ups, liar])
    # Assert: every module's weight and the scalar one within the cap; the head too
    for m_weights in (report.module_weights or {"all": report.weights}).values():
        assert m_weights["x"] <= cap * (1 + 1e-12)
        assert sum(m_weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert report.effective_weights["x"] <= cap * (1 + 1e-12)
    if name != "hetlora" and opts.get("weights", {}).get("rule") != "uniform":
        assert report.weights["x"] == pytest.approx(cap, rel=1e-9)  # the liar sits at the cap
    # the head: x's share of the average is at most the cap (its value 1 against honest ~0.1)
    p_head = (new.extras["head"] - honest_head_average(ups, strategy)) / (1.0 - honest_head_average(ups, strategy))
    assert p_head.tolist() == pytest.approx([cap] * 4, rel=1e-9)  # capped data size, not 10**12
    assert not [c for c in report.clipped if c.client != "x"]  # honest clients untouched


def honest_head_average(ups, strategy) -> torch.Tensor:
    """What the head would be without x, for reading x's share back out of the average."""
    n = torch.tensor([float(u.n_examples) for u in ups], dtype=F64)
    p = n / n.sum()
    return torch.stack([pi * u.extras["head"] for pi, u in zip(p.tolist(), ups, strict=True)]).sum(0)


def test_old_cap_semantics_would_have_handed_the_liar_everything() -> None:
    # under the uniform rule the cap binds nothing; under data-size weights (no cap) the liar
    # takes ~1 — the reason the cap is relative to uniform, not to the claimed data share
    strategy, state, plan, ups = honest_round("fedhl", weights={"rule": "uniform"})
    liar = trained(strategy, state, plan, "x", 10**12, seed=99)
    _, report = strategy.aggregate(state, plan, [*ups, liar])
    assert report.weights["x"] == pytest.approx(1 / 6, rel=1e-12)
    uncapped, state, plan, ups = honest_round(
        "fedhl", weights={"rule": "data_size", "max_weight_ratio": None}, size_k=None
    )
    _, report = uncapped.aggregate(state, plan, [*ups, trained(uncapped, state, plan, "x", 10**12, seed=99)])
    assert report.weights["x"] > 0.999999


# ------------------------------------------------------------------ reported sizes


def test_bounded_sizes_by_hand() -> None:
    # the lower median of six claims is the third smallest (120): the bound is 2 × 120
    sizes, bound = bounded_sizes([100, 110, 120, 130, 140, 2**63 - 1], 2.0)
    assert bound == 240.0
    assert sizes == [100.0, 110.0, 120.0, 130.0, 140.0, 240.0]
    assert bounded_sizes([100, 110, 120, 130, 140, 2**63 - 1], None) == (
        [100.0, 110.0, 120.0, 130.0, 140.0, float(2**63 - 1)],
        math.inf,
    )
    assert bounded_sizes([5], 2.0) == ([5.0], 10.0)  # one client: its own claim bounds nothing
    assert bounded_sizes([100, 10**12], 2.0) == ([100.0, 200.0], 200.0)  # two: the smaller claim
    assert bounded_sizes([10**12, 100], 1.0) == ([100.0, 100.0], 100.0)
    # one liar cannot move the bound: the same whatever it claims (N ≥ 3)
    for claim in (1, 10**6, 2**63 - 1):
        assert bounded_sizes([300, 200, 100, claim], 3.0)[1] == (300.0 if claim < 200 else 600.0)


@pytest.mark.parametrize("bad", [0.5, float("inf"), float("nan"), 0])
def test_size_k_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="size_k"):
        build_strategy("flexlora", alpha=ALPHA, size_k=bad)


@pytest.mark.parametrize("name", ALL)
def test_a_size_liar_weighs_what_a_client_at_size_k_times_the_median_would(name: str) -> None:
    # Prepare: five honest clients (100..140 examples) and x, an honest-looking upload whose
    # claim runs from the job's default bound up to int64's largest; the cap is off so that the
    # size bound alone is measured, and a reference x that honestly reports 2 × median
    uncapped = {"weights": {"max_weight_ratio": None}} if name == "fedhl" else {"max_weight_ratio": None}
    strategy, state, plan, ups = honest_round(name, clip="off", size_k=2.0, **uncapped)
    base = trained(strategy, state, plan, "x", 240, seed=99)
    base = replace(base, extras={"head": torch.full((4,), 1.0, dtype=F64)})  # honest heads are ~0.1
    median = 120.0  # the lower median of 100, 110, 120, 130, 140 and x's claim
    ref, ref_report = strategy.aggregate(state, plan, [*ups, base])
    for claim in (10**6, 10**12, 2**63 - 1):
        # Execute
        new, report = strategy.aggregate(state, plan, [*ups, replace(base, n_examples=claim)])
        # Assert: the same merge as an honest client at 2 × median, bit for bit, and named
        assert report.weights == ref_report.weights
        for k, v in new.tensors().items():
            assert torch.equal(v, ref.tensors()[k]), k
        assert [(r.client, r.reported, r.bounded, r.bound) for r in report.sizes_bounded] == [
            ("x", claim, 2 * median, 2 * median)
        ]
        assert report.to_dict()["sizes_bounded"] == [
            {"client": "x", "reported": claim, "bounded": 240.0, "bound": 240.0}
        ]
        # hand-computed: data-size weights give x exactly 240 / (600 + 240); so does the head
        share = 240.0 / (100 + 110 + 120 + 130 + 140 + 240)
        if name in ("flexlora", "flora", "zeropad", "fedit"):
            assert report.weights["x"] == pytest.approx(share, rel=1e-12)
        honest = honest_head_average(ups, strategy)
        assert ((new.extras["head"] - honest) / (1.0 - honest)).tolist() == pytest.approx([share] * 4, rel=1e-9)
    assert ref_report.sizes_bounded == []  # an honest 2 × median is within the bound


@pytest.mark.parametrize("name", ["fedhl", "flexlora"])
def test_two_clients_the_larger_claim_counts_at_most_size_k_times_the_smaller(name: str) -> None:
    # Prepare: data-size weights, no cap (with N = 2 a cap of 4/N binds nothing anyway)
    opts = {"weights": {"rule": "data_size", "max_weight_ratio": None}} if name == "fedhl" else {}
    strategy, state, plan = setup(name, {"h1": 1, "x": 2}, clip="off", size_k=SIZE_K, **opts)
    h1 = trained(strategy, state, plan, "h1", 100, seed=20)
    x = trained(strategy, state, plan, "x", 2**63 - 1, seed=99)
    # Execute
    _, report = strategy.aggregate(state, plan, [h1, x])
    # Assert: x counts SIZE_K × the smaller claim
    assert report.weights["x"] == pytest.approx(SIZE_K / (SIZE_K + 1), rel=1e-12)
    assert [(r.client, r.bounded) for r in report.sizes_bounded] == [("x", SIZE_K * 100)]
    # one client: nothing to bound against, its weight is 1 and nothing is named
    plan1 = strategy.plan_round(state, {"x": dict.fromkeys(SHAPES, 2)})
    _, alone = strategy.aggregate(state, plan1, [trained(strategy, state, plan1, "x", 2**63 - 1, seed=99)])
    assert alone.weights == {"x": 1.0} and alone.sizes_bounded == []


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [SIZE_K, 2.0])
def test_sizes_within_size_k_times_the_median_change_nothing(name: str, k: float) -> None:
    # honest sizes 100..140 and x: all within k × median (k = 1: all equal), so the bound binds
    # nothing and the merge is the unbounded one, bit for bit
    on, state, plan, ups = honest_round(name, clip="off", size_k=k)
    if k == 1.0:
        ups = [replace(u, n_examples=100) for u in ups]
    x = trained(on, state, plan, "x", int(k * 100) if k == 1.0 else 240, seed=99)
    off = build_strategy(name, alpha=ALPHA, clip="off", size_k=None)
    new_on, rep_on = on.aggregate(state, plan, [*ups, x])
    new_off, rep_off = off.aggregate(state, plan, [*ups, x])
    assert rep_on.sizes_bounded == [] and rep_on.weights == rep_off.weights
    for key, v in new_on.tensors().items():
        assert torch.equal(v, new_off.tensors()[key]), key
    assert on.options()["size_k"] == k and off.options()["size_k"] is None
    assert build_strategy(name, alpha=ALPHA).options()["size_k"] is None  # the core's default: off


def test_size_bound_is_on_in_every_job_and_set_only_in_its_defence_block() -> None:
    spec = JOB
    for strategy in ALL:
        job = JobSpec.model_validate({**spec, "strategy": strategy})
        assert job.defence.size_k == SIZE_K == 1.0 and job.build_strategy().size_k == SIZE_K
    assert JobSpec.model_validate({**spec, "defence": {"size_k": None}}).build_strategy().size_k is None
    assert JobSpec.model_validate({**spec, "defence": {"size_k": 3}}).build_strategy().options()["size_k"] == 3
    with pytest.raises(ValueError, match="size_k"):
        JobSpec.model_validate({**spec, "defence": {"size_k": 0.5}})
    with pytest.raises(ValueError, match="defence"):
        JobSpec.model_validate({**spec, "strategy_options": {"size_k": 1.0}})


# ------------------------------------------------------------------ update-size bound


@pytest.mark.parametrize("name", [n for n in ALL if n != "hetlora"])
@pytest.mark.parametrize("factor", [1000.0, 30.0])
def test_scaled_update_contributes_at_most_k_times_median(name: str, factor: float) -> None:
    # Prepare: x sends an honest-looking change scaled by `factor`; the reference round has x
    # send its start factors (no change), with the same weights
    strategy, state, plan, ups = honest_round(name)
    x = scaled_change(strategy, state, plan, trained(strategy, state, plan, "x", 120, seed=99), factor)
    # Execute
    new, report = strategy.aggregate(state, plan, [*ups, x])
    ref, ref_report = strategy.aggregate(state, plan, [*ups, noop(strategy, state, plan, "x", 120)])
    # Assert: x clipped in every module and the head, nobody else; the difference to the
    # reference is exactly p_x · bound per module (the clipped change), so ≤ p_x · k · median
    assert {c.client for c in report.clipped} == {"x"}
    assert {c.module for c in report.clipped} == {*SHAPES, "extra::head"}
    assert report.dropped == []
    assert report.weights == pytest.approx(ref_report.weights, rel=1e-12)
    for rec in report.clipped:
        assert rec.norm * rec.scale == pytest.approx(rec.bound, rel=1e-12)
        if rec.module.startswith("extra::"):
            continue
        p_x = (report.module_weights or {rec.module: report.weights})[rec.module]["x"]
        if strategy.dense_state:
            diff = fro(new.dense[rec.module] - ref.dense[rec.module])
        else:
            a, b = new.factors[rec.module], ref.factors[rec.module]
            diff = math.hypot(fro(a.B - b.B), fro(a.A - b.A))
        assert diff == pytest.approx(p_x * rec.bound, rel=1e-9)
        assert report.effective_weights["x"] < report.weights["x"]


@pytest.mark.parametrize("name", DENSE)
def test_reject_leaves_the_update_out_and_reweights_the_rest(name: str) -> None:
    strategy, state, plan, ups = honest_round(name, clip={"action": "reject"})
    x = scaled_change(strategy, state, plan, trained(strategy, state, plan, "x", 120, seed=99), 1000.0)
    new, report = strategy.aggregate(state, plan, [*ups, x])
    without, _ = strategy.aggregate(state, plan, ups)
    assert {(d.client, d.reason) for d in report.dropped} == {("x", "update_norm_above_bound")}
    assert len(report.dropped) == len(SHAPES) + 1  # every module and the head
    for d in report.dropped:  # the norm and the bound it broke, for the strike rule
        assert d.norm is not None and d.bound is not None and d.norm > d.bound > 0
    assert report.weights["x"] == 0.0 and report.clipped == []
    for k, v in new.tensors().items():  # exactly the round without x
        assert torch.equal(v, without.tensors()[k]), k


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", ALL)
def test_1e20_factors_are_clipped_and_the_merge_stays_near_the_honest_one(name: str, dtype) -> None:
    # Prepare: x uploads 1e20 everywhere (float32 products overflow; float64 ones do not)
    strategy, state, plan, ups = honest_round(name, dtype=dtype)
    start = strategy.client_start(state, plan, "x")
    huge = {m: LoRAFactors(torch.full_like(f.B, 1e20), torch.full_like(f.A, 1e20)) for m, f in start.factors.items()}
    x = ClientUpdate("x", huge, n_examples=120, extras=dict(start.extras))
    # Execute
    new, report = strategy.aggregate(state, plan, [*ups, x])
    ref, _ = strategy.aggregate(state, plan, [*ups, noop(strategy, state, plan, "x", 120)])
    # Assert: finite, x named per module, and the merge within p_x · bound of the reference
    assert all(bool(torch.isfinite(t).all()) for t in new.tensors().values())
    recs = {c.module: c for c in report.clipped if c.client == "x"}
    assert set(recs) == set(SHAPES)
    tol = 1e-9 if dtype == F64 else 1e-3
    for m, rec in recs.items():
        p_x = (report.module_weights or {m: report.weights})[m]["x"]
        if strategy.dense_state:
            diff = fro(new.dense[m] - ref.dense[m])
            assert diff <= p_x * rec.bound * (1 + tol) + 1e-6 * fro(ref.dense[m])
        else:
            a, b = new.factors[m], ref.factors[m]
            assert all(bool(torch.isfinite(t).all()) for t in (a.B, a.A))
            if name != "hetlora":  # HetLoRA's weights move with x's (clipped) norm
                diff = math.hypot(fro(a.B - b.B), fro(a.A - b.A))
                assert diff <= p_x * rec.bound * (1 + tol) + 1e-6


@pytest.mark.parametrize("name", DENSE)
def test_sign_flipped_update_is_not_stopped(name: str) -> None:
    # What the bound does not stop: x sends −Δ of an honest change. Its norm is an honest one,
    # so it is merged unclipped with its full weight (documented in core/defence.py).
    strategy, state, plan, ups = honest_round(name)
    x = scaled_change(strategy, state, plan, trained(strategy, state, plan, "x", 120, seed=99), -1.0)
    _, report = strategy.aggregate(state, plan, [*ups, x])
    assert report.clipped == [] and report.dropped == []
    assert report.effective_weights["x"] == report.weights["x"] > 0


# ------------------------------------------------------------------ HetLoRA


def test_hetlora_scaling_up_no_longer_wins_weight() -> None:
    # Prepare: x multiplies its B by 1000 (so ‖B A‖ by 1000)
    on, state, plan, ups = honest_round("hetlora")
    x = trained(on, state, plan, "x", 120, seed=99)
    x = replace(x, factors={m: LoRAFactors(1000 * f.B, f.A) for m, f in x.factors.items()})
    off = build_strategy("hetlora", alpha=ALPHA, clip="off", max_weight_ratio=None)
    # Execute
    _, rep_on = on.aggregate(state, plan, [*ups, x])
    _, rep_off = off.aggregate(state, plan, [*ups, x])
    # Assert: the paper's rule hands x nearly everything; with the bound, x's norm weight is at
    # most k × the median norm, i.e. p_x ≤ 3·med / (3·med + Σ honest norms)
    assert all(w["x"] > 0.99 for w in (rep_off.module_weights or {}).values())
    assert rep_on.module_weights is not None
    for w in rep_on.module_weights.values():
        honest = sorted(w[c] for c in HONEST)
        assert w["x"] <= 3 * honest[(6 - 1) // 2] * (1 + 1e-9)  # ω ∝ min(norm, 3 × median)
        assert w["x"] <= 2.0 / 3.0 + 1e-12  # and the 4/N cap


# ------------------------------------------------------------------ shards


@pytest.mark.parametrize("action", ["clip", "reject"])
@pytest.mark.parametrize("name", ALL)
def test_sharded_merge_makes_the_same_decisions_as_the_unsharded_one(name: str, action: str) -> None:
    # Prepare: x scales its change in one module only, NaN in another
    strategy, state, plan, ups = honest_round(name, clip={"action": action})
    x = trained(strategy, state, plan, "x", 120, seed=99)
    big = scaled_change(strategy, state, plan, x, 500.0)
    fs = dict(x.factors)
    fs["q"] = big.factors["q"]
    fs["v"] = LoRAFactors(fs["v"].B * float("nan"), fs["v"].A)
    x = replace(x, factors=fs)
    # Execute: one merge of everything; two shards of the modules (shard 1 without extras)
    full, rep = strategy.aggregate(state, plan, [*ups, x])
    parts = []
    for i, modules in enumerate([["q", "o"], ["v"]]):
        sub = GlobalState(
            round=state.round,
            dense={m: state.dense[m] for m in modules if m in state.dense},
            factors={m: state.factors[m] for m in modules if m in state.factors},
            extras=state.extras if i == 0 else {},
        )
        shard_ups = [u if i == 0 else replace(u, extras={}) for u in [*ups, x]]  # as the runner reads them
        parts.append(strategy.aggregate(sub, plan, shard_ups))
    # Assert: every module bit-identical, and the records are the union of the shards'
    for part, _report in parts:
        for k, v in part.tensors().items():
            assert torch.equal(v, full.tensors()[k]), k
    assert sorted(rep.clipped, key=str) == sorted([c for _, r in parts for c in r.clipped], key=str)
    assert sorted(rep.dropped, key=str) == sorted([d for _, r in parts for d in r.dropped], key=str)
    assert ("x", "v", "non_finite_factors") in [(d.client, d.module, d.reason) for d in rep.dropped]
    named_q = [c.module for c in rep.clipped if c.client == "x"] + [d.module for d in rep.dropped if d.client == "x"]
    assert "q" in named_q


# ------------------------------------------------------------------ off and honest


@pytest.mark.parametrize("name", ALL)
def test_defence_on_is_bit_identical_to_off_for_honest_rounds(name: str) -> None:
    # honest uploads within k × median and no weight over the cap: the update bound and the cap
    # bind nothing, and the merge is the unguarded one bit for bit (same code path for every
    # kept upload). The size bound has its own tests above: at a job's default size_k = 1 it
    # does count honest sizes above the median as the median
    on, state, plan, ups = honest_round(name)
    off_opts = {"clip": "off", "size_k": None}
    off = build_strategy(name, alpha=ALPHA, max_weight_ratio=None, **off_opts) if name != "fedhl" else None
    off = off or build_strategy("fedhl", alpha=ALPHA, weights=WeightConfig(max_weight_ratio=None), **off_opts)
    new_on, rep_on = on.aggregate(state, plan, ups)
    new_off, rep_off = off.aggregate(state, plan, ups)
    assert rep_on.clipped == [] and rep_on.dropped == []
    assert rep_on.weights == rep_off.weights == rep_on.effective_weights
    for k, v in new_on.tensors().items():
        assert torch.equal(v, new_off.tensors()[k]), k


def test_report_to_dict_lists_the_actions() -> None:
    strategy, state, plan, ups = honest_round("fedhl")
    x = scaled_change(strategy, state, plan, trained(strategy, state, plan, "x", 120, seed=99), 1000.0)
    fs = dict(x.factors)
    fs["v"] = LoRAFactors(fs["v"].B * float("inf"), fs["v"].A)
    _, report = strategy.aggregate(state, plan, [*ups, replace(x, factors=fs)])
    d = report.to_dict()
    assert {
        "client": "x",
        "module": "v",
        "reason": "non_finite_factors",
        "detail": "factors contain NaN or Inf",
        "norm": None,
        "bound": None,
        "cosine": None,
        "effect": None,
        "threshold": None,
        "score": None,
    } in d["dropped"]
    assert {c["module"] for c in d["clipped"]} == {"q", "o", "extra::head"}
    assert all(set(c) == {"client", "module", "norm", "bound", "scale"} for c in d["clipped"])
    assert set(d["effective_weights"]) == {*HONEST, "x"}
    assert d["options"]["clip"] == {"k": 3.0, "action": "clip", "reject_k": None}


# ------------------------------------------------------------------------------ strikes


@pytest.mark.parametrize(
    ("reason", "excess", "reject_k", "strike"),
    [
        ("non_finite_factors", None, 10.0, True),  # unsound uploads always count
        ("overflow", None, None, True),
        ("non_finite_extras", 1.0, 10.0, True),
        ("clipped", 3.6, 10.0, False),  # an honest high-rank client just above 3 × median
        ("clipped", 10.0, 10.0, False),  # at the threshold: not above it
        ("clipped", 1000.0, 10.0, True),  # a ×1000 update
        ("update_norm_above_bound", 4.0, 10.0, False),  # the reject action, same rule
        ("update_norm_above_bound", 50.0, 10.0, True),
        ("update_norm_above_bound", None, 10.0, True),  # no norm recorded (an old report): counts
        ("clipped", 1e9, None, False),  # reject_k off: bound actions never count
    ],
)
def test_is_strike(reason: str, excess: float | None, reject_k: float | None, strike: bool) -> None:
    assert is_strike(reason, excess, reject_k) is strike


def test_bound_excess_is_norm_over_median() -> None:
    assert bound_excess(12.0, 6.0, 3.0) == 6.0  # bound 6 = 3 × median 2; norm 12 = 6 × median
    assert bound_excess(1.0, 0.0, 3.0) == math.inf


def _report(clipped: list[dict[str, object]], dropped: list[dict[str, object]]) -> RoundReport:
    return RoundReport(
        strategy="fedhl",
        round=0,
        clients=["honest-32", "liar", "nan", "rejected"],
        weights={},
        truncation_errors={},
        energy_kept={},
        update_norms={},
        global_update_norm=0.0,
        n_eff=1.0,
        clipped=clipped,
        dropped=dropped,
    )


def test_report_strikes_only_unsound_drops_and_updates_far_above_the_bound() -> None:
    # bound = 3 × median = 3.0 in every module: median 1
    clipped = [
        {"client": "honest-32", "module": "q", "norm": 3.6, "bound": 3.0, "scale": 3.0 / 3.6},
        {"client": "liar", "module": "q", "norm": 1000.0, "bound": 3.0, "scale": 0.003},
    ]
    dropped = [
        {"client": "nan", "module": "v", "reason": "non_finite_factors", "detail": "", "norm": None, "bound": None},
        {
            "client": "rejected",
            "module": "v",
            "reason": "update_norm_above_bound",
            "detail": "",
            "norm": 5.0,
            "bound": 3.0,
        },
    ]
    report = _report(clipped, dropped)
    assert report.struck(3.0, 10.0) == {"liar", "nan"}
    assert report.struck(3.0, 4.0) == {"liar", "nan", "rejected"}  # 5 × median > 4
    assert report.struck(3.0, None) == {"nan"}
    assert set(report.offences()) == {"honest-32", "liar", "nan", "rejected"}  # all still named


def test_a_honest_high_rank_clip_is_no_strike_in_a_real_merge() -> None:
    # Prepare: x's honest-looking change, 5 × the others' (above 3 × median, below 10 ×)
    strategy, state, plan, ups = honest_round("fedhl")
    x = scaled_change(strategy, state, plan, trained(strategy, state, plan, "x", 120, seed=99), 5.0)
    y = scaled_change(strategy, state, plan, trained(strategy, state, plan, "x", 120, seed=99), 1000.0)
    # Execute
    _, small = strategy.aggregate(state, plan, [*ups, x])
    _, large = strategy.aggregate(state, plan, [*ups, y])
    small_report, large_report = RoundReport.of(small), RoundReport.of(large)
    # Assert: both clipped and named; only the ×1000 one counts
    assert "x" in small_report.offences() and "x" in large_report.offences()
    assert small_report.struck(3.0, 10.0) == set()
    assert large_report.struck(3.0, 10.0) == {"x"}


@pytest.mark.parametrize("name", ALL)
def test_far_above_the_bound_an_update_is_left_out_even_under_clip(name: str) -> None:
    # Prepare: clip between 3 × and 10 × the median, reject above
    strategy, state, plan, ups = honest_round(name, clip={"k": 3.0, "action": "clip", "reject_k": 10.0})
    u = trained(strategy, state, plan, "x", 120, seed=99)
    far = scaled_change(strategy, state, plan, u, 1000.0)
    # Execute
    new, report = strategy.aggregate(state, plan, [*ups, far])
    without, _ = strategy.aggregate(state, plan, ups)
    # Assert: x is dropped by name in every module and the head, the merge is the round without it
    assert {(d.client, d.reason) for d in report.dropped} == {("x", "update_norm_above_bound")}
    assert len(report.dropped) == len(SHAPES) + 1 and report.clipped == []
    assert all("10 × median" in d.detail for d in report.dropped)
    assert report.effective_weights["x"] == 0.0
    for k, v in new.tensors().items():
        assert torch.allclose(v, without.tensors()[k], rtol=1e-12, atol=1e-12), k


def test_reject_k_below_k_is_refused() -> None:
    with pytest.raises(ValueError, match="reject_k"):
        ClipConfig(k=3.0, reject_k=2.0)
    assert ClipConfig(k=3.0, reject_k=3.0).reject_k == 3.0


# ------------------------------------------------------------------ direction screen


def test_lowrank_gram_equals_the_dense_inner_products() -> None:
    # ⟨B1 A1, B2 A2⟩ = tr((B1ᵀ B2)(A2 A1ᵀ)), any inner sizes
    g = gen(5)
    Ls = [randn(7, k, g=g) for k in (1, 3, 4)]
    Rs = [randn(k, 9, g=g) for k in (1, 3, 4)]
    dense = [(L @ R).reshape(-1) for L, R in zip(Ls, Rs, strict=True)]
    expected = torch.tensor([[float(a @ b) for b in dense] for a in dense], dtype=F64)
    assert torch.allclose(lowrank_gram(Ls, Rs), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(vector_gram(dense), expected, rtol=1e-12, atol=1e-12)
    # float32 factors are widened: the same Gram to float64 rounding of the inputs
    L32, R32 = [x.float() for x in Ls], [x.float() for x in Rs]
    wide = lowrank_gram(L32, R32)
    assert wide.dtype == F64
    assert torch.allclose(wide, lowrank_gram([x.double() for x in L32], [x.double() for x in R32]), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(7, 9), (40, 50)])  # K = 16: the dense route, then the Gram route
def test_both_lowrank_cosine_routes_equal_the_dense_one(shape) -> None:
    g = gen(8)
    Ls = [randn(shape[0], k, g=g) for k in (2, 4, 4, 6)]
    Rs = [randn(k, shape[1], g=g) for k in (2, 4, 4, 6)]
    Ls.append(torch.zeros(shape[0], 2, dtype=F64))  # a zero update: no direction
    Rs.append(randn(2, shape[1], g=g))
    dense = cosines_to_others(vector_gram([L @ R for L, R in zip(Ls, Rs, strict=True)]))
    assert lowrank_cosines_to_others(Ls, Rs) == pytest.approx(dense, abs=1e-12)
    assert dense[-1] == 0.0


def test_cosines_to_the_others_by_hand() -> None:
    e1, e2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    # u1 = u2 = e1, u3 = e2: client 1's others sum to e1 + e2 (cos 1/√2); client 3's to 2 e1 (cos 0)
    cos = cosines_to_others(vector_gram([e1, 5 * e1, e2]))  # norms do not count
    assert cos == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], abs=1e-15)
    # a sign flip among three agreeing clients: −1; each honest one sees e1 + e1 − e1 = e1: +1
    assert cosines_to_others(vector_gram([e1, e1, e1, -3 * e1])) == pytest.approx([1, 1, 1, -1], abs=1e-15)
    # a zero update has no direction (0) and adds nothing to the others' reference
    assert cosines_to_others(vector_gram([e1, e1, 0 * e1])) == pytest.approx([1, 1, 0], abs=1e-15)
    assert cosines_to_others(vector_gram([e1])) == [0.0]
    assert cosines_to_others(vector_gram([e1, -e1])) == pytest.approx([-1, -1], abs=1e-15)


def test_direction_threshold_and_outliers_by_hand() -> None:
    # m = lower median = 0.5 > |−0.15|: the round has a direction, threshold −0.15
    cos = [0.6, 0.5, 0.7, -0.2, 0.4]
    assert direction_threshold(cos, -0.15) == -0.15
    assert direction_outliers(cos, -0.15) == [3]
    assert direction_outliers(cos, -0.25) == []  # −0.2 is not below −0.25
    assert direction_outliers(cos, None) == [] and direction_threshold(cos, None) == -math.inf
    # −1: measured, never acted on (no cosine is below −1, and no median above 1)
    assert direction_outliers([0.9, 0.9, 0.9, -1.0], -1.0) == []
    # an honest orthogonal update (cosine 0) is not against a round that agrees
    assert direction_outliers([0.6, 0.5, 0.7, 0.0, 0.4], -0.15) == []
    # a round without a direction (median ≤ 0.15: updates that cancel near a stationary point): no screen
    assert direction_threshold([0.1, -0.3, 0.9, -0.2, 0.12], -0.15) == -math.inf
    assert direction_outliers([0.1, -0.3, 0.9, -0.2, 0.12], -0.15) == []
    # N = 2 (each is the other's only reference) and N = 1: nothing to decide
    assert direction_outliers([-1.0, -1.0], -0.15) == [] and direction_outliers([0.0], -0.15) == []
    # the lowest first; never half the round (with m > 0, fewer than half are below m), and a
    # colluding half sets the median: no screen
    assert direction_outliers([0.9, 0.8, 0.9, 0.9, 0.85, -0.9, -0.99], -0.15) == [6, 5]
    assert direction_outliers([0.9, 0.8, 0.9, -0.95, -0.9, -0.99], -0.15) == []


@pytest.mark.parametrize("bad", [1.5, -2.0, float("nan"), float("inf")])
def test_min_cosine_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="min_cosine"):
        build_strategy("fedhl", alpha=ALPHA, min_cosine=bad)


def aligned_round(name: str, flip: float | None = -1.0, n_honest: int = 5):
    """Honest clients at one rank that share a change direction (plus 30 % noise), and x:
    the same change × `flip` (None: no x)."""
    ranks = dict.fromkeys([*HONEST[:n_honest], "x"], 3 if name == "fedit" else 2)
    strategy, state, plan = setup(name, ranks, min_cosine=MIN_COSINE)
    g = gen(3)
    r = ranks["x"]
    common = {m: (randn(d_out, r, g=g), randn(r, d_in, g=g)) for m, (d_out, d_in) in SHAPES.items()}
    head = randn(4, g=g)

    def upload(c: str, sign: float, noise: float, seed: int) -> ClientUpdate:
        start = strategy.client_start(state, plan, c)
        h = gen(seed)
        fs = {}
        for m, f in start.factors.items():
            dB, dA = common[m]
            fs[m] = LoRAFactors(
                f.B + 0.05 * (sign * dB + noise * randn(*dB.shape, g=h)),
                f.A + 0.05 * (sign * dA + noise * randn(*dA.shape, g=h)),
            )
        x = start.extras["head"] + 0.05 * (sign * head + noise * randn(4, g=h))
        return ClientUpdate(c, fs, n_examples=100, extras={"head": x})

    ups = [upload(c, 1.0, 0.3, 40 + i) for i, c in enumerate(HONEST[:n_honest])]
    if flip is not None:
        ups.append(upload("x", flip, 0.3, 99))
    return strategy, state, plan, ups


@pytest.mark.parametrize("name", ALL)
def test_a_sign_flipped_update_is_left_out_of_every_module_and_named(name: str) -> None:
    strategy, state, plan, ups = aligned_round(name)
    _, report = strategy.aggregate(state, plan, ups)
    against = {d.module: d for d in report.dropped if d.reason == DIRECTION_REASON}
    assert set(against) == set(SHAPES)  # every LoRA module; the head is measured, never screened
    assert report.cosines["extra::head"]["x"] < -0.5
    assert all(d.client == "x" and d.cosine is not None and d.cosine < -0.5 for d in against.values())
    assert report.effective_weights["x"] == 0.0
    assert all(c > 0.5 for m in report.cosines.values() for k, c in m.items() if k != "x")
    rr = RoundReport.of(report)
    assert rr.struck(3.0, 30.0, modules=len(SHAPES)) == {"x"}  # every LoRA module: a strike
    assert rr.to_dict()["dropped"][0]["cosine"] == against[rr.dropped[0]["module"]].cosine


@pytest.mark.parametrize("name", ALL)
def test_the_screen_leaves_out_x_as_if_it_had_not_taken_part(name: str) -> None:
    strategy, state, plan, ups = aligned_round(name)
    new, report = strategy.aggregate(state, plan, ups)
    alone, _ = strategy.aggregate(state, plan, ups[:-1])  # the honest five, no x at all
    assert all(d.client == "x" for d in report.dropped)
    for k, v in alone.tensors().items():  # every LoRA module as without x; the head keeps x
        same = torch.allclose(new.tensors()[k], v, rtol=1e-12, atol=1e-12)
        assert same != k.startswith("extra::"), k


@pytest.mark.parametrize("name", ALL)
def test_an_honest_round_is_not_screened(name: str) -> None:
    strategy, state, plan, ups = aligned_round(name, flip=1.0)  # x agrees too
    _, report = strategy.aggregate(state, plan, ups)
    assert report.dropped == []
    assert set(report.cosines) == {*SHAPES, "extra::head"}


@pytest.mark.parametrize("name", DENSE)
def test_two_clients_and_one_are_never_screened(name: str) -> None:
    strategy, state, plan, ups = aligned_round(name, n_honest=1)  # h1 and its flip x: N = 2
    _, report = strategy.aggregate(state, plan, ups)
    assert report.dropped == [] and report.cosines[next(iter(SHAPES))]["x"] < -0.5
    strategy, state, plan, ups = aligned_round(name, flip=None, n_honest=1)
    _, report = strategy.aggregate(state, plan, ups)
    assert report.dropped == [] and report.cosines[next(iter(SHAPES))] == {"h1": 0.0}


@pytest.mark.parametrize("name", ALL)
def test_screen_off_merges_the_flip_and_measures_nothing(name: str) -> None:
    on, state, plan, ups = aligned_round(name)
    off = build_strategy(name, alpha=ALPHA, min_cosine=None)
    assert off.options()["min_cosine"] is None and on.options()["min_cosine"] == MIN_COSINE
    _, report = off.aggregate(state, plan, ups)
    assert report.dropped == [] and report.cosines == {} and report.effective_weights["x"] > 0
    # -1: measured and reported, never acted on
    measure = build_strategy(name, alpha=ALPHA, min_cosine=-1.0)
    _, report = measure.aggregate(state, plan, ups)
    assert report.dropped == [] and report.cosines[next(iter(SHAPES))]["x"] < -0.5


@pytest.mark.parametrize("name", ALL)
def test_sharded_merge_makes_the_same_direction_decisions(name: str) -> None:
    strategy, state, plan, ups = aligned_round(name)
    full, rep = strategy.aggregate(state, plan, ups)
    decided = sorted((d.client, d.module, d.cosine) for d in rep.dropped)
    parts = []
    for i, modules in enumerate([["q", "o"], ["v"]]):
        sub = GlobalState(
            round=state.round,
            dense={m: state.dense[m] for m in modules if m in state.dense},
            factors={m: state.factors[m] for m in modules if m in state.factors},
            extras=state.extras if i == 0 else {},
        )
        parts.append(strategy.aggregate(sub, plan, [u if i == 0 else replace(u, extras={}) for u in ups]))
    assert decided == sorted((d.client, d.module, d.cosine) for _, r in parts for d in r.dropped)
    for part, _r in parts:
        for k, v in part.tensors().items():
            assert torch.equal(v, full.tensors()[k]), k


def test_direction_strikes_only_in_most_modules() -> None:
    def drop(module: str) -> dict[str, object]:
        return {"client": "x", "module": module, "reason": DIRECTION_REASON, "detail": "", "cosine": -0.5}

    assert _report([], [drop("q"), drop("v"), drop("o")]).struck(3.0, 30.0, modules=4) == {"x"}  # 3 of 4
    assert _report([], [drop("q"), drop("v"), drop("extra::head")]).struck(3.0, 30.0, modules=4) == set()
    assert _report([], [drop("q")]).struck(3.0, 30.0, modules=1) == {"x"}
    assert _report([], [drop("q")]).struck(3.0, 30.0) == set()  # modules unknown: never
    assert not is_strike(DIRECTION_REASON, None, 30.0)
    assert set(_report([], [drop("q")]).offences()) == {"x"}  # named all the same


def test_direction_screen_is_on_in_every_job_and_set_only_in_its_defence_block() -> None:
    spec = JOB
    for strategy in ALL:
        job = JobSpec.model_validate({**spec, "strategy": strategy})
        assert job.defence.min_cosine == MIN_COSINE and job.build_strategy().min_cosine == MIN_COSINE
    assert JobSpec.model_validate({**spec, "defence": {"min_cosine": None}}).build_strategy().min_cosine is None
    with pytest.raises(ValueError, match="min_cosine"):
        JobSpec.model_validate({**spec, "defence": {"min_cosine": 2}})
    with pytest.raises(ValueError, match="defence"):
        JobSpec.model_validate({**spec, "strategy_options": {"min_cosine": 0.0}})
