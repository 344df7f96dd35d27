"""The outbox relay: publishes committed events to RabbitMQ, in order, losing nothing.

One relay is active across all replicas: it holds a PostgreSQL advisory lock on its own
connection, and the others stand by until the lock is free (its holder's session ended). The
active relay is woken by NOTIFY after each commit, polls as a fallback, publishes a batch with
publisher confirms, and marks rows published only once the broker has confirmed them: a crash
in between publishes them again (same message_id), never loses them.
"""

import asyncio
import logging
import time

import aio_pika
import asyncpg

from service.backoff import Backoff, sleep_unless
from service.errors import DATABASE_UNAVAILABLE
from service.events.broker import BROKER_UNAVAILABLE, Broker
from service.metrics import Metrics
from service.settings import EventSettings

log = logging.getLogger(__name__)

APP_ID = "conversations"
# Session-level advisory lock that makes a relay the active one ("convrela").
RELAY_LOCK_KEY = 0x636F6E76_72656C61
NOTIFY_CHANNEL = "outbox"
STANDBY_RETRY_SECONDS = 2.0
PUBLISH_CONFIRM_TIMEOUT_SECONDS = 10.0
CLEANUP_INTERVAL_SECONDS = 60.0
CLEANUP_BATCH = 1000

# Always from the oldest pending row, skipping only the batch in flight: a row that commits late
# with a lower id is still published before any later event of its conversation.
SELECT_PENDING = """
SELECT id, event_id, event_type, account_id, conversation_id, payload, traceparent, created_at
FROM outbox
WHERE published_at IS NULL AND NOT (id = ANY($2::bigint[]))
ORDER BY id
LIMIT $1
"""
MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"
DELETE_PUBLISHED = """
DELETE FROM outbox
WHERE id IN (
    SELECT id FROM outbox
    WHERE published_at < now() - make_interval(secs => $1)
    ORDER BY id
    LIMIT $2
)
"""
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"


def build_message(row: asyncpg.Record) -> aio_pika.Message:
    """The AMQP message for an outbox row: the contract's properties and headers."""
    headers: dict[str, str] = {
        "account_id": row["account_id"],
        "conversation_id": row["conversation_id"],
    }
    if row["traceparent"]:
        headers["traceparent"] = row["traceparent"]
    return aio_pika.Message(
        body=row["payload"].encode(),
        message_id=row["event_id"],
        type=row["event_type"],
        timestamp=row["created_at"],
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id=APP_ID,
        headers=headers,  # type: ignore[arg-type]
    )


