"""The validation screen on a real (tiny, random-config) BERT, trained for real by the agents'
trainer (issue 12, aggregation/validate.py): a sign-flipped upload is left out by name (by the
one-round rule in the round it is seen, by the window rule once two rounds add up), a clean
round is bit-identical to a round without the screen, and `fedhl simulate` and the aggregation
worker (`compute_shard`, reading the round from the blob store and the window's history from
the earlier round's summary) decide the same."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).parents[1] / "agent"))
from tiny_models import toy_examples, write_bert

from fedhl.aggregation.compute import compute_shard
from fedhl.aggregation.inputs import RoundInputs
from fedhl.aggregation.shards import assemble
from fedhl.aggregation.validate import validation_screen
from fedhl.artifacts import initial_state, next_round_artifacts, put_spectra, put_state
from fedhl.backends import Deps
from fedhl.codec import encode_update
from fedhl.core import AggregationError, ClientStart, ClientUpdate, LoRAFactors, RoundPlan
from fedhl.core.defence import VALIDATION_REASON
from fedhl.data import Example
from fedhl.jobspec import JobSpec
from fedhl.modeling import resolve_shapes
from fedhl.simulation import SimClient, simulate
from fedhl.storage.blobs import FileBlobStore

HOSTILE = "agent-0"


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the two paths then add in the same order: bit-identical losses
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    write_bert(path)
    return path


def write_split(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    return path


def spec_for(bert: Path, tmp: Path, strategy: str, *, validation: bool = True, **val: Any) -> JobSpec:
    shapes, extras = resolve_shapes(str(bert), ["query", "value"], "seq_cls", 2)
    raw: dict[str, Any] = {
        "name": "screen",
        "base_model": str(bert),
        "target_modules": ["query", "value"],
        "module_shapes": shapes,
        "extra_shapes": extras,
        "rank_set": [2, 4],
        "strategy": strategy,
        "rounds": 2,
        "train": {"local_steps": 30, "lr": 3e-2, "head_lr": 1e-1, "batch_size": 8, "max_seq_len": 16},
        "seed": 3,
    }
    if validation:
        split = write_split(tmp / "validation.jsonl", toy_examples(64, seed=99))
        raw["defence"] = {"validation": {"path": str(split), **val}}
    return JobSpec.model_validate(raw)


def clients() -> list[SimClient]:
    return [SimClient(f"agent-{i}", [2, 4][i % 2], toy_examples(48, seed=10 + i)) for i in range(5)]


FLIP = -3.0  # a sign flip as large as the update-size bound lets through (3 × the median norm)
# the tiny task learns in a few rounds and its honest effects are helpful (< 0) and close together;
# the flip's is 1.9-2.2 × the round's median |effect| (MiniLM's defaults are for MiniLM's spread)
RULE = {"k": 1.5, "margin": 0.01, "scope": "upload", "window": 1}
# the window rule at the tiny task's scale: one round of the flip (≈ 2 medians) is not enough,
# two are; honest uploads sit near −1 median each round
WINDOW = {"margin": 0.01, "scope": "upload", "window": 2, "score": 3.0, "cap": 3.0}


def flip(start: ClientStart, upd: ClientUpdate) -> ClientUpdate:
    """start + FLIP × (trained − start), factors and head: the honest change reversed and
    scaled up to the update-size bound."""
    fs = {
        m: LoRAFactors(s.B + FLIP * (f.B - s.B), s.A + FLIP * (f.A - s.A))
        for m, f in upd.factors.items()
        for s in [start.factors[m]]
    }
    head = {k: start.extras[k] + FLIP * (v - start.extras[k]) for k, v in upd.extras.items()}
    return dataclasses.replace(upd, factors=fs, extras=head)


class Recorder:
    """`simulate`'s tamper hook: flips the hostile upload (when asked; `also`: more hostile
    agents) and keeps every upload as the merge received it, per round."""

    def __init__(self, hostile: bool, also: tuple[str, ...] = ()) -> None:
        self.hostile = hostile
        self.flipped = {HOSTILE, *also}
        self.uploads: dict[int, list[ClientUpdate]] = {}

    def __call__(self, round_: int, start: ClientStart, upd: ClientUpdate) -> ClientUpdate:
        out = flip(start, upd) if self.hostile and upd.client_id in self.flipped else upd
        self.uploads.setdefault(round_, []).append(out)
        return out


def left_out(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(r["round"], d["client"]) for r in rows for d in r["report"]["dropped"] if d["reason"] == VALIDATION_REASON]


@pytest.mark.parametrize("strategy", ["fedhl", "flexlora"])
def test_a_sign_flipped_upload_is_left_out_by_name(strategy: str, bert: Path, tmp_path: Path) -> None:
    spec = spec_for(bert, tmp_path, strategy, **RULE)
    _, rows = simulate(spec, clients(), toy_examples(40, seed=7), tamper=Recorder(hostile=True))
    assert left_out(rows) == [(0, HOSTILE), (1, HOSTILE)]
    for r in rows:
        v = r["validation"]
        effects = v["effects"]
        assert v["left_out"] == [HOSTILE] and v["examples"] == 64 and v["seconds"] > 0
        assert effects[HOSTILE] > v["threshold"] >= spec.defence.validation.margin  # type: ignore[union-attr]
        assert all(e <= v["threshold"] for c, e in effects.items() if c != HOSTILE)
        d = next(d for d in r["report"]["dropped"] if d["reason"] == VALIDATION_REASON)
        assert d["module"] == "*" and d["effect"] == effects[HOSTILE] and d["threshold"] == v["threshold"]
        assert r["report"]["effective_weights"][HOSTILE] == 0.0
        assert r["report"]["validation"] == v and r["report"]["timings"]["validate_s"] > 0
    # measured but not acted on: the flip is merged
    _, measured = simulate(
        spec_for(bert, tmp_path, strategy, act=False, **RULE),
        clients(),
        toy_examples(40, seed=7),
        tamper=Recorder(True),
    )
    assert left_out(measured) == [] and measured[0]["validation"]["left_out"] == []
    assert measured[0]["validation"]["effects"] == rows[0]["validation"]["effects"]  # round 0 starts alike
    assert measured[0]["report"]["effective_weights"][HOSTILE] > 0


@pytest.mark.parametrize("strategy", ["fedhl", "flexlora"])
def test_a_clean_run_is_bit_identical_with_and_without_the_screen(strategy: str, bert: Path, tmp_path: Path) -> None:
    test = toy_examples(40, seed=7)
    screened, rows = simulate(spec_for(bert, tmp_path, strategy), clients(), test)
    plain, plain_rows = simulate(spec_for(bert, tmp_path, strategy, validation=False), clients(), test)
    assert left_out(rows) == []
    assert all(r["validation"]["threshold"] is not None for r in rows)  # measured every round
    assert plain_rows[0]["validation"] is None and "validation" not in plain_rows[0]["report"]
    for k, v in plain.tensors().items():
        assert torch.equal(screened.tensors()[k], v), k
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in plain_rows]


@pytest.mark.parametrize("strategy", ["fedhl", "flexlora"])
def test_simulate_and_the_worker_decide_the_same(strategy: str, bert: Path, tmp_path: Path) -> None:
    spec = spec_for(bert, tmp_path, strategy, **RULE)
    rec = Recorder(hostile=True)
    sim = spec.model_copy(update={"rounds": 1})
    sim_state, rows = simulate(sim, clients(), [], tamper=rec)
    # the same round through the worker: start state, spectra and uploads from the blob store
    blobs = FileBlobStore(tmp_path / "blobs")
    strategy_ = spec.build_strategy()
    state0 = initial_state(strategy_, spec)
    spectra, _ = next_round_artifacts(strategy_, state0, spec.rank_set)
    uploads = []
    for u in rec.uploads[0]:
        key = blobs.put_bytes(encode_update(u.factors, u.extras))
        uploads.append((u.client_id, key, u.n_examples))
    inp = RoundInputs(
        round_id=1,
        job_id="job",
        number=0,
        spec=spec,
        uploads=uploads,
        rank_of={c.name: c.rank for c in clients()},
        state_key=put_state(blobs, state0),
        plan_key=put_spectra(blobs, spectra) if strategy_.uses_spectrum else None,
        shards=1,
    )
    deps = Deps(sessions=None, blobs=blobs, coordination=None, device="cpu")  # type: ignore[arg-type]
    part = compute_shard(deps, inp, 0)
    worker_state, _, _ = assemble([part])

    def timeless(v: dict[str, Any]) -> dict[str, Any]:
        return {k: x for k, x in v.items() if k != "seconds"}

    # same effects (bit for bit), threshold and decision
    assert timeless(part.report["validation"]) == timeless(rows[0]["validation"])
    assert [d for d in part.report["dropped"] if d["reason"] == VALIDATION_REASON] == [
        d for d in rows[0]["report"]["dropped"] if d["reason"] == VALIDATION_REASON
    ]
    assert rows[0]["validation"]["left_out"] == [HOSTILE]
    for k, v in sim_state.tensors().items():
        torch.testing.assert_close(worker_state.tensors()[k], v, rtol=1e-6, atol=1e-7)
    # the same function, called directly on the round, decides the same again
    plan = RoundPlan(
        round=0,
        ranks={u.client_id: dict.fromkeys(spec.module_shapes, inp.rank_of[u.client_id]) for u in rec.uploads[0]},
        spectra=spectra,
    )
    again = validation_screen(strategy_, state0, plan, rec.uploads[0], spec)
    assert again.summary is not None and timeless(again.summary) == timeless(rows[0]["validation"])
    # a sharded round of a screened job fails with the reason
    with pytest.raises(AggregationError, match="one aggregation task"):
        compute_shard(deps, dataclasses.replace(inp, shards=2), 0)


def test_bad_configuration_is_refused_precisely(bert: Path, tmp_path: Path) -> None:
    spec = spec_for(bert, tmp_path, "fedhl")
    raw = spec.model_dump()
    with pytest.raises(ValidationError, match="max_examples"):
        JobSpec.model_validate({**raw, "defence": {"validation": {"path": "v.jsonl", "max_examples": 0}}})
    with pytest.raises(ValidationError, match="k"):
        JobSpec.model_validate({**raw, "defence": {"validation": {"path": "v.jsonl", "k": 0.5}}})
    with pytest.raises(ValidationError, match="margin"):
        JobSpec.model_validate({**raw, "defence": {"validation": {"path": "v.jsonl", "margin": -1}}})
    with pytest.raises(ValidationError, match="path"):
        JobSpec.model_validate({**raw, "defence": {"validation": {"max_examples": 10}}})
    with pytest.raises(ValidationError, match=r"evaluation\.path"):
        JobSpec.model_validate(
            {**raw, "evaluation": {"path": "v.jsonl"}, "defence": {"validation": {"path": "v.jsonl"}}}
        )
    missing = JobSpec.model_validate({**raw, "defence": {"validation": {"path": str(tmp_path / "nope.jsonl")}}})
    with pytest.raises(
        AggregationError, match=r"defence\.validation\.path cannot be used: .*nope\.jsonl: no such file"
    ):
        simulate(missing, clients(), [])
    assert JobSpec.model_validate({**raw, "defence": {}}).defence.validation is None  # off by default
    assert math.isfinite(spec.defence.validation.k)  # type: ignore[union-attr]


def test_the_scheduler_gives_a_screened_job_one_shard(tmp_path: Path) -> None:
    from crew import crew, token, wait_round
    from fedhl.aggregation.inputs import load_inputs
    from fedhl.storage.models import RoundState
    from stack import job_spec, running, settings_for

    settings = settings_for("sqlite+inprocess", tmp_path, inprocess_aggregator=False, aggregation_shards=3)
    spec = job_spec(n_layers=3, dim=24, selection={"count": 3, "min_clients": 3, "deadline_s": 120})
    screened = {**spec, "defence": {"validation": {"path": str(tmp_path / "v.jsonl")}}}
    shards = []
    with running(settings) as c:
        team = crew(f"127.0.0.1:{c.grpc_port}", token(c), 3)
        try:
            for raw in (spec, screened):  # one after the other: nothing aggregates, the agents move on
                job = c.jobs.create(JobSpec.model_validate(raw))
                rnd = wait_round(c, job.id, {RoundState.AGGREGATING})
                inp = load_inputs(c.deps, rnd.id)
                assert inp is not None
                shards.append(inp.shards)
        finally:
            team.close()
    assert shards == [3, 1]


def worker_round(spec: JobSpec, state: Any, uploads: list[ClientUpdate], tmp: Path, **inputs: Any) -> Any:
    """The round that starts from `state`, through the aggregation worker (`compute_shard`):
    state, spectra and uploads from a blob store."""
    blobs = FileBlobStore(tmp / "blobs")
    strategy = spec.build_strategy()
    spectra, _ = next_round_artifacts(strategy, state, spec.rank_set)
    inp = RoundInputs(
        round_id=1,
        job_id="job",
        number=state.round,
        spec=spec,
        uploads=[(u.client_id, blobs.put_bytes(encode_update(u.factors, u.extras)), u.n_examples) for u in uploads],
        rank_of={c.name: c.rank for c in clients()},
        state_key=put_state(blobs, state),
        plan_key=put_spectra(blobs, spectra) if strategy.uses_spectrum else None,
        shards=1,
        **inputs,
    )
    deps = Deps(sessions=None, blobs=blobs, coordination=None, device="cpu")  # type: ignore[arg-type]
    return compute_shard(deps, inp, 0)


@pytest.mark.parametrize("strategy", ["fedhl", "flexlora"])
def test_the_window_rule_leaves_out_the_flip_once_two_rounds_add_up_and_the_worker_agrees(
    strategy: str, bert: Path, tmp_path: Path
) -> None:
    spec = spec_for(bert, tmp_path, strategy, **WINDOW)
    rec = Recorder(hostile=True)
    _, rows = simulate(spec, clients(), [], tamper=rec)
    assert left_out(rows) == [(1, HOSTILE)]  # round 0 alone is not enough
    first, second = rows[0]["validation"], rows[1]["validation"]
    assert 0 < first["scores"][HOSTILE] <= 3.0 < second["scores"][HOSTILE]
    assert (first["history"], second["history"]) == (0, 1) and second["threshold"] == 3.0
    honest = [s for c, s in second["scores"].items() if c != HOSTILE]
    assert max(honest) < 0  # helpful in both rounds
    d = next(d for d in rows[1]["report"]["dropped"] if d["reason"] == VALIDATION_REASON)
    assert (d["effect"], d["score"], d["threshold"]) == (second["effects"][HOSTILE], second["scores"][HOSTILE], 3.0)
    # round 1 through the worker, from the state round 0 committed and round 0's summary as stored
    state1, _ = simulate(spec.model_copy(update={"rounds": 1}), clients(), [], tamper=Recorder(hostile=True))
    stored = json.loads(json.dumps(first))  # through a report's JSON, as the database returns it
    part = worker_round(spec, state1, rec.uploads[1], tmp_path, screened=[stored])
    timeless = {k: x for k, x in part.report["validation"].items() if k != "seconds"}
    assert timeless == {k: x for k, x in second.items() if k != "seconds"}
    assert [x for x in part.report["dropped"] if x["reason"] == VALIDATION_REASON] == [
        x for x in rows[1]["report"]["dropped"] if x["reason"] == VALIDATION_REASON
    ]
    # the history decides: without round 0's summary the same round keeps the flip in
    alone = worker_round(spec, state1, rec.uploads[1], tmp_path / "alone", screened=[None])
    assert alone.report["validation"]["left_out"] == [] and alone.report["validation"]["history"] == 0


def test_a_second_candidate_is_left_out_only_if_it_hurts_the_merge_without_the_first(
    bert: Path, tmp_path: Path
) -> None:
    # two flipped agents of five: both above the score in round 1; the second is re-measured
    # against the merge without the first (an honest agent whose harm came from the first would
    # fall below the margin there) and, a flip itself, is left out too
    # with two flips the round's median |effect| is larger: each sums to ≈ 1.7 medians over the two rounds
    spec = spec_for(bert, tmp_path, "fedhl", **{**WINDOW, "score": 1.5})
    _, rows = simulate(spec, clients(), [], tamper=Recorder(hostile=True, also=("agent-2",)))
    v = rows[1]["validation"]
    assert sorted(c for r, c in left_out(rows) if r == 1) == [HOSTILE, "agent-2"]
    second = v["left_out"][1]
    assert list(v["rechecked"]) == [second] and v["rechecked"][second] > v["margin"]
    assert v["rechecked"][second] != v["effects"][second]  # measured against a different merge
    assert "rechecked" not in rows[0]["validation"]  # nobody above the score: nothing to re-check
