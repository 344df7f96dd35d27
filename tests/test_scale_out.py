"""Events at scale, against the real PostgreSQL and RabbitMQ: relays sharing the outbox's
partitions (joining, leaving, killed), and a subscriber that scales out in order."""

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
import pytest

from service.events.broker import Broker, declare_topology
from service.events.partitions import (
    JOIN,
    PARTITION_LOCK_CLASS,
    RELAY_LOCK_KEY,
    PartitionShare,
)
from service.events.relay import (
    SESSION_SETTINGS,
    Relay,
    select_pending_of,
)
from tests.bench.relay import PARTITION_HOLDERS
from tests.events_support import (
    RecordingBroker,
    Subscriber,
    amqp_url,
    pending_is,
    relay_last_ran,
    running_relay,
    wait_until,
)
from tests.plans import plan_nodes
from tests.proxy import TcpProxy, free_port, via_port

PARTITIONS = 16  # what migration 0006 sets
# One event per conversation and sequence, in sequence order: outbox order is commit order.
FILL = """
INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload)
SELECT 'evt_' || $3::text || lpad(n::text, 10, '0'), 'conversation.updated', 'acct_scale',
       $3::text || lpad((n % $1::int)::text, 8, '0'), n / $1::int + 1,
       json_build_object('sequence', n / $1::int + 1)
FROM generate_series(0, $1::int * $2::int - 1) AS n
ORDER BY n
"""
INSERT_ONE = """
INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload)
VALUES ($1, 'conversation.updated', 'acct_scale', $2, $3::bigint,
        json_build_object('sequence', $3::bigint))
"""


async def fill(db: asyncpg.Connection, conversations: int, events_each: int) -> list[str]:
    """A backlog committed at once; returns its event ids."""
    tag = uuid.uuid4().hex[:8]
    await db.execute(FILL, conversations, events_each, tag)
    return [
        r["event_id"]
        for r in await db.fetch("SELECT event_id FROM outbox WHERE published_at IS NULL")
    ]


async def burst(database_url: str, conversations: int, events_each: int, writers: int = 8) -> set:
    """`writers` sessions committing one event per transaction, each for its own conversations
    in sequence order (as the row lock orders one conversation's writers); returns event ids."""
    tag = uuid.uuid4().hex[:8]
    ids: set[str] = set()

    async def write(conn: asyncpg.Connection, mine: range) -> None:
        for sequence in range(1, events_each + 1):
            for number in mine:
                event_id = f"evt_{tag}{number:05d}{sequence:03d}"
                await conn.execute(INSERT_ONE, event_id, f"{tag}{number:08d}", sequence)
                ids.add(event_id)

    async with asyncpg.create_pool(database_url, min_size=writers, max_size=writers) as pool:

        async def writer(number: int) -> None:
            async with pool.acquire() as conn:
                await write(conn, range(number, conversations, writers))

        await asyncio.gather(*(writer(n) for n in range(writers)))
    return ids


async def receive_all(subscriber: Subscriber, expected: set, timeout: float = 60) -> list:
    """Messages until every expected event id has come (duplicates included)."""
    got: list = []
    seen: set = set()
    async with asyncio.timeout(timeout):
        while not expected <= seen:
            message = await subscriber.messages.get()
            got.append(message)
            seen.add(message.message_id)
    return got


def in_order(messages: list) -> int:
    """Assert each conversation's events come in sequence order, 1, 2, 3... (a copy of an event
    already seen is a duplicate, which a subscriber drops by id); return the duplicates."""
    seen: set[str] = set()
    sequences: dict[str, list[int]] = {}
    duplicates = 0
    for message in messages:
        if message.message_id in seen:
            duplicates += 1
            continue
        seen.add(message.message_id)
        conversation = message.headers["conversation_id"]
        sequences.setdefault(conversation, []).append(orjson.loads(message.body)["sequence"])
    for conversation, numbers in sequences.items():
        assert numbers == list(range(1, len(numbers) + 1)), f"{conversation} out of order"
    return duplicates


def one_relay_at_a_time(log: list) -> None:
    """Assert no partition was ever published by two relays at once."""
    spans: dict[int, list] = {}
    for name, partition, start, end, _ in log:
        spans.setdefault(partition, []).append((start, end, name))
    for partition, publishes in spans.items():
        last_end: dict[str, float] = {}
        for start, end, name in sorted(publishes):
            others = [e for other, e in last_end.items() if other != name]
            assert all(e <= start for e in others), f"partition {partition}: two relays at once"
            last_end[name] = max(end, last_end.get(name, end))


