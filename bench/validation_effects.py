"""The validation screen's measurements (aggregation/validate.py), from bench/robustness.py runs on
disk (`validation`: one summary per round, with every upload's leave-one-out effect
`e_i = L(all) − L(all but i)` on the server's validation split; > 0: leaving i out lowers the loss).

For each run: the honest effects (count, min, median, max, and the largest in multiples of the
round's median |effect|), the hostile agent's effects per round, and, for each one-round rule
`max(margin, k × median |e|)` of a small grid and each window rule (window, cap, score; margin
--margin), how many honest uploads it would leave out and in how many rounds it would leave out
the hostile one (counterfactual on a measured run: after a
first leave-out the trajectory would differ; on a clean run with no honest leave-out the acting
run is the measured run, bit for bit).

    python bench/validation_effects.py [--scope adapters] \
        bench/results/robustness/minilm-a1-r10-s6-seed*-val*/*/on/*.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
from fedhl.core.defence import validation_outliers, validation_window_outliers

HOSTILE = "agent-0"
KS = [2.0, 3.0, 4.0, 5.0, 8.0]
MARGINS = [0.01, 0.02, 0.05, 0.1]
WINDOWS, CAPS, SCORES = [3, 4, 5, 6], [2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0, 8.0]  # the window rule's grid


def lower_median(xs: list[float]) -> float:
    return sorted(xs)[(len(xs) - 1) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--scope", default=None, help="upload or adapters: that scope's effects (measured runs record both)")
    p.add_argument("--margin", type=float, default=0.01, help="the window rules' margin")
    args = p.parse_args()
    for path in args.runs:
        d = json.loads(Path(path).read_text())
        rounds = [v for v in d.get("validation") or [] if v and "effects" in v]
        if args.scope is not None:  # the other scope's effects, where the run measured both
            rounds = [{**v, "effects": v["effects_by_scope"][args.scope]} for v in rounds if "effects_by_scope" in v]
        if not rounds:
            continue
        hostile = d["attack"] != "clean"
        honest = [e for v in rounds for c, e in v["effects"].items() if c != HOSTILE or not hostile]
        ratios = []
        for v in rounds:
            med = lower_median([abs(e) for e in v["effects"].values()])
            ratios += [e / med for c, e in v["effects"].items() if (c != HOSTILE or not hostile) and med > 0]
        print(f"\n{path}  ({d['strategy']}, {d['attack']}, last-5 {d['last5_accuracy']:.3f})")
        print(
            f"  honest effects: n={len(honest)} min={min(honest):+.4f} median={lower_median(honest):+.4f} "
            f"max={max(honest):+.4f}; largest / round median |e| = {max(ratios):.2f}"
        )
        if hostile:
            he = [v["effects"].get(HOSTILE, math.nan) for v in rounds]
            hr = [
                v["effects"][HOSTILE] / lower_median([abs(e) for e in v["effects"].values()])
                for v in rounds
                if HOSTILE in v["effects"]
            ]
            print("  hostile effect per round:", " ".join(f"{e:+.3f}" for e in he))
            print("  hostile / median |e|:    ", " ".join(f"{r:+.2f}" for r in hr))
            rank = [sorted(v["effects"].values(), reverse=True).index(v["effects"][HOSTILE]) + 1 for v in rounds]
            print("  hostile's rank (1 = largest effect):", rank)
        print("  rule (margin, k): honest left out / rounds the hostile is left out")
        for m in MARGINS:
            cells = []
            for k in KS:
                fp, tp = 0, 0
                for v in rounds:
                    clients = list(v["effects"])
                    out = [clients[i] for i in validation_outliers([v["effects"][c] for c in clients], m, k)]
                    fp += sum(1 for c in out if c != HOSTILE or not hostile)
                    tp += sum(1 for c in out if c == HOSTILE and hostile)
                cells.append(f"k{k:g}: {fp}/{tp}")
            print(f"    margin {m:<5g} " + "  ".join(cells))
        by_round = [
            ((v.get("effects_by_scope") or {}).get(args.scope, v.get("effects")) if v else None) or {}
            for v in d.get("validation") or []
        ]
        print(f"  window rule (window, cap: score → honest left out / hostile's rounds), margin {args.margin:g}")
        for w in WINDOWS:
            for cap in CAPS:
                cells = []
                for score in SCORES:
                    fp, tp = 0, []
                    for t, now in enumerate(by_round):
                        out = validation_window_outliers(now, by_round[max(0, t - w + 1) : t], args.margin, score, cap)
                        fp += sum(1 for c in out if c != HOSTILE or not hostile)
                        tp += [t for c in out if c == HOSTILE and hostile]
                    cells.append(f"s{score:g}: {fp}/{''.join(map(str, tp)) or '-'}")
                print(f"    w{w} cap{cap:g}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
