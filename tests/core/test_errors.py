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
    "nan_in_B": (poisoned(float("nan"), "B"), "NaN or Inf", "v"),
    "inf_in_A": (poisoned(float("inf"), "A"), "NaN or Inf", "v"),
    "neg_inf_in_B": (poisoned(float("-inf"), "B"), "NaN or Inf", "v"),
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
    "extras_nan": (
        lambda u: with_extras(u, "a", {"head": torch.tensor([0.0, float("nan"), 1.0], dtype=F64)}),
        "finite",
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


@pytest.mark.parametrize("n", [0, -5])
def test_non_positive_n_examples_is_rejected_at_construction(n: int) -> None:
    f = {"q": LoRAFactors(torch.ones(6, 1, dtype=F64), torch.ones(1, 5, dtype=F64))}
    with pytest.raises(UploadError, match="n_examples must be positive") as info:
        ClientUpdate("a", f, n_examples=n)
    assert info.value.client_id == "a"


def test_lora_factors_validate_shapes() -> None:
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRAFactors(torch.ones(4, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        LoRAFactors(torch.ones(4), torch.ones(1, 5))


OVERFLOW_CASES = [  # (state dtype, factor magnitude): finite factors whose product overflows
    (torch.float64, 1e200),
    (torch.float32, 1e30),
]


@pytest.mark.parametrize(("dtype", "big"), OVERFLOW_CASES, ids=["f64-1e200", "f32-1e30"])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_merge_raises_aggregation_error_and_keeps_state(name: str, dtype, big) -> None:
    # Prepare: client a's "v" factors are finite but their product is not
    strategy, state, plan, uploads = make_round(name, dtype=dtype)
    f = uploads[0].factors["v"]
    huge = LoRAFactors(torch.full_like(f.B, big), torch.full_like(f.A, big))
    bad = with_factor(uploads, "a", "v", huge)
    snap = snapshot(state)
    # Execute
    with pytest.raises(AggregationError, match=r"not finite|overflow") as info:
        strategy.aggregate(state, plan, bad)
    # Assert
    assert not isinstance(info.value, UploadError)
    assert "'v'" in str(info.value)
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


def test_extras_are_averaged_by_data_size() -> None:
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