def publishers(log: list) -> dict[int, set[str]]:
    """Which relays published each partition."""
    found: dict[int, set[str]] = {}
    for name, partition, *_ in log:
        found.setdefault(partition, set()).add(name)
    return found


async def holders(db: asyncpg.Connection) -> list[int]:
    """How many partitions each relay session holds, smallest first."""
    return sorted(r["partitions"] for r in await db.fetch(PARTITION_HOLDERS, PARTITION_LOCK_CLASS))


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def relays(settings, log: list, names: str) -> AsyncIterator[list[Relay]]:
    """A recording relay per letter of `names`, all running in this event loop."""
    exchange = settings.events.exchange
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for name in names:
            broker = RecordingBroker(amqp_url(), exchange, log, name)
            relay, _ = await stack.enter_async_context(running_relay(settings, broker))
            started.append(relay)
        yield started


# --- relays sharing the partitions ------------------------------------------------------------


async def test_three_relays_share_the_partitions_and_keep_each_conversation_in_order(
    event_settings, subscriber, db
):
    log: list = []
    async with relays(event_settings, log, "abc") as (a, b, c):

        async def settled() -> bool:
            held = [set(r.partitions) for r in (a, b, c)]
            return set().union(*held) == set(range(PARTITIONS)) and all(
                0 < len(h) <= 6
                for h in held  # ceil(16 / 3)
            )

        await wait_until(settled)
        owners = {p: r for r in (a, b, c) for p in r.partitions}
        expected = await burst(event_settings.database_url, conversations=200, events_each=15)
        messages = await receive_all(subscriber, expected)
        await wait_until(lambda: pending_is(db, 0))
        await subscriber.nothing_more()
    assert {m.message_id for m in messages} == expected
    assert in_order(messages) == 0  # no fault, no duplicate
    one_relay_at_a_time(log)
    names = {a: "a", b: "b", c: "c"}
    # Each partition went out through the relay that held it, and every relay had a share.
    assert publishers(log) == {p: {names[owners[p]]} for p in publishers(log)}
    assert {name for name, *_ in log} == {"a", "b", "c"}
    for message in messages:
        assert 0 <= message.headers["partition"] < PARTITIONS


async def test_a_relay_that_joins_mid_drain_gets_its_share_and_one_that_leaves_hands_it_back(
    event_settings, subscriber, db
):
    settings = _batch(event_settings, 50)  # many batches: the join lands mid-drain
    log: list = []
    exchange = settings.events.exchange
    expected = set(await fill(db, conversations=300, events_each=20))
    async with running_relay(settings, RecordingBroker(amqp_url(), exchange, log, "a")) as (a, _):
        first = []
        while len(first) < 1000:
            first.append(await asyncio.wait_for(subscriber.messages.get(), 30))
        async with running_relay(settings, RecordingBroker(amqp_url(), exchange, log, "b")) as (
            b,
            _,
        ):
            # Rebalanced to fair shares: 8 each.
            await wait_until(lambda: _true(len(a.partitions) == len(b.partitions) == 8))
            assert set(a.partitions) | set(b.partitions) == set(range(PARTITIONS))
            rest = await receive_all(subscriber, expected - {m.message_id for m in first})
            await wait_until(lambda: pending_is(db, 0))
            assert b.published > 0  # it joined while the backlog was draining
        # b left: a takes every partition back and publishes what comes next.
        await wait_until(lambda: _true(len(a.partitions) == PARTITIONS))
        later = await burst(settings.database_url, conversations=20, events_each=5)
        after = await receive_all(subscriber, later)
        await wait_until(lambda: pending_is(db, 0))
    messages = first + rest
    assert {m.message_id for m in messages} == expected
    assert in_order(messages) == 0  # a hand-over between batches duplicates nothing
    assert in_order(after) == 0
    one_relay_at_a_time(log)
    assert {name for name, _, _, _, message_id in log if message_id in later} == {"a"}


