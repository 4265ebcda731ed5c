"""The one-shot GPU check (bench/gpu_check.py) keeps working: its CPU variant at tiny sizes
runs every step but the gpu-marked tests (the suite runs those itself) and prints one JSON
summary line that says each step passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_prints_one_json_summary() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services")}
    p = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--quick", "--skip-tests", "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    agg = summary["aggregation"]
    assert agg["ok"] and agg["f64_checked_modules"] == 2 and agg["rel_error_vs_cpu_f64"] < 1e-4, agg
    assert agg["seconds_per_round"] > 0 and agg["peak_device_mb"] is None  # no device memory on CPU
    sim = summary["simulate"]
    assert sim["ok"] and 0.0 <= sim["accuracy"] <= 1.0, sim
    assert p.returncode == 0 and summary["ok"], summary
