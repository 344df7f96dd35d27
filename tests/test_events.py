"""Events end to end: HTTP writes -> outbox -> relay -> a real RabbitMQ -> a subscriber."""

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import io
import logging
import os
import signal
import sys
import time
import uuid
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
import pytest

from schemas import ReadinessSchema
from schemas.event import EventSchema
from service.api.app import create_app
from service.backoff import Backoff
from service.conversations import housekeeping
from service.conversations.housekeeping import DELETE_PUBLISHED_OUTBOX, published_outbox_rows
from service.events import amqp_logs
from service.events import relay as relay_module
from service.events.broker import Broker, Outgoing
from service.events.relay import (
    SELECT_PENDING,
    SESSION_SETTINGS,
    Relay,
    build_message,
    select_pending_of,
)
from service.events.tail import tail
from service.logs import Throttle
from tests.events_support import (
    RecordingBroker,
    amqp_url,
    pending_is,
    relay_last_ran,
    running_relay,
    wait_until,
)
from tests.plans import plan_nodes
from tests.proxy import TcpProxy, free_port, via_port

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def client(event_settings, aiohttp_client):
    return await aiohttp_client(create_app(event_settings))


async def create(client, headers, **body) -> dict:
    resp = await client.post("/v1/conversations", json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def body(message) -> dict:
    return EventSchema().loads(message.body)


# --- what each write publishes ----------------------------------------------------------------


async def test_each_committed_write_publishes_one_message(client, headers, account, subscriber, db):
    trace = {**headers, "traceparent": TRACEPARENT}
    created = await create(client, trace, contact_id="c1")
    url = f"/v1/conversations/{created['id']}"
    assert (await client.patch(url, json={"is_muted": True}, headers=headers)).status == 200
    assert (
        await client.patch(url, json={"archived_at": 1700000000}, headers=headers)
    ).status == 200
    assert (
        await client.patch(url, json={"is_muted": True}, headers=headers)
    ).status == 200  # no-op
    assert (await client.patch(url, json={"is_muted": "yes"}, headers=headers)).status == 422
    assert (await client.patch(url, json={"archived_at": None}, headers=headers)).status == 200
    assert (await client.delete(url, headers=headers)).status == 200

    messages = await subscriber.receive(5)
    await subscriber.nothing_more()
    assert [m.routing_key for m in messages] == [
        "conversation.created",
        "conversation.updated",
        "conversation.archived",
        "conversation.updated",
        "conversation.deleted",
    ]
    outbox = {
        r["event_id"]: r["payload"] for r in await db.fetch("SELECT event_id, payload FROM outbox")
    }
    for number, message in enumerate(messages, start=1):
        event = body(message)
        assert message.message_id == event["id"]
        assert message.type == event["type"] == message.routing_key
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.app_id == "conversations"
        assert abs(message.timestamp.timestamp() - event["created_at"]) < 2
        assert message.headers["account_id"] == account == event["account_id"]
        assert message.headers["conversation_id"] == created["id"]
        assert event["sequence"] == number
        assert orjson.loads(outbox[event["id"]]) == orjson.loads(message.body)
    assert messages[0].headers["traceparent"] == TRACEPARENT
    assert "traceparent" not in messages[1].headers
    assert body(messages[2])["data"]["previous_attributes"] == {"archived_at": None}
    assert body(messages[4])["data"]["object"]["archived_at"] is None
    # Everything the relay published is marked published.
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def test_per_conversation_order_under_concurrent_writes(client, headers, subscriber):
    conversations = [await create(client, headers, contact_id=f"c{n}") for n in range(4)]

    async def touch(conversation: dict, times: int) -> None:
        for n in range(times):
            url = f"/v1/conversations/{conversation['id']}"
            resp = await client.put(url, json={"last_active_at": n + 1}, headers=headers)
            assert resp.status == 200

    await asyncio.gather(*(touch(c, 15) for c in conversations))
    messages = await subscriber.receive(4 + 4 * 15)
    sequences: dict[str, list[int]] = {}
    for message in messages:
        sequences.setdefault(message.headers["conversation_id"], []).append(
            body(message)["sequence"]
        )
    assert sequences == {c["id"]: list(range(1, 17)) for c in conversations}


async def test_a_rejected_or_rolled_back_write_publishes_nothing(client, headers, subscriber, db):
    created = await create(client, headers, contact_id="c1")
    await subscriber.receive(1)
    url = f"/v1/conversations/{created['id']}"
    assert (await client.put(url, json={"id": "x"}, headers=headers)).status == 422
    assert (
        await client.put(url, json={"is_muted": True}, headers={**headers, "If-Match": '"9"'})
    ).status == 412
    assert (
        await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    ).status == 200
    await subscriber.nothing_more(1.0)
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


async def test_notify_wakes_the_relay_long_before_its_poll(
    event_settings, aiohttp_client, headers, subscriber, db
):
    slow_poll = dataclasses.replace(event_settings.events, relay_poll_interval_seconds=30)
    client = await aiohttp_client(create_app(dataclasses.replace(event_settings, events=slow_poll)))
    await create(client, headers, contact_id="warm-up")
    await subscriber.receive(1)
    await wait_until(lambda: pending_is(db, 0))  # marked: the relay is done with it, and waits
    started = time.monotonic()
    await create(client, headers, contact_id="c1")
    await subscriber.receive(1, timeout=10)
    assert time.monotonic() - started < 10  # a 30 s poll would not have found it yet


async def test_unroutable_events_wait_in_the_unrouted_queue(client, headers, exchange):
    # No subscriber is bound: the alternate exchange keeps the event instead of dropping it.
    created = await create(client, headers, contact_id="c1")
    message = await get_one(f"{exchange}.unrouted", timeout=20)
    assert body(message)["data"]["object"]["id"] == created["id"]


async def get_one(queue_name: str, timeout: float) -> aio_pika.abc.AbstractIncomingMessage:
    """The first message of a quorum queue, taken with basic.get and acknowledged."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with await aio_pika.connect(amqp_url()) as connection:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(  # as service.events.broker declares it
                        queue_name, durable=True, arguments={"x-queue-type": "quorum"}
                    )
                    while (message := await queue.get(fail=False)) is None:
                        await asyncio.sleep(0.1)
                    await message.ack()
                    return message
            except aio_pika.exceptions.ConnectionClosed:
                # "noproc": a quorum queue declared a moment ago may not have its process yet
                # on a busy machine; RabbitMQ closes the connection, and a new one can retry.
                await asyncio.sleep(0.2)


async def test_readyz_reports_broker_relay_and_backlog(client):
    checks: dict = {}

    async def connected_and_active() -> bool:
        body = await (await client.get("/readyz")).json()
        assert ReadinessSchema().validate(body) == {}
        checks.update(body["checks"])
        return checks["broker"] == "connected" and checks["relay"] == "active"

    await wait_until(connected_and_active)
    assert checks["outbox"]["pending"] == 0


# --- the broker going away --------------------------------------------------------------------


async def test_writes_succeed_while_the_broker_is_down_and_every_event_arrives_after(
    event_settings, aiohttp_client, headers, subscriber, db
):
    parts = urlsplit(amqp_url())
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    events = dataclasses.replace(event_settings.events, amqp_url=via_port(amqp_url(), proxy.port))
    client = await aiohttp_client(create_app(dataclasses.replace(event_settings, events=events)))
    try:
        first = await create(client, headers, contact_id="before")
        [message] = await subscriber.receive(1)
        ids = [message.message_id]
        # Confirmed and marked: a cut before its confirm reached the relay would republish it.
        await wait_until(lambda: pending_is(db, 0))

        await proxy.cut()
        during = [await create(client, headers, contact_id=f"during{n}") for n in range(10)]
        for conversation in during[:3]:
            resp = await client.put(
                f"/v1/conversations/{conversation['id']}", json={"is_pinned": True}, headers=headers
            )
            assert resp.status == 200
        ready = await (await client.get("/readyz")).json()
        assert ready["checks"]["broker"] == "disconnected"
        assert ready["checks"]["outbox"]["pending"] >= 13
        await subscriber.nothing_more(1.0)

        await proxy.start()
        messages = await subscriber.receive(13, timeout=60)
        await subscriber.nothing_more(1.0)
    finally:
        if proxy.running:
            await proxy.cut()
    ids += [m.message_id for m in messages]
    outbox_ids = [r["event_id"] for r in await db.fetch("SELECT event_id FROM outbox ORDER BY id")]
    assert sorted(ids) == sorted(outbox_ids)
    assert len(set(ids)) == 14  # each event once
    assert first["id"] not in {m.headers["conversation_id"] for m in messages}
    per_conversation: dict[str, list[int]] = {}
    for m in messages:
        per_conversation.setdefault(m.headers["conversation_id"], []).append(body(m)["sequence"])
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_conversation.values())
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


class _LongBackoff(Backoff):
    """Every retry waits two minutes: longer than the test may take."""

    def next_delay(self) -> float:
        return LONG_BACKOFF_SECONDS


LONG_BACKOFF_SECONDS = 120.0


async def test_the_relay_resumes_once_the_broker_is_back_not_after_its_backoff(
    event_settings, aiohttp_client, headers, subscriber, db, caplog
):
    # The relay once slept out its backoff ("retrying in 26.5s") after RabbitMQ was back.
    caplog.set_level(logging.INFO, logger="service.events.relay")
    parts = urlsplit(amqp_url())
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    quiet = dataclasses.replace(event_settings.events, relay_enabled=False)
    client = await aiohttp_client(create_app(dataclasses.replace(event_settings, events=quiet)))
    via_proxy = via_port(amqp_url(), proxy.port)
    broker = Broker(via_proxy, event_settings.events.exchange)
    try:
        async with running_relay(event_settings, broker, backoff=_LongBackoff):
            await create(client, headers, contact_id="before")
            await subscriber.receive(1)
            await wait_until(lambda: pending_is(db, 0))  # confirmed: it is not published again

            await proxy.cut()
            await create(client, headers, contact_id="during")  # wakes the relay: it fails
            # It waits its backoff: after a failed publish, or after leaving the relays.
            await wait_until(
                lambda: _true(
                    f"retrying in {LONG_BACKOFF_SECONDS:.1f}s" in caplog.text
                    or "relay left the relays until RabbitMQ is back" in caplog.text
                )
            )
            await proxy.start()
            # Well before the backoff would end: resumed by the reconnect, not by the clock.
            [message] = await subscriber.receive(1, timeout=LONG_BACKOFF_SECONDS / 4)
            await wait_until(lambda: pending_is(db, 0))
    finally:
        if proxy.running:
            await proxy.cut()
    assert body(message)["data"]["object"]["contact_id"] == "during"
    assert broker.generation >= 1  # it was the robust connection's reconnect


async def _true(value: bool) -> bool:
    return value


LIBRARY_LOGGERS = ("aiormq", "aio_pika", "asyncio")


async def test_a_broker_outage_logs_one_warning_per_interval_and_no_library_errors(
    event_settings, subscriber, db, caplog, monkeypatch
):
    # A RabbitMQ kill once logged 30 ERROR lines from aiormq and aio-pika: "Connection refused"
    # every second, "Task exception was never retrieved" for a failed batch's publishes, and an
    # error in a channel's close callback.
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(amqp_logs.FILTER, "throttle", Throttle(2.5))  # a short interval
    await db.execute(
        """
        INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload)
        SELECT 'evt_' || lpad(n::text, 16, '0'), 'conversation.updated', 'a', 'c' || n, 1, '{}'
        FROM generate_series(1, 5000) AS n
        """
    )
    parts = urlsplit(amqp_url())
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    broker = Broker(via_port(amqp_url(), proxy.port), event_settings.events.exchange)
    try:
        async with running_relay(event_settings, broker) as (relay, _):
            await wait_until(lambda: _true(relay.published > 0))
            await proxy.cut()  # mid-drain: batches in flight fail
            # Reconnects fail every second: their line comes again once the interval is over.
            await wait_until(lambda: _true(len(_lines(caplog, "RabbitMQ unreachable")) >= 2))
            await proxy.start()
            await wait_until(lambda: pending_is(db, 0), timeout=60)
    finally:
        if proxy.running:
            await proxy.cut()
    gc.collect()  # a task whose exception nobody took logs it when it is collected
    for record in caplog.records:
        message = record.getMessage()
        assert "never retrieved" not in message, message
        if record.name.split(".")[0] in LIBRARY_LOGGERS:
            assert record.levelno < logging.ERROR, (record.name, message)
    first, second, *_ = _lines(caplog, "RabbitMQ unreachable")
    assert (first.levelno, second.levelno) == (logging.WARNING, logging.WARNING)
    assert "more like it since the last line" not in first.getMessage()
    assert second.held_back >= 1, second.getMessage()  # the attempts in between, counted
    assert f"(and {second.held_back} more like it" in second.getMessage()
    assert len(_lines(caplog, "RabbitMQ connection lost")) <= 1  # one connection, lost once


def _lines(caplog, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(start)]


def test_a_broker_that_closes_the_connection_is_a_warning_not_an_error():
    # A RabbitMQ that shuts down cleanly closes its connections (320 CONNECTION_FORCED), which
    # aiormq logs as an ERROR; it is the outage's first line, a WARNING, and the next ones
    # within the interval are held back.
    logs = amqp_logs.ConnectionLogs(interval=60)
    reason = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"

    def closed() -> logging.LogRecord:
        return logging.LogRecord(
            "aiormq.connection", logging.ERROR, __file__, 1, amqp_logs.CLOSED_BY_BROKER[1],
            ("<Connection>", 320, reason), None,
        )  # fmt: skip

    first = closed()
    assert logs.filter(first)
    assert (first.levelno, first.levelname) == (logging.WARNING, "WARNING")
    assert first.getMessage() == f"RabbitMQ closed the connection (320 {reason})"
    assert not logs.filter(closed())


def test_what_is_not_an_outage_passes_as_the_library_wrote_it():
    # A reader that failed on something else than a lost connection (a malformed frame), and
    # a broker closing for another reason (access refused), are faults: ERROR, traceback kept.
    logs = amqp_logs.ConnectionLogs(interval=60)
    try:
        raise ValueError("malformed frame")
    except ValueError:
        exc_info = sys.exc_info()
    reader = logging.LogRecord(
        "aiormq.connection", logging.WARNING, __file__, 1, amqp_logs.READER_FAILED[1], (), exc_info
    )
    refused = logging.LogRecord(
        "aiormq.connection", logging.ERROR, __file__, 1, amqp_logs.CLOSED_BY_BROKER[1],
        ("<Connection>", 403, "ACCESS_REFUSED"), None,
    )  # fmt: skip
    for record in (reader, refused):
        message, level = record.getMessage(), record.levelno
        assert logs.filter(record)
        assert (record.getMessage(), record.levelno) == (message, level)
    assert reader.exc_info is exc_info
    # A lost connection is the outage's line.
    lost = logging.LogRecord(
        "aiormq.connection", logging.WARNING, __file__, 1, amqp_logs.READER_FAILED[1], (),
        (ConnectionResetError, ConnectionResetError(), None),
    )  # fmt: skip
    assert logs.filter(lost)
    assert lost.getMessage() == "RabbitMQ connection lost (ConnectionResetError)"


@pytest.mark.parametrize(
    ("error", "at_most"),
    [
        (ConnectionRefusedError(), relay_module.RECONNECT_INTERVAL_SECONDS),
        (asyncpg.CannotConnectNowError("starting up"), relay_module.RECONNECT_INTERVAL_SECONDS),
        (asyncpg.InterfaceError("connection is closed"), relay_module.RECONNECT_INTERVAL_SECONDS),
        (asyncpg.DataError("a bug"), None),  # an InterfaceError too, but not the database's absence
        (asyncpg.QueryCanceledError("statement timeout"), None),  # a slow database: back off
        (asyncpg.TooManyConnectionsError("full"), None),
    ],
)
async def test_only_an_absent_database_is_tried_again_within_the_second(error, at_most):
    waits = []

    class Recorder:
        async def wait(self, what, error, *, at_most=None):
            waits.append(at_most)

    relay = relay_module.Relay.__new__(relay_module.Relay)
    relay._database = Recorder()
    await relay._database_failed("PostgreSQL connection lost", error)
    assert waits == [at_most]


# --- relays: crash between publish and mark, and only one active ------------------------------


async def write_events(settings, aiohttp_client, headers, count: int) -> None:
    """Writes through an app that runs no relay: the events wait in the outbox."""
    quiet = dataclasses.replace(settings.events, relay_enabled=False)
    client = await aiohttp_client(create_app(dataclasses.replace(settings, events=quiet)))
    for n in range(count):
        await create(client, headers, contact_id=f"c{n}-{uuid.uuid4().hex[:6]}")


async def test_a_relay_killed_before_marking_causes_a_duplicate_never_a_loss(
    event_settings, aiohttp_client, headers, subscriber, db
):
    await write_events(event_settings, aiohttp_client, headers, 3)
    exchange = event_settings.events.exchange

    class KilledBeforeMarking(Relay):
        async def mark_published(self, conn, ids) -> None:
            await (
                asyncio.Event().wait()
            )  # the process dies here: after the confirms, before the mark

    broker = Broker(amqp_url(), exchange)
    await broker.connect(asyncio.Event())
    doomed = KilledBeforeMarking(event_settings.database_url, broker, event_settings.events)
    task = asyncio.create_task(doomed.run())
    first = await subscriber.receive(3)
    task.cancel()  # killed; its session ends, so its lock is free
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await broker.close()
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 3

    async with running_relay(event_settings, Broker(amqp_url(), exchange)):
        again = await subscriber.receive(3)
        await wait_until(lambda: pending_is(db, 0))
    assert [m.message_id for m in again] == [m.message_id for m in first]
    assert [m.body for m in again] == [m.body for m in first]


class _HeldConfirms(Broker):
    """Publishes for real, but holds back the outcome of the batches whose number (from 1) is
    in `held` until `release` is set, as a broker slow to confirm would; `fail` turns the
    outcome of those batches into "only the first message confirmed"."""

    def __init__(self, exchange: str, held: set[int], *, fail: bool = False) -> None:
        super().__init__(amqp_url(), exchange)
        self.held, self.fail = held, fail
        self.release = asyncio.Event()
        self.calls = 0
        self.returned: list[int] = []  # batch numbers, in the order their outcomes came back

    async def publish_batch(self, messages, confirm_timeout) -> tuple[int, BaseException | None]:
        self.calls += 1
        number = self.calls
        outcome = await super().publish_batch(messages, confirm_timeout)
        if number in self.held:
            await self.release.wait()
            if self.fail:
                outcome = (1, ConnectionError("the broker went away after the first message"))
        self.returned.append(number)
        return outcome


class _MarkRecorder(Relay):
    """Notes each set of ids it marks published."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.marks: list[list[int]] = []

    async def mark_published(self, conn, ids) -> None:
        self.marks.append(list(ids))
        await super().mark_published(conn, ids)


