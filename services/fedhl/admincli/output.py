"""How the admin commands print: `--json` for scripts (the API's JSON, unchanged), rich tables
for people. Times are shown in UTC to the second."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

Column = tuple[str, Callable[[dict[str, Any]], object]]


def console() -> Console:
    # soft_wrap off and a generous width when piped, so rows are not folded mid-word in logs
    return Console(width=None if sys.stdout.isatty() else 160)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def when(value: object) -> str:
    if not value:
        return "—"
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(value)


def number(value: object, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], title: str | None = None) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for name, _ in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        t.add_row(*(str(get(row)) for _, get in columns))
    return t


def fields(record: dict[str, Any], pairs: Sequence[tuple[str, object]], title: str | None = None) -> Table:
    """A record as a two-column table (`show` commands)."""
    t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for name, value in pairs:
        t.add_row(name, str(value))
    return t
