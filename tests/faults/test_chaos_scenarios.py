"""bench/chaos.py's scenarios, smaller, in CI: real processes (a coordinator, two aggregator
workers, four scripted agents) on a private Postgres and a private Redis, with Redis and
Postgres stopped for 3 s, an aggregator SIGKILLed mid-merge and 30 % of the agents killed.
Nothing accepted is lost or applied twice and no scenario gets stuck. (A coordinator SIGKILL
mid-round runs in tests/coordinator/test_e2e_rounds.py, an aggregator SIGKILL with a
bit-identical result in tests/aggregation/test_worker.py; the per-phase coordinator kills and
the partition, which waits out a round deadline, stay in the benchmark.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["redis_stopped_10s", "postgres_stopped_10s", "aggregator_sigkill_mid_merge", "agents_30pct_killed"]


def test_chaos_scenarios_lose_nothing_double_nothing_and_recover() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--agents", "4", "--outage-s", "3", "--only", *SCENARIOS],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr[-3000:]
    *scenarios, summary = lines
    assert [s["scenario"] for s in scenarios] == SCENARIOS, out.stdout
    for s in scenarios:
        assert s["updates_accepted"] > 0 and s["rounds_completed"] >= 3, s
    assert summary == {"scenarios": 4, "total_lost": 0, "total_doubled": 0, "stuck_scenarios": []}, out.stdout