async def _first(*events: asyncio.Event, within: float | None = None) -> None:
    """Until any of `events` is set (or `within` seconds pass)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _record(metrics: Metrics, rows: list[asyncpg.Record], confirmed: int, seconds: float) -> None:
    """Count a batch: the first `confirmed` rows were confirmed, the rest failed."""
    metrics.publish_confirm_seconds.observe(seconds)
    for index, row in enumerate(rows):
        outcome = "confirmed" if index < confirmed else "failed"
        metrics.events_published.labels(row["event_type"], outcome).inc()


class Relay:
    """Drains the outbox to the broker while it holds the relay lock; stands by otherwise."""

    def __init__(
        self,
        database_url: str,
        broker: Broker,
        settings: EventSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self._database_url = database_url
        self._broker = broker
        self._settings = settings
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self.is_leader = False
        self.published = 0

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run` (unconfirmed rows stay pending)."""
        self._stopping.set()

    async def run(self) -> None:
        """Relay until `stop()`: connect, become the active relay or stand by, drain, repeat."""
        await _first(self._broker.first_connected, self._stopping)  # nothing to do before it
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                conn = await asyncpg.connect(self._database_url)
            except (*DATABASE_UNAVAILABLE, asyncpg.PostgresError) as error:
                await self._pause(backoff.next_delay(), "PostgreSQL unreachable", error)
                continue
            try:
                await self._lead(conn, backoff)
            except (*DATABASE_UNAVAILABLE, asyncpg.PostgresError) as error:
                await self._pause(backoff.next_delay(), "PostgreSQL connection lost", error)
            finally:
                if self.is_leader:
                    log.info("relay is no longer the active one")
                self.is_leader = False
                conn.terminate()  # ends the session, so the lock is free for a standby at once

    async def _lead(self, conn: asyncpg.Connection, backoff: Backoff) -> None:
        while not await conn.fetchval(TRY_LOCK, RELAY_LOCK_KEY):
            if await sleep_unless(self._stopping, STANDBY_RETRY_SECONDS):
                return
        self.is_leader = True
        log.info("relay is the active one")
        wake = asyncio.Event()
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
        broker_backoff = Backoff()
        last_cleanup = 0.0
        while not self._stopping.is_set():
            wake.clear()
            if not self._broker.connected:
                await self._pause(broker_backoff.next_delay(), "RabbitMQ not connected", None)
                continue
            try:
                await self._drain(conn)
            except BROKER_UNAVAILABLE as error:
                await self._pause(broker_backoff.next_delay(), "publishing failed", error)
                continue
            backoff.reset()  # only a drain that worked proves the database side is healthy
            broker_backoff.reset()
            if time.monotonic() - last_cleanup >= CLEANUP_INTERVAL_SECONDS:
                await self.remove_published(conn)
                last_cleanup = time.monotonic()
            await self._wait(wake, self._settings.relay_poll_interval_seconds)

    async def _drain(self, conn: asyncpg.Connection) -> None:
        """Publish batches until the outbox is empty (or we are stopping).

        While the broker confirms a batch, the database work around it runs on `conn`: the
        previous batch is marked and the next one read (all pending rows but the batch in
        flight). A batch goes out only once the one before it is confirmed, so the broker
        receives events in outbox order.
        """
        batch_size = self._settings.relay_batch_size
        rows = await conn.fetch(SELECT_PENDING, batch_size, [])
        unmarked: list[int] = []
        while rows:
            publishing = asyncio.ensure_future(self.publish_batch(rows))
            try:
                if unmarked:
                    await self.mark_published(conn, unmarked)
                    unmarked = []
                more = len(rows) == batch_size and not self._stopping.is_set()
                in_flight = [row["id"] for row in rows]
                next_rows = await conn.fetch(SELECT_PENDING, batch_size, in_flight) if more else []
            except BaseException:
                await asyncio.gather(publishing, return_exceptions=True)  # let it settle
                raise
            unmarked, failure = await publishing
            if failure is not None:
                if unmarked:
                    await self.mark_published(conn, unmarked)
                raise failure
            rows = next_rows
        if unmarked:
            await self.mark_published(conn, unmarked)

    async def publish_batch(
        self, rows: list[asyncpg.Record]
    ) -> tuple[list[int], BaseException | None]:
        """Publish `rows` in order; return the ids of the confirmed prefix and the first failure.

        The publishes are pipelined on one channel, so the broker receives them in row order.
        Only the confirmed prefix counts: if an event fails, it and every later one stay pending
        and are published again, so per conversation nothing is ever overtaken for good.
        """
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                self._broker.publish(
                    build_message(row), row["event_type"], PUBLISH_CONFIRM_TIMEOUT_SECONDS
                )
                for row in rows
            ),
            return_exceptions=True,
        )
        confirmed = []
        failure: BaseException | None = None
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                failure = result
                break
            confirmed.append(row["id"])
        if self._metrics is not None:
            _record(self._metrics, rows, len(confirmed), time.perf_counter() - started)
        return confirmed, failure

    async def mark_published(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        """Stamp rows as published: the broker has confirmed them."""
        await conn.execute(MARK_PUBLISHED, ids)
        self.published += len(ids)

    async def remove_published(self, conn: asyncpg.Connection) -> int:
        """Delete rows published longer ago than the retention, in bounded batches."""
        retention = self._settings.outbox_retention_hours * 3600
        removed = 0
        while not self._stopping.is_set():
            status = await conn.execute(DELETE_PUBLISHED, retention, CLEANUP_BATCH)
            count = int(status.split()[-1])
            removed += count
            if count < CLEANUP_BATCH:
                break
        if removed:
            log.info("removed %d published outbox rows past retention", removed)
        return removed

    async def _wait(self, wake: asyncio.Event, seconds: float) -> None:
        """Until a NOTIFY, the poll interval, or stop."""
        await _first(wake, self._stopping, within=seconds)

    async def _pause(self, seconds: float, what: str, error: BaseException | None) -> None:
        reason = f" ({type(error).__name__})" if error is not None else ""
        log.warning("%s%s; retrying in %.1fs", what, reason, seconds)
        await sleep_unless(self._stopping, seconds)