async def test_a_slow_confirm_holds_up_the_marking_not_the_events_behind_it(
    event_settings, aiohttp_client, headers, subscriber, db
):
    # A persistent message is confirmed once the broker's disk has it: 50 to 300 ms at times
    # on a busy host. The events committed meanwhile go out; the rows stay pending until then.
    events = dataclasses.replace(event_settings.events, relay_batch_size=2)
    settings = dataclasses.replace(event_settings, events=events)
    await write_events(event_settings, aiohttp_client, headers, 2)
    broker = _HeldConfirms(events.exchange, held={1})
    async with running_relay(settings, broker):
        first = await subscriber.receive(2)
        await write_events(event_settings, aiohttp_client, headers, 2)  # while 1 is unconfirmed
        later = await subscriber.receive(2)
        # Both batches out, none marked: the second's confirm waits behind the first's.
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 4
        broker.release.set()
        await wait_until(lambda: pending_is(db, 0))
    in_order = [
        row["event_id"] for row in await db.fetch("SELECT event_id FROM outbox ORDER BY id")
    ]
    assert [m.message_id for m in first + later] == in_order
    await subscriber.nothing_more()


async def test_after_a_failed_batch_the_batches_behind_it_are_not_marked_even_if_confirmed(
    event_settings, aiohttp_client, headers, subscriber, db
):
    events = dataclasses.replace(event_settings.events, relay_batch_size=2)
    settings = dataclasses.replace(event_settings, events=events)
    await write_events(event_settings, aiohttp_client, headers, 4)
    ids = [row["id"] for row in await db.fetch("SELECT id FROM outbox ORDER BY id")]
    broker = _HeldConfirms(events.exchange, held={1}, fail=True)
    relay = _MarkRecorder(settings.database_url, broker, events)
    await broker.connect(asyncio.Event())
    task = asyncio.create_task(relay.run())
    try:
        first = await subscriber.receive(4)  # both batches went out
        await wait_until(lambda: _true(broker.returned == [2]))  # the second is confirmed
        broker.release.set()  # and the first fails after its first message
        again = await subscriber.receive(3)  # from the first unconfirmed one, in order
        await wait_until(lambda: pending_is(db, 0))
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)
        await broker.close()
    assert relay.marks[0] == ids[:1]  # only the failed batch's confirmed prefix
    assert sorted(i for mark in relay.marks for i in mark) == ids  # each once
    assert [m.message_id for m in again] == [m.message_id for m in first[1:]]