async def test_a_relay_cut_off_from_the_broker_hands_its_partitions_to_the_others(
    event_settings, subscriber, db
):
    parts = urlsplit(amqp_url())
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    log: list = []
    exchange = event_settings.events.exchange
    cut_off = RecordingBroker(via_port(amqp_url(), proxy.port), exchange, log, "a")

    async def halves() -> bool:
        return len(a.partitions) == len(b.partitions) == PARTITIONS // 2

    try:
        async with (
            running_relay(event_settings, cut_off) as (a, _),
            running_relay(event_settings, RecordingBroker(amqp_url(), exchange, log, "b")) as (
                b,
                _,
            ),
        ):
            await wait_until(halves)
            await proxy.cut()
            await wait_until(lambda: _true(len(b.partitions) == PARTITIONS and not a.partitions))
            expected = await burst(event_settings.database_url, conversations=50, events_each=5)
            messages = await receive_all(subscriber, expected)
            await proxy.start()
            await wait_until(halves)  # back, it gets its share again
    finally:
        if proxy.running:
            await proxy.cut()
    assert in_order(messages) == 0
    assert {name for name, _, _, _, event_id in log if event_id in expected} == {"b"}


async def test_with_one_partition_one_relay_publishes_everything_in_order(
    event_settings, subscriber, db
):
    log: list = []
    async with relays(event_settings, log, "ab") as (a, b):
        await wait_until(lambda: _true(len(a.partitions) == len(b.partitions) == 8))
        # P changes under running relays (nothing pending): they follow without a restart.
        await db.execute("SELECT outbox_set_partitions(1)")
        await wait_until(lambda: _true(sorted([a.partitions, b.partitions]) == [(), (0,)]))
        expected = await burst(event_settings.database_url, conversations=50, events_each=10)
        messages = await receive_all(subscriber, expected)
        await wait_until(lambda: pending_is(db, 0))
        active = a if a.is_active else b
        assert active.published == len(expected)
    assert in_order(messages) == 0
    assert {m.headers["partition"] for m in messages} == {0}
    assert len({name for name, *_ in log}) == 1


async def test_relays_wait_while_a_single_leader_relay_of_the_earlier_version_runs(
    event_settings, subscriber, db
):
    await db.execute("SELECT pg_advisory_lock($1)", RELAY_LOCK_KEY)  # how the old leader locked
    expected = set(await fill(db, conversations=10, events_each=2))
    exchange = event_settings.events.exchange
    async with running_relay(event_settings, Broker(amqp_url(), exchange)) as (relay, _):
        await wait_until(lambda: relay_last_ran(db, "%pg_try_advisory_lock_shared%"))  # it tried
        assert subscriber.messages.empty()  # and stood by
        assert relay.partitions == ()
        await db.execute("SELECT pg_advisory_unlock($1)", RELAY_LOCK_KEY)  # the old one stopped
        messages = await receive_all(subscriber, expected)
    assert in_order(messages) == 0


async def test_a_relay_with_some_partitions_reads_no_more_than_its_batch(db, db_url):
    # Not a scan of every pending row: the others' backlog may be large (one stuck partition).
    # Nor the oldest rows of each partition it holds before the batch's choice among them: a
    # range of each partition's index, merged in id order, read only as far as the batch goes.
    await fill(db, conversations=2000, events_each=20)
    await db.execute("ANALYZE outbox")
    held = [3, 7, 8, 12]
    in_flight = [
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM outbox WHERE partition = ANY($1) ORDER BY id LIMIT 100", held
        )
    ]
    relay = await asyncpg.connect(db_url, server_settings=SESSION_SETTINGS)  # as the relay's
    try:
        explained = await relay.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + select_pending_of(len(held)),
            200,
            in_flight,
            *held,
        )
    finally:
        await relay.close()
    nodes = plan_nodes(orjson.loads(explained)[0]["Plan"])
    kinds = [node["Node Type"] for node in nodes]
    assert "Merge Append" in kinds, kinds
    assert "Seq Scan" not in kinds, kinds
    assert "Sort" not in kinds, kinds
    scans = [node for node in nodes if node["Node Type"] == "Index Scan"]
    assert {node["Index Name"] for node in scans} == {"outbox_pending_partition_idx"}
    # The batch (200), and at most one row more from each range to know it comes later.
    assert sum(node["Actual Rows"] for node in scans) <= 200 + len(held)
    assert sum(node.get("Rows Removed by Filter", 0) for node in scans) == len(in_flight)


