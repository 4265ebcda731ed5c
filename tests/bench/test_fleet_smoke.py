"""bench/fleet.py, small, in CI: 50 scripted agents held connected by a coordinator process on a
private Postgres + Redis, then one round that selects 10 of them; the summary carries every key
the benchmark reports and no call failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {
    "max_connected_agents",
    "heartbeat_p50_ms",
    "heartbeat_p99_ms",
    "errors",
    "round_overhead_s",
    "coordinator_peak_rss_mb",
    "coordinator_cpu_s_per_round",
}


def test_fleet_bench_holds_50_agents_and_runs_a_round_without_errors() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), os.environ.get("PYTHONPATH", "")])}
    args = ["--agents", "50", "--idle", "50", "--select", "10", "--rounds", "1"]
    args += ["--duration", "6", "--ramp", "2", "--warmup", "2", "--settle", "0", "--round-limit", "60"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3, out.stdout + out.stderr[-3000:]
    idle, rnd, summary = lines
    assert idle["scenario"] == "idle:50" and idle["connected_min"] == 50 and idle["coordinator_live"] == 50, idle
    assert idle["heartbeats"] > 0, idle
    assert rnd["scenario"] == "round:10" and rnd["rounds_committed"] == 1 and rnd["uploads"] == 10, rnd
    assert summary.keys() >= SUMMARY_KEYS, summary
    assert summary["errors"] == 0 and summary["max_connected_agents"] == 50, summary
    assert isinstance(summary["round_overhead_s"]["10"], float), summary
    assert summary["coordinator_peak_rss_mb"] > 0 and summary["coordinator_cpu_s_per_round"]["10"] > 0, summary
