"""Housekeeping: rows past their retention (delta-sync tombstones, idempotency keys, published
outbox rows) removed periodically, in bounded batches, by one process of all replicas at a time.

Each cleanup is one statement that removes at most `$1` rows (further parameters follow) and
returns how many it removed; it runs again until a batch comes back short (a windowed one:
until a batch removes none). Every batch is its own short transaction that first takes a
transaction-scoped advisory lock: while one process is deleting, the others skip their pass, no
lock or snapshot is held for long, a process that dies leaves no lock behind and no session
state on the pool's connections (PgBouncer in transaction mode stays safe), and an interrupted
run loses nothing: the next one carries on.
"""

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from service.errors import DATABASE_SESSION_FAILURES

log = logging.getLogger(__name__)

# The lock every housekeeping batch takes ("convhous"; the relay's and migrations' differ).
HOUSEKEEPING_LOCK_KEY = 0x636F6E76_686F7573
INTERVAL_SECONDS = 60.0
BATCH_SIZE = 1000
TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1)"


@dataclass(frozen=True, slots=True)
class Cleanup:
    """A named batched delete: `statement` removes at most `$1` rows and returns the count;
    `arguments` are its `$2`, `$3`, ...

    `windowed`: the statement removes what expired among the `$1` oldest rows, so a short batch
    does not mean that it is done (a row not yet expired may sit among the oldest): it runs
    again until a batch removes none.
    """

    name: str
    statement: str
    arguments: tuple[object, ...] = ()
    windowed: bool = False


async def run_once(
    pool: asyncpg.Pool, cleanups: Sequence[Cleanup], *, batch_size: int = BATCH_SIZE
) -> dict[str, int] | None:
    """Run every cleanup to the end; how many rows each removed, or None as soon as another
    process holds the lock (it is doing the same work)."""
    removed = {cleanup.name: 0 for cleanup in cleanups}
    async with pool.acquire() as conn:
        for cleanup in cleanups:
            while True:
                async with conn.transaction():
                    if not await conn.fetchval(TRY_LOCK, HOUSEKEEPING_LOCK_KEY):
                        return None
                    count = await conn.fetchval(cleanup.statement, batch_size, *cleanup.arguments)
                removed[cleanup.name] += count
                if count == 0 or (count < batch_size and not cleanup.windowed):
                    break
            if removed[cleanup.name]:
                log.info("housekeeping: %s: removed %d rows", cleanup.name, removed[cleanup.name])
    return removed


async def run_periodically(
    pool: asyncpg.Pool, cleanups: Sequence[Cleanup], *, interval: float = INTERVAL_SECONDS
) -> None:
    """Each cleanup every `interval` seconds (jittered, so replicas spread out) until cancelled;
    one that fails (a database outage, most likely) is logged, does not keep the others from
    running, and is tried again at the next pass."""
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))  # noqa: S311  # not cryptography
        for cleanup in cleanups:
            try:
                await run_once(pool, [cleanup])
            except Exception as error:  # the job must outlive a bad round; the type says what
                level = (
                    logging.WARNING
                    if isinstance(error, DATABASE_SESSION_FAILURES)
                    else logging.ERROR
                )
                log.log(
                    level,
                    "housekeeping: %s failed (%s); next run in about %.0fs",
                    cleanup.name,
                    type(error).__name__,
                    interval,
                )


# Of the outbox's oldest rows, those published longer ago than the retention ($2, seconds).
# Rows are published about in id order, so the expired ones are the oldest: each batch reads
# only its window of the primary key, never the whole outbox looking for rows that have not
# expired yet, and fewer than a batch of rows still pending among the oldest do not hold back
# those after them (a batch of them does: a partition that long stuck stops retention).
DELETE_PUBLISHED_OUTBOX = """
WITH expired AS (
    DELETE FROM outbox
    WHERE id IN (
        SELECT id FROM (SELECT id, published_at FROM outbox ORDER BY id LIMIT $1) AS oldest
        WHERE published_at < now() - make_interval(secs => $2)
    )
    RETURNING 1
)
SELECT count(*) FROM expired
"""


def published_outbox_rows(retention_seconds: float) -> Cleanup:
    """The housekeeping job that removes outbox rows published longer ago than the retention
    (OUTBOX_RETENTION_HOURS): the relay marks rows, housekeeping removes them."""
    return Cleanup(
        "published outbox rows",
        DELETE_PUBLISHED_OUTBOX,
        (retention_seconds,),
        windowed=True,
    )