async def test_mid_drain_a_relay_takes_free_partitions_but_releases_none(db_url):
    # The shares are looked at between the batches of a drain, with a batch in flight: taking
    # a free partition is safe then (the next read starts at its oldest row), releasing one is
    # not (the taker would publish the rows in flight again), so that waits for the batch.
    a, b = PartitionShare(), PartitionShare()  # two relays' shares, without their relays
    conn_a = await asyncpg.connect(db_url, server_settings=SESSION_SETTINGS)
    conn_b = await asyncpg.connect(db_url, server_settings=SESSION_SETTINGS)
    try:
        assert await conn_a.fetchval(JOIN, RELAY_LOCK_KEY)
        assert await a.rebalance(conn_a, in_flight=True)  # alone: it takes them all
        assert len(a.held) == PARTITIONS
        assert await conn_b.fetchval(JOIN, RELAY_LOCK_KEY)
        assert not await a.rebalance(conn_a, in_flight=True)  # over its share, batch in flight
        assert len(a.held) == PARTITIONS
        assert await b.rebalance(conn_b, in_flight=True)  # nothing free yet
        assert b.held == ()
        assert await a.rebalance(conn_a)  # the batch is marked: it releases its extras
        assert len(a.held) == PARTITIONS // 2
        assert await b.rebalance(conn_b, in_flight=True)  # and b takes them mid-drain
        assert sorted(a.held + b.held) == list(range(PARTITIONS))
    finally:
        await conn_a.close()
        await conn_b.close()


async def test_the_partition_count_changes_only_with_nothing_pending(db):
    await db.execute(INSERT_ONE, "evt_p1", "0TvcokihPzRVh2GP", 1)
    with pytest.raises(asyncpg.RaiseError, match="1 events are pending"):
        await db.execute("SELECT outbox_set_partitions(4)")
    assert await db.fetchval("SELECT partitions FROM outbox_settings") == PARTITIONS
    await db.execute("UPDATE outbox SET published_at = now()")
    await db.execute("SELECT outbox_set_partitions(4)")
    await db.execute(INSERT_ONE, "evt_p2", "0TvcokihPzRVh2GP", 2)
    rows = await db.fetch(
        "SELECT partition, outbox_partition(conversation_id, $1) AS expected FROM outbox"
        " ORDER BY id",
        4,
    )
    # The trigger set both from the conversation id; the later one under the new P.
    assert rows[1]["partition"] == rows[1]["expected"] < 4
    assert rows[0]["partition"] == await db.fetchval(
        "SELECT outbox_partition('0TvcokihPzRVh2GP', 16)"
    )


def _batch(settings, size: int):
    return dataclasses.replace(
        settings, events=dataclasses.replace(settings.events, relay_batch_size=size)
    )


# --- a relay killed mid-drain -----------------------------------------------------------------


async def test_a_relay_killed_mid_drain_is_taken_over_within_seconds(
    event_settings, subscriber, db, tmp_path
):
    batch = 100
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "DATABASE_URL": event_settings.database_url,
        "AMQP_URL": amqp_url(),
        "EVENTS_EXCHANGE": event_settings.events.exchange,
        "JWT_HS256_SECRETS": event_settings.auth.hs256_secrets[0],
        "RELAY_BATCH_SIZE": str(batch),
        "LOG_FORMAT": "console",
    }
    processes = []
    for name in ("doomed", "survivor"):
        with (tmp_path / f"{name}.log").open("wb") as log_file:
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "service.cli",
                    "relay",
                    env={**env, "RELAY_HTTP_PORT": str(free_port())},
                    stderr=log_file,
                )
            )
    doomed, survivor = processes
    try:
        await wait_until(lambda: _holders_are(db, [8, 8]), timeout=30)
        expected = set(await fill(db, conversations=400, events_each=15))
        first = []
        while len(first) < 1500:
            first.append(await asyncio.wait_for(subscriber.messages.get(), 30))
        doomed.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await doomed.wait()
        await wait_until(lambda: _holders_are(db, [PARTITIONS]), timeout=30)
        print(
            f"\ntakeover: the survivor held all partitions {time.monotonic() - killed:.1f} s after SIGKILL"
        )
        rest = await receive_all(subscriber, expected - {m.message_id for m in first})
        await wait_until(lambda: pending_is(db, 0))
        await asyncio.sleep(0.5)
        while not subscriber.messages.empty():  # late copies count as duplicates too
            rest.append(subscriber.messages.get_nowait())
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), 30)
    messages = first + rest
    assert {m.message_id for m in messages} == expected  # nothing lost
    duplicates = in_order(messages)
    # At most the dead relay's batch in flight and the confirmed one it was marking.
    assert duplicates <= 2 * batch
    assert survivor.returncode == 0


