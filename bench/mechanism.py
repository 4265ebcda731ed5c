"""Mechanism benchmark: federated LoRA regression with a known optimum, on the production
strategies of `fedhl.core` (build_strategy → init_state → plan_round → client_start → local
training → aggregate), no transformer.

Each module ℓ is a linear map with a frozen base W0[ℓ]; the task is to learn a target update
ΔW*[ℓ] whose spectrum needs rank 24–48 (more than most clients hold). Client i sees inputs
x ~ N(0, Σ_i) with its own covariance (a random rotation of a spread spectrum: it is well
informed about some directions and nearly blind to others) and, optionally, a target shifted by
a client-specific low-rank term (the analogue of label skew). Clients hold ranks such as
2,2,4,4,4,8,8,16,16,32 and n_i examples; each round they run plain SGD or Adam on (B, A) from
the strategy's start point, on `W0 + base_residual + s·B@A` (the `client_view` full and
residual views put a residual in the frozen base, exactly as the agent does).

Metrics after every round, on the global model W_t (`strategy.effective_update`):
- `loss`: the pooled population loss Σ_i π_i E‖(W_t − ΔW*_i) x‖² (π_i ∝ n_i, exact, from the
  covariances), divided by its value at W_t = 0 (so 1 = learned nothing, 0 = the target);
- `rel_error`: ‖W_t − ΔW*‖_F / ‖ΔW*‖_F over all modules (ΔW* the shared target);
- `rel_error_opt`: the same against the pooled optimum (differs from ΔW* only with shifts);
- `energy`: the fraction of ‖ΔW*‖² inside W_t's top-K singular subspaces (K = the target's rank
  per module): whether the global model found the target's directions.
Plus the strategy's round report (weights, N_eff, truncation energy kept per rank).

    python bench/mechanism.py                      # 20 seeds, every arm → bench/results/mechanism/
    python bench/mechanism.py --seeds 0-1 --rounds 5 --out /tmp/m   # a quick look
    python bench/mechanism.py --report-only        # summary.json, table.md, mechanism.png from disk
    python bench/mechanism.py --init optimum --out bench/results/mechanism-fixed-point
        # start every dense strategy at ΔW*: does the method keep the optimum (a fixed point)?

Per run: <out>/<arm>/seed<k>.json; a run whose file exists is not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stats  # noqa: E402  (bench/stats.py)
from fedhl.core import ClientUpdate, GlobalState, LoRAFactors, Strategy, build_strategy  # noqa: E402

REFERENCE = "fedhl"
EXTRA_PAIRS = [  # (arm, against): weights within the full view, the start parametrisation, FLoRA's fresh adapter
    ("fedhl-full-data-size", "fedhl-full"),
    ("fedhl-full-balanced", "fedhl-full"),
    ("flora", "fedhl-full"),
    ("fedhl-residual16", "fedhl-full"),
    ("flora", "centralized"),
]
TIE_TOL = 0.002  # |Δ rel_error| within which a seed counts as a tie


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    ranks: str | None = None  # None: heterogeneous; "min" / "max": everyone at that rank
    centralized: bool = False  # one client holding the pooled data


def arms(residual_rank: int) -> list[Arm]:
    return [
        Arm("fedhl", "FedHL (default weights, truncated view)", "fedhl"),
        Arm("fedhl-data-size", "FedHL data-size weights", "fedhl", {"weights": "data-size"}),
        Arm("fedhl-uniform", "FedHL uniform weights", "fedhl", {"weights": "uniform"}),
        Arm("fedhl-paper", "FedHL paper-literal weights", "fedhl", {"weights": "paper-literal"}),
        Arm("fedhl-full", "FedHL client_view=full", "fedhl", {"client_view": "full"}),
        Arm(
            f"fedhl-residual{residual_rank}",
            f"FedHL client_view=residual:{residual_rank}",
            "fedhl",
            {"client_view": f"residual:{residual_rank}"},
        ),
        Arm(
            "fedhl-full-data-size",
            "FedHL full view + data-size weights",
            "fedhl",
            {"client_view": "full", "weights": "data-size"},
        ),
        Arm(
            "fedhl-full-balanced",
            "FedHL full view, balanced start factors",
            "fedhl",
            {"client_view": "full", "start_balance": "balanced"},
        ),
        Arm("flexlora", "FlexLoRA", "flexlora"),
        Arm("hetlora", "HetLoRA (‖BA‖ weights, no pruning)", "hetlora"),
        Arm("zeropad", "zero-padding", "zeropad"),
        Arm("flora", "FLoRA (stacking)", "flora"),
        Arm("fedit-min", "FedIT, all at the smallest rank", "fedit", ranks="min"),
        Arm("centralized", "centralized LoRA at the largest rank", "fedit", ranks="max", centralized=True),
    ]


# --------------------------------------------------------------------------- the problem
@dataclass
class ModuleTask:
    W0: Tensor  # (d_out, d_in), frozen base
    target: Tensor  # ΔW*, (d_out, d_in)
    target_rank: int
    shifts: list[Tensor]  # per client: ΔW*_i − ΔW*
    covs: list[Tensor]  # per client Σ_i (d_in, d_in), population covariance
    X: list[Tensor]  # per client (n_i, d_in)
    Y: list[Tensor]  # per client (n_i, d_out): (W0 + ΔW*_i) x + noise
    R0: list[Tensor]  # per client X W0ᵀ − Y: the residual of the frozen base alone
    optimum: Tensor  # pooled optimum (Σ π_i ΔW*_i Σ_i)(Σ π_i Σ_i)^-1
    pooled: tuple[Tensor, Tensor, float]  # Σ̄, M, c = Σ π_i tr(ΔW*_i Σ_i ΔW*_iᵀ): the pooled loss


@dataclass
class Problem:
    modules: dict[str, ModuleTask]
    n: list[int]
    ranks: list[int]
    pi: list[float]  # π_i = n_i / Σ n


def _orthonormal(d: int, k: int, g: torch.Generator) -> Tensor:
    q: Tensor = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q
    return q


def make_problem(args: argparse.Namespace, seed: int) -> Problem:
    g = torch.Generator().manual_seed(10_000 + seed)
    ranks = [int(r) for r in args.ranks.split(",")]
    N = len(ranks)
    # data sizes: log-uniform in [n_min, n_max], independent of the rank
    lo, hi = math.log(args.n_min), math.log(args.n_max)
    n = [round(math.exp(lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64)))) for _ in range(N)]
    total = sum(n)
    pi = [x / total for x in n]
    modules: dict[str, ModuleTask] = {}
    for name, spec in zip(args.module_names, args.shapes, strict=True):
        d_out, d_in, k = spec
        W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        # target: k significant singular values, σ_j ∝ j^-decay, ‖ΔW*‖_F = sqrt(d_out)·target_scale
        U, V = _orthonormal(d_out, k, g), _orthonormal(d_in, k, g)
        sig = torch.arange(1, k + 1, dtype=torch.float64) ** -args.decay
        sig *= args.target_scale * math.sqrt(d_out) / float(sig.norm())
        target = (U * sig) @ V.T
        shifts, covs, Xs, Ys = [], [], [], []
        lam = torch.logspace(math.log10(args.cov_spread), -math.log10(args.cov_spread), d_in, dtype=torch.float64)
        lam = lam * d_in / lam.sum()  # tr Σ_i = d_in
        for i in range(N):
            Q = _orthonormal(d_in, d_in, g) if args.cov_spread > 1 else torch.eye(d_in, dtype=torch.float64)
            cov = (Q * lam) @ Q.T
            if args.shift > 0:  # a client-specific rank-2 shift of relative size `shift`
                su, sv = _orthonormal(d_out, 2, g), _orthonormal(d_in, 2, g)
                shift = (su @ sv.T) * (args.shift * float(target.norm()) / math.sqrt(2))
            else:
                shift = torch.zeros_like(target)
            X = torch.randn(n[i], d_in, generator=g, dtype=torch.float64) @ (Q * lam.sqrt()).T
            Y = X @ (W0 + target + shift).T + args.noise * torch.randn(n[i], d_out, generator=g, dtype=torch.float64)
            shifts.append(shift)
            covs.append(cov)
            Xs.append(X.float())
            Ys.append(Y.float())
        S = sum(p * c for p, c in zip(pi, covs, strict=True))
        M = sum(p * (target + s) @ c for p, s, c in zip(pi, shifts, covs, strict=True))
        optimum = torch.linalg.solve(S, M.T).T  # M S^-1 (S symmetric)
        c = sum(
            p * float((((target + s) @ cv) * (target + s)).sum()) for p, s, cv in zip(pi, shifts, covs, strict=True)
        )
        R0 = [(X.double() @ W0.T - Y.double()).float() for X, Y in zip(Xs, Ys, strict=True)]
        modules[name] = ModuleTask(W0, target, k, shifts, covs, Xs, Ys, R0, optimum, (S, M, c))
    return Problem(modules, n, ranks, pi)


# --------------------------------------------------------------------------- metrics
def metrics(problem: Problem, strategy: Strategy, state: GlobalState, *, energy: bool = True) -> dict[str, float]:
    """The round's metrics (module docstring). The pooled loss uses the expansion
    Σ_i π_i tr(E_i Σ_i E_iᵀ) = tr(W Σ̄ Wᵀ) − 2⟨M, W⟩ + c with Σ̄ = Σ π_i Σ_i, M = Σ π_i ΔW*_i Σ_i
    (ModuleTask.pooled), so one product per module instead of one per client."""
    loss = loss0 = err = err_opt = tnorm = onorm = captured = 0.0
    for m, t in problem.modules.items():
        W = strategy.effective_update(state, m).to(torch.float64)
        S_bar, M, c = t.pooled
        loss += float(((W @ S_bar) * W).sum()) - 2 * float((M * W).sum()) + c
        loss0 += c
        err += float(((W - t.target) ** 2).sum())
        err_opt += float(((W - t.optimum) ** 2).sum())
        tnorm += float((t.target**2).sum())
        onorm += float((t.optimum**2).sum())
        if energy and bool(W.any()):
            U, _, Vh = torch.linalg.svd(W.float(), full_matrices=False)
            K = t.target_rank
            captured += float(((U[:, :K].T @ t.target.float() @ Vh[:K].T) ** 2).sum())
    out = {
        "loss": max(loss, 0.0) / loss0,
        "rel_error": math.sqrt(err / tnorm),
        "rel_error_opt": math.sqrt(err_opt / onorm),
    }
    if energy:
        out["energy"] = captured / tnorm
    return out


# --------------------------------------------------------------------------- local training
def local_train(
    args: argparse.Namespace,
    problem: Problem,
    strategy: Strategy,
    starts: list[Any],
    clients: list[int | None],
    steps: int,
    gens: list[torch.Generator],
) -> list[dict[str, LoRAFactors]]:
    """`steps` minibatch steps on (B, A) of every module from each client's start factors, on the
    frozen weight W0 + base_residual. Gradients by hand (a linear model): with the minibatch
    residual R = X (W0 + res + s·B A)ᵀ − Y (b × d_out) and loss (1/b) Σ_j ‖R_j‖²,
    ∂B = (2s/b) Rᵀ (X Aᵀ) and ∂A = (2s/b) (B ᵀRᵀ) X — never forming a d_out × d_in matrix per
    step. `X W0ᵀ − Y` is the same every round (ModuleTask.R0) and `X resᵀ` is computed once per
    round for the minibatches that will be drawn.

    The round's clients train as one batch (bmm), each padded to the largest rank with zero
    columns of B and zero rows of A: those entries get zero gradients, so SGD and Adam leave
    them at zero and every client trains exactly its own rank-r_i LoRA. `clients[j]` is a
    client index, or None for the centralized arm (the pooled data)."""
    N = len(starts)
    idx = []
    for c, g in zip(clients, gens, strict=True):
        n_c = sum(problem.n) if c is None else problem.n[c]
        idx.append(torch.randint(0, n_c, (steps, min(args.batch_size, n_c)), generator=g))
    out: list[dict[str, LoRAFactors]] = [{} for _ in range(N)]
    for m, t in problem.modules.items():
        ranks = [st.factors[m].rank for st in starts]
        r_max = max(ranks)
        d_out, d_in = t.target.shape
        B = torch.zeros(N, d_out, r_max)
        A = torch.zeros(N, r_max, d_in)
        scale = torch.tensor([strategy.scaling.scale(r) for r in ranks]).view(N, 1, 1)
        data = [(torch.cat(t.X), torch.cat(t.R0)) if c is None else (t.X[c], t.R0[c]) for c in clients]
        Xb = torch.stack([x[i] for (x, _), i in zip(data, idx, strict=True)], 1)  # (steps, N, b, d_in)
        Rb = torch.stack([r[i] for (_, r), i in zip(data, idx, strict=True)], 1)  # (steps, N, b, d_out)
        for j, st in enumerate(starts):
            f = st.factors[m]
            B[j, :, : f.rank] = f.B.float()
            A[j, : f.rank] = f.A.float()
            res = st.base_residual.get(m)
            if isinstance(res, Tensor):
                Rb[:, j] += Xb[:, j] @ res.float().T
            elif res is not None:
                Rb[:, j] += (Xb[:, j] @ res.A.float().T) @ res.B.float().T
        mB, vB, mA, vA = torch.zeros_like(B), torch.zeros_like(B), torch.zeros_like(A), torch.zeros_like(A)
        b1, b2 = 0.9, 0.999
        coef = scale * (2.0 / Xb.shape[2])
        for k in range(1, steps + 1):
            xb = Xb[k - 1]
            XA = torch.bmm(xb, A.transpose(1, 2))  # (N, b, r)
            R = scale * torch.bmm(XA, B.transpose(1, 2)) + Rb[k - 1]  # (N, b, d_out)
            Rt = R.transpose(1, 2)
            gB = coef * torch.bmm(Rt, XA)
            gA = coef * torch.bmm(torch.bmm(B.transpose(1, 2), Rt), xb)
            if args.optimizer == "sgd":
                B -= args.lr * gB
                A -= args.lr * gA
            else:  # Adam, fresh state every round (as the agent's trainer)
                mB.mul_(b1).add_(gB, alpha=1 - b1)
                vB.mul_(b2).addcmul_(gB, gB, value=1 - b2)
                mA.mul_(b1).add_(gA, alpha=1 - b1)
                vA.mul_(b2).addcmul_(gA, gA, value=1 - b2)
                c1, c2 = 1 - b1**k, 1 - b2**k
                B -= args.lr * (mB / c1) / ((vB / c2).sqrt() + 1e-8)
                A -= args.lr * (mA / c1) / ((vA / c2).sqrt() + 1e-8)
        for j, r in enumerate(ranks):
            out[j][m] = LoRAFactors(B[j, :, :r].clone(), A[j, :r].clone())
    return out


# --------------------------------------------------------------------------- one run
_PROBLEMS: dict[int, Problem] = {}  # one seed's problem serves every arm (runs are seed-major)


def run_one(args: argparse.Namespace, arm: Arm, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    if seed not in _PROBLEMS:
        _PROBLEMS.clear()
        _PROBLEMS[seed] = make_problem(args, seed)
    problem = _PROBLEMS[seed]
    names = list(problem.modules)
    shapes = {m: (int(problem.modules[m].target.shape[0]), int(problem.modules[m].target.shape[1])) for m in names}
    het = problem.ranks
    ranks = {None: het, "min": [min(het)] * len(het), "max": [max(het)] * len(het)}[arm.ranks]
    if arm.centralized:
        clients, ranks = ["all"], [max(het)]
    else:
        clients = [f"c{i}" for i in range(len(het))]
    strategy = build_strategy(arm.strategy, alpha=args.lora_alpha, seed=seed, **arm.options)
    state = strategy.init_state(shapes, max_rank=max(ranks), dtype=torch.float32)
    if args.init == "optimum":
        if not strategy.dense_state:
            raise SystemExit(f"--init optimum needs a dense-state strategy, not {arm.strategy}")
        state.dense = {m: problem.modules[m].optimum.float().clone() for m in names}
    sample = torch.Generator().manual_seed(20_000 + seed)  # participation: same schedule for every arm
    history: list[dict[str, Any]] = [{"round": 0, **metrics(problem, strategy, state)}]
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        if arm.centralized:
            part = [0]
        else:
            k = max(1, round(args.participation * len(clients)))
            part = sorted(torch.randperm(len(clients), generator=sample)[:k].tolist())
        plan = strategy.plan_round(state, {clients[i]: dict.fromkeys(names, ranks[i]) for i in part})
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + rnd * 1009 + i) for i in part]  # same batches
        steps = args.local_steps * (len(problem.ranks) if arm.centralized else 1)
        starts = [strategy.client_start(state, plan, clients[i]) for i in part]
        who: list[int | None] = [None] if arm.centralized else list(part)
        trained = local_train(args, problem, strategy, starts, who, steps, gens)
        updates = [
            ClientUpdate(clients[i], f, n_examples=sum(problem.n) if arm.centralized else problem.n[i])
            for i, f in zip(part, trained, strict=True)
        ]
        state, report = strategy.aggregate(state, plan, updates)
        every = (rnd + 1) % 5 == 0 or rnd + 1 > args.rounds - args.last  # the SVD for `energy` is the costly part
        history.append(
            {
                "round": rnd + 1,
                **metrics(problem, strategy, state, energy=every),
                "weights": report.weights,
                "n_eff": report.n_eff,
                "energy_kept": {str(k): v for k, v in report.energy_kept.items()},
                "truncation_errors": report.truncation_errors,
            }
        )
    return {
        "arm": arm.key,
        "label": arm.label,
        "seed": seed,
        "n_examples": problem.n,
        "ranks": ranks,
        "wall_s": time.monotonic() - t0,
        "config": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "strategy_options": strategy.options(),
        "rounds": history,
    }


# --------------------------------------------------------------------------- report
def _final(run: dict[str, Any], key: str, last: int) -> float:
    return statistics.fmean(r[key] for r in run["rounds"][-last:])


def summarise(out: Path, arm_list: list[Arm], last: int) -> dict[str, Any]:
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for a in arm_list:
        for f in sorted((out / a.key).glob("seed*.json")):
            r = json.loads(f.read_text())
            runs.setdefault(a.key, {})[int(r["seed"])] = r
    if REFERENCE not in runs:
        raise SystemExit(f"no runs of the reference arm {REFERENCE!r} under {out}")
    ref_err = {s: _final(r, "rel_error", last) for s, r in runs[REFERENCE].items()}
    ref_loss = {s: _final(r, "loss", last) for s, r in runs[REFERENCE].items()}
    summary: dict[str, Any] = {
        "seeds": sorted(runs[REFERENCE]),
        "reference": REFERENCE,
        "metric": f"rel_error = ‖W_t − ΔW*‖/‖ΔW*‖, mean of the last {last} rounds; lower is better",
        "tie_tol": TIE_TOL,
        "arms": {},
    }
    for a in arm_list:
        if a.key not in runs:
            continue
        rs = runs[a.key]
        err = {s: _final(r, "rel_error", last) for s, r in rs.items()}
        loss = {s: _final(r, "loss", last) for s, r in rs.items()}
        entry: dict[str, Any] = {
            "label": a.label,
            "n_seeds": len(rs),
            "final_rel_error_mean": statistics.fmean(err.values()),
            "final_rel_error_std": statistics.stdev(err.values()) if len(err) > 1 else 0.0,
            "final_loss_mean": statistics.fmean(loss.values()),
            "final_energy_mean": statistics.fmean(_final(r, "energy", last) for r in rs.values()),
            "final_rel_error_opt_mean": statistics.fmean(_final(r, "rel_error_opt", last) for r in rs.values()),
        }
        diag = [x for r in rs.values() for x in r["rounds"][1:] if "n_eff" in x]
        if diag:
            entry["n_eff_mean"] = statistics.fmean(x["n_eff"] for x in diag)
            entry["max_weight_mean"] = statistics.fmean(max(x["weights"].values()) for x in diag)
            kept = [x["energy_kept"] for x in diag if x["energy_kept"]]
            if kept:  # rounds where some participant held the smallest rank (partial participation)
                lo = str(min(int(r) for k in kept for r in k))
                entry["energy_kept_min_rank_mean"] = {lo: statistics.fmean(k[lo] for k in kept if lo in k)}
            # weight of each rank class (sum over its clients), mean over rounds and seeds
            by_rank: dict[str, list[float]] = {}
            for r in rs.values():
                rank_of = {f"c{i}": rk for i, rk in enumerate(r["ranks"])} if len(r["ranks"]) > 1 else {"all": 0}
                for x in r["rounds"][1:]:
                    acc: dict[str, float] = {}
                    for c, w in x["weights"].items():
                        acc[str(rank_of[c])] = acc.get(str(rank_of[c]), 0.0) + w
                    for k, v in acc.items():
                        by_rank.setdefault(k, []).append(v)
            entry["weight_by_rank_mean"] = {
                k: statistics.fmean(v) for k, v in sorted(by_rank.items(), key=lambda kv: int(kv[0]))
            }
        if a.key != REFERENCE:
            entry["vs_reference"] = stats.compare(err, ref_err, tie_tol=TIE_TOL, higher_is_better=False)
            entry["vs_reference_loss"] = stats.compare(loss, ref_loss, tie_tol=TIE_TOL, higher_is_better=False)
            entry.update(
                {
                    k: entry["vs_reference"][k]
                    for k in ("paired_diff_mean", "ci95_low", "ci95_high", "wins", "ties", "losses")
                }
            )
        summary["arms"][a.key] = entry
    # comparisons that isolate one factor, beside the ones against the reference
    finals = {k: {s: _final(r, "rel_error", last) for s, r in v.items()} for k, v in runs.items()}
    summary["pairs"] = {
        f"{arm} vs {ref}": stats.compare(finals[arm], finals[ref], tie_tol=TIE_TOL, higher_is_better=False)
        for arm, ref in EXTRA_PAIRS
        if arm in finals and ref in finals and set(finals[arm]) & set(finals[ref])
    }
    summary["_curves"] = {
        k: stats.mean_ci_band([[x["rel_error"] for x in r["rounds"]] for _, r in sorted(v.items())])
        for k, v in runs.items()
    }
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"Reference: FedHL default. Seeds: {len(summary['seeds'])}. Tie tolerance ±{summary['tie_tol']} in "
        "rel. error. Δ = arm − reference (negative = arm closer to ΔW*); W/T/L from the arm's side.",
        "",
        "| arm | seeds | final rel. error (mean ± sd) | pooled loss | energy captured | Δ rel. error vs FedHL "
        "[95 % CI] | W/T/L | Δ pooled loss [95 % CI] | N_eff | largest weight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, e in summary["arms"].items():
        if key == REFERENCE:
            delta, wtl, dloss = "(reference)", "—", "—"
        else:
            v, lv = e["vs_reference"], e["vs_reference_loss"]
            delta = f"{v['paired_diff_mean']:+.4f} [{v['ci95_low']:+.4f}, {v['ci95_high']:+.4f}]"
            wtl = f"{v['wins']}/{v['ties']}/{v['losses']}"
            dloss = f"{lv['paired_diff_mean']:+.4f} [{lv['ci95_low']:+.4f}, {lv['ci95_high']:+.4f}]"
        lines.append(
            f"| {e['label']} | {e['n_seeds']} | {e['final_rel_error_mean']:.4f} ± {e['final_rel_error_std']:.4f} "
            f"| {e['final_loss_mean']:.4f} | {e['final_energy_mean']:.3f} | {delta} | {wtl} | {dloss} "
            f"| {e.get('n_eff_mean', float('nan')):.2f} | {e.get('max_weight_mean', float('nan')):.2f} |"
        )
    if summary.get("pairs"):
        lines += ["", "| comparison | seeds | Δ rel. error [95 % CI] | W/T/L |", "|---|---|---|---|"]
        for name, v in summary["pairs"].items():
            lines.append(
                f"| {name} | {v['n']} | {v['paired_diff_mean']:+.4f} [{v['ci95_low']:+.4f}, {v['ci95_high']:+.4f}] "
                f"| {v['wins']}/{v['ties']}/{v['losses']} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["_curves"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    ax = axes[0]
    for i, (key, band) in enumerate(curves.items()):
        x = list(range(len(band["mean"])))
        style = "-" if key.startswith("fedhl") else "--"
        (line,) = ax.plot(
            x, band["mean"], style, color=plt.cm.tab20(i % 20), label=summary["arms"][key]["label"], linewidth=1.4
        )
        ax.fill_between(x, band["low"], band["high"], color=line.get_color(), alpha=0.18)
    ax.set_xlabel("round")
    ax.set_ylabel("‖W_t − ΔW*‖ / ‖ΔW*‖  (mean, 95 % CI band)")
    ax.set_yscale("log")
    ax.set_title(f"Relative error per round ({len(summary['seeds'])} seeds)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    # paired differences vs the reference, with CI
    ax = axes[1]
    keys = [k for k in summary["arms"] if k != REFERENCE]
    means = [summary["arms"][k]["paired_diff_mean"] for k in keys]
    lows = [summary["arms"][k]["ci95_low"] for k in keys]
    highs = [summary["arms"][k]["ci95_high"] for k in keys]
    y = list(range(len(keys)))
    ax.errorbar(
        means,
        y,
        xerr=[[m - lo for m, lo in zip(means, lows, strict=True)], [h - m for m, h in zip(means, highs, strict=True)]],
        fmt="o",
        capsize=3,
    )
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(y, [summary["arms"][k]["label"] for k in keys], fontsize=7)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("Δ final rel. error vs FedHL default (< 0: arm better), 95 % CI")
    ax.set_title("Paired differences per seed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, arm_list: list[Arm], last: int) -> None:
    summary = summarise(out, arm_list, last)
    curves = summary.pop("_curves")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    text = table(summary)
    (out / "table.md").write_text(text)
    plot({**summary, "_curves": curves}, out / "mechanism.png")
    print(text)
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'mechanism.png'}")


def _seeds(s: str) -> list[int]:
    if "-" in s:
        a, b = s.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in s.split(",")]


def _shapes(s: str) -> list[tuple[int, int, int]]:
    """'64x64:24,128x128:32,256x256:48' → [(d_out, d_in, target rank)]."""
    out = []
    for item in s.split(","):
        dims, k = item.split(":")
        d_out, d_in = dims.split("x")
        out.append((int(d_out), int(d_in), int(k)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mechanism"))
    ap.add_argument("--seeds", default="0-19", type=_seeds)
    ap.add_argument("--arms", default=None, type=lambda s: s.split(","), help="subset of arm keys")
    ap.add_argument(
        "--shapes", default="64x64:24,128x128:32,256x256:48", type=_shapes, help="modules as d_outxd_in:target_rank"
    )
    ap.add_argument("--ranks", default="2,2,4,4,4,8,8,16,16,32", help="one rank per client")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-2 (adam), 5e-3 (sgd)")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--participation", type=float, default=1.0, help="fraction of clients per round")
    ap.add_argument("--n-min", type=int, default=100)
    ap.add_argument("--n-max", type=int, default=1000)
    ap.add_argument("--decay", type=float, default=0.5, help="target singular values σ_j ∝ j^-decay")
    ap.add_argument("--target-scale", type=float, default=1.0)
    ap.add_argument("--cov-spread", type=float, default=10.0, help="client covariance eigenvalues span spread² ")
    ap.add_argument("--shift", type=float, default=0.0, help="client target shift, relative to ‖ΔW*‖")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--init", choices=["zero", "optimum"], default="zero")
    ap.add_argument("--residual-rank", type=int, default=16)
    ap.add_argument("--last", type=int, default=5, help="rounds averaged for the final figures")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 1e-2 if args.optimizer == "adam" else 5e-3
    args.module_names = [f"m{i}_{a}x{b}" for i, (a, b, _) in enumerate(args.shapes)]
    torch.set_num_threads(1)
    all_arms = arms(args.residual_rank)
    if args.init == "optimum":
        all_arms = [a for a in all_arms if a.strategy in ("fedhl", "flexlora", "flora") and not a.centralized]
    chosen = [a for a in all_arms if args.arms is None or a.key in args.arms]
    out = Path(args.out)
    if not args.report_only:
        t0 = time.monotonic()
        for seed in args.seeds:  # seed-major: an interrupted grid has every arm at its first seeds
            for a in chosen:
                path = out / a.key / f"seed{seed}.json"
                if path.exists():
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                res = run_one(args, a, seed)
                path.write_text(json.dumps(res))
                last = res["rounds"][-1]
                print(
                    f"[{time.monotonic() - t0:6.0f}s] seed {seed:2d} {a.key:22s} rel_error {last['rel_error']:.4f} "
                    f"loss {last['loss']:.4f} energy {last['energy']:.3f} ({res['wall_s']:.1f}s)",
                    flush=True,
                )
    report(out, all_arms, args.last)


if __name__ == "__main__":
    main()
