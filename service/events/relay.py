"""The outbox relay: publishes committed events to RabbitMQ, in order, losing nothing.

Any number of relays share the outbox's P partitions (a partition is a hash of the
conversation id, so one conversation's events share one). A relay publishes only the partitions
it holds a PostgreSQL advisory lock for, on its own connection: at most one relay at a time per
partition. Each relay also holds a shared "member" lock, so the live relays can be counted from
pg_locks; every second each keeps a fair share, ceil(P / relays), taking free partitions at
once (also between the batches of a drain) and releasing extras only with no batch in flight.
A relay that dies ends its session, which frees its locks for the others; one that loses
RabbitMQ leaves until it is back. A relay is woken by NOTIFY after each commit, polls as a
fallback, publishes a batch with publisher confirms, and marks rows published only once the
broker has confirmed them: a crash in between publishes them again (same message_id), never
loses them.
"""

import asyncio
import functools
import logging
import random
import time
from asyncio import FIRST_COMPLETED
from collections import Counter, deque
from collections.abc import Callable

import aio_pika
import aiormq
import asyncpg

from service.backoff import Backoff, first_set, sleep_unless
from service.errors import DATABASE_UNAVAILABLE
from service.events.broker import BROKER_UNAVAILABLE, Broker, Outgoing
from service.events.tracing import end_publish_spans, start_publish_spans
from service.metrics import Metrics
from service.settings import EventSettings

log = logging.getLogger(__name__)

# What ends the relay's database session; it reconnects with backoff. asyncpg's protocol raises
# InternalClientError when the server ends the session in the middle of a query.
SESSION_LOST = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError, asyncpg.InternalClientError)

APP_ID = "conversations"
# Held shared by every relay ("convrela"): the live relays are its holders. Relays of the
# single-leader version took it exclusively, so old and new never publish at the same time.
RELAY_LOCK_KEY = 0x636F6E76_72656C61
# The first half of each partition's two-part advisory lock key ("outb"); the second, the number.
PARTITION_LOCK_CLASS = 0x6F757462
NOTIFY_CHANNEL = "outbox"
STANDBY_RETRY_SECONDS = 2.0
# How often a relay recounts the relays and evens out the shares (also mid-drain, between batches).
REBALANCE_INTERVAL_SECONDS = 1.0
PUBLISH_CONFIRM_TIMEOUT_SECONDS = 10.0
# How many batches' rows a relay may have published and unconfirmed: one is read and published
# while the broker confirms the other, and a slow confirm does not hold up the events behind it.
# A relay that dies re-publishes at most these (duplicates, never a loss).
IN_FLIGHT_BATCHES = 2
CLEANUP_INTERVAL_SECONDS = 60.0
CLEANUP_BATCH = 1000
# The relay's database session: named in pg_stat_activity, ended by the server within about
# 10 s of the relay's host going silent (so that its partitions are freed for the others),
# costing random reads as the cached reads they are (else the planner prefers filtering the
# id-ordered scan of every pending row to an index range of each of the relay's partitions),
# and planning each statement with its values: a plan cached while the outbox was empty (a
# new database) scans and sorts the whole backlog for every batch until the next ANALYZE
# (seen: 0.1 to 0.35 s a batch over 100,000 rows), and the in-flight ids, as a constant, are
# looked up in a hash instead of a list.
SESSION_SETTINGS = {
    "application_name": "conversations-relay",
    "random_page_cost": "1.1",
    "plan_cache_mode": "force_custom_plan",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}

COLUMNS = (
    "id, event_id, event_type, account_id, conversation_id, partition, payload, traceparent, "
    "created_at"
)
# Always from the oldest pending row, skipping only the rows in flight: a row that commits late
# with a lower id is still published before any later event of its conversation. A relay that
# holds every partition reads them all in id order.
SELECT_PENDING = f"""
SELECT {COLUMNS}
FROM outbox
WHERE published_at IS NULL AND NOT (id = ANY($2::bigint[]))
ORDER BY id
LIMIT $1
"""  # noqa: S608  # a constant column list; values are $n parameters


@functools.cache
def select_pending_of(partitions: int) -> str:
    """The read of a relay holding `partitions` of the partitions (their numbers are $3, $4,
    ...): the same rows as SELECT_PENDING, of those partitions only.

    Each partition's pending rows are a range of its index, in id order; PostgreSQL merges the
    ranges (a Merge Append) and stops once it has the batch, so a read costs what the batch
    takes, whatever the other partitions' backlog, plus an index descent per partition.
    """
    # A constant column list and parameter numbers; every value is a $n parameter.
    ranges = "\n    UNION ALL\n    ".join(
        f"(SELECT {COLUMNS} FROM outbox WHERE published_at IS NULL AND partition = ${number}"  # noqa: S608
        " AND NOT (id = ANY($2::bigint[])) ORDER BY id LIMIT $1)"
        for number in range(3, 3 + partitions)
    )
    return f"SELECT {COLUMNS}\nFROM (\n    {ranges}\n) AS pending\nORDER BY id\nLIMIT $1"


MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"
# Of the oldest rows, those published longer ago than the retention. Rows are published about
# in id order, so the expired ones are the oldest: each statement reads only its window of the
# primary key, never the whole outbox looking for rows that have not expired yet.
DELETE_PUBLISHED = """
DELETE FROM outbox
WHERE id IN (
    SELECT id FROM (SELECT id, published_at FROM outbox ORDER BY id LIMIT $2) AS oldest
    WHERE published_at < now() - make_interval(secs => $1)
)
"""
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


def build_message(row: asyncpg.Record) -> Outgoing:
    """The AMQP message for an outbox row: the contract's properties and headers.

    The properties are built as aio-pika's Message builds them (the same bytes on the wire,
    priority 0 included), without the Message: it costs about ten times as much per event.
    """
    headers: dict[str, str | int] = {
        "account_id": row["account_id"],
        "conversation_id": row["conversation_id"],
        "partition": row["partition"],
    }
    if row["traceparent"]:
        headers["traceparent"] = row["traceparent"]
    return Outgoing(
        row["event_type"],
        row["payload"].encode(),
        aiormq.spec.Basic.Properties(
            content_type="application/json",
            headers=headers,  # type: ignore[arg-type]
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
            priority=0,
            message_id=row["event_id"],
            timestamp=row["created_at"],
            message_type=row["event_type"],
            app_id=APP_ID,
        ),
    )


# The ids of a batch's confirmed prefix, and its first failure (None: all confirmed).
PublishOutcome = tuple[list[int], BaseException | None]


def _record(metrics: Metrics, rows: list[asyncpg.Record], confirmed: int, seconds: float) -> None:
    """Count a batch: the first `confirmed` rows were confirmed, the rest failed."""
    metrics.publish_confirm_seconds.observe(seconds)
    counts = Counter(
        (row["event_type"], "confirmed" if index < confirmed else "failed")
        for index, row in enumerate(rows)
    )
    for (event_type, outcome), count in counts.items():
        metrics.events_published.labels(event_type, outcome).inc(count)