async def test_commits_within_the_linger_after_a_notify_go_out_in_one_batch(
    event_settings, aiohttp_client, headers, subscriber, db
):
    # A producer's linger: at a steady rate, a read, publish and mark carry several events.
    log: list = []
    broker = RecordingBroker(amqp_url(), event_settings.events.exchange, log, "relay")
    # No poll meanwhile: a read that the poll started would not linger.
    lingering = dataclasses.replace(
        event_settings.events, relay_linger_seconds=2.0, relay_poll_interval_seconds=30
    )
    settings = dataclasses.replace(event_settings, events=lingering)
    async with running_relay(settings, broker):
        # Its first drain read nothing: from now on a NOTIFY starts its reads.
        await wait_until(lambda: relay_last_ran(db, "%published_at IS NULL%"))
        await write_events(event_settings, aiohttp_client, headers, 3)  # well within 2 s
        received = await subscriber.receive(3)
    assert len({start for _, _, start, _, _ in log}) == 1  # one batch
    assert [m.message_id for m in received] == [message_id for *_, message_id in log]


RETENTION_SECONDS = 72 * 3600.0


async def remove_published(db_url: str) -> int:
    """One housekeeping run of the outbox's retention (72 hours): the rows it removed."""
    async with asyncpg.create_pool(db_url, min_size=1, max_size=1) as pool:
        removed = await housekeeping.run_once(pool, [published_outbox_rows(RETENTION_SECONDS)])
    assert removed is not None
    return removed["published outbox rows"]


