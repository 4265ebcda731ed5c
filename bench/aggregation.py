"""Aggregation benchmark: one FedHL round (start factors + merge) on a LLaMA-7B-shaped
target set, fast path vs the naive path, measured in the same run.

    python bench/aggregation.py            # 32 layers × {q_proj, v_proj} at 4096×4096, 100 clients
    python bench/aggregation.py --quick    # CI-sized: 2 layers at 2048×2048

The naive path is what a direct reading of ALGORITHMS.md does: a full `torch.linalg.svd`
per module, then per client a dense `trunc(W_t, r_i)`, a dense `s_i B_i A_i` and a dense
accumulation. It runs on `--naive-modules` modules and is extrapolated to all of them.

The global update W_t of every module is synthetic with a stated spectrum (see
`make_state`); `--spectrum power` uses a plain σ_k = 1/k law instead, the hardest case for a
randomized SVD. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))  # run from a checkout too

from fedhl.core import (
    ClientUpdate,
    FedHL,
    GlobalState,
    LoRAFactors,
    LoRAScaling,
    RoundPlan,
    Spectrum,
    SVDConfig,
    WeightConfig,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def spectrum(kind: str, d: int, k_signal: int) -> torch.Tensor:
    k = torch.arange(1, min(d, 8 * k_signal) + 1, dtype=torch.float64)
    s = 1.0 / k
    if kind == "stepped":  # shared task signal in the top k_signal directions, a 10× lower floor beyond
        s[k_signal:] *= 0.1
    return s


def make_state(modules: list[str], d: int, kind: str, k_signal: int, seed: int, device: torch.device) -> GlobalState:
    """W_t = G1 diag(σ) G2 with Gaussian G1 (d, K), G2 (K, d) scaled to near-orthonormal.

    `stepped` (default): σ_k = 1/k for k ≤ 64, 0.1/k for 64 < k ≤ 512 — the shape of an
    aggregated update whose clients share a task subspace (ranks ≤ 64) over a floor of
    client-specific directions. `power`: σ_k = 1/k for k ≤ 512.
    """
    s = spectrum(kind, d, k_signal)
    K = s.numel()
    state = GlobalState(round=1)
    for i, m in enumerate(modules):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        G1 = torch.randn(d, K, generator=g) / d**0.5  # (d, K)
        G2 = torch.randn(K, d, generator=g) / d**0.5  # (K, d)
        state.dense[m] = ((G1 * s.float()) @ G2).to(device)  # (d, d)
    return state


class TrainedUpload(Mapping[str, LoRAFactors]):
    """A client's upload, produced one module at a time (as a worker streams blobs): its
    start factors plus a seeded perturbation standing in for local training."""

    def __init__(self, strategy: FedHL, state: GlobalState, plan: RoundPlan, client: str, idx: int):
        self.strategy, self.state, self.plan, self.client, self.idx = (
            strategy,
            state,
            plan,
            client,
            idx,
        )

    def __getitem__(self, module: str) -> LoRAFactors:
        r = self.plan.rank(self.client, module)
        f = self.strategy.start_factors(self.state, self.plan, module, r)
        g = torch.Generator().manual_seed(self.idx * 7919 + hash_module(module))
        dB = torch.randn(f.B.shape, generator=g).to(f.B) * 1e-3  # (d_out, r)
        dA = torch.randn(f.A.shape, generator=g).to(f.A) * 1e-3  # (r, d_in)
        return LoRAFactors(f.B + dB, f.A + dA)

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan.ranks[self.client])

    def __len__(self) -> int:
        return len(self.plan.ranks[self.client])


def hash_module(m: str) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(m))


def naive_round(
    W: torch.Tensor,
    ups: list[LoRAFactors],
    ranks: list[int],
    n: torch.Tensor,
    scaling: LoRAScaling,
    weights: WeightConfig,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], float]:
    """Full SVD, then dense per-client truncations, products and accumulation."""
    t0 = time.perf_counter()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    truncs = {r: (U[:, :r] * S[:r]) @ Vh[:r] for r in sorted(set(ranks))}  # start points
    errors = torch.tensor([float(torch.linalg.vector_norm(W - truncs[r]) ** 2) for r in ranks], dtype=torch.float64)
    p = weights.compute(errors, n).tolist()
    out = W.clone()
    for f, r, pi in zip(ups, ranks, p, strict=True):
        s = scaling.scale(r)
        out += pi * (s * (f.B @ f.A) - (U[:, :r] * S[:r]) @ Vh[:r])  # dense, one client at a time
    sync(W.device)
    return out, truncs, time.perf_counter() - t0


def f64_check(
    strategy: FedHL,
    plan: RoundPlan,
    updates: list[ClientUpdate],
    old: dict[str, torch.Tensor],
    merged: GlobalState,
    modules: list[str],
) -> float:
    """Largest relative error of the merged modules against a float64 CPU merge of the same
    inputs (same uploads, same spectra: the round's weights see every module)."""
    ref = FedHL(strategy.scaling, seed=strategy.seed, device="cpu", compute_dtype=torch.float64, svd=strategy.svd)
    spectra = {
        m: Spectrum(s.U.cpu().double(), s.S.cpu().double(), s.Vh.cpu().double(), s.total_energy, s.method, s.residual)
        for m, s in plan.spectra.items()
    }
    plan64 = RoundPlan(round=plan.round, ranks=plan.ranks, spectra=spectra)
    state = GlobalState(round=plan.round, dense={m: old[m].cpu().double() for m in modules})
    ups = [
        ClientUpdate(
            u.client_id,
            {m: LoRAFactors(u.factors[m].B.cpu().double(), u.factors[m].A.cpu().double()) for m in modules},
            u.n_examples,
        )
        for u in updates
    ]
    new64, _ = ref.aggregate(state, plan64, ups)
    err = 0.0
    for m in modules:
        want = new64.dense[m]
        got = merged.dense[m].cpu().double()
        err = max(err, float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)))
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 layers at 2048×2048, naive on 1 module")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--ranks", default="4,8,16,32,64")
    ap.add_argument("--naive-modules", type=int, default=2)
    ap.add_argument(
        "--f64-check", type=int, default=0, help="compare this many merged modules with a float64 CPU merge"
    )
    ap.add_argument("--spectrum", choices=["stepped", "power"], default="stepped")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--worker",
        action="store_true",
        help="time a full aggregation job through `fedhl aggregator` (1 vs 2 workers; Postgres + Redis)",
    )
    ap.add_argument("--worker-counts", default="1,2", help="with --worker: the worker counts to run, in order")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = ap.parse_args()
    if args.worker:
        if args.quick:
            args.layers, args.dim, args.clients = 2, 1024, 20
        from worker_mode import main as worker_main

        worker_main(args)
        return
    if args.quick:
        args.layers, args.dim, args.naive_modules = 2, 2048, 1
    device = torch.device(args.device)
    rank_set = [int(r) for r in args.ranks.split(",")]
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(args.layers) for p in ("q_proj", "v_proj")]
    gen = torch.Generator().manual_seed(args.seed)
    clients = [f"client-{i:03d}" for i in range(args.clients)]
    client_rank = {c: rank_set[int(torch.randint(len(rank_set), (1,), generator=gen))] for c in clients}
    n = torch.randint(50, 500, (args.clients,), generator=gen).tolist()
    ranks = {c: dict.fromkeys(modules, client_rank[c]) for c in clients}

    strategy = FedHL(LoRAScaling(alpha=16.0), seed=args.seed, device=device, svd=SVDConfig())
    print(
        f"building W_t: {len(modules)} modules of {args.dim}×{args.dim} ({args.spectrum} spectrum) on {device}",
        flush=True,
    )
    state = make_state(modules, args.dim, args.spectrum, max(rank_set), args.seed, device)
    state_mb = sum(w.numel() * w.element_size() for w in state.dense.values()) / 2**20
    rss_before = peak_rss_mb()

    # ---- fast path: one partial SVD per module, start factors once per rank, one GEMM merge
    sync(device)
    t0 = time.perf_counter()
    plan = strategy.plan_round(state, ranks)
    for m in modules:
        for r in plan.distinct_ranks(m):
            strategy.start_factors(state, plan, m, r)
    sync(device)
    t_start = time.perf_counter() - t0
    updates = [
        ClientUpdate(c, TrainedUpload(strategy, state, plan, c, i), n_examples=n[i]) for i, c in enumerate(clients)
    ]
    t0 = time.perf_counter()  # what producing the uploads costs, to subtract from the merge
    for u in updates:
        for m in modules:
            u.factors[m]
    t_gen = time.perf_counter() - t0
    n_keep = max(args.naive_modules, args.f64_check)
    old = {m: state.dense[m].clone() for m in modules[:n_keep]}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    new_state, report = strategy.aggregate(state, plan, updates, inplace=True)
    sync(device)
    t_merge = time.perf_counter() - t0 - t_gen
    fast_seconds = t_start + t_merge
    fast_rss = peak_rss_mb()
    peak_device_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    f64_err = f64_check(strategy, plan, updates, old, new_state, modules[: args.f64_check]) if args.f64_check else None
    print(
        f"fast: start factors {t_start:.2f}s + merge {t_merge:.2f}s = {fast_seconds:.2f}s "
        f"(upload generation {t_gen:.2f}s excluded); svd {report.svd}",
        flush=True,
    )

    # ---- naive path on a subset of modules, same inputs
    scaling = strategy.scaling
    nt = torch.tensor([float(x) for x in n], dtype=torch.float64)
    naive_t, start_err, merge_err = 0.0, 0.0, 0.0
    for m in modules[: args.naive_modules]:
        W = old[m].to(device)
        ups = [updates[i].factors[m] for i in range(len(clients))]
        rl = [client_rank[c] for c in clients]
        W_naive, truncs, secs = naive_round(W, ups, rl, nt, scaling, strategy.weights)
        naive_t += secs
        spec_fast = plan.spectra[m]
        for r, T in truncs.items():
            start_err = max(
                start_err,
                float(torch.linalg.vector_norm(spec_fast.trunc(r) - T) / torch.linalg.vector_norm(T)),
            )
        merge_err = max(
            merge_err,
            float(torch.linalg.vector_norm(new_state.dense[m] - W_naive) / torch.linalg.vector_norm(W_naive)),
        )
        print(f"naive {m}: {secs:.2f}s", flush=True)
    naive_per_round = naive_t / args.naive_modules * len(modules)

    result = {
        "modules": len(modules),
        "shape": [args.dim, args.dim],
        "clients": args.clients,
        "ranks": rank_set,
        "spectrum": args.spectrum,
        "seconds_per_round": round(fast_seconds, 3),
        "start_factor_seconds": round(t_start, 3),
        "merge_seconds": round(t_merge, 3),
        "naive_seconds_per_round": round(naive_per_round, 3),
        "naive_measured_modules": args.naive_modules,
        "speedup_vs_naive": round(naive_per_round / fast_seconds, 2),
        "max_rel_error": start_err,
        "merge_rel_error": merge_err,
        "svd_methods": report.svd.get("methods"),
        "state_mb": round(state_mb, 1),
        "peak_rss_mb": round(fast_rss, 1),
        "rss_before_round_mb": round(rss_before, 1),
        "n_eff": round(report.n_eff, 2),
        "peak_device_mb": None if peak_device_mb is None else round(peak_device_mb, 1),
        "f64_rel_error": f64_err,
        "f64_checked_modules": args.f64_check,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
