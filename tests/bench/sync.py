"""Scenario 7's walks, in the harness: the large account read whole by delta sync and by the
keyset list, page after page at the same page size, through the same domain operations the
handlers call and encoded as the handlers encode them (HTTP adds the same per page to both)."""

import time

import asyncpg
import orjson

from schemas import cursor
from service.conversations import operations, sync
from service.conversations.repository import ListFilter

RETENTION_SECONDS = 30 * 86_400


async def list_walk(pool: asyncpg.Pool, account_id: str, page_size: int) -> tuple[float, int]:
    """Rows per second and rows of a newest-first keyset walk over the whole account."""
    started = time.perf_counter()
    rows, after = 0, None
    while True:
        page = await operations.list_page(
            pool, account_id, ListFilter(), limit=page_size, starting_after=after
        )
        data = [conversation.resource for conversation in page.conversations]
        first, last = cursor.Position(data[0]["id"]), cursor.Position(data[-1]["id"])
        ends = {"before": cursor.encode(cursor.Sort.CREATED, first), "after": last.id}
        orjson.dumps({"has_more": page.has_more, "data": data, "cursors": ends})
        rows += len(data)
        if not page.has_more:
            return rows / (time.perf_counter() - started), rows
        after = last


async def sync_walk(pool: asyncpg.Pool, account_id: str, page_size: int) -> tuple[float, int, str]:
    """Rows per second and rows of a delta-sync walk from nothing, and the token it ends with."""
    started = time.perf_counter()
    rows, since = 0, None
    while True:
        page = await sync.changes(
            pool, account_id, since, limit=page_size, retention_seconds=RETENTION_SECONDS
        )
        orjson.dumps({"data": page.items, "has_more": page.has_more, "next_since": page.next_since})
        rows += len(page.items)
        since = page.next_since
        if not page.has_more:
            return rows / (time.perf_counter() - started), rows, since
