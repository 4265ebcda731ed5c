"""`fedhl jobs …`: submit a spec file, list, show, watch until the end, pause/resume/cancel."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import output
from .client import AdminClient
from .specfile import load_spec

ENDED = ("COMPLETED", "CANCELLED", "FAILED")
ACTIVE_ROUND = ("OPEN", "COLLECTING", "AGGREGATING")


def submit(args: argparse.Namespace, api: AdminClient) -> int:
    spec = load_spec(args.spec, args.set or ())
    if args.dry_run:
        output.print_json(spec) if args.json else print(f"{args.spec}: valid job spec {spec['name']!r}")
        return 0
    job = api.post("/jobs", spec)
    if args.json:
        output.print_json(job)
    else:
        print(job["id"])  # alone on the line, so `JOB=$(fedhl jobs submit spec.yaml)` works
    return 0


JOB_COLUMNS: list[output.Column] = [
    ("id", lambda j: j["id"]),
    ("name", lambda j: j["name"]),
    ("status", lambda j: j["status"]),
    ("strategy", lambda j: j["strategy"]),
    ("round", lambda j: f"{j['current_round']}/{j['rounds']}"),
    ("created (UTC)", lambda j: output.when(j["created_at"])),
]


def list_jobs(args: argparse.Namespace, api: AdminClient) -> int:
    jobs = api.get("/jobs", status=args.status)
    if args.json:
        output.print_json(jobs)
    elif not jobs:
        print("no jobs")
    else:
        output.console().print(output.table(jobs, JOB_COLUMNS))
    return 0


def _seconds(r: dict[str, Any]) -> float | None:
    if not r.get("committed_at"):
        return None
    return (datetime.fromisoformat(r["committed_at"]) - datetime.fromisoformat(r["created_at"])).total_seconds()


def _participants(r: dict[str, Any]) -> str:
    report = r.get("report") or {}
    if "clients" in report:
        return f"{len(report['clients'])}/{r['target']}"
    return f"—/{r['target']}"


def _evaluation(r: dict[str, Any], key: str) -> object:
    return ((r.get("report") or {}).get("evaluation") or {}).get(key)


ROUND_COLUMNS: list[output.Column] = [
    ("round", lambda r: r["number"] + 1 if r["attempt"] == 0 else f"{r['number'] + 1} (try {r['attempt'] + 1})"),
    ("state", lambda r: r["state"] + (f": {r['error']}" if r.get("error") else "")),
    ("agents", _participants),
    ("accuracy", lambda r: output.number(_evaluation(r, "accuracy"))),
    ("loss", lambda r: output.number(_evaluation(r, "loss"))),
    ("N_eff", lambda r: output.number((r.get("report") or {}).get("n_eff"), 2)),
    ("seconds", lambda r: output.number(_seconds(r), 1)),
]


def _job_fields(job: dict[str, Any]) -> Table:
    cfg = job["config"]
    return output.fields(
        job,
        [
            ("id", job["id"]),
            ("name", job["name"]),
            ("status", job["status"] + (f" ({job['error']})" if job.get("error") else "")),
            ("strategy", job["strategy"]),
            ("rounds", f"{job['current_round']} of {job['rounds']} committed"),
            ("base model", cfg.get("base_model")),
            ("rank set", ", ".join(map(str, cfg.get("rank_set", [])))),
            ("rank policy", (cfg.get("rank_policy") or {}).get("kind")),
            ("created (UTC)", output.when(job["created_at"])),
            ("updated (UTC)", output.when(job["updated_at"])),
        ],
    )


def show(args: argparse.Namespace, api: AdminClient) -> int:
    job = api.get(f"/jobs/{args.job_id}")
    rounds = api.get(f"/jobs/{args.job_id}/rounds")
    if args.json:
        output.print_json({"job": job, "rounds": rounds})
        return 0
    con = output.console()
    con.print(_job_fields(job))
    if rounds:
        con.print(output.table(rounds, ROUND_COLUMNS, title="rounds"))
    return 0


def _live_view(job: dict[str, Any], rounds: list[dict[str, Any]], live_detail: dict[str, Any] | None) -> Group:
    head = Text.assemble(
        (job["name"], "bold"),
        f"  {job['id']}  ",
        (job["status"], "bold green" if job["status"] in ("RUNNING", "COMPLETED") else "bold yellow"),
        f"  {job['current_round']}/{job['rounds']} rounds committed",
    )
    parts: list[Any] = [head, output.table(rounds[-15:], ROUND_COLUMNS)]
    if not rounds and job["status"] == "RUNNING":
        min_clients = (job["config"].get("selection") or {}).get("min_clients")
        parts.append(Text(f"no round yet: one opens once {min_clients} agents are alive"))
    if live_detail is not None:
        uploaded = sum(1 for a in live_detail["assignments"] if a["state"] == "UPLOADED")
        parts.append(
            Text(
                f"round {live_detail['number'] + 1}: {live_detail['state']}, {uploaded} of "
                f"{len(live_detail['assignments'])} uploads in, quorum {live_detail['quorum']}, "
                f"deadline {output.when(live_detail['deadline'])} UTC"
            )
        )
    return Group(*parts)


def watch(args: argparse.Namespace, api: AdminClient) -> int:
    """Refresh until the job ends; exit 0 when it completed, 1 when it failed or was cancelled.
    With --json, one JSON line per change (job + rounds) instead of the live table."""
    last = ""
    con = output.console()
    with Live(console=con, auto_refresh=False, transient=False) if not args.json else _Null() as live:
        while True:
            job = api.get(f"/jobs/{args.job_id}")
            rounds = api.get(f"/jobs/{args.job_id}/rounds")
            active = [r for r in rounds if r["state"] in ACTIVE_ROUND]
            detail = api.get(f"/jobs/{args.job_id}/rounds/{active[-1]['id']}") if active else None
            if args.json:
                line = json.dumps({"job": job, "rounds": rounds})
                if line != last:
                    print(line, flush=True)
                    last = line
            else:
                live.update(_live_view(job, rounds, detail), refresh=True)
            if job["status"] in ENDED:
                break
            time.sleep(args.interval)
    if not args.json and not con.is_terminal:
        con.line()  # a live view written to a file or pipe ends without a newline
    return 0 if job["status"] == "COMPLETED" else 1


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, *a: object, **kw: object) -> None:
        pass


def _action(verb: str) -> Callable[[argparse.Namespace, AdminClient], int]:
    def run(args: argparse.Namespace, api: AdminClient) -> int:
        job = api.post(f"/jobs/{args.job_id}/{verb}")
        if args.json:
            output.print_json(job)
        else:
            print(f"{job['id']}: {job['status']}")
        return 0

    run.__doc__ = f"{verb} a job"
    return run


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from . import command

    jobs = sub.add_parser("jobs", help="federated jobs: submit a spec, list, show, watch, pause/resume/cancel")
    verbs = jobs.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = verbs.add_parser("submit", parents=[common], help="validate a job spec (YAML or JSON) and create the job")
    s.add_argument("spec", help="job spec file, YAML or JSON (.json), or - for standard input; see deploy/examples/")
    s.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="override a field, e.g. --set rounds=3 (repeatable)"
    )
    s.add_argument("--dry-run", action="store_true", help="validate only; send nothing")
    s.add_argument("--json", action="store_true", help="print the created job as JSON (default: its id alone)")
    s.set_defaults(func=command(submit))

    ls = verbs.add_parser("list", parents=[common], help="all jobs, newest first")
    ls.add_argument("--status", choices=["PENDING", "RUNNING", "PAUSED", *ENDED])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=command(list_jobs))

    sh = verbs.add_parser("show", parents=[common], help="a job and its rounds")
    sh.add_argument("job_id", metavar="JOB")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=command(show))

    w = verbs.add_parser("watch", parents=[common], help="live view until the job ends (exit 1 unless it completed)")
    w.add_argument("job_id", metavar="JOB")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    w.add_argument("--json", action="store_true", help="one JSON line per change instead of the live table")
    w.set_defaults(func=command(watch))

    for verb, text in (
        ("pause", "stop opening rounds (RUNNING → PAUSED)"),
        ("resume", "PAUSED → RUNNING"),
        ("cancel", "end the job; its open round fails"),
    ):
        a = verbs.add_parser(verb, parents=[common], help=text)
        a.add_argument("job_id", metavar="JOB")
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=command(_action(verb)))