async def test_a_relay_that_loses_its_database_session_hands_over_its_partitions(
    event_settings, subscriber, db
):
    settings = _batch(event_settings, 50)
    log: list = []
    expected = set(await fill(db, conversations=200, events_each=20))
    async with relays(settings, log, "ab") as (a, b):
        first = []
        while len(first) < 1000:
            first.append(await asyncio.wait_for(subscriber.messages.get(), 30))
        await wait_until(lambda: _true(len(a.partitions) == len(b.partitions) == 8))
        lost = a.partitions
        # The server ends a's session (as a failover or a network cut would).
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid = $1::bigint::oid AND objid = $2::oid",
            PARTITION_LOCK_CLASS,
            lost[0],
        )
        rest = await receive_all(subscriber, expected - {m.message_id for m in first})
        await wait_until(lambda: pending_is(db, 0))
        # a reconnected and rejoined: fair shares again.
        await wait_until(lambda: _true(len(a.partitions) == len(b.partitions) == 8))
    messages = first + rest
    assert {m.message_id for m in messages} == expected
    # Its batch in flight and the confirmed one it could no longer mark may go out twice (both
    # still pending when another relay takes the partition over), never out of order.
    assert in_order(messages) <= 2 * settings.events.relay_batch_size


async def _holders_are(db: asyncpg.Connection, counts: list[int]) -> bool:
    return await holders(db) == counts


# --- subscribers that scale out in order ------------------------------------------------------


async def test_consumers_behind_a_consistent_hash_exchange_see_each_conversation_in_order(
    event_settings, db
):
    # docs/events.md, "Scaling out a subscriber": the same declarations.
    exchange = event_settings.events.exchange
    hashed = f"{exchange}.scale-test.by-conversation"
    queues = [f"{exchange}.scale-test.{n}" for n in range(3)]
    processed: dict[str, list[int]] = {}
    consumers_of: dict[str, set[int]] = {}
    counts = [0, 0, 0]
    total = 3000
    done = asyncio.Event()
    connection = await aio_pika.connect_robust(amqp_url())
    try:
        channel = await connection.channel()
        topic = await declare_topology(channel, exchange)
        by_conversation = await channel.declare_exchange(
            hashed,
            aio_pika.ExchangeType.X_CONSISTENT_HASH,
            durable=True,
            arguments={"hash-header": "conversation_id"},
        )
        await by_conversation.bind(topic, routing_key="#")
        for name in queues:
            queue = await channel.declare_queue(
                name,
                durable=True,
                arguments={"x-queue-type": "quorum", "x-single-active-consumer": True},
            )
            await queue.bind(by_conversation, routing_key="1")  # equal weights

        async def consume(number: int) -> None:
            own = await connection.channel()
            await own.set_qos(prefetch_count=20)
            queue = await own.get_queue(queues[number])
            async with queue.iterator() as messages:
                async for message in messages:
                    event = orjson.loads(message.body)
                    conversation = message.headers["conversation_id"]
                    await asyncio.sleep(0)  # the others get their turn: consumers interleave
                    processed.setdefault(conversation, []).append(event["sequence"])
                    consumers_of.setdefault(conversation, set()).add(number)
                    counts[number] += 1
                    await message.ack()
                    if sum(counts) == total:
                        done.set()

        consuming = [asyncio.create_task(consume(n)) for n in range(3)]
        await fill(db, conversations=300, events_each=10)
        async with running_relay(event_settings, Broker(amqp_url(), exchange)):
            await asyncio.wait_for(done.wait(), 60)
        for task in consuming:
            task.cancel()
        await asyncio.gather(*consuming, return_exceptions=True)
    finally:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        await channel.exchange_delete(hashed)
        await connection.close()
    assert sum(counts) == total
    assert all(count > 0 for count in counts), counts  # each consumer had its share
    assert len(processed) == 300
    for conversation, sequences in processed.items():
        assert sequences == list(range(1, 11)), f"{conversation} out of order"
    assert all(len(numbers) == 1 for numbers in consumers_of.values())  # one consumer each
