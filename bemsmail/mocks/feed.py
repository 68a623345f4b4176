"""Reading a mock's bounded request history by cursor, so a load test can follow everything a mock received."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

Row = TypeVar("Row")

MAX_PAGE = 10_000


def rows_after(history: deque[Row], total: int, after: int, limit: int = MAX_PAGE) -> tuple[int, list[Row]]:
    """The rows numbered after `after` (rows are numbered 1, 2, … as they arrive; `total` have arrived and the
    newest `len(history)` are kept). Returns the number of the first row given minus one, which is larger than
    `after` when rows the reader had not seen were already forgotten (its history was too short)."""
    oldest = total - len(history)  # rows up to this number are gone
    start = max(after, oldest)
    skip = start - oldest
    return start, list(itertools.islice(history, skip, skip + max(0, min(limit, MAX_PAGE))))


def parse_cursor(query: Any) -> tuple[int, int]:
    """`after` and `limit` from a control API query; ValueError names the bad one."""
    try:
        after = int(query.get("after", "0"))
        limit = int(query.get("limit", str(MAX_PAGE)))
    except ValueError:
        raise ValueError("after and limit must be integers") from None
    if after < 0 or limit < 1:
        raise ValueError("after must be >= 0 and limit >= 1")
    return after, limit


def received_handler(read: Callable[[int, int], dict[str, Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /mock/received?after=N[&limit=M] for a mock whose `read(after, limit)` gives the page."""
    async def handle(request: web.Request) -> web.Response:
        try:
            after, limit = parse_cursor(request.query)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(read(after, limit))
    return handle
