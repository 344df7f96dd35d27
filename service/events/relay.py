"""The outbox relay: publishes committed events to RabbitMQ, in order, losing nothing.

Any number of relays share the outbox's P partitions (a partition is a hash of the
conversation id, so one conversation's events share one): each publishes only its share
(service.events.partitions), on its own database session. A relay that dies ends its session,
which frees its partitions for the others; one that loses RabbitMQ leaves until it is back. A
relay is woken by NOTIFY after each commit, polls as a fallback, publishes batches pipelined
with publisher confirms (service.events.inflight), and marks rows published only once the
broker has confirmed them: a crash in between publishes them again (same message_id), never
loses them.
"""

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable

import aio_pika
import aiormq
import asyncpg

from service.backoff import Backoff, first_set, sleep_unless
from service.errors import DATABASE_SESSION_FAILURES, DatabaseUnreachable
from service.events.broker import BROKER_UNAVAILABLE, Broker, Outgoing
from service.events.inflight import InFlight, PublishOutcome
from service.events.partitions import PartitionShare
from service.events.retry import Retry
from service.events.tracing import end_publish_spans, start_publish_spans
from service.metrics import Metrics
from service.settings import EventSettings

log = logging.getLogger(__name__)

# What says the server is not there right now (refused, starting up, stopped, the connection
# dropped or closed under the session): tried again within the second, as a refused connection
# costs the server nothing. A statement timeout, too many connections, or asyncpg's DataError and
# ClientConfigurationError (InterfaceErrors, like a closed connection's, but bugs) back off in full.
NOT_THERE = (
    OSError,
    TimeoutError,
    DatabaseUnreachable,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InternalClientError,
)
NOT_THERE_BUT_BUGS = (asyncpg.DataError, asyncpg.ClientConfigurationError)

APP_ID = "conversations"
NOTIFY_CHANNEL = "outbox"
STANDBY_RETRY_SECONDS = 2.0
# While PostgreSQL is unavailable (refusing connections, starting up, dropping the session) the
# relay tries again this often whatever its backoff says, so that it is back within a second of
# the database (a refused connection costs the server nothing); other failures back off in full.
RECONNECT_INTERVAL_SECONDS = 0.5
# A connection attempt to a host that went silent fails after this, not asyncpg's 60 s.
CONNECT_TIMEOUT_SECONDS = 5.0
PUBLISH_CONFIRM_TIMEOUT_SECONDS = 10.0
# How many batches' rows a relay may have published and unconfirmed: one is read and published
# while the broker confirms the other, and a slow confirm does not hold up the events behind it.
# A relay that dies re-publishes at most these (duplicates, never a loss).
IN_FLIGHT_BATCHES = 2
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


def _record(metrics: Metrics, rows: list[asyncpg.Record], confirmed: int, seconds: float) -> None:
    """Count a batch: the first `confirmed` rows were confirmed, the rest failed."""
    metrics.publish_confirm_seconds.observe(seconds)
    counts = Counter(
        (row["event_type"], "confirmed" if index < confirmed else "failed")
        for index, row in enumerate(rows)
    )
    for (event_type, outcome), count in counts.items():
        metrics.events_published.labels(event_type, outcome).inc(count)