async def test_published_rows_past_retention_are_removed_in_batches(db, db_url):
    await db.execute(
        """
        INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload,
                            published_at)
        SELECT 'evt_' || lpad(n::text, 16, '0'), 'conversation.updated', 'a', 'c', n, '{}',
               CASE WHEN n <= 2500 THEN now() - interval '100 hours'
                    WHEN n <= 2600 THEN now() - interval '1 hour' END
        FROM generate_series(1, 2700) AS n
        """
    )
    assert await remove_published(db_url) == 2500
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 100
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 100


async def test_retention_reads_only_the_oldest_rows_and_passes_a_pending_one(db, db_url):
    """Nothing expired: the statement reads one batch of the oldest rows, not the outbox. A row
    still pending among the oldest (its broker was down) does not keep back the expired rows
    published after it."""
    await db.execute(
        """
        INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload,
                            published_at)
        SELECT 'evt_' || lpad(n::text, 16, '0'), 'conversation.updated', 'a', 'c', n, '{}',
               CASE WHEN n = 3 THEN NULL
                    WHEN n <= 2500 THEN now() - interval '100 hours'
                    ELSE now() - interval '1 hour' END
        FROM generate_series(1, 20000) AS n
        """
    )
    assert await remove_published(db_url) == 2499
    ids = await db.fetch("SELECT id FROM outbox ORDER BY id LIMIT 2")
    assert await db.fetchval("SELECT published_at IS NULL FROM outbox WHERE id = $1", ids[0]["id"])
    assert await db.fetchval("SELECT count(*) FROM outbox") == 20000 - 2499
    batch = housekeeping.BATCH_SIZE
    plan = await db.fetchval(
        f"EXPLAIN (ANALYZE, FORMAT JSON) {DELETE_PUBLISHED_OUTBOX}", batch, RETENTION_SECONDS
    )
    scans = [n for n in plan_nodes(orjson.loads(plan)[0]["Plan"]) if "Relation Name" in n]
    assert scans, plan
    read = [
        (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in scans
    ]
    assert max(read) <= batch, plan


# --- events tail ------------------------------------------------------------------------------


async def test_events_tail_prints_each_event_on_a_line(client, headers, exchange):
    out = io.StringIO()
    bound = asyncio.Event()
    tailing = asyncio.create_task(
        tail(amqp_url(), exchange, ["conversation.created"], count=2, out=out, bound=bound)
    )
    await asyncio.wait_for(bound.wait(), 20)
    first = await create(client, headers, contact_id="c1")
    await client.put(f"/v1/conversations/{first['id']}", json={"is_muted": True}, headers=headers)
    second = await create(client, headers, contact_id="c2")
    assert await asyncio.wait_for(tailing, 20) == 2
    lines = out.getvalue().splitlines()
    assert [orjson.loads(line)["data"]["object"]["id"] for line in lines] == [
        first["id"],
        second["id"],
    ]


async def test_the_events_tail_command_needs_only_the_broker_settings(client, headers, exchange):
    env = {"PATH": os.environ["PATH"], "AMQP_URL": amqp_url(), "EVENTS_EXCHANGE": exchange}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "events", "tail", "--count", "1",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    created = set()
    exited = asyncio.ensure_future(process.wait())
    try:
        async with asyncio.timeout(30):
            while not exited.done():  # until the tail's queue is bound, events pass it by
                created.add((await create(client, headers, contact_id=f"c{len(created)}"))["id"])
                await asyncio.wait([exited], timeout=0.5)
    finally:
        if process.returncode is None:
            process.kill()
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    [line] = out.decode().splitlines()
    assert orjson.loads(line)["data"]["object"]["id"] in created


async def test_the_relay_command_publishes_and_stops_cleanly_on_sigterm(
    event_settings, aiohttp_client, headers, subscriber, db, tmp_path
):
    await write_events(event_settings, aiohttp_client, headers, 5)
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "RELAY_HTTP_PORT": str(free_port()),
        "DATABASE_URL": event_settings.database_url,
        "AMQP_URL": amqp_url(),
        "EVENTS_EXCHANGE": event_settings.events.exchange,
        "JWT_HS256_SECRETS": event_settings.auth.hs256_secrets[0],
    }
    log = tmp_path / "relay.log"  # a file, not a pipe that could fill up unread
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "relay", env=env, stderr=log_file
        )
    try:
        await subscriber.receive(5, timeout=30)
        await wait_until(lambda: pending_is(db, 0))
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    assert process.returncode == 0, log.read_text()[-2000:]
    # Alone, it holds every partition.
    assert "relay holds partitions [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]" in (
        log.read_text()
    )


