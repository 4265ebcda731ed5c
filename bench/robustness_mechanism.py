"""Robustness to one hostile client on the mechanism benchmark's federated LoRA regression
(bench/mechanism.py: a known optimum ΔW*, clients with their own input covariances, ranks
2, 2, 4, 4, 4, 8, 8, 16, 16, 32). The MiniLM mode (bench/robustness.py) needs ≈ 7 CPU-minutes
a run; this one needs seconds, so every attack × strategy × defence setting runs on several
seeds with paired statistics.

The strategies are the production ones, built as a job builds them (`JobSpec.build_strategy`,
the job's `defence` block): defences **on** = the job defaults (`max_examples_per_agent` 10⁶
refused at the edge, reported sizes counted at most `size_k` × the round's median size, weights
≤ 4/N, update bound 3 × median per module, clip; `--size-k`, `--max-weight-ratio` override
two of them); **off** = no size bound, no weight cap, no update bound. The non-finite / overflow screen is not a switch.

Client `--hostile` (default c0, rank 2) trains honestly, then rewrites its upload:
  size_above_bound  n_examples = 10**6 + 1, the default max_examples_per_agent + 1 (on: refused,
                    left out of the round)
  size_at_bound     n_examples = 10**6 (the largest size the default bound accepts)
  size_1e12         n_examples = 10**12 (on: refused)
  size_2p64         n_examples = 2**64 - 1 (refused by the core in either setting: beyond int64)
  factors_1e20      every factor entry 1e20
  scale_x1000       start + 1000 × (trained − start), per factor
  sign_flip         start − (trained − start)
  sign_flip_at_bound  sign_flip with n_examples = 10**6 (the strongest
                    single-agent attack the defaults admit: the weight of a client at
                    size_k × the median size, norm ≈ honest)
  stale             the factors it uploaded the round before (a replayed update re-sent as
                    this round's; the message-level replay of another round's task is refused
                    by the coordinator: tests/coordinator/test_hostile_agents.py)

Metric (lower is better): `loss`, the pooled population loss of the global model divided by
its value at W = 0 (mechanism.py: 1 = learned nothing, 0 = the target), mean of the last 5
rounds. The summary keeps bench/robustness.py's shape with the accuracy keys mapped:
`last5_accuracy` → `last5_loss`, `clean_last5_accuracy` → `clean_last5_loss`,
`drop_pt` = 100 × (last5_loss − clean_last5_loss) (points of the starting loss; > 0 = worse,
paired per seed, mean over seeds), `worst_drop_pt_with_defence` the largest mean `drop_pt`
with defences on. `rel_error` (‖W − ΔW*‖/‖ΔW*‖) is reported beside it.

    python bench/robustness_mechanism.py                           # the grid in bench/README.md
    python bench/robustness_mechanism.py --seeds 0 --rounds 5 --out /tmp/rm   # a quick look
    python bench/robustness_mechanism.py --summary-only            # summary.json, table.md from disk

Per run: <out>/<strategy>/<on|off>/<attack>/seed<k>.json; a run whose file exists is not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mechanism  # noqa: E402  (bench/mechanism.py: the problem, local training, metrics)
import stats  # noqa: E402
from attacks import DEFENCE_OFF, tamperer  # noqa: E402  (bench/attacks.py)
from fedhl.core import ClientUpdate, Strategy  # noqa: E402
from fedhl.core.types import AggregationError  # noqa: E402
from fedhl.jobspec import JobSpec  # noqa: E402

ATTACKS = [
    "size_above_bound",
    "size_at_bound",
    "size_1e12",
    "size_2p64",
    "factors_1e20",
    "scale_x1000",
    "sign_flip",
    "sign_flip_at_bound",
    "stale",
]
STRATEGIES = ["fedhl", "flexlora", "hetlora"]
TIE_TOL = 0.2  # drop_pt within which a seed counts as a tie (points of the starting loss)


# --------------------------------------------------------------------------- the job
def job(args: argparse.Namespace, strategy: str, defence: bool) -> JobSpec:
    """The job a coordinator would run for this problem, defences on (defaults) or off."""
    shapes = {m: (d_out, d_in) for m, (d_out, d_in, _) in zip(args.module_names, args.shapes, strict=True)}
    ranks = [int(r) for r in args.ranks.split(",")]
    return JobSpec.model_validate(
        {
            "name": f"robustness-{strategy}",
            "base_model": "mechanism-regression",
            "target_modules": list(shapes),
            "module_shapes": shapes,
            "rank_set": sorted(set(ranks)),
            "lora_alpha": args.lora_alpha,
            "strategy": strategy,
            "rounds": args.rounds,
            "defence": defence_on(args) if defence else DEFENCE_OFF,
        }
    )


def defence_on(args: argparse.Namespace) -> dict[str, Any]:
    """The job defaults, with --max-weight-ratio / --size-k where given."""
    out: dict[str, Any] = {}
    if args.max_weight_ratio:
        out["max_weight_ratio"] = args.max_weight_ratio
    if args.size_k is not None:
        out["size_k"] = None if args.size_k == "none" else float(args.size_k)
    if args.min_cosine is not None:
        out["min_cosine"] = None if args.min_cosine == "none" else float(args.min_cosine)
    return out


# --------------------------------------------------------------------------- one run
def run_one(args: argparse.Namespace, strategy_name: str, attack: str, defence: bool, seed: int) -> dict[str, Any]:
    """One federated run with the hostile client; mechanism.run_one's loop, all clients every round."""
    torch.manual_seed(seed)
    problem = mechanism._PROBLEMS.get(seed)
    if problem is None:
        mechanism._PROBLEMS.clear()
        problem = mechanism._PROBLEMS[seed] = mechanism.make_problem(args, seed)
    names = list(problem.modules)
    shapes = {m: (int(problem.modules[m].target.shape[0]), int(problem.modules[m].target.shape[1])) for m in names}
    ranks = problem.ranks
    clients = [f"c{i}" for i in range(len(ranks))]
    spec = job(args, strategy_name, defence)
    strategy: Strategy = spec.build_strategy()
    tamper = tamperer(attack, spec, defence, args.hostile)
    state = strategy.init_state(shapes, max_rank=max(ranks), dtype=torch.float32)
    history: list[dict[str, Any]] = [{"round": 0, **mechanism.metrics(problem, strategy, state, energy=False)}]
    failures: list[str] = []
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        part = list(range(len(clients)))
        plan = strategy.plan_round(state, {clients[i]: dict.fromkeys(names, ranks[i]) for i in part})
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + rnd * 1009 + i) for i in part]  # mechanism's batches
        starts = [strategy.client_start(state, plan, clients[i]) for i in part]
        trained = mechanism.local_train(args, problem, strategy, starts, list(part), args.local_steps, gens)
        updates = []
        for i, st, f in zip(part, starts, trained, strict=True):
            u = tamper(rnd, st, ClientUpdate(clients[i], f, n_examples=problem.n[i]))
            if u is not None:
                updates.append(u)
        row: dict[str, Any] = {"round": rnd + 1}
        try:
            state, report = strategy.aggregate(state, plan, updates)
        except AggregationError as e:  # the previous state stays (as a failed round keeps it)
            failures.append(str(e))
            row["failed"] = str(e)
        else:
            k = strategy.clip.k
            row.update(
                {
                    "weights": report.weights,
                    "effective_weights": report.effective_weights,
                    "dropped": [dataclasses.asdict(d) for d in report.dropped],
                    "sizes_bounded": [dataclasses.asdict(r) for r in report.sizes_bounded],
                    "cosines": report.cosines,  # the direction screen's measurements
                    # norm / median of the module's uploads (the bound is k × median)
                    "clip_ratios": [
                        {"client": c.client, "module": c.module, "ratio": c.norm * k / c.bound}
                        for c in report.clipped
                        if k is not None and c.bound > 0
                    ],
                }
            )
        row.update(mechanism.metrics(problem, strategy, state, energy=False))
        history.append(row)
    last = history[-min(5, args.rounds) :]
    named = sum(
        1
        for r in history[1:]
        if any(d["client"] == args.hostile for d in r.get("dropped", []))
        or any(c["client"] == args.hostile for c in r.get("clip_ratios", []))
        or any(c["client"] == args.hostile for c in r.get("sizes_bounded", []))
    )
    honest = [  # every client is honest in the clean run
        c["ratio"]
        for r in history[1:]
        for c in r.get("clip_ratios", [])
        if c["client"] != args.hostile or attack == "clean"
    ]
    return {
        "attack": attack,
        "strategy": strategy_name,
        "defence": "on" if defence else "off",
        "seed": seed,
        "hostile": args.hostile,
        "last5_loss": statistics.fmean(r["loss"] for r in last),
        "last5_rel_error": statistics.fmean(r["rel_error"] for r in last),
        "rounds_failed": len(failures),
        "failures": failures,
        "rounds_naming_hostile": named,
        "hostile_effective_weight_max": max(
            (r["effective_weights"].get(args.hostile, 0.0) for r in history[1:] if "effective_weights" in r),
            default=0.0,
        ),
        "honest_clips": len(honest),
        "honest_clip_ratio_max": max(honest, default=None),
        "wall_s": round(time.monotonic() - t0, 2),
        "curve_loss": [r["loss"] for r in history],
        "curve_rel_error": [r["rel_error"] for r in history],
        "history": history,
    }


