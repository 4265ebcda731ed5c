"""`fedhl simulate`: client sampling, input checks, and the command end to end on a tiny BERT
over the vendored corpus (results.json in the demo's shape; same seed ⇒ same numbers).
That simulate and the distributed path reach the same state is pinned in test_agent_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedhl.data import Example
from fedhl.jobspec import JobSpec
from fedhl.simulation import SimClient, select_clients, simulate


def clients(n: int) -> list[SimClient]:
    return [SimClient(f"agent-{i}", 2, [Example("good", 1)]) for i in range(n)]


def test_participation_samples_a_seeded_subset_per_round() -> None:
    cs = clients(10)
    picked = [select_clients(cs, 0.3, seed=1, round_=t) for t in range(20)]
    assert all(len(p) == 3 for p in picked)
    assert picked == [select_clients(cs, 0.3, seed=1, round_=t) for t in range(20)]  # reproducible
    assert len({tuple(c.name for c in p) for p in picked}) > 1  # not the same three every round
    assert select_clients(cs, 1.0, 0, 0) == cs
    assert len(select_clients(cs, 0.01, 0, 0)) == 1  # at least one
    with pytest.raises(ValueError, match="participation"):
        select_clients(cs, 0.0, 0, 0)


def test_bad_clients_are_refused_before_any_work(bert_dir: Path) -> None:
    spec = JobSpec.model_validate(
        {"name": "x", "base_model": str(bert_dir), "target_modules": ["query"], "rank_set": [2, 4], "rounds": 1}
    )
    with pytest.raises(ValueError, match="not in the job's rank_set"):
        simulate(spec, [SimClient("a", 8, [Example("good", 1)])], [])
    with pytest.raises(ValueError, match="unique"):
        simulate(spec, [*clients(1), *clients(1)], [])
    with pytest.raises(ValueError, match="no examples"):
        simulate(spec, [SimClient("a", 2, [])], [])
    with pytest.raises(ValueError, match="no clients"):
        simulate(spec, [], [])


def _simulate(model: Path, out: Path) -> dict[str, object]:
    argv = [
        *("--model", str(model), "--agents", "3", "--ranks", "2,4", "--rounds", "2", "--local-steps", "2"),
        *("--batch-size", "8", "--max-seq-len", "16", "--test-size", "40", "--alpha-dirichlet", "0.5"),
        *("--participation", "0.6", "--threads", "1", "--quiet", "--out", str(out)),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "fedhl.cli", "simulate", *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads((out / "results.json").read_text())
    return result


def test_the_command_writes_the_demos_results_shape_reproducibly(tmp_path: Path) -> None:
    from tiny_models import write_bert

    model = tmp_path / "tiny-bert"
    write_bert(model)
    first = _simulate(model, tmp_path / "one")
    assert {"strategy", "config", "wall_s", "rounds"} <= set(first)
    rounds = first["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 2
    for r in rounds:
        assert {"round", "accuracy", "loss", "participants", "ranks", "weights", "truncation_errors"} <= set(r)
        assert r["participants"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and r["bytes_uploaded"] > 0
    assert (tmp_path / "one" / "accuracy.png").stat().st_size > 0
    assert JobSpec.model_validate_json((tmp_path / "one" / "spec.json").read_text()).rounds == 2
    again = _simulate(model, tmp_path / "two")
    assert [(r["accuracy"], r["loss"], r["weights"]) for r in again["rounds"]] == [  # type: ignore[index, union-attr]
        (r["accuracy"], r["loss"], r["weights"]) for r in rounds
    ]


def test_full_view_clients_rebuild_the_global_update(bert_dir: Path) -> None:
    """The factored downlink in `simulate`: clients that sat rounds out take a chain of changes
    (or the dense state), every rebuilt state matched the server's hashes (simulate raises
    otherwise), and the round report names the view and the bytes per rank class."""
    # Prepare
    spec = JobSpec.model_validate(
        {
            "name": "full",
            "base_model": str(bert_dir),
            "target_modules": ["query", "value"],
            "rank_set": [2, 4],
            "lora_alpha": 8.0,
            "rounds": 5,
            "strategy": "fedhl",
            "strategy_options": {"client_view": "full"},
            "train": {"local_steps": 2, "lr": 1e-2, "batch_size": 8, "max_seq_len": 16},
            "seed": 1,
        }
    )
    data = [Example("good fun", 1), Example("bad dull", 0)] * 4
    cs = [SimClient(f"agent-{i}", 2 if i < 2 else 4, data) for i in range(4)]
    # Execute
    _, rows = simulate(spec, cs, [], participation=0.5)
    # Assert
    routes = [(r["round"], c, route) for r in rows for c, route in r["downlink_routes"].items()]
    assert {route for t, _, route in routes if t == 0} == {"zeros"}
    assert {route for t, _, route in routes if t > 0} <= {"chain", "state"}
    # row t's report gives the sizes of version t+1; a client obtaining version t downloads its
    # start package plus one change per version it missed, or the dense state
    down = [r["report"]["downlink"] for r in rows]
    last_seen: dict[str, int] = {}
    missed = 0
    for r in rows[1:]:
        t = r["round"]
        for c, got in r["bytes_downloaded"].items():
            start = down[t - 1]["start_bytes"]["2" if c in ("agent-0", "agent-1") else "4"]
            gap = t - last_seen.get(c, 0)
            if r["downlink_routes"][c] == "chain":
                assert got == start + sum(d["change_bytes"] for d in down[t - gap : t])
            else:
                assert got == start + down[t - 1]["state_bytes"]
            missed += gap > 1
            last_seen[c] = t
    assert missed > 0  # some client sat rounds out and caught up
    report = rows[-1]["report"]["downlink"]
    assert report["client_view"] == "full" and report["factored"]
    assert report["per_rank_bytes"]["2"] == report["start_bytes"]["2"] + report["change_bytes"]


def test_rebuilt_residual_is_the_servers_dense_residual() -> None:
    """What an agent folds into its base (`W − s·B⁰A⁰` from its start factors) is the dense
    residual `W − trunc(W, r)` the server would have sent."""
    import torch

    from fedhl.agent.globalcache import full_view_start
    from fedhl.core import FedHL, LoRAScaling

    # Prepare
    g = torch.Generator().manual_seed(0)
    strategy = FedHL(LoRAScaling(8.0), client_view="full")
    state = strategy.init_state({"q": (24, 20)})
    state.dense["q"] = torch.randn(24, 6, generator=g) @ torch.randn(6, 20, generator=g)
    plan = strategy.plan_round(state, {"a": {"q": 2}})
    # Execute
    dense = strategy.client_start(state, plan, "a")
    lean = strategy.client_start(state, plan, "a", residuals=False)
    rebuilt = full_view_start(lean, state.dense, LoRAScaling(8.0))
    # Assert
    assert not lean.base_residual
    want = dense.base_residual["q"]
    assert isinstance(want, torch.Tensor)
    assert torch.allclose(rebuilt.base_residual["q"], want, rtol=0, atol=1e-5 * float(want.abs().max()))
