"""The one-shot GPU check: what to run the first time a CUDA machine is at hand, in under
8 minutes, ending with one JSON summary line.

    bench/gpu_check.sh                                   # CUDA when present, else CPU (slow)
    python bench/gpu_check.py --quick --skip-tests       # CI: tiny sizes on CPU (tests/test_gpu_check.py)

1. the `gpu`-marked tests (`pytest -m gpu`; they run on CPU without a GPU);
2. one FedHL aggregation round at LLaMA-7B q/v shape (`bench/aggregation.py`: 64 modules of
   4096², 100 clients) on the device: seconds per round, peak device memory, and the merged
   state's relative error against a float64 CPU merge of the same inputs on a few modules;
3. one `fedhl simulate` round (MiniLM-L6, the demo's setting) on the device.

Every step has its own time limit; a step that fails or times out is reported in the summary
(`ok: false`) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout_s: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out, time.perf_counter() - t0


def gpu_tests(timeout_s: float) -> dict[str, Any]:
    rc, out, secs = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], timeout_s)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return {"ok": rc == 0, "rc": rc, "summary": last, "seconds": round(secs, 1)}


def aggregation_round(device: str, quick: bool, timeout_s: float) -> dict[str, Any]:
    size = ["--layers", "1", "--dim", "256", "--clients", "8"] if quick else []
    cmd = [sys.executable, "bench/aggregation.py", "--device", device, "--naive-modules", "1", "--f64-check", "2"]
    rc, out, secs = _run(cmd + size, timeout_s)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"ok": False, "rc": rc, "tail": out[-2000:], "seconds": round(secs, 1)}
    keep = ("modules", "shape", "clients", "seconds_per_round", "merge_seconds", "start_factor_seconds")
    return {
        "ok": rc == 0,
        **{k: res[k] for k in keep},
        "peak_device_mb": res.get("peak_device_mb"),
        "rel_error_vs_cpu_f64": res.get("f64_rel_error"),
        "f64_checked_modules": res.get("f64_checked_modules"),
        "device_name": res["device"],
    }


def simulate_round(device: str, quick: bool, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedhl-gpucheck-") as d:
        size = ["--agents", "2", "--local-steps", "1", "--test-size", "16", "--max-seq-len", "16"] if quick else []
        cmd = [sys.executable, "-m", "fedhl.cli", "simulate", "--rounds", "1", "--device", device, "--quiet"]
        rc, out, secs = _run([*cmd, "--out", d, *size], timeout_s)
        path = Path(d) / "results.json"
        if rc != 0 or not path.exists():
            return {"ok": False, "rc": rc, "tail": out[-2000:], "seconds": round(secs, 1)}
        res = json.loads(path.read_text())
    last = res["rounds"][-1] if res.get("rounds") else {}
    return {
        "ok": True,
        "seconds": round(secs, 1),
        "accuracy": last.get("accuracy"),
        "round_seconds": last.get("seconds"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI on CPU)")
    ap.add_argument("--skip-tests", action="store_true", help="leave out step 1 (the suite runs those tests itself)")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"check": "gpu", "device": device, "quick": args.quick}
    if device.startswith("cuda"):
        summary["device_name"] = torch.cuda.get_device_name(torch.device(device))
    if not args.skip_tests:
        summary["gpu_tests"] = gpu_tests(150)
    summary["aggregation"] = aggregation_round(device, args.quick, 120 if args.quick else 240)
    summary["simulate"] = simulate_round(device, args.quick, 120 if args.quick else 150)
    steps = [v for v in summary.values() if isinstance(v, dict)]
    summary["ok"] = all(s["ok"] for s in steps)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary), flush=True)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
