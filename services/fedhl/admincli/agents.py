"""`fedhl agents …`: the fleet, one agent, revoke, pin a rank."""

from __future__ import annotations

import argparse
from typing import Any

from . import output
from .client import AdminClient


def _gib(value: object) -> str:
    return f"{int(value) / 2**30:.1f} GiB" if isinstance(value, (int, float)) and value else "—"


def _device(a: dict[str, Any]) -> str:
    res = a.get("resources") or {}
    kind = res.get("device_type") or "—"
    name = res.get("device_name")
    return f"{kind} ({name})" if name else str(kind)


COLUMNS: list[output.Column] = [
    ("id", lambda a: a["id"]),
    ("name", lambda a: a["name"]),
    ("status", lambda a: a["status"]),
    ("alive", lambda a: "yes" if a["alive"] else "no"),
    ("last seen (UTC)", lambda a: output.when(a["last_seen_at"])),
    ("device", _device),
    ("memory", lambda a: _gib((a.get("resources") or {}).get("device_memory_bytes"))),
    ("rank override", lambda a: a["rank_override"] if a["rank_override"] is not None else "—"),
]


def list_agents(args: argparse.Namespace, api: AdminClient) -> int:
    agents = api.get("/agents")
    if args.json:
        output.print_json(agents)
    elif not agents:
        print("no agents")
    else:
        output.console().print(output.table(agents, COLUMNS))
    return 0


def _print_agent(args: argparse.Namespace, agent: dict[str, Any]) -> None:
    if args.json:
        output.print_json(agent)
        return
    res = agent.get("resources") or {}
    pairs: list[tuple[str, object]] = [(name, get(agent)) for name, get in COLUMNS]
    pairs += [(f"resources.{k}", v) for k, v in sorted(res.items())]
    pairs.append(("enrolled (UTC)", output.when(agent["created_at"])))
    output.console().print(output.fields(agent, pairs))


def show(args: argparse.Namespace, api: AdminClient) -> int:
    _print_agent(args, api.get(f"/agents/{args.agent_id}"))
    return 0


def revoke(args: argparse.Namespace, api: AdminClient) -> int:
    _print_agent(args, api.post(f"/agents/{args.agent_id}/revoke"))
    return 0


def rank_override(args: argparse.Namespace, api: AdminClient) -> int:
    rank = None if args.rank == "clear" else int(args.rank)
    _print_agent(args, api.request("PUT", f"/agents/{args.agent_id}/rank-override", json={"rank": rank}))
    return 0


def _rank(value: str) -> str:
    if value == "clear" or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"a rank is a positive integer or 'clear', got {value!r}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from . import command

    agents = sub.add_parser("agents", help="the fleet: list, show, revoke, rank-override")
    verbs = agents.add_subparsers(dest="verb", required=True, metavar="VERB")

    ls = verbs.add_parser("list", parents=[common], help="every enrolled agent: alive, last seen, device")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=command(list_agents))

    sh = verbs.add_parser("show", parents=[common], help="one agent and its reported resources")
    sh.add_argument("agent_id", metavar="AGENT")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=command(show))

    r = verbs.add_parser("revoke", parents=[common], help="refuse its credential from now on")
    r.add_argument("agent_id", metavar="AGENT")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=command(revoke))

    o = verbs.add_parser("rank-override", parents=[common], help="pin the rank it trains at, or 'clear' the pin")
    o.add_argument("agent_id", metavar="AGENT")
    o.add_argument("rank", type=_rank, metavar="RANK|clear", help="snapped to each job's rank set")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=command(rank_override))
