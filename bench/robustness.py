"""Robustness of the global model to one hostile agent (issue 12), on `fedhl simulate`'s demo
setting: MiniLM-L6, the vendored review corpus, 6 agents (ranks 2, 4, 8, 16 in turn), agent-0
hostile. Each attack runs against each strategy with the defences on (the job's defaults:
`max_examples_per_agent` refused at the edge, reported sizes counted at most `size_k` × the
round's median size, weights ≤ `max_weight_ratio / N`, update bound 3 × median, clip, the
direction screen at `min_cosine`; `--size-k` and `--min-cosine` override those) and off (no size
bound, no weight cap, no update bound, no direction screen), next to a clean run of the same
strategy and defence setting. Each run's JSON carries the direction screen's cosines per round.

The hostile agent trains honestly, then rewrites its upload (`simulate(tamper=...)`):
  size_above_bound  n_examples = max_examples_per_agent + 1
  size_at_bound     n_examples = 10**6, the default max_examples_per_agent (the largest accepted)
  size_1e12         n_examples = 10**12
  size_2p64         n_examples = 2**64 - 1
  factors_1e20      every factor entry 1e20
  scale_x1000       start + 1000 × (trained − start), per factor
  sign_flip         start − (trained − start)
  sign_flip_at_bound  sign_flip with n_examples = 10**6
With the defences on, a size above the bound is refused as the coordinator's edge refuses it
(the agent is left out of that round); 2**64-1 is refused by the core in any case (beyond int64).
Control-plane attacks (replay, revocation, restart mid-upload, metric flooding) do not touch
the model and are covered by tests/coordinator/test_hostile_agents.py.

With `--validation-size N` the server holds a validation split (N snippets drawn from the agents'
pool after the partition, taken out of their shares; `split_with_validation`), and `--validation
measure|on` turns on the validation screen (`defence.validation`; measure: effects of both scopes
computed and reported, never acted on; `--validation-window/-score/-cap` the window rule's
parameters, `--validation-window 1` the one-round rule); `--skip-clean` runs the attacks only.

Prints one JSON line per run and a final summary line with `attacks` and
`worst_drop_pt_with_defence`. Resumable: a run whose JSON exists under --out is not run again.

    python bench/robustness.py   # the full grid: 42 runs of 10 rounds, ≈ 7 min each on one idle core
    python bench/robustness.py --rounds 5 --local-steps 4 --test-size 200 --strategies fedhl \\
        --attacks scale_x1000,factors_1e20 [--defences on|off]   # the reduced run in bench/README.md
    python bench/robustness.py --rounds 5 --local-steps 4 --summary-only    # the summary line from the runs on disk
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attacks import DEFENCE_OFF, tamperer  # bench/attacks.py (beside this script)
from fedhl.data import Example
from fedhl.demo.run import add_arguments as demo_arguments
from fedhl.demo.run import job_spec, model_path, split_corpus
from fedhl.jobspec import JobSpec
from fedhl.simulation import SimClient, simulate

ATTACKS = [
    "size_above_bound",
    "size_at_bound",
    "size_1e12",
    "size_2p64",
    "factors_1e20",
    "scale_x1000",
    "sign_flip",
    "sign_flip_at_bound",
]
STRATEGIES = ["fedhl", "flexlora", "hetlora"]
HOSTILE = "agent-0"


def split_with_validation(args: argparse.Namespace, path: Path) -> tuple[list[Example], list[Example], list[list[int]]]:
    """`split_corpus` with a server-side validation split: the same test split and the same
    Dirichlet partition of the rest among the agents (so every agent keeps its label skew), then
    `validation_size` snippets drawn at random (seeded) from that rest are taken out of the
    agents' shares and written to `path` (JSONL) for the server. Disjoint from the test split
    and from every agent's data; each agent loses about validation_size / len(rest) of its own."""
    train, test, shards = split_corpus(args)
    picked = set(random.Random(f"validation:{args.seed}").sample(range(len(train)), args.validation_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"text": train[i].text, "label": train[i].label}) + "\n" for i in sorted(picked))
    )
    return train, test, [[i for i in s if i not in picked] for s in shards]