def _not_there(error: BaseException) -> bool:
    return isinstance(error, NOT_THERE) and not isinstance(error, NOT_THERE_BUT_BUGS)


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
        self._stopping = asyncio.Event()
        self._database = Retry(log, self._stopping, backoff=backoff)
        self._publishing = Retry(log, self._stopping, backoff=backoff)
        self.share = PartitionShare()
        self.published = 0

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions this relay holds now."""
        return self.share.held

    @property
    def is_active(self) -> bool:
        """Whether this relay holds at least one partition."""
        return bool(self.share.held)

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run` (unconfirmed rows stay pending)."""
        self._stopping.set()

    async def run(self) -> None:
        """Relay until `stop()`: connect, join the relays, drain its partitions, repeat."""
        await first_set(self._broker.first_connected, self._stopping)  # nothing to do before it
        while not self._stopping.is_set():
            try:
                conn = await asyncpg.connect(
                    self._database_url,
                    server_settings=SESSION_SETTINGS,
                    timeout=CONNECT_TIMEOUT_SECONDS,
                )
            except DATABASE_SESSION_FAILURES as error:  # it reconnects
                await self._database_failed("PostgreSQL unreachable", error)
                continue
            try:
                await self._serve(conn)
            except DATABASE_SESSION_FAILURES as error:  # it reconnects
                await self._database_failed("PostgreSQL connection lost", error)
            except Exception as error:  # a bug must not end publishing for this process's life
                log.error("relay failed (%s); starting over", type(error).__name__)
                await self._database.wait("relay failed", error)
            finally:
                self.share.lost()
                conn.terminate()  # ends the session, so its locks are free for the others at once

    async def _database_failed(self, what: str, error: BaseException) -> None:
        """Back off; while the database is unavailable, try again within the second."""
        await self._database.wait(
            what,
            error,
            at_most=RECONNECT_INTERVAL_SECONDS if _not_there(error) else None,
        )

    async def _serve(self, conn: asyncpg.Connection) -> None:
        wake = asyncio.Event()
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
        share = self.share
        while not self._stopping.is_set():
            generation = self._broker.generation
            if not self._broker.connected:
                if share.joined:  # its partitions go to relays that can publish them
                    log.info("relay left the relays until RabbitMQ is back")
                    await share.leave(conn)
                await self._broker_back(generation, None)  # the broker logs its outage
                continue
            if not share.joined and not await share.join(conn):  # a single-leader relay runs
                await sleep_unless(self._stopping, STANDBY_RETRY_SECONDS)
                continue
            if share.due:
                await share.rebalance(conn)
            try:
                more = await self._drain(conn, wake)
            except BROKER_UNAVAILABLE as error:
                await self._broker_back(generation, error)
                continue
            self._database.succeeded()  # only a drain that worked proves the session healthy
            self._publishing.succeeded()
            if not more:
                poll = self._settings.relay_poll_interval_seconds
                await first_set(wake, self._stopping, within=min(poll, share.seconds_until_due()))

    async def _broker_back(self, generation: int, error: BaseException | None) -> None:
        """Back off after a broker failure, but resume as soon as the connection is back: the
        backoff only spaces out failures on one connection (issue: a relay slept 26 s after
        RabbitMQ returned)."""

        async def reconnected(seconds: float) -> None:
            await self._broker.reconnected_since(generation, self._stopping, seconds)

        what = None if error is None else "publishing failed"
        await self._publishing.wait(what, error, until=reconnected)

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
        if not self.share.held:
            wake.clear()  # nothing of its own to read: a NOTIFY must not end the next wait
            return False
        batch_size = self._settings.relay_batch_size
        flight = InFlight(IN_FLIGHT_BATCHES * batch_size)
        more = True  # rows may be pending that are neither in flight nor marked
        full = False  # the last read filled its limit: the next one is due at once
        releasing = False  # the share must shrink: no more reads until nothing is in flight
        try:
            while True:
                can_read = flight.room > 0 and not releasing and not self._stopping.is_set()
                if can_read and more and self.share.due:
                    releasing = not await self.share.rebalance(conn, in_flight=bool(flight))
                    can_read = not releasing
                if can_read and more:
                    if wake.is_set() and not full:  # a commit's NOTIFY: wait for those behind it
                        await asyncio.sleep(self._settings.relay_linger_seconds)
                    wake.clear()  # a commit after this read sets it again
                    limit = min(flight.room, batch_size)
                    rows = await self._read(conn, flight.ids, limit)
                    more = full = len(rows) == limit
                    if rows:
                        publishing = asyncio.ensure_future(self.publish_batch(rows))
                        flight.add([row["id"] for row in rows], publishing)
                        continue
                if not flight:
                    return more or releasing
                if can_read:  # every pending row is out: a commit may come before the confirm
                    await flight.wait(wake)
                    more = wake.is_set()
                else:
                    await flight.wait()
                if (settled := flight.settled()) is not None:
                    confirmed, failure = settled
                    if confirmed:
                        await self.mark_published(conn, confirmed)
                    if failure is not None:
                        raise failure
        finally:  # after a failure or a cancellation: let the later batches settle, mark none
            await flight.drop()

    async def _read(
        self, conn: asyncpg.Connection, in_flight: list[int], limit: int
    ) -> list[asyncpg.Record]:
        """The next `limit` rows: the oldest pending rows of this relay's partitions, but those
        in flight."""
        if self.share.holds_all:
            return await conn.fetch(SELECT_PENDING, limit, in_flight)
        select = select_pending_of(len(self.share.held))
        return await conn.fetch(select, limit, in_flight, *self.share.held)

    async def publish_batch(self, rows: list[asyncpg.Record]) -> PublishOutcome:
        """Publish `rows` in order; return the ids of the confirmed prefix and the first failure.

        The publishes are pipelined on one channel, so the broker receives them in row order.
        Only the confirmed prefix counts: if an event fails, it and every later one stay pending
        and are published again, so per conversation nothing is ever overtaken for good.
        """
        started = time.perf_counter()
        messages = [build_message(row) for row in rows]
        spans = start_publish_spans(self._settings.exchange, messages)  # None: tracing off
        try:
            confirmed, failure = await self._broker.publish_batch(
                messages, PUBLISH_CONFIRM_TIMEOUT_SECONDS
            )
        except BaseException as error:  # cancelled at shutdown: the spans end all the same
            end_publish_spans(spans, 0, error)
            raise
        end_publish_spans(spans, confirmed, failure)
        if self._metrics is not None:
            _record(self._metrics, rows, confirmed, time.perf_counter() - started)
        return [row["id"] for row in rows[:confirmed]], failure

    async def mark_published(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        """Stamp rows as published: the broker has confirmed them."""
        await conn.execute(MARK_PUBLISHED, ids)
        self.published += len(ids)
