"""Every job-spec field has a bound, field by field, read from the model itself: a number just
past its bound (and NaN, infinity for floats), a string, list or map one element too long are
refused with the field's path; the bound itself is accepted at the field. A field added without a
bound fails `test_every_field_is_bounded`. Over REST the same specs are 422 naming the field,
never 500."""

from __future__ import annotations

import copy
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt, MaxLen
from live_stack import Live
from pydantic import BaseModel, ValidationError

from fedhl.jobspec import INT64_MAX, JobSpec
from stack import job_spec

# Bounded elsewhere than in the type, and checked below all the same.
BOUNDED_BY_VALIDATOR = {
    "defence.expected_examples": "values in [1, 2**63-1] (_expected)",
    "strategy_options": "keys ≤ 64 characters, ≤ 64 entries; values checked by the strategy's constructor",
}
REST_BODY_LIMIT = 512 * 1024  # specs larger than this are 413 before validation (max_request_bytes)


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    annotation: Any
    metadata: tuple[Any, ...]

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def base(self) -> Any:
        """The annotation without `| None`."""
        if isinstance(self.annotation, types.UnionType) or typing.get_origin(self.annotation) is typing.Union:
            args = [a for a in typing.get_args(self.annotation) if a is not type(None)]
            assert len(args) == 1, self.annotation
            return args[0]
        return self.annotation

    def bound(self, kind: type) -> float | int | None:
        for m in self.metadata:
            if isinstance(m, kind):
                return getattr(m, next(iter(m.__dataclass_fields__)))  # type: ignore[no-any-return]
        return None


def leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    for name, field in model.model_fields.items():
        ann = field.annotation
        # an optional block (`X | None`, e.g. defence.validation) is walked like a required one
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            ann = args[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaves(ann, (*prefix, name))
        else:
            yield Leaf((*prefix, name), ann, tuple(field.metadata))


LEAVES = list(leaves(JobSpec))


def with_value(path: tuple[str, ...], value: object) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(job_spec())
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return spec


def field_errors(spec: dict[str, Any], path: tuple[str, ...]) -> list[dict[str, Any]]:
    """Validation errors located at `path` (or inside it); model-level errors do not count."""
    try:
        JobSpec.model_validate(spec)
    except ValidationError as e:
        return [dict(err) for err in e.errors() if tuple(err["loc"][: len(path)]) == path]
    return []


def sample_item(annotation: Any) -> object:
    """A valid element for a list or map value of this type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return sample_item(typing.get_args(annotation)[0])
    if origin is tuple:
        return [sample_item(a) for a in typing.get_args(annotation)]
    if origin is list:
        return [sample_item(typing.get_args(annotation)[0])]
    if annotation is str:
        return "x"
    return 1


def too_long(leaf: Leaf, n: int) -> object:
    base = leaf.base
    origin = typing.get_origin(base)
    if base is str:
        return "a" * n
    if origin is list:
        return [sample_item(typing.get_args(base)[0])] * n
    assert origin is dict, leaf
    value = sample_item(typing.get_args(base)[1])
    return {f"k{i}": value for i in range(n)}


def past(bound: float | int, kind: type, is_int: bool) -> object:
    """The nearest value on the wrong side of a bound."""
    if kind in (Gt, Lt):
        return bound  # exclusive bounds: the bound itself is out
    step = 1 if is_int else max(1.0, abs(float(bound))) * 1e-6
    return bound + step if kind is Le else bound - step


def out_of_bounds() -> Iterator[tuple[str, tuple[str, ...], object]]:
    """(case id, field path, value that must be refused at that path)."""
    for leaf in LEAVES:
        base = leaf.base
        if base in (int, float):
            for kind in (Ge, Gt, Le, Lt):
                bound = leaf.bound(kind)
                if bound is not None:
                    yield f"{leaf.name}-{kind.__name__.lower()}", leaf.path, past(bound, kind, base is int)
            if base is float:
                yield f"{leaf.name}-nan", leaf.path, math.nan
                yield f"{leaf.name}-inf", leaf.path, math.inf
        elif (n := leaf.bound(MaxLen)) is not None:
            yield f"{leaf.name}-maxlen", leaf.path, too_long(leaf, int(n) + 1)
    yield "defence.expected_examples-zero", ("defence", "expected_examples"), {"a": 0}
    yield "defence.expected_examples-int64", ("defence", "expected_examples"), {"a": INT64_MAX + 1}
    yield "strategy_options-long-key", ("strategy_options",), {"k" * 65: 1}
    yield "rank_set-item", ("rank_set",), [4097]
    yield "module_shapes-dim", ("module_shapes",), {"layers.0.q": [1 << 21, 16]}
    yield "module_shapes-negative", ("module_shapes",), {"layers.0.q": [-16, 16]}
    yield "extra_shapes-dim", ("extra_shapes",), {"classifier.weight": [0, 16]}


CASES = list(out_of_bounds())


def test_every_field_is_bounded() -> None:
    unbounded = []
    for leaf in LEAVES:
        base = leaf.base
        if leaf.name in BOUNDED_BY_VALIDATOR or typing.get_origin(base) is typing.Literal or base is bool:
            continue
        if base in (int, float):
            low, high = leaf.bound(Ge) is not None or leaf.bound(Gt) is not None, leaf.bound(Le) or leaf.bound(Lt)
            ok = low and high is not None
        elif base is str:
            ok = leaf.bound(MaxLen) is not None or any(getattr(m, "pattern", None) for m in leaf.metadata)
        else:
            ok = typing.get_origin(base) in (list, dict) and leaf.bound(MaxLen) is not None
        if not ok:
            unbounded.append(leaf.name)
    assert not unbounded, f"job-spec fields without a bound: {unbounded}"
    assert len(LEAVES) >= 45 and len(CASES) >= 90  # the walk found the nested models


@pytest.mark.parametrize(("path", "value"), [pytest.param(p, v, id=i) for i, p, v in CASES])
def test_a_value_past_its_bound_is_refused_at_its_field(path: tuple[str, ...], value: object) -> None:
    assert field_errors(job_spec(), path) == []  # the base spec is valid at that field
    errors = field_errors(with_value(path, value), path)
    assert errors, f"{'.'.join(path)} = {str(value)[:80]} was accepted"


@pytest.mark.parametrize("leaf", [pytest.param(leaf, id=leaf.name) for leaf in LEAVES if leaf.base in (int, float)])
def test_the_bound_itself_is_accepted_at_the_field(leaf: Leaf) -> None:
    for kind in (Ge, Le):
        bound = leaf.bound(kind)
        if bound is not None:
            errors = field_errors(with_value(leaf.path, bound), leaf.path)
            assert errors == [], (leaf.name, bound, errors)


def test_rest_answers_422_naming_the_field_never_500(live: Live) -> None:
    refused = 0
    for case, path, value in CASES:
        # Python's json writes (and the server's parser reads) NaN and Infinity: they reach the model
        body = json.dumps(with_value(path, value))
        if len(body) > REST_BODY_LIMIT:
            continue  # refused by size (413) before it is parsed: test_rest_edge
        r = live.http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (case, r.status_code, r.text[:300])
        locs = [tuple(err["loc"]) for err in r.json()["detail"]]
        assert any(loc[1 : 1 + len(path)] == path for loc in locs), (case, locs)
        refused += 1
    assert refused >= 90
