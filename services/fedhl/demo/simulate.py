"""`fedhl simulate`: the demo's federated job (same corpus split, job spec, trainer and strategy
code) in one process, without gRPC or a database — for sweeps over strategies, ranks, skew
and seeds. Writes results.json (the demo's shape) and accuracy.png to --out."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..jobspec import JobSpec
from ..simulation import SimClient, simulate
from .run import job_spec, model_path, run_config, split_corpus, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .run import add_arguments as demo_arguments

    demo_arguments(p)
    p.set_defaults(out="./fedhl-simulation")
    p.add_argument("--participation", type=float, default=1.0, help="fraction of agents sampled each round")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    train, test, shards = split_corpus(args)
    spec = JobSpec.model_validate(job_spec(args, model_path(args.model), ranks, None))
    clients = [SimClient(f"agent-{i}", ranks[i % len(ranks)], [train[j] for j in idx]) for i, idx in enumerate(shards)]
    config = {**run_config(args, ranks, train, test, shards), "participation": args.participation, "mode": "simulate"}
    if not args.quiet:
        print(
            f"fedhl simulate: {args.agents} agents, ranks {ranks}, {args.strategy} {config['strategy_options']}, "
            f"{args.rounds} rounds, Dirichlet α={args.alpha_dirichlet}, seed {args.seed}",
            flush=True,
        )

    def progress(row: dict[str, Any]) -> None:
        if not args.quiet:
            print(
                f"  round {row['round'] + 1:>3}/{args.rounds}  accuracy {row['accuracy']:.3f}"
                f"  loss {row['loss']:.3f}  {row['seconds']:.1f}s",
                flush=True,
            )

    t0 = time.monotonic()
    _, rows = simulate(spec, clients, test, participation=args.participation, device=args.device, on_round=progress)
    write_report(out, args, config, rows, time.monotonic() - t0)
    (out / "spec.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    return 0
