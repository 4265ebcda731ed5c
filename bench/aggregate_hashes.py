"""Content hashes of two rounds of every strategy's merge on small random inputs, with an
outlier (clipped or rejected), a non-finite and an overflowing upload, float32 and bfloat16
uploads: run it against two source trees and diff the output to show that a change to the merge
or its screening leaves every result bit-identical.

    python bench/aggregate_hashes.py --services services > new.txt
    python bench/aggregate_hashes.py --services /path/to/main/services > old.txt
    diff old.txt new.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any


def run(services: str) -> None:
    sys.path.insert(0, services)
    import torch

    from fedhl.core import AggregationError, ClientUpdate, LoRAFactors, build_strategy

    shapes = {"q": (48, 40), "v": (40, 56)}
    ranks = {"c0": 2, "c1": 4, "c2": 4, "c3": 8, "c4": 2, "c5": 8}
    cases: list[tuple[str, dict[str, Any]]] = []
    for name in ("fedhl", "flexlora", "flora", "hetlora", "zeropad"):
        for clip in ({"k": 3.0, "action": "clip"}, {"k": 2.0, "action": "reject"}, "off"):
            cases.append((name, {"clip": clip}))
    cases.append(("fedhl", {"client_view": "full"}))
    cases.append(("fedhl", {"client_view": "residual:6", "weights": "paper-literal"}))
    cases.append(("fedit", {"clip": {"k": 3.0, "action": "clip"}}))
    for name, opts in cases:
        for dtype in (torch.float32, torch.bfloat16):
            strategy = build_strategy(name, alpha=16.0, **opts)
            rk = dict.fromkeys(ranks, 4) if name == "fedit" else ranks
            state = strategy.init_state(shapes, {"head": torch.zeros(3)}, max_rank=max(rk.values()))
            g = torch.Generator().manual_seed(7)
            lines = []
            for rnd in range(2):
                plan = strategy.plan_round(state, {c: dict.fromkeys(shapes, r) for c, r in rk.items()})
                updates = []
                for j, c in enumerate(rk):
                    start = strategy.client_start(state, plan, c)
                    fs = {}
                    for m, f in start.factors.items():
                        noise = 0.05 * (30.0 if j == 1 else 1.0)  # c1: an outlier
                        B = f.B + noise * torch.randn(f.B.shape, generator=g, dtype=torch.float64).to(f.B.dtype)
                        A = f.A + noise * torch.randn(f.A.shape, generator=g, dtype=torch.float64).to(f.A.dtype)
                        if j == 2 and m == "q":
                            B = B.clone()
                            B[0, 0] = float("nan")
                        if j == 4 and m == "v":
                            B = B * 1e37
                        fs[m] = LoRAFactors(B.to(dtype), A.to(dtype))
                    extras = {"head": torch.randn(3, generator=g) * (10.0 if j == 1 else 1.0)}
                    updates.append(ClientUpdate(c, fs, n_examples=10 + 7 * j, extras=extras))
                try:
                    state, report = strategy.aggregate(state, plan, updates)
                except AggregationError as e:
                    lines.append(f"round {rnd}: {e}")
                    break
                h = hashlib.sha256()
                for k, t in sorted(state.tensors().items()):
                    h.update(k.encode())
                    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
                rep = report.to_dict()
                rep.pop("svd", None)  # holds SVD seconds
                lines.append(f"round {rnd}: state {h.hexdigest()[:16]} report {_digest(rep)}")
            print(name, json.dumps(opts, sort_keys=True), str(dtype), *lines)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", default="services", help="the fedhl source tree to run")
    run(ap.parse_args().services)


if __name__ == "__main__":
    main()
