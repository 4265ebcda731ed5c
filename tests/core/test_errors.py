"""Bad input: every rejected upload raises `UploadError` (a round-level problem raises
`AggregationError`) and leaves the input state exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from naive_core import F64, assert_unchanged, gen, randn, random_uploads, snapshot

from fedhl.core import (
    AggregationError,
    ClientUpdate,
    LoRAFactors,
    Strategy,
    UploadError,
    build_strategy,
)

ALPHA = 8.0
SHAPES = {"q": (6, 5), "v": (4, 7)}  # failures are planted in "v", after "q" was merged
RANKS = {"a": {"q": 2, "v": 3}, "b": {"q": 1, "v": 2}}
N = {"a": 3, "b": 5}
ALL = ["fedhl", "flexlora", "flora", "hetlora", "zeropad"]


def make_round(name: str, dtype: torch.dtype = F64, extras: bool = True):
    """A strategy, a non-trivial state at round 2 (with a non-LoRA 'head'), its plan, uploads."""
    strategy = build_strategy(name, alpha=ALPHA)
    head = {"head": torch.zeros(3, dtype=dtype)} if extras else None
    state = strategy.init_state(SHAPES, head, max_rank=4, dtype=dtype)
    g = gen(1)
    for m, (d_out, d_in) in SHAPES.items():
        if strategy.dense_state:
            state.dense[m] = randn(d_out, d_in, g=g).to(dtype)
        else:
            state.factors[m] = LoRAFactors(randn(d_out, 4, g=g).to(dtype), randn(4, d_in, g=g).to(dtype))
    state.round = 2
    plan = strategy.plan_round(state, RANKS)
    uploads = random_uploads(RANKS, SHAPES, N, gen(2), dtype=dtype)
    if extras:
        uploads = [replace(u, extras={"head": torch.ones(3, dtype=dtype) * i}) for i, u in enumerate(uploads)]
    return strategy, state, plan, uploads


def with_factor(uploads, client: str, module: str, f: LoRAFactors | None):
    out = []
    for u in uploads:
        if u.client_id == client:
            fs = dict(u.factors)
            if f is None:
                del fs[module]
            else:
                fs[module] = f
            u = replace(u, factors=fs)
        out.append(u)
    return out


def with_extras(uploads, client: str, extras: dict):
    return [replace(u, extras=extras) if u.client_id == client else u for u in uploads]


def poisoned(value: float, where: str):
    def edit(uploads):
        f = uploads[0].factors["v"]
        B, A = f.B.clone(), f.A.clone()
        (B if where == "B" else A)[0, 0] = value
        return with_factor(uploads, "a", "v", LoRAFactors(B, A))

    return edit


UPLOAD_CASES: dict[str, tuple[Callable, str, str | None]] = {
    # name: (edit the good uploads, message fragment, module blamed)
    "wrong_rank": (
        lambda u: with_factor(u, "a", "v", LoRAFactors(torch.ones(4, 2, dtype=F64), torch.ones(2, 7, dtype=F64))),
        r"expected B\(4, 3\) A\(3, 7\)",
        "v",
    ),
    "wrong_d_in": (
        lambda u: with_factor(u, "a", "v", LoRAFactors(torch.ones(4, 3, dtype=F64), torch.ones(3, 8, dtype=F64))),
        "expected B",
        "v",
    ),
    "wrong_d_out": (
        lambda u: with_factor(u, "a", "v", LoRAFactors(torch.ones(5, 3, dtype=F64), torch.ones(3, 7, dtype=F64))),
        "expected B",
        "v",
    ),
    "missing_module": (lambda u: with_factor(u, "a", "v", None), "module missing", "v"),
    "integer_factors": (
        lambda u: with_factor(
            u,
            "a",
            "v",
            LoRAFactors(torch.ones(4, 3, dtype=torch.int64), torch.ones(3, 7, dtype=torch.int64)),
        ),
        "floating point",
        "v",
    ),
    "unknown_client": (
        lambda u: [*u, ClientUpdate("zz", u[0].factors, 1, u[0].extras)],
        "no assignment",
        None,
    ),
    "extras_missing": (lambda u: with_extras(u, "a", {}), "missing", None),
    "extras_unexpected": (
        lambda u: with_extras(u, "a", {"head": torch.ones(3, dtype=F64), "norm": torch.ones(2, dtype=F64)}),
        "unexpected",
        None,
    ),
    "extras_shape": (
        lambda u: with_extras(u, "a", {"head": torch.ones(4, dtype=F64)}),
        "shape",
        None,
    ),
    "extras_integer": (
        lambda u: with_extras(u, "a", {"head": torch.ones(3, dtype=torch.int64)}),
        "floating point",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(UPLOAD_CASES))
@pytest.mark.parametrize("name", ALL)
def test_bad_upload_raises_upload_error_and_keeps_state(name: str, case: str) -> None:
    # Prepare
    strategy, state, plan, uploads = make_round(name)
    edit, match, module = UPLOAD_CASES[case]
    bad = edit(uploads)
    snap = snapshot(state)
    # Execute
    with pytest.raises(UploadError, match=match) as info:
        strategy.aggregate(state, plan, bad)
    # Assert
    assert info.value.client_id in ("a", "zz")
    assert info.value.module == module
    assert_unchanged(state, snap)
    # the same round still aggregates with the good uploads
    new, _ = strategy.aggregate(state, plan, uploads)
    assert new.round == 3


@pytest.mark.parametrize("name", ALL)
def test_duplicate_client_raises_and_keeps_state(name: str) -> None:
    strategy, state, plan, uploads = make_round(name)
    snap = snapshot(state)
    with pytest.raises(AggregationError, match="duplicate"):
        strategy.aggregate(state, plan, [*uploads, uploads[0]])
    assert_unchanged(state, snap)


@pytest.mark.parametrize("name", ALL)
def test_round_level_errors(name: str) -> None:
    strategy, state, plan, uploads = make_round(name)
    snap = snapshot(state)
    with pytest.raises(AggregationError, match="no uploads"):
        strategy.aggregate(state, plan, [])
    state.round = 3
    with pytest.raises(AggregationError, match="round 2"):
        strategy.aggregate(state, plan, uploads)
    state.round = 2
    assert_unchanged(state, snap)


@pytest.mark.parametrize(("n", "match"), [(0, "positive"), (-5, "positive"), (2**63, "at most"), (10**400, "at most")])
def test_out_of_range_n_examples_is_rejected_at_construction(n: int, match: str) -> None:
    f = {"q": LoRAFactors(torch.ones(6, 1, dtype=F64), torch.ones(1, 5, dtype=F64))}
    with pytest.raises(UploadError, match=f"n_examples must be {match}") as info:
        ClientUpdate("a", f, n_examples=n)
    assert info.value.client_id == "a"


def test_lora_factors_validate_shapes() -> None:
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRAFactors(torch.ones(4, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        LoRAFactors(torch.ones(4), torch.ones(1, 5))


# Non-finite and overflowing uploads no longer fail the round (issue 12): the upload is left out
# of the module by name and the others are merged. Only a module with nothing left raises.
NON_FINITE_CASES = {
    "nan_in_B": (poisoned(float("nan"), "B"), "non_finite_factors"),
    "inf_in_A": (poisoned(float("inf"), "A"), "non_finite_factors"),
    "neg_inf_in_B": (poisoned(float("-inf"), "B"), "non_finite_factors"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
@pytest.mark.parametrize("name", ALL)
def test_non_finite_upload_is_dropped_by_name_and_the_rest_merged(name: str, case: str) -> None:
    # Prepare
    strategy, state, plan, uploads = make_round(name)
    edit, reason = NON_FINITE_CASES[case]
    snap = snapshot(state)
    # Execute
    new, report = strategy.aggregate(state, plan, edit(uploads))
    only_b, _ = strategy.aggregate(state, plan, [uploads[1]])
    both, _ = strategy.aggregate(state, plan, uploads)
    # Assert: a is named for "v"; "v" is b's merge alone, "q" the merge of both
    assert [(d.client, d.module, d.reason) for d in report.dropped] == [("a", "v", reason)]
    assert report.module_weights is None or report.module_weights["v"]["a"] == 0.0
    assert_unchanged(state, snap)
    for k, v in new.tensors().items():
        if k.endswith("::v"):
            assert torch.equal(v, only_b.tensors()[k]), k
        elif k.endswith("::q"):
            assert torch.equal(v, both.tensors()[k]), k


def test_non_finite_extras_are_dropped_by_name() -> None:
    strategy, state, plan, uploads = make_round("fedhl")
    bad = with_extras(uploads, "a", {"head": torch.tensor([0.0, float("nan"), 1.0], dtype=F64)})
    new, report = strategy.aggregate(state, plan, bad)
    assert [(d.client, d.module, d.reason) for d in report.dropped] == [("a", "extra::head", "non_finite_extras")]
    assert torch.equal(new.extras["head"], uploads[1].extras["head"])  # b's head alone


OVERFLOW_CASES = [  # (state dtype, factor magnitude): finite factors whose product overflows
    (torch.float64, 1e200),
    (torch.float32, 1e30),
]


@pytest.mark.parametrize("clip", ["default", "off"])
@pytest.mark.parametrize(("dtype", "big"), OVERFLOW_CASES, ids=["f64-1e200", "f32-1e30"])
@pytest.mark.parametrize("name", ALL)
def test_overflowing_upload_is_dropped_or_clipped_and_the_round_merges(name: str, dtype, big, clip) -> None:
    # Prepare: client a's "v" factors are finite but their product is not (in the state dtype)
    strategy, state, plan, uploads = make_round(name, dtype=dtype)
    if clip == "off":
        strategy = build_strategy(name, alpha=ALPHA, clip="off")
    f = uploads[0].factors["v"]
    huge = LoRAFactors(torch.full_like(f.B, big), torch.full_like(f.A, big))
    snap = snapshot(state)
    # Execute
    new, report = strategy.aggregate(state, plan, with_factor(uploads, "a", "v", huge))
    # Assert: finite result; a named for "v" (clipped when its norm is finite in float64 and the
    # bound is on, dropped otherwise); nothing else touched
    assert all(bool(torch.isfinite(t).all()) for t in new.tensors().values())
    named = [(d.client, d.module) for d in report.dropped] + [(c.client, c.module) for c in report.clipped]
    assert ("a", "v") in named
    if clip == "off":
        assert report.clipped == [] and report.dropped[0].reason in ("overflow", "non_finite_update")
    elif big == 1e30:  # ‖Δ‖ ~ 1e60: finite in float64, so it is clipped, not dropped
        (rec,) = report.clipped
        assert rec.norm * rec.scale == pytest.approx(rec.bound, rel=1e-12)
    assert_unchanged(state, snap)


@pytest.mark.parametrize("name", ALL)
def test_module_with_no_upload_left_raises_naming_the_dropped(name: str) -> None:
    strategy, state, plan, uploads = make_round(name)
    bad = poisoned(float("nan"), "B")(uploads)
    f = bad[1].factors["v"]
    bad = with_factor(bad, "b", "v", LoRAFactors(f.B * float("inf"), f.A))
    snap = snapshot(state)
    with pytest.raises(AggregationError, match=r"'v'.*a: non_finite_factors; b: non_finite_factors"):
        strategy.aggregate(state, plan, bad)
    assert_unchanged(state, snap)


def test_inplace_aggregate_updates_the_given_state() -> None:
    strategy, state, plan, uploads = make_round("fedhl")
    ref, _ = strategy.aggregate(state, plan, uploads)
    new, _ = strategy.aggregate(state, plan, uploads, inplace=True)
    assert new is state and state.round == 3
    for k, v in ref.tensors().items():
        assert torch.equal(state.tensors()[k], v)


def test_aggregate_does_not_modify_uploads() -> None:
    strategy, state, plan, uploads = make_round("fedhl")
    before = [{m: (f.B.clone(), f.A.clone()) for m, f in u.factors.items()} for u in uploads]
    strategy.aggregate(state, plan, uploads)
    for u, b in zip(uploads, before, strict=True):
        for m, f in u.factors.items():
            assert torch.equal(f.B, b[m][0]) and torch.equal(f.A, b[m][1])


def test_extras_are_averaged_by_capped_data_size() -> None:
    # heads 0·1 (n=3) and 1·1 (n=5): average 5/8 everywhere, for every strategy
    for name in ALL:
        strategy, state, plan, uploads = make_round(name)
        new, _ = strategy.aggregate(state, plan, uploads)
        assert torch.allclose(new.extras["head"], torch.full((3,), 5 / 8, dtype=F64), rtol=1e-15)


def test_fedit_rejects_heterogeneous_ranks() -> None:
    strategy: Strategy = build_strategy("fedit", alpha=ALPHA)
    state = strategy.init_state(SHAPES, max_rank=3, dtype=F64)
    with pytest.raises(ValueError, match="homogeneous"):
        strategy.plan_round(state, {"a": {"q": 3, "v": 3}, "b": {"q": 2, "v": 3}})
    plan = strategy.plan_round(state, {"a": {"q": 3, "v": 3}, "b": {"q": 3, "v": 3}})
    assert plan.r_max("q") == 3


@pytest.mark.parametrize("name", ["hetlora", "zeropad", "fedit"])
def test_factor_strategies_need_max_rank_and_reject_ranks_above_it(name: str) -> None:
    strategy = build_strategy(name, alpha=ALPHA)
    with pytest.raises(ValueError, match="max_rank"):
        strategy.init_state(SHAPES)
    state = strategy.init_state(SHAPES, max_rank=2, dtype=F64)
    with pytest.raises(ValueError, match=r"exceeds|homogeneous"):
        strategy.plan_round(state, {"a": {"q": 3, "v": 1}})


def test_client_start_for_unassigned_client_raises() -> None:
    strategy, state, plan, _ = make_round("fedhl")
    with pytest.raises(KeyError, match="no assignment"):
        strategy.client_start(state, plan, "zz")