async def test_the_next_batch_starts_at_the_oldest_pending_row_not_after_the_last_one(db):
    # A row that commits late with a lower id (here 1) must come before any later row, or a
    # later event of its conversation could overtake it; only the batch in flight is skipped.
    await db.execute(
        """
        INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload)
        SELECT 'evt_' || lpad(n::text, 16, '0'), 'conversation.updated', 'a', 'c' || n, 1, '{}'
        FROM generate_series(1, 6) AS n
        """
    )
    await db.execute("UPDATE outbox SET published_at = now() WHERE id = 4")
    rows = await db.fetch(SELECT_PENDING, 10, [2, 3])
    assert [row["id"] for row in rows] == [1, 5, 6]
    rows = await db.fetch(SELECT_PENDING, 2, [])
    assert [row["id"] for row in rows] == [1, 2]
    # The same holds for a relay with some of the partitions: here, those of rows 1, 2 and 5.
    held = list(
        {
            row["partition"]
            for row in await db.fetch("SELECT partition FROM outbox WHERE id IN (1, 2, 5)")
        }
    )
    expected = [
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM outbox WHERE published_at IS NULL AND partition = ANY($1)"
            " AND id NOT IN (2) ORDER BY id",
            held,
        )
    ]
    rows = await db.fetch(select_pending_of(len(held)), 10, [2], *held)
    assert [row["id"] for row in rows] == expected
    assert expected[0] == 1


