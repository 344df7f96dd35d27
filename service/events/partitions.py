"""A relay's share of the outbox's partitions: PostgreSQL advisory locks on its own session.

Each relay holds the "member" lock shared, so the live relays can be counted from pg_locks, and
one exclusive lock per partition it publishes: at most one relay at a time per partition. Every
second each relay keeps a fair share, ceil(P / relays), taking free partitions at once (also
between the batches of a drain) and releasing extras only with no batch in flight. Locks, not
leases: no clock, no expiry; a relay whose session ends frees them all at once.
"""

import logging
import random
import time

import asyncpg

log = logging.getLogger(__name__)

# Held shared by every relay ("convrela"): the live relays are its holders. Relays of the
# single-leader version took it exclusively, so old and new never publish at the same time.
RELAY_LOCK_KEY = 0x636F6E76_72656C61
# The first half of each partition's two-part advisory lock key ("outb"); the second, the number.
PARTITION_LOCK_CLASS = 0x6F757462
# How often a relay recounts the relays and evens out the shares (also mid-drain, between batches).
REBALANCE_INTERVAL_SECONDS = 1.0

JOIN = "SELECT pg_try_advisory_lock_shared($1)"
LEAVE = "SELECT pg_advisory_unlock_shared($1)"
TRY_PARTITION = "SELECT pg_try_advisory_lock($1::int, $2::int)"
RELEASE_PARTITION = "SELECT pg_advisory_unlock($1::int, $2::int)"
# P, the live relays, and the partitions no relay holds: what a relay's fair share depends on.
SHARES = """
WITH locks AS (
    SELECT classid::bigint AS classid, objid::bigint AS objid, objsubid
    FROM pg_locks
    WHERE locktype = 'advisory' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT s.partitions,
       (SELECT count(*) FROM locks
        WHERE classid = $1::bigint >> 32 AND objid = $1::bigint & 4294967295 AND objsubid = 1)
           AS relays,
       ARRAY(SELECT p FROM generate_series(0, s.partitions - 1) AS p
             WHERE p NOT IN (SELECT objid FROM locks WHERE classid = $2::bigint AND objsubid = 2))
           AS free
FROM outbox_settings AS s
"""


class PartitionShare:
    """The partitions this relay holds, on the session `conn` of each call."""

    def __init__(self) -> None:
        # Where this relay starts looking for free partitions: relays starting together spread.
        self._offset = random.randrange(1024)  # noqa: S311  # spreading, not cryptography
        self.held: tuple[int, ...] = ()
        self.joined = False
        self._count = 0  # P, as of the last rebalance
        self._due_at = 0.0  # when the shares are next looked at (time.monotonic())

    @property
    def holds_all(self) -> bool:
        """Whether this relay holds every partition (then it reads the outbox unfiltered)."""
        return len(self.held) == self._count

    @property
    def due(self) -> bool:
        """Whether the shares are to be looked at now."""
        return time.monotonic() >= self._due_at

    def seconds_until_due(self) -> float:
        return max(0.0, self._due_at - time.monotonic())

    async def join(self, conn: asyncpg.Connection) -> bool:
        """Be counted among the relays; False while a single-leader relay runs."""
        if not await conn.fetchval(JOIN, RELAY_LOCK_KEY):
            return False
        log.info("relay joined the relays")
        self.joined, self._due_at = True, 0.0
        return True

    async def leave(self, conn: asyncpg.Connection) -> None:
        """Stop being counted and release every partition (nothing may be in flight)."""
        for partition in self.held:
            await conn.fetchval(RELEASE_PARTITION, PARTITION_LOCK_CLASS, partition)
        await conn.fetchval(LEAVE, RELAY_LOCK_KEY)
        self.lost()

    def lost(self) -> None:
        """The session is gone, and its locks with it."""
        if self.held:
            log.info("relay released its partitions %s", list(self.held))
        self.held, self.joined = (), False

    async def rebalance(self, conn: asyncpg.Connection, *, in_flight: bool = False) -> bool:
        """Keep a fair share of the partitions, ceil(P / live relays); False if that means
        releasing some while a batch is in flight (`in_flight`): nothing is changed then, and
        the shares stay due, for the caller to try again once the batch is marked.

        A partition is released only with nothing in flight: every confirmed row of it is
        marked, and the relay taking it starts from its oldest pending row. Taking one is
        safe at any time: this relay's next read starts from that partition's oldest row too.
        """
        shares = await conn.fetchrow(SHARES, RELAY_LOCK_KEY, PARTITION_LOCK_CLASS)
        count, relays, free = shares["partitions"], shares["relays"], shares["free"]
        share = -(-count // max(1, relays))
        keep = [p for p in self.held if p < count][:share]  # P may have been lowered
        if in_flight and len(keep) < len(self.held):
            return False
        for partition in self.held:
            if partition not in keep:
                await conn.fetchval(RELEASE_PARTITION, PARTITION_LOCK_CLASS, partition)
        for partition in sorted(free, key=lambda p: (p - self._offset) % count):
            if len(keep) >= share:
                break
            if await conn.fetchval(TRY_PARTITION, PARTITION_LOCK_CLASS, partition):
                keep.append(partition)  # free a moment ago; another relay may have won it
        if sorted(keep) != list(self.held):
            log.info(
                "relay holds partitions %s (%d relays, %d partitions)", sorted(keep), relays, count
            )
        self.held = tuple(sorted(keep))
        self._count = count
        self._due_at = time.monotonic() + REBALANCE_INTERVAL_SECONDS
        return True
