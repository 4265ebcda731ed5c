"""The operator's commands (`fedhl jobs|tokens|agents …`, `fedhl export --job`): a client of
the coordinator's admin REST API only, never of its database.

Connection: `--url` / `FEDHL_URL`, the token from `FEDHL_ADMIN_TOKEN` or a TOML config file
(`--config`, `FEDHL_CONFIG`, default ~/.config/fedhl/admin.toml), `--ca-file` /
`FEDHL_CA_FILE` for a coordinator whose certificate a private CA signed. Exit codes: 0 ok,
1 the server refused or failed (401/404/409/422/5xx, with its reason), 2 bad input or
configuration, 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial

from .client import AdminClient, AdminError, resolve

Handler = Callable[[argparse.Namespace, AdminClient], int]


def add_connection_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("connection")
    g.add_argument("--url", help="coordinator REST root, e.g. https://coord:8080 [FEDHL_URL; default localhost:8080]")
    g.add_argument("--ca-file", help="CA bundle that signed the coordinator's TLS certificate [FEDHL_CA_FILE]")
    g.add_argument("--config", help="TOML file with url, token or token_file, ca_file [FEDHL_CONFIG]")
    return p


def command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """An argparse `func` that connects lazily and prints an `AdminError` as one line."""

    def run(args: argparse.Namespace) -> int:
        name = " ".join(filter(None, [args.command, getattr(args, "verb", None)]))
        try:
            with AdminClient(partial(resolve, args.url, args.ca_file, args.config)) as api:
                return handler(args, api)
        except AdminError as e:
            print(f"fedhl {name}: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            return 130

    return run


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], export: argparse.ArgumentParser) -> None:
    """Add the admin command groups to `fedhl`, and `--job` (with connection flags) to `export`."""
    from . import agents, jobs, tokens

    common = add_connection_arguments(argparse.ArgumentParser(add_help=False))
    jobs.add_parser(sub, common)
    tokens.add_parser(sub, common)
    agents.add_parser(sub, common)

    remote = export.add_argument_group("from a running coordinator (instead of --state)")
    remote.add_argument("--job", help="job id: download its checkpoint over the admin API")
    remote.add_argument("--round", type=int, help="checkpoint version (rounds committed; default: the latest)")
    add_connection_arguments(export)


def export_job(args: argparse.Namespace) -> int:
    from .export import export_job as run

    return command(run)(args)


__all__ = ["AdminClient", "AdminError", "command", "export_job", "register", "resolve"]