class Relay:
    """Drains its share of the outbox's partitions to the broker; stands by with none."""

    def __init__(
        self,
        database_url: str,
        broker: Broker,
        settings: EventSettings,
        metrics: Metrics | None = None,
        *,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self._database_url = database_url
        self._broker = broker
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff
        self._stopping = asyncio.Event()
        # Where this relay starts looking for free partitions: relays starting together spread.
        self._offset = random.randrange(1024)  # noqa: S311  # spreading, not cryptography
        self.partitions: tuple[int, ...] = ()
        self._partition_count = 0  # P, as of the last rebalance
        self._rebalance_at = 0.0  # when the shares are next looked at (time.monotonic())
        self.published = 0

    @property
    def is_active(self) -> bool:
        """Whether this relay holds at least one partition."""
        return bool(self.partitions)

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run` (unconfirmed rows stay pending)."""
        self._stopping.set()

    async def run(self) -> None:
        """Relay until `stop()`: connect, join the relays, drain its partitions, repeat."""
        await first_set(self._broker.first_connected, self._stopping)  # nothing to do before it
        backoff = self._backoff()
        while not self._stopping.is_set():
            try:
                conn = await asyncpg.connect(self._database_url, server_settings=SESSION_SETTINGS)
            except SESSION_LOST as error:
                await self._pause(backoff.next_delay(), "PostgreSQL unreachable", error)
                continue
            try:
                await self._serve(conn, backoff)
            except SESSION_LOST as error:
                await self._pause(backoff.next_delay(), "PostgreSQL connection lost", error)
            except Exception as error:  # a bug must not end publishing for this process's life
                log.error("relay failed (%s); starting over", type(error).__name__)
                await self._pause(backoff.next_delay(), "relay failed", error)
            finally:
                if self.partitions:
                    log.info("relay released its partitions %s", list(self.partitions))
                self.partitions = ()
                conn.terminate()  # ends the session, so its locks are free for the others at once

    async def _serve(self, conn: asyncpg.Connection, backoff: Backoff) -> None:
        wake = asyncio.Event()
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
        broker_backoff = self._backoff()
        joined = False
        last_cleanup = 0.0
        while not self._stopping.is_set():
            generation = self._broker.generation
            if not self._broker.connected:
                if joined:  # its partitions go to relays that can publish them
                    await self._leave(conn)
                    joined = False
                await self._pause_for_broker(broker_backoff, generation, "RabbitMQ not connected")
                continue
            if not joined:
                if not await conn.fetchval(JOIN, RELAY_LOCK_KEY):  # a single-leader relay runs
                    await sleep_unless(self._stopping, STANDBY_RETRY_SECONDS)
                    continue
                log.info("relay joined the relays")
                joined, self._rebalance_at = True, 0.0
            if time.monotonic() >= self._rebalance_at:
                await self.rebalance(conn)
            try:
                more = await self._drain(conn, wake)
            except BROKER_UNAVAILABLE as error:
                await self._pause_for_broker(broker_backoff, generation, "publishing failed", error)
                continue
            backoff.reset()  # only a drain that worked proves the database side is healthy
            broker_backoff.reset()
            # One relay cleans up (partition 0's), so that no two delete the same rows.
            if 0 in self.partitions and time.monotonic() - last_cleanup >= CLEANUP_INTERVAL_SECONDS:
                await self.remove_published(conn)
                last_cleanup = time.monotonic()
            if not more:
                until_rebalance = max(0.0, self._rebalance_at - time.monotonic())
                await self._wait(
                    wake, min(self._settings.relay_poll_interval_seconds, until_rebalance)
                )

    async def _leave(self, conn: asyncpg.Connection) -> None:
        """Stop being counted and release every partition (nothing is in flight here)."""
        for partition in self.partitions:
            await conn.fetchval(RELEASE_PARTITION, PARTITION_LOCK_CLASS, partition)
        await conn.fetchval(LEAVE, RELAY_LOCK_KEY)
        if self.partitions:
            log.info("relay released its partitions %s", list(self.partitions))
        self.partitions = ()

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
        keep = [p for p in self.partitions if p < count][:share]  # P may have been lowered
        if in_flight and len(keep) < len(self.partitions):
            return False
        for partition in self.partitions:
            if partition not in keep:
                await conn.fetchval(RELEASE_PARTITION, PARTITION_LOCK_CLASS, partition)
        for partition in sorted(free, key=lambda p: (p - self._offset) % count):
            if len(keep) >= share:
                break
            if await conn.fetchval(TRY_PARTITION, PARTITION_LOCK_CLASS, partition):
                keep.append(partition)  # free a moment ago; another relay may have won it
        if sorted(keep) != list(self.partitions):
            log.info(
                "relay holds partitions %s (%d relays, %d partitions)", sorted(keep), relays, count
            )
        self.partitions = tuple(sorted(keep))
        self._partition_count = count
        self._rebalance_at = time.monotonic() + REBALANCE_INTERVAL_SECONDS
        return True

    async def _drain(self, conn: asyncpg.Connection, wake: asyncio.Event) -> bool:
        """Publish this relay's partitions' pending rows until none is left, or its share must
        shrink; True if rows may remain.

        Batches are pipelined on one channel, so the broker receives them in outbox order: a
        batch goes out as soon as it is read, while earlier ones wait for their confirms, up to
        IN_FLIGHT_BATCHES batches' rows unconfirmed. (The broker confirms a persistent message
        once its disk has it, at times 50 to 300 ms later on a busy host: that holds up the
        marking, not the events committed meanwhile.) The database work runs on `conn` while
        the broker confirms: the confirmed batches are marked in order, the shares are looked
        at when due, and the next batch is read (the oldest pending rows but those in flight).
        A failure marks its batch's confirmed prefix and leaves every later row pending,
        published again (a duplicate, never a loss, and nothing of a conversation overtaken
        for good); it is raised once the later batches have settled.

        A read that a commit's NOTIFY started first lingers (RELAY_LINGER_SECONDS, as a
        producer's), so that the commits right behind it go in the same read, publish and
        mark; one after a full read does not (a backlog). At a steady 500 commits/s the relay
        and its database session used 62% of a core with no linger (1.2 ms of CPU an event,
        against 0.15 ms draining a backlog), 44% with 2 ms, 38% with 3 ms (the default) and
        33% with 5 ms. Every event waits up to this much longer.
        """
        if not self.partitions:
            wake.clear()  # nothing of its own to read: a NOTIFY must not end the next wait
            return False
        batch_size = self._settings.relay_batch_size
        flight: deque[tuple[list[int], asyncio.Future[PublishOutcome]]] = deque()
        more = True  # rows may be pending that are neither in flight nor marked
        full = False  # the last read filled its limit: the next one is due at once
        releasing = False  # the share must shrink: no more reads until nothing is in flight
        try:
            while True:
                room = IN_FLIGHT_BATCHES * batch_size - sum(len(ids) for ids, _ in flight)
                can_read = room > 0 and not releasing and not self._stopping.is_set()
                if can_read and more and time.monotonic() >= self._rebalance_at:
                    releasing = not await self.rebalance(conn, in_flight=bool(flight))
                    can_read = not releasing
                if can_read and more:
                    if wake.is_set() and not full:  # a commit's NOTIFY: wait for those behind it
                        await asyncio.sleep(self._settings.relay_linger_seconds)
                    wake.clear()  # a commit after this read sets it again
                    limit = min(room, batch_size)
                    rows = await self._read(conn, [i for ids, _ in flight for i in ids], limit)
                    more = full = len(rows) == limit
                    if rows:
                        publishing = asyncio.ensure_future(self.publish_batch(rows))
                        flight.append(([row["id"] for row in rows], publishing))
                        continue
                if not flight:
                    return more or releasing
                publishing = flight[0][1]
                if can_read:  # every pending row is out: a commit may come before the confirm
                    committed = asyncio.ensure_future(wake.wait())
                    await asyncio.wait((publishing, committed), return_when=FIRST_COMPLETED)
                    committed.cancel()
                    more = wake.is_set()
                else:
                    await asyncio.wait((publishing,))
                if publishing.done():
                    flight.popleft()
                    confirmed, failure = publishing.result()
                    if confirmed:
                        await self.mark_published(conn, confirmed)
                    if failure is not None:
                        raise failure
        finally:  # after a failure or a cancellation: let the later batches settle, mark none
            await asyncio.gather(*(publishing for _, publishing in flight), return_exceptions=True)

    async def _read(
        self, conn: asyncpg.Connection, in_flight: list[int], limit: int
    ) -> list[asyncpg.Record]:
        """The next `limit` rows: the oldest pending rows of this relay's partitions, but those
        in flight."""
        if len(self.partitions) == self._partition_count:
            return await conn.fetch(SELECT_PENDING, limit, in_flight)
        select = select_pending_of(len(self.partitions))
        return await conn.fetch(select, limit, in_flight, *self.partitions)

    async def publish_batch(self, rows: list[asyncpg.Record]) -> PublishOutcome:
        """Publish `rows` in order; return the ids of the confirmed prefix and the first failure.

        The publishes are pipelined on one channel, so the broker receives them in row order.
        Only the confirmed prefix counts: if an event fails, it and every later one stay pending
        and are published again, so per conversation nothing is ever overtaken for good.
        """
        started = time.perf_counter()
        messages = [build_message(row) for row in rows]
        spans = start_publish_spans(self._settings.exchange, messages)  # None: tracing off
        confirmed, failure = await self._broker.publish_batch(
            messages, PUBLISH_CONFIRM_TIMEOUT_SECONDS
        )
        end_publish_spans(spans, confirmed, failure)
        if self._metrics is not None:
            _record(self._metrics, rows, confirmed, time.perf_counter() - started)
        return [row["id"] for row in rows[:confirmed]], failure

    async def mark_published(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        """Stamp rows as published: the broker has confirmed them."""
        await conn.execute(MARK_PUBLISHED, ids)
        self.published += len(ids)

    async def remove_published(self, conn: asyncpg.Connection) -> int:
        """Delete rows published longer ago than the retention, oldest first, in bounded
        batches, until the oldest batch has none: a row still pending (or not yet expired)
        among the oldest does not keep the expired ones behind it."""
        retention = self._settings.outbox_retention_hours * 3600
        removed = 0
        while not self._stopping.is_set():
            status = await conn.execute(DELETE_PUBLISHED, retention, CLEANUP_BATCH)
            count = int(status.split()[-1])
            removed += count
            if count == 0:
                break
        if removed:
            log.info("removed %d published outbox rows past retention", removed)
        return removed

    async def _wait(self, wake: asyncio.Event, seconds: float) -> None:
        """Until a NOTIFY, the poll interval, or stop."""
        await first_set(wake, self._stopping, within=seconds)

    async def _pause_for_broker(
        self,
        backoff: Backoff,
        generation: int,
        what: str,
        error: BaseException | None = None,
    ) -> None:
        """Back off after a broker failure, but resume as soon as the connection is back: the
        backoff only spaces out failures on one connection (issue: a relay slept 26 s after
        RabbitMQ returned)."""
        delay = backoff.next_delay()
        reason = f" ({type(error).__name__})" if error is not None else ""
        log.warning("%s%s; retrying in %.1fs or once reconnected", what, reason, delay)
        await self._broker.reconnected_since(generation, self._stopping, delay)

    async def _pause(self, seconds: float, what: str, error: BaseException | None) -> None:
        reason = f" ({type(error).__name__})" if error is not None else ""
        log.warning("%s%s; retrying in %.1fs", what, reason, seconds)
        await sleep_unless(self._stopping, seconds)