async def test_a_backlog_is_read_through_the_index_after_the_relay_polled_an_empty_outbox(
    db, db_url
):
    # Seen in a benchmark: the relay's session polled an empty outbox, vacuumed as such (as
    # autovacuum leaves one that retention emptied), PostgreSQL cached a generic plan for its
    # read (a scan and a sort: the table had no pages) and kept it for a backlog of 100,000
    # rows, 0.1 to 0.35 s a batch, until autovacuum analyzed the table again.
    await db.execute("VACUUM ANALYZE outbox")
    relay = await asyncpg.connect(db_url, server_settings=SESSION_SETTINGS)  # as the relay's
    try:
        await relay.execute(f"PREPARE pending (int, bigint[]) AS {SELECT_PENDING}")
        for _ in range(10):  # past the 5 runs after which PostgreSQL may settle on a plan
            await relay.execute("EXECUTE pending (500, '{}')")
        await db.execute(
            """
            INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence,
                                payload)
            SELECT 'evt_' || lpad(n::text, 16, '0'), 'conversation.updated', 'a', 'c' || n, 1, '{}'
            FROM generate_series(1, 20000) AS n
            """
        )
        plan = "\n".join(r[0] for r in await relay.fetch("EXPLAIN EXECUTE pending (500, '{1}')"))
    finally:
        await relay.close()
    assert "Index Scan using outbox_pending_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
    assert "Sort" not in plan, plan


