"""Housekeeping: named DELETE jobs that remove expired rows in bounded batches, periodically,
in one process at a time.

Each batch is its own short transaction that first takes a transaction-scoped advisory lock:
while one process (of any replica) is deleting, the others skip their pass, and a process that
dies leaves no lock behind and no session state on the pool's connections.
"""

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from service.errors import DATABASE_UNAVAILABLE

log = logging.getLogger(__name__)

# The lock every housekeeping batch takes ("convhous"; the relay's and migrations' differ).
HOUSEKEEPING_LOCK_KEY = 0x636F6E76_686F7573
TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1)"
INTERVAL_SECONDS = 60.0
BATCH_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Job:
    """A DELETE of at most `$1` rows; `$2`, `$3`... are `args`."""

    name: str
    statement: str
    args: tuple[object, ...] = ()


async def run_jobs(
    pool: asyncpg.Pool, jobs: Sequence[Job], *, batch_size: int = BATCH_SIZE
) -> dict[str, int] | None:
    """One pass: each job in batches until a batch removes fewer than `batch_size` rows.

    Returns the rows removed per job, or None if another process was running a pass.
    """
    removed: dict[str, int] = {}
    async with pool.acquire() as conn:
        for job in jobs:
            removed[job.name] = 0
            while True:
                async with conn.transaction():
                    if not await conn.fetchval(TRY_LOCK, HOUSEKEEPING_LOCK_KEY):
                        return None
                    status = await conn.execute(job.statement, batch_size, *job.args)
                count = int(status.split()[-1])
                removed[job.name] += count
                if count < batch_size:
                    break
    for name, count in removed.items():
        if count:
            log.info("housekeeping removed %d %s", count, name)
    return removed


async def run_periodically(
    pool: asyncpg.Pool, jobs: Sequence[Job], *, interval: float = INTERVAL_SECONDS
) -> None:
    """Each of `jobs` every `interval` seconds until cancelled; a job that fails is logged and
    tried again at the next pass, and does not keep the others from running."""
    # Replicas started together would otherwise all wake at once, only for one to find work.
    await asyncio.sleep(random.uniform(0, interval))  # noqa: S311  # jitter, not cryptography
    while True:
        for job in jobs:
            try:
                await run_jobs(pool, [job])
            except (*DATABASE_UNAVAILABLE, asyncpg.PostgresError) as error:
                log.warning("housekeeping: %s failed (%s)", job.name, type(error).__name__)
            except Exception as error:  # a bug must not end housekeeping for the process's life
                log.error("housekeeping: %s failed (%s)", job.name, type(error).__name__)
        await asyncio.sleep(interval)
