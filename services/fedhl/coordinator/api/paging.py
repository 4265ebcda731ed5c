"""Pagination of every list route: `limit` (bounded) and `cursor`; the response is the page as
a list and, when more remain, the cursor of the next page in the `X-Next-Cursor` header."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, TypeVar

from fastapi import Path, Query, Response

T = TypeVar("T")

MAX_PAGE = 500
NEXT_CURSOR = "X-Next-Cursor"
MAX_DB_INT = 2**63 - 1  # BIGINT: a larger id is a 422, not a database overflow (500)

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size (at most {MAX_PAGE})")]
Cursor = Annotated[
    str | None,
    Query(max_length=19, pattern=r"^[0-9]{1,18}$", description=f"the previous page's {NEXT_CURSOR} header"),
]
# Identifiers: bounded strings of id characters (ids are uuid hex; a NUL byte or other control
# character would otherwise reach the database and fail there: a 500) and integers that fit it.
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
IdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=ID_PATTERN)]
IdQuery = Annotated[str | None, Query(min_length=1, max_length=128, pattern=ID_PATTERN)]
RoundIdPath = Annotated[int, Path(ge=1, le=MAX_DB_INT)]
RoundNumberPath = Annotated[int, Path(ge=0, le=MAX_DB_INT)]

PAGE_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {
        "headers": {
            NEXT_CURSOR: {"description": "cursor of the next page (absent on the last)", "schema": {"type": "string"}}
        }
    }
}


def offset_of(cursor: str | None) -> int:
    return int(cursor) if cursor else 0


def page(response: Response, rows: Sequence[T], limit: int, next_cursor: str) -> Sequence[T]:
    """`rows` were fetched with limit + 1: a row beyond `limit` means another page exists."""
    if len(rows) > limit:
        response.headers[NEXT_CURSOR] = next_cursor
        return rows[:limit]
    return rows