@pytest.mark.parametrize("traceparent", [None, TRACEPARENT])
def test_an_event_goes_out_as_the_message_aio_pika_would_build_for_it(traceparent):
    # The relay builds the AMQP properties itself (aio-pika's Message costs ten times as much
    # per event): the same properties, the same bytes on the wire.
    created = datetime.datetime(2026, 11, 30, 4, 5, 6, tzinfo=datetime.UTC)
    row = {
        "account_id": "acct_1",
        "conversation_id": "0VbyNILkpXDULPE0",
        "partition": 7,
        "traceparent": traceparent,
        "payload": '{"id": "evt_1"}',
        "event_id": "evt_1",
        "event_type": "conversation.updated",
        "created_at": created,
    }
    headers = {"account_id": "acct_1", "conversation_id": "0VbyNILkpXDULPE0", "partition": 7}
    if traceparent:
        headers["traceparent"] = traceparent
    expected = aio_pika.Message(
        body=b'{"id": "evt_1"}',
        message_id="evt_1",
        type="conversation.updated",
        timestamp=created,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        app_id="conversations",
        headers=headers,
    )
    message = build_message(row)
    assert message.routing_key == "conversation.updated"
    assert message.body == expected.body
    assert message.properties == expected.properties
    assert message.properties.marshal() == expected.properties.marshal()


