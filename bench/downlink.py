"""Downlink and uplink bytes per client per round for FedHL's client views (issue 20 item 2).

Views: `truncated` (start factors only), `residual:R` (plus the residual band r..R as factors),
`full` with the old dense residual (plus d_out × d_in per module), and `full` with the factored
downlink (plus the round's change as factors of inner size K = Σ r_i + r_max, or the module's
new value where that is smaller). Sizes are the files the platform writes: float32 values plus
the exact safetensors header (`fedhl.tensorfile.header`, same tensor names and metadata).

Shapes: the demo's (MiniLM-L6, q/v, 6 layers × 384×384) and LLaMA-7B q/v (32 layers × 2 ×
4096×4096). Cohorts: the demo's 6 agents (ranks 2,2,4,4,8,16), and 10 and 100 participants with
ranks 2..64 spread evenly over {2, 4, 8, 16, 32, 64} (participant i has rank 2^(1 + i mod 6)).

Also: the agent's memory for the held global update, the number of missed rounds a chain of
changes stays cheaper than the dense state, and the CPU time to rebuild W_{t+1} from W_t
(`core.downlink.apply_change` + the module hash, measured on one module per shape and cohort,
times the module count).

    PYTHONPATH=services flock /work/wt/bench.lock nice -n 0 .venv/bin/python bench/downlink.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from fedhl.codec import START_HASHES, change_metadata, state_metadata
from fedhl.core.downlink import apply_change, exact_factors, factors_cheaper, module_sha256
from fedhl.tensorfile import header

F32 = torch.float32
SHAPES = {
    "minilm-l6-qv": {f"encoder.layer.{i}.attention.self.{p}": (384, 384) for i in range(6) for p in ("query", "value")},
    "llama7b-qv": {f"model.layers.{i}.self_attn.{p}": (4096, 4096) for i in range(32) for p in ("q_proj", "v_proj")},
}
RANK_SET = [2, 4, 8, 16, 32, 64]
COHORTS = {"demo-6": [2, 2, 4, 4, 8, 16], "10": [RANK_SET[i % 6] for i in range(10)]}
COHORTS["100"] = [RANK_SET[i % 6] for i in range(100)]
RESIDUAL_R = [32, 64, 128]
HASH = "0" * 64


def file_bytes(specs: dict[str, tuple[int, ...]], meta: dict[str, str]) -> int:
    head = header({k: (F32, s) for k, s in specs.items()}, meta)
    return len(head) + 4 * sum(int(torch.Size(s).numel()) for s in specs.values())


def start_specs(shapes: dict[str, tuple[int, int]], r: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for m, (o, i) in shapes.items():
        out[f"lora_B::{m}"], out[f"lora_A::{m}"] = (o, r), (r, i)
    return out


def start_meta(shapes: dict[str, tuple[int, int]], factored: bool) -> dict[str, str]:
    meta = {"job_id": "0" * 32, "round": "10", "strategy": "fedhl", "lora_alpha": "16.0", "scale_rule": "standard"}
    if factored:
        meta[START_HASHES] = json.dumps(dict.fromkeys(shapes, HASH))
    return {**meta, "rank": "64"}


def sizes(shapes: dict[str, tuple[int, int]], ranks: list[int]) -> dict[str, Any]:
    k = sum(ranks) + max(ranks)
    change: dict[str, tuple[int, ...]] = {}
    for m, (o, i) in shapes.items():
        if factors_cheaper((o, i), k):
            change[f"change_B::{m}"], change[f"change_A::{m}"] = (o, k), (k, i)
        else:
            change[f"value::{m}"] = (o, i)
    change_b = file_bytes(change, change_metadata(11, dict.fromkeys(shapes, HASH)))
    state_b = file_bytes({f"dense::{m}": s for m, s in shapes.items()}, state_metadata(11))
    per_rank: dict[str, dict[str, int]] = {}
    for r in sorted(set(ranks)):
        start = file_bytes(start_specs(shapes, r), start_meta(shapes, False))
        start_f = file_bytes(start_specs(shapes, r), start_meta(shapes, True))
        row = {"uplink": file_bytes(start_specs(shapes, r), {}), "truncated": start}
        for R in RESIDUAL_R:
            band = {}
            for m, (o, i) in shapes.items():
                if min(R, o, i) > r:
                    band[f"residual_B::{m}"], band[f"residual_A::{m}"] = (o, min(R, o, i) - r), (min(R, o, i) - r, i)
            row[f"residual:{R}"] = file_bytes({**start_specs(shapes, r), **band}, start_meta(shapes, False))
        dense = {f"residual::{m}": s for m, s in shapes.items()}
        row["full-dense"] = file_bytes({**start_specs(shapes, r), **dense}, start_meta(shapes, False))
        row["full-factored"] = start_f + min(change_b, state_b)  # the coordinator sends the smaller
        row["full-factored-new-or-lagging"] = start_f + state_b  # worst case: the dense state
        per_rank[str(r)] = row
    mean = {v: sum(per_rank[str(r)][v] for r in ranks) / len(ranks) for v in next(iter(per_rank.values()))}
    return {
        "K": k,
        "change_bytes": change_b,
        "state_bytes": state_b,
        "change_is_factored": any(n.startswith("change_B::") for n in change),
        "chain_cheaper_up_to_missed_rounds": state_b // change_b if change_b else None,
        "held_memory_bytes": state_b,
        "per_rank": per_rank,
        "mean_per_client": mean,
    }


def rebuild_seconds(shape: tuple[int, int], k: int, n_modules: int) -> dict[str, float]:
    """One module: W_{t+1} = apply_change(W_t, change) and its sha256, on CPU; × n_modules."""
    g = torch.Generator().manual_seed(0)
    o, i = shape
    W = torch.randn(o, i, generator=g) * 0.01
    if factors_cheaper(shape, k):
        c = exact_factors(torch.randn(o, k, generator=g) * 0.01, torch.randn(k, i, generator=g) * 0.01)
        change: Any = c
    else:
        change = torch.randn(o, i, generator=g) * 0.01  # the new value travels: a copy
    t0 = time.perf_counter()
    new = apply_change(W, change)
    t1 = time.perf_counter()
    module_sha256(new)
    t2 = time.perf_counter()
    return {
        "apply_s_per_module": t1 - t0,
        "hash_s_per_module": t2 - t1,
        "rebuild_s_all_modules": (t2 - t0) * n_modules,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/downlink/downlink.json"))
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "results": {},
    }
    for name, shapes in SHAPES.items():
        for cohort, ranks in COHORTS.items():
            if name == "llama7b-qv" and cohort == "demo-6":
                continue
            res = sizes(shapes, ranks)
            if not args.no_timing:
                shape = next(iter(shapes.values()))
                res["rebuild_cpu"] = rebuild_seconds(shape, res["K"], len(shapes))
            out["results"][f"{name}/{cohort}"] = res
            print(name, cohort, json.dumps({k: v for k, v in res.items() if k != "per_rank"}))
    out["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
