"""`fedhl tokens …`: enrolment tokens that agents exchange once for a credential."""

from __future__ import annotations

import argparse

from . import output
from .client import AdminClient


def create(args: argparse.Namespace, api: AdminClient) -> int:
    body: dict[str, object] = {"label": args.label, "uses": args.uses}
    if args.expires_in_s is not None:
        body["expires_in_s"] = args.expires_in_s
    created = api.post("/agents/enrolment-tokens", body)
    if args.json:
        output.print_json(created)
    else:
        print(created["token"])  # the token alone: it is shown once, and pipes into a secret store
    return 0


COLUMNS: list[output.Column] = [
    ("id", lambda t: t["id"]),
    ("label", lambda t: t["label"] or "—"),
    ("uses left", lambda t: t["uses_left"]),
    ("expires (UTC)", lambda t: output.when(t["expires_at"]) if t["expires_at"] else "never"),
    ("revoked", lambda t: "yes" if t["revoked"] else "no"),
    ("created (UTC)", lambda t: output.when(t["created_at"])),
]


def list_tokens(args: argparse.Namespace, api: AdminClient) -> int:
    tokens = api.get("/agents/enrolment-tokens")
    if args.json:
        output.print_json(tokens)
    elif not tokens:
        print("no enrolment tokens")
    else:
        output.console().print(output.table(tokens, COLUMNS))
    return 0


def revoke(args: argparse.Namespace, api: AdminClient) -> int:
    row = api.request("DELETE", f"/agents/enrolment-tokens/{args.token_id}")
    if args.json:
        output.print_json(row)
    else:
        print(f"{row['id']}: revoked ({row['label'] or 'no label'})")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    from . import command

    tokens = sub.add_parser("tokens", help="agent enrolment tokens: create, list, revoke")
    verbs = tokens.add_subparsers(dest="verb", required=True, metavar="VERB")

    c = verbs.add_parser("create", parents=[common], help="a new enrolment token, printed once and alone")
    c.add_argument("--label", default="", help="a note for the operator (e.g. the site)")
    c.add_argument("--uses", type=int, default=1, help="how many agents it can enrol (default 1)")
    c.add_argument("--expires-in-s", type=float, default=None, help="lifetime in seconds (default: no expiry)")
    c.add_argument("--json", action="store_true", help="the id, label, uses and expiry too, as JSON")
    c.set_defaults(func=command(create))

    ls = verbs.add_parser("list", parents=[common], help="tokens (never their secret)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=command(list_tokens))

    r = verbs.add_parser("revoke", parents=[common], help="no further enrolments (enrolled agents keep working)")
    r.add_argument("token_id", metavar="TOKEN_ID")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=command(revoke))