async def test_an_event_nothing_can_route_fails_its_publish_and_the_rest_of_the_batch(exchange):
    # With the alternate exchange gone, `mandatory` makes the broker return the event: it is not
    # counted as published, nor is anything after it.
    broker = Broker(amqp_url(), exchange)
    await broker.connect(asyncio.Event())
    try:
        connection = await aio_pika.connect_robust(amqp_url())
        async with connection:
            channel = await connection.channel()
            await channel.exchange_delete(f"{exchange}.unrouted")
        messages = [
            Outgoing(
                "conversation.updated", b"{}", aio_pika.Message(b"", message_id=f"e{n}").properties
            )
            for n in range(3)
        ]
        confirmed, failure = await broker.publish_batch(messages, confirm_timeout=10)
    finally:
        await broker.close()
    assert confirmed == 0
    assert isinstance(failure, aio_pika.exceptions.PublishError)


class _SilentAfter:
    """A broker's channel that confirms its first `count` publishes, then none (as a broker
    that stopped reading: a connection blocked by an alarm), and its robust wrapper."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.waiting: list[asyncio.Future] = []

    async def get_underlay_channel(self) -> "_SilentAfter":
        return self

    async def basic_publish(self, body: bytes, **_: object) -> None:
        if self.count > 0:
            self.count -= 1
            return
        confirm = asyncio.get_running_loop().create_future()
        self.waiting.append(confirm)
        await confirm


async def test_a_batch_not_confirmed_in_time_counts_its_confirmed_prefix_and_leaves_no_publish():
    broker = Broker(amqp_url(), "unused")
    channel = _SilentAfter(2)
    broker._channel, broker._exchange = channel, object()  # as if connected and declared
    properties = aio_pika.Message(b"").properties
    messages = [Outgoing("conversation.updated", b"{}", properties) for _ in range(5)]
    started = time.monotonic()
    confirmed, failure = await broker.publish_batch(messages, confirm_timeout=0.3)
    assert confirmed == 2
    assert isinstance(failure, TimeoutError)
    assert 0.3 <= time.monotonic() - started < 2
    assert all(confirm.cancelled() for confirm in channel.waiting)  # none outlives the batch
