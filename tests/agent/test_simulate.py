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
