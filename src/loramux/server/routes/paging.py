"""OpenAI's cursor paging for the list routes.

A page holds at most `limit` items (at least 1; a larger limit is clamped to the route's maximum)
that follow the item with id `after` in the list's order; `has_more` says whether another page
follows, and the official client asks for it with `after` set to the page's last id. An `after`
that is not an item of the list is a 400 naming `after` rather than an empty page, so a mistyped
cursor is not read as the end of the list.
"""

from __future__ import annotations

from typing import Annotated, Callable

from fastapi import Query

from loramux.server.protocol import APIError
from loramux.server.store import UnknownCursor

After = Annotated[str | None, Query(description="the id of the last item of the previous page")]
Limit = Annotated[int, Query(ge=1, description="items per page, at least 1; above the route's maximum counts as the maximum")]


def page(fetch: Callable[[str | None, int], tuple[list[dict], bool]], after: str | None, limit: int, maximum: int,
         *, with_ids: bool = False) -> dict:
    """The list body of `fetch(after, limit)`; `with_ids` adds first_id and last_id (OpenAI's files
    and checkpoints lists have them, its jobs and events lists do not)."""
    try:
        data, more = fetch(after, min(limit, maximum))
    except UnknownCursor:
        raise APIError(400, f"after: {after!r} is not the id of an item of this list", param="after") from None
    body = {"object": "list", "data": data, "has_more": more}
    if with_ids:
        body |= {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
    return body
