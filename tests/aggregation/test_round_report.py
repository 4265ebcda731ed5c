"""The round report: a sharded merge reports what an unsharded one does (weights, norms, n_eff,
SVD figures, with the SVD time kept), and the stored shape round-trips and rejects strangers."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from fedhl.agent.scripted import ScriptedAgent
from fedhl.aggregation.compute import compute_shard
from fedhl.aggregation.inputs import load_inputs
from fedhl.core import effective_participants
from fedhl.jobspec import JobSpec
from fedhl.round_report import RoundReport, RoundReportError
from fedhl.storage.db import transaction
from fedhl.storage.models import Round, RoundState
from fedhl.storage.repos import AgentRepo
from stack import job_spec, running, settings_for

SPEC = job_spec(
    n_layers=3,
    dim=24,
    ranks=[2, 4],
    rounds=2,
    rank_policy={"kind": "fixed", "fixed": {"agent-0": 2, "agent-1": 4}},
    selection={"count": 2, "min_clients": 2, "deadline_s": 120},
)


def _aggregating_round(c: object, job_id: str) -> int:
    deps = c.deps  # type: ignore[attr-defined]
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with transaction(deps.sessions) as s:
            rnd = s.query(Round).filter(Round.job_id == job_id, Round.state == RoundState.AGGREGATING).first()
            if rnd is not None:
                return rnd.id
        time.sleep(0.05)
    raise AssertionError("no round reached AGGREGATING")


def test_sharded_report_matches_unsharded_and_keeps_svd_time(tmp_path: Path) -> None:
    settings = settings_for("sqlite+inprocess", tmp_path, inprocess_aggregator=False, aggregation_shards=3)
    with running(settings) as c:
        job = c.jobs.create(JobSpec.model_validate({**SPEC, "strategy": "fedhl"}))
        with transaction(c.deps.sessions) as s:
            tok, _ = AgentRepo(s).create_token("test", 10, None)
        agents = [ScriptedAgent(f"127.0.0.1:{c.grpc_port}", tok, f"agent-{i}", n_examples=40 + 7 * i) for i in range(2)]
        stop = threading.Event()
        threads = [threading.Thread(target=a.run, args=(stop, 1), daemon=True) for a in agents]
        for t in threads:
            t.start()
        try:
            round_id = _aggregating_round(c, job.id)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for a in agents:
                a.close()
        inp = load_inputs(c.deps, round_id)
        assert inp is not None and inp.shards == 3
        sharded = RoundReport.combine([compute_shard(c.deps, inp, k).report for k in range(3)], [1.0, 2.0, 3.0])
        whole = RoundReport.combine([compute_shard(c.deps, dataclasses.replace(inp, shards=1), 0).report], [1.0])

    assert sharded.clients == whole.clients and len(whole.clients) == 2
    for client, w in whole.weights.items():
        assert sharded.weights[client] == pytest.approx(w, rel=1e-9)
        assert sharded.update_norms[client] == pytest.approx(whole.update_norms[client], rel=1e-9)
        assert sharded.effective_weights[client] == pytest.approx(whole.effective_weights[client], rel=1e-9)
    assert sharded.global_update_norm == pytest.approx(whole.global_update_norm, rel=1e-9)
    key = lambda d: (d["client"], d["module"])  # noqa: E731
    assert sorted(sharded.dropped, key=key) == sorted(whole.dropped, key=key)
    assert sorted(sharded.clipped, key=key) == sorted(whole.clipped, key=key)
    # two agents: the larger claim (47) counts as the smaller (40), in every shard alike
    assert sharded.sizes_bounded == whole.sizes_bounded
    assert [(r["client"], r["reported"], r["bounded"]) for r in whole.sizes_bounded] == [(agents[1].agent_id, 47, 40.0)]
    assert sharded.n_eff == pytest.approx(effective_participants(list(sharded.weights.values())))
    assert 1.0 <= sharded.n_eff <= 2.0
    assert sharded.svd["seconds"] > 0  # the round's spectra were timed where they were computed
    assert sharded.timings["shards"] == 3 and sharded.timings["max_shard_s"] == 3.0
    assert RoundReport.from_dict(sharded.to_dict()) == sharded


def test_report_shape_is_checked() -> None:
    good = RoundReport("fedhl", 0, ["a"], {"a": 1.0}, {}, {}, {"a": 0.5}, 0.5, 1.0)
    assert "evaluation" not in good.to_dict()
    assert RoundReport.from_dict(good.to_dict()) == good
    with pytest.raises(RoundReportError, match="unexpected"):
        RoundReport.from_dict({**good.to_dict(), "bogus": 1})
    with pytest.raises(RoundReportError, match="not a round report"):
        RoundReport.from_dict({"strategy": "fedhl"})
