"""The direction screen's measurements (core/defence.py `cosines_to_others`), from runs on disk.

Reads bench/robustness.py results (`cosines`: one map per round) and bench/robustness_mechanism.py
results (`history[*].cosines`), run with `--min-cosine -1` (measured, never acted on) or with the
screen on, and prints

- the honest per-module cosines of each group of runs: count, min, 5th percentile, median, max,
  the module-rounds whose lower-median cosine opens the screen's gate (> |min_cosine|) and the
  honest uploads the screen would leave out there (counterfactual on a measured run: after a first
  leave-out the trajectory would differ), and the non-LoRA parameters' cosines (min / median / max);
- with `--sweep`, the same count for several thresholds, and how often the hostile client's
  update (attacked runs) falls below them, over all rounds and over the first three.

    M=bench/results/robustness/direction/measure-regression
    python bench/direction_cosines.py --group "regression FedHL=$M/fedhl/on/clean/*.json"
    python bench/direction_cosines.py --sweep --group "FedHL=$M/fedhl/on/*/*.json"
"""

from __future__ import annotations

import argparse
import glob
import json
from typing import Any

HOSTILE = {"c0", "agent-0"}


def quantile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]


def lower_median(xs: list[float]) -> float:
    return sorted(xs)[(len(xs) - 1) // 2]


def rounds_of(path: str) -> tuple[dict[str, Any], list[dict[str, dict[str, float]]]]:
    with open(path) as fh:
        d = json.load(fh)
    if "history" in d:
        return d, [r.get("cosines") or {} for r in d["history"][1:]]
    return d, [c or {} for c in d.get("cosines", [])]


def cells(files: list[str]) -> list[tuple[bool, int, str, float, float, int]]:
    """(hostile?, round, module, cosine, module's lower-median cosine, uploads) for every upload."""
    out = []
    for f in files:
        d, rounds = rounds_of(f)
        attacked = d.get("attack", "clean") != "clean"
        for t, cos in enumerate(rounds):
            for m, by in cos.items():
                med = lower_median(list(by.values()))
                for c, v in by.items():
                    out.append((attacked and c in HOSTILE, t, m, v, med, len(by)))
    return out


def screened(v: float, med: float, n: int, tau: float) -> bool:
    return n >= 3 and med > abs(tau) and v < tau


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", required=True, help="LABEL=GLOB (repeatable)")
    ap.add_argument("--min-cosine", type=float, default=-0.15)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    tau = args.min_cosine
    if not args.sweep:
        print(
            "| runs | honest cosines | min | 5th pct | median | max | gate open (module-rounds) | honest left out "
            "| head: min / median / max |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.group:
        label, pattern = spec.split("=", 1)
        all_cells = cells(sorted(glob.glob(pattern)))
        lora = [c for c in all_cells if not c[2].startswith("extra::")]
        honest = [c for c in lora if not c[0]]
        if args.sweep:
            print(
                f"{label}: honest left out / honest uploads | hostile left out / hostile uploads (first three rounds)"
            )
            hostile = [c for c in lora if c[0]]
            for t in (0.0, -0.05, -0.1, -0.15, -0.2, -0.3):
                h = sum(screened(v, med, n, t) for _, _, _, v, med, n in honest)
                x = sum(screened(v, med, n, t) for _, _, _, v, med, n in hostile)
                xe = sum(screened(v, med, n, t) for _, r, _, v, med, n in hostile if r < 3)
                ne = sum(1 for c in hostile if c[1] < 3)
                print(f"  min_cosine {t:+.2f}: {h}/{len(honest)} | {x}/{len(hostile)} ({xe}/{ne})")
            continue
        vals = [c[3] for c in honest]
        seen: dict[tuple[int, str, float], bool] = {}
        for _, r, m, _, med, n in honest:
            seen[(r, m, med)] = n >= 3 and med > abs(tau)
        gates = {k for k, v in seen.items() if v}
        left = sum(screened(v, med, n, tau) for _, _, _, v, med, n in honest)
        head = [c[3] for c in all_cells if c[2].startswith("extra::") and not c[0]]
        head_s = f"{min(head):+.2f} / {quantile(head, 0.5):+.2f} / {max(head):+.2f}" if head else "—"
        print(
            f"| {label} | {len(vals)} | {min(vals):+.2f} | {quantile(vals, 0.05):+.2f} | {quantile(vals, 0.5):+.3f} "
            f"| {max(vals):+.2f} | {len(gates)}/{len(seen)} | {left} | {head_s} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