# --------------------------------------------------------------------------- summary
def _runs(out: Path) -> dict[tuple[str, str, str], dict[int, dict[str, Any]]]:
    runs: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for f in sorted(out.glob("*/*/*/seed*.json")):
        r = json.loads(f.read_text())
        runs.setdefault((r["strategy"], r["defence"], r["attack"]), {})[int(r["seed"])] = r
    return runs


def summarise(out: Path) -> dict[str, Any]:
    runs = _runs(out)
    attacks: list[dict[str, Any]] = []
    honest: dict[str, list[float]] = {}  # the largest norm / median of an honest client's clip, per strategy
    honest_rejects: dict[str, int] = {}  # uploads left out of a clean run (all clients are honest there)
    for (strategy, defence, attack), by_seed in sorted(runs.items()):
        if attack == "clean":
            honest.setdefault(strategy, []).extend(
                r["honest_clip_ratio_max"] for r in by_seed.values() if r["honest_clip_ratio_max"] is not None
            )
            honest_rejects[f"{strategy}/{defence}"] = sum(
                1 for r in by_seed.values() for h in r["history"][1:] for d in h.get("dropped", [])
            )
            continue
        clean = runs.get((strategy, defence, "clean"), {})
        seeds = sorted(set(by_seed) & set(clean))
        if not seeds:
            continue
        loss = {s: by_seed[s]["last5_loss"] for s in seeds}
        clean_loss = {s: clean[s]["last5_loss"] for s in seeds}
        drop = {s: 100 * (loss[s] - clean_loss[s]) for s in seeds}
        cmp = stats.compare(
            {s: 100 * loss[s] for s in seeds},
            {s: 100 * clean_loss[s] for s in seeds},
            tie_tol=TIE_TOL,
            higher_is_better=False,
        )
        err = {s: by_seed[s]["last5_rel_error"] for s in seeds}
        clean_err = {s: clean[s]["last5_rel_error"] for s in seeds}
        attacks.append(
            {
                "attack": attack,
                "strategy": strategy,
                "defence": defence,
                "last5_loss": statistics.fmean(loss.values()),
                "clean_last5_loss": statistics.fmean(clean_loss.values()),
                "drop_pt": statistics.fmean(drop.values()),
                "drop_pt_ci95": [cmp["ci95_low"], cmp["ci95_high"]],
                "drop_pt_worst_seed": max(drop.values()),
                "last5_rel_error": statistics.fmean(err.values()),
                "clean_last5_rel_error": statistics.fmean(clean_err.values()),
                "rel_error_change_pct": statistics.fmean(100 * (err[s] / clean_err[s] - 1) for s in seeds),
                "rounds_failed": sum(by_seed[s]["rounds_failed"] for s in seeds),
                "rounds_naming_hostile_min": min(by_seed[s]["rounds_naming_hostile"] for s in seeds),
                "hostile_effective_weight_max": max(by_seed[s]["hostile_effective_weight_max"] for s in seeds),
                "seeds": seeds,
            }
        )
    on = [a for a in attacks if a["defence"] == "on"]
    worst = max(on, key=lambda a: a["drop_pt"], default=None)
    defence_cost = {}
    for strategy in sorted({k[0] for k in runs}):
        a, b = runs.get((strategy, "on", "clean"), {}), runs.get((strategy, "off", "clean"), {})
        seeds = sorted(set(a) & set(b))
        if seeds:
            defence_cost[strategy] = statistics.fmean(100 * (a[s]["last5_loss"] - b[s]["last5_loss"]) for s in seeds)
    return {
        "metric": "last5_loss = pooled population loss / loss at W = 0, mean of the last 5 rounds (lower is better); "
        "drop_pt = 100 × (last5_loss − clean_last5_loss), paired per seed, mean over seeds (> 0: worse)",
        "attacks": attacks,
        "worst_drop_pt_with_defence": worst["drop_pt"] if worst else None,
        "worst_with_defence": {k: worst[k] for k in ("attack", "strategy", "drop_pt_ci95")} if worst else None,
        "worst_seed_drop_pt_with_defence": max((a["drop_pt_worst_seed"] for a in on), default=None),
        "rounds_failed_with_defence": sum(a["rounds_failed"] for a in on),
        "clean_defence_cost_pt": defence_cost,
        "honest_clip_ratio_max": {k: max(v) for k, v in honest.items() if v},
        "clean_runs_dropped_uploads": honest_rejects,
        "target": "with defences on, every single-agent attack costs ≤ 2 points (drop_pt) and no round fails",
        "target_met": bool(on) and max(a["drop_pt"] for a in on) <= 2.0 and not any(a["rounds_failed"] for a in on),
    }


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| strategy | attack | defence | last-5 loss (clean) | drop (pt) [95 % CI] | worst seed (pt) "
        "| rel. error change | rounds failed | rounds naming c0 (min) | c0 max eff. weight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in sorted(summary["attacks"], key=lambda a: (a["strategy"], a["defence"] == "off", a["attack"])):
        lo, hi = a["drop_pt_ci95"]
        lines.append(
            f"| {a['strategy']} | {a['attack']} | {a['defence']} | {a['last5_loss']:.4g} ({a['clean_last5_loss']:.4g}) "
            f"| {a['drop_pt']:+.3g} [{lo:+.3g}, {hi:+.3g}] | {a['drop_pt_worst_seed']:+.3g} "
            f"| {a['rel_error_change_pct']:+.3g} % | {a['rounds_failed']} | {a['rounds_naming_hostile_min']} "
            f"| {a['hostile_effective_weight_max']:.3g} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI
def problem_arguments(ap: argparse.ArgumentParser) -> None:
    """mechanism.py's problem and training settings (same names, same defaults except the size)."""
    ap.add_argument("--shapes", default="64x64:24,128x128:32", type=mechanism._shapes)
    ap.add_argument("--ranks", default="2,2,4,4,4,8,8,16,16,32")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--n-min", type=int, default=100)
    ap.add_argument("--n-max", type=int, default=1000)
    ap.add_argument("--decay", type=float, default=0.5)
    ap.add_argument("--target-scale", type=float, default=1.0)
    ap.add_argument("--cov-spread", type=float, default=10.0)
    ap.add_argument("--shift", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    problem_arguments(ap)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "robustness" / "mechanism"))
    ap.add_argument("--seeds", default="0-4", type=mechanism._seeds)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defences", default="on,off")
    ap.add_argument("--hostile", default="c0", help="the hostile client (c<i>, rank = --ranks[i])")
    ap.add_argument(
        "--max-weight-ratio",
        type=float,
        default=None,
        help="defence on: this weight cap (× 1/N) instead of the default 4",
    )
    ap.add_argument(
        "--size-k",
        default=None,
        help="defence on: reported sizes count at most this × the round's median size ('none': off) "
        "instead of the default",
    )
    ap.add_argument(
        "--min-cosine",
        default=None,
        help="defence on: the direction screen's threshold instead of the default ('none': off; -1: measure only)",
    )
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    args.module_names = [f"m{i}_{a}x{b}" for i, (a, b, _) in enumerate(args.shapes)]
    torch.set_num_threads(1)
    out = Path(args.out)
    if not args.summary_only:
        t0 = time.monotonic()
        for seed in args.seeds:  # seed-major: an interrupted grid has every cell at its first seeds
            for strategy in args.strategies.split(","):
                for d in args.defences.split(","):
                    for attack in ["clean", *args.attacks.split(",")]:
                        path = out / strategy / d / attack / f"seed{seed}.json"
                        if path.exists():
                            continue
                        res = run_one(args, strategy, attack, d == "on", seed)
                        res["config"] = {k: v for k, v in vars(args).items() if k != "summary_only"}
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(res))
                        brief = {
                            k: res[k] for k in ("attack", "strategy", "defence", "seed", "last5_loss", "rounds_failed")
                        }
                        print(json.dumps({**brief, "elapsed_s": round(time.monotonic() - t0)}), flush=True)
    summary = summarise(out)
    print(json.dumps({k: summary[k] for k in ("attacks", "worst_drop_pt_with_defence")}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "table.md").write_text(table(summary))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