def run_one(args: argparse.Namespace, strategy: str, attack: str, defence: bool, path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    ns = argparse.Namespace(**{**vars(args), "strategy": strategy, "strategy_options": "{}"})
    ns.train_options = json.dumps({"hetlora_gamma": 0.99, "hetlora_lambda": 1e-3} if strategy == "hetlora" else {})
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.validation_size:
        val_path = path.parent.parent.parent / f"validation-seed{args.seed}.jsonl"
        train, test, shards = split_with_validation(ns, val_path)
    else:
        train, test, shards = split_corpus(ns)
    raw = job_spec(ns, model_path(args.model), ranks, None)
    on: dict[str, Any] = (
        {} if args.size_k is None else {"size_k": None if args.size_k == "none" else float(args.size_k)}
    )
    if args.min_cosine is not None:
        on["min_cosine"] = None if args.min_cosine == "none" else float(args.min_cosine)
    if args.validation != "off":
        if not args.validation_size:
            raise SystemExit("--validation needs --validation-size > 0 (a split apart from the agents' data)")
        on["validation"] = {
            "path": str(val_path),
            "max_examples": args.validation_size,
            "act": args.validation == "on",
            "scope": args.validation_scope,
            **({"k": args.validation_k} if args.validation_k is not None else {}),
            **({"margin": args.validation_margin} if args.validation_margin is not None else {}),
            **{
                key: getattr(args, f"validation_{key}")
                for key in ("window", "score", "cap")
                if getattr(args, f"validation_{key}") is not None
            },
        }
    raw["defence"] = on if defence else DEFENCE_OFF
    spec = JobSpec.model_validate(raw)
    clients = [SimClient(f"agent-{i}", ranks[i % len(ranks)], [train[j] for j in idx]) for i, idx in enumerate(shards)]
    t0 = time.monotonic()

    def progress(r: dict[str, Any]) -> None:  # one line per round on stderr, to follow a long run
        v = r.get("validation") or {}
        print(json.dumps({"run": str(path), "round": r["round"], "accuracy": r["accuracy"], **v}), file=sys.stderr)

    _, rows = simulate(
        spec, clients, test, tamper=tamperer(attack, spec, defence, HOSTILE), keep_going=True, on_round=progress
    )
    acc = [r["accuracy"] for r in rows]
    last = acc[-min(5, len(acc)) :]
    named = 0
    for r in rows:
        rep = r.get("report") or {}
        acts = rep.get("dropped", []) + rep.get("clipped", []) + rep.get("sizes_bounded", [])
        named += any(d["client"] == HOSTILE for d in acts)
    hostile_w = [r["report"]["effective_weights"].get(HOSTILE, 0.0) for r in rows if "report" in r]
    k = spec.defence.clip_k
    honest_ratios = [  # an honest agent's clipped norm in multiples of its module's median
        c["norm"] * k / c["bound"]
        for r in rows
        for c in (r.get("report") or {}).get("clipped", [])
        if k is not None and (c["client"] != HOSTILE or attack == "clean") and c["bound"] > 0
    ]
    honest_dropped = [
        (r["round"], d["client"], d["module"], d["reason"])
        for r in rows
        for d in (r.get("report") or {}).get("dropped", [])
        if d["client"] != HOSTILE or attack == "clean"
    ]
    res = {
        "attack": attack,
        "strategy": strategy,
        "defence": "on" if defence else "off",
        "last5_accuracy": statistics.fmean(last),
        "curve": acc,
        "rounds_failed": sum(1 for r in rows if "failed" in r),
        "failures": [r["failed"] for r in rows if "failed" in r],
        "rounds_naming_hostile": named,
        "hostile_effective_weight_max": max(hostile_w, default=0.0),
        "honest_clips": len(honest_ratios),
        "honest_clip_ratio_max": max(honest_ratios, default=None),
        "honest_dropped": honest_dropped,
        "sizes_bounded": [(r["round"], x) for r in rows for x in (r.get("report") or {}).get("sizes_bounded", [])],
        "weights": [(r.get("report") or {}).get("effective_weights") for r in rows],
        "cosines": [r.get("cosines") for r in rows],  # the direction screen's measurements, per round
        "direction_dropped": [
            (r["round"], d["client"], d["module"], d["cosine"])
            for r in rows
            for d in (r.get("report") or {}).get("dropped", [])
            if d["reason"] == "update_against_round"
        ],
        "validation": [r.get("validation") for r in rows],  # the validation screen's measurements, per round
        "validation_dropped": [
            (r["round"], d["client"], d["effect"], d["threshold"], d.get("score"))
            for r in rows
            for d in (r.get("report") or {}).get("dropped", [])
            if d["reason"] == "validation_loss_worse"
        ],
        "validate_s": [r["time"]["validate_s"] for r in rows if "time" in r],
        "wall_s": round(time.monotonic() - t0, 1),
        "config": {
            k: getattr(args, k)
            for k in (
                "rounds",
                "local_steps",
                "agents",
                "ranks",
                "seed",
                "test_size",
                "size_k",
                "min_cosine",
                "validation",
                "validation_size",
            )
        },
        "defence_block": raw["defence"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo_arguments(p)
    p.set_defaults(out="bench/results/robustness", test_size=400)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defences", default="on,off", help="on, off or both (a second process can take the other)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size-k", default=None, help="defence on: this size_k instead of the default ('none': off)")
    p.add_argument(
        "--min-cosine",
        default=None,
        help="defence on: the direction screen's threshold instead of the default ('none': off; -1: measure only)",
    )
    p.add_argument(
        "--validation-size",
        type=int,
        default=0,
        help="carve this many snippets for a server-side validation split (after the test split, before the "
        "agents' partition: changes the agents' data)",
    )
    p.add_argument(
        "--validation",
        choices=("off", "measure", "on"),
        default="off",
        help="defence on: the validation screen (measure: effects computed and reported, never acted on)",
    )
    p.add_argument("--validation-scope", choices=("upload", "adapters"), default="upload")
    p.add_argument("--validation-k", type=float, default=None, help="the screen's k instead of the default")
    p.add_argument("--validation-margin", type=float, default=None, help="the screen's margin instead of the default")
    p.add_argument(
        "--validation-window", type=int, default=None, help="the screen's window instead of the default (1: one round)"
    )
    p.add_argument(
        "--validation-score", type=float, default=None, help="the window rule's score instead of the default"
    )
    p.add_argument("--validation-cap", type=float, default=None, help="the window rule's cap instead of the default")
    p.add_argument("--summary-only", action="store_true", help="summarise the runs on disk; run nothing")
    p.add_argument(
        "--skip-clean", action="store_true", help="run the attacks only (the clean run comes from elsewhere)"
    )
    p.add_argument("--attacks-first", action="store_true", help="run the attacks before the clean run")
    p.add_argument(
        "--tag", default=None, help="results folder under --out (default r<rounds>-s<local steps>-seed<seed>)"
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tag = args.tag or f"r{args.rounds}-s{args.local_steps}-seed{args.seed}"
    results = []
    if args.summary_only:
        for clean_path in sorted((out / tag).glob("*/*/clean.json")):
            clean = json.loads(clean_path.read_text())
            for f in sorted(clean_path.parent.glob("*.json")):
                if f.name != "clean.json":
                    res = json.loads(f.read_text())
                    res["clean_last5_accuracy"] = clean["last5_accuracy"]
                    res["drop_pt"] = 100 * (clean["last5_accuracy"] - res["last5_accuracy"])
                    results.append(res)
        args.strategies, args.defences = "", "on,off"
    for strategy in filter(None, args.strategies.split(",")):
        for defence in [d == "on" for d in args.defences.split(",")]:
            d = "on" if defence else "off"
            if args.skip_clean:
                for attack in filter(None, args.attacks.split(",")):
                    print(
                        json.dumps(
                            run_one(args, strategy, attack, defence, out / tag / strategy / d / f"{attack}.json")
                        )
                    )
                continue
            if args.attacks_first:  # the attacked runs first (resumable: read back below)
                for attack in filter(None, args.attacks.split(",")):
                    run_one(args, strategy, attack, defence, out / tag / strategy / d / f"{attack}.json")
            clean = run_one(args, strategy, "clean", defence, out / tag / strategy / d / "clean.json")
            print(json.dumps(clean), flush=True)
            for attack in filter(None, args.attacks.split(",")):
                res = run_one(args, strategy, attack, defence, out / tag / strategy / d / f"{attack}.json")
                res["clean_last5_accuracy"] = clean["last5_accuracy"]
                res["drop_pt"] = 100 * (clean["last5_accuracy"] - res["last5_accuracy"])
                print(json.dumps(res), flush=True)
                results.append(res)
    keys = ("attack", "strategy", "defence", "last5_accuracy", "clean_last5_accuracy", "drop_pt", "rounds_failed")
    attacks = [{k: r[k] for k in keys} for r in results]
    on = [r["drop_pt"] for r in results if r["defence"] == "on"]
    summary = {"attacks": attacks, "worst_drop_pt_with_defence": max(on, default=None)}
    print(json.dumps(summary), flush=True)
    (out / tag / f"summary-{args.defences.replace(',', '-')}.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
