"""Scenario 4, the relay: the service's own relay draining a pre-filled outbox against a raw
aio-pika publisher in the same run, and commit-to-subscriber latency at a steady write rate.
Scenario 9: the same backlog drained by 1, 2 and 4 relays sharing the outbox's partitions,
with each one's CPU time (and the database's and the broker's) from /proc.

Both publishers send persistent messages with batched publisher confirms to the same durable
topic exchange, bound to one durable queue, so the broker writes every message either way.
"""

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families

from service.events.broker import declare_topology
from service.events.partitions import PARTITION_LOCK_CLASS
from service.events.relay import SESSION_SETTINGS
from tests.bench.load import LoadResult, percentile

EXCHANGE = "conversations_bench"
SINK_QUEUE = f"{EXCHANGE}.sink"
BATCH = 500  # the raw publisher's batch: RELAY_BATCH_SIZE's default
DRAIN_TIMEOUT_SECONDS = 300.0
FILL = """
INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload)
SELECT 'evt_' || lpad(n::text, 16, '0'), 'conversation.updated', 'acct_bench',
       lpad((n % 5000)::text, 16, '0'), n, $1::json
FROM generate_series(1, $2) AS n
"""
# A realistic envelope (about 600 bytes), as the service writes them.
PAYLOAD = (
    '{"id":"evt_0VbyNILkpXDULPE0","type":"conversation.updated","created_at":1795596350,'
    '"account_id":"acct_bench","sequence":2,"data":{"object":{"id":"0VbyNILkpXDULPE0",'
    '"contact_id":"WAz8eIbvDR60rouK","group_id":null,"pinned_message_id":null,"is_pinned":false,'
    '"is_muted":true,"last_active_at":1795596350,"last_opened_at":null,"created_at":1795596350,'
    '"archived_at":null},"previous_attributes":{"is_muted":false}}}'
)
PENDING = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
# Polled every 50 ms while relays drain: the first entry of the pending index, whatever the
# statistics say. As `EXISTS (... WHERE published_at IS NULL)` PostgreSQL scanned the table
# through every published row before the first pending one, 60 to 80 ms of its CPU per poll
# once the writes scenario had left 100,000 rows: the harness took a core from the relay.
FIRST_PENDING = "SELECT id FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1"


@contextlib.asynccontextmanager
async def broker_sink(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """The benchmark's exchange (the service's topology, under its own name) and a durable
    queue bound to every event, standing for the subscribers; all deleted afterwards."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_topology(channel, EXCHANGE)
        queue = await channel.declare_queue(SINK_QUEUE, durable=True)
        await queue.bind(exchange, routing_key="#")
        try:
            yield queue
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await channel.exchange_delete(EXCHANGE)
            await channel.exchange_delete(f"{EXCHANGE}.unrouted")
            await channel.queue_delete(f"{EXCHANGE}.unrouted")


async def broker_version(amqp_url: str) -> str:
    """RabbitMQ's version, as the broker announces it."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        properties = connection.transport.connection.server_properties
        return str(properties.get("version", "?"))


async def raw_publisher(amqp_url: str, count: int) -> float:
    """Messages/s of a bare aio-pika publisher: batches of BATCH, confirms awaited per batch."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_topology(channel, EXCHANGE)
        body = PAYLOAD.encode()
        started = time.perf_counter()
        for offset in range(0, count, BATCH):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            message_id=f"raw-{n}",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            content_type="application/json",
                        ),
                        "conversation.updated",
                    )
                    for n in range(offset, min(count, offset + BATCH))
                )
            )
        return count / (time.perf_counter() - started)


async def _until_drained(conn: asyncpg.Connection) -> float:
    """Seconds until the outbox has no pending event (the running service's relay drains it)."""
    started = time.perf_counter()
    while await conn.fetchval(FIRST_PENDING) is not None:
        if time.perf_counter() - started > DRAIN_TIMEOUT_SECONDS:
            raise RuntimeError(f"the outbox did not drain in {DRAIN_TIMEOUT_SECONDS:g}s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def wait_drained(database_url: str) -> float:
    """Seconds until the outbox of `database_url` has no pending event."""
    conn = await asyncpg.connect(database_url)
    try:
        return await _until_drained(conn)
    finally:
        await conn.close()


async def relay_drain(database_url: str, count: int) -> float:
    """Events/s of the running service's relay draining `count` events committed at once.

    Timed on the database's clock, from the fill's commit to the last `published_at` stamp.
    """
    conn = await asyncpg.connect(database_url)
    try:
        await _until_drained(conn)
        await conn.execute(FILL, PAYLOAD, count)
        committed = await conn.fetchval("SELECT clock_timestamp()")
        await _until_drained(conn)
        seconds = await conn.fetchval(
            "SELECT extract(epoch FROM max(published_at) - $1)::float8 FROM outbox", committed
        )
        return count / seconds
    finally:
        await conn.close()


@dataclass(frozen=True)
class LatencyResult:
    """Commit-to-subscriber latency of `conversation.created` events at a steady POST rate."""

    events: LoadResult  # rate = the POST rate achieved; p50/p99 = send to subscriber receipt
    answers: LoadResult  # p50/p99 = send to the POST's answer (the service's own share)


async def commit_to_subscriber(
    base_url: str,
    amqp_url: str,
    tokens: list[str],
    rate: float,
    seconds: float,
) -> LatencyResult:
    """POST new contacts at `rate`/s for `seconds` (open loop: sends never wait for answers),
    and time each one's `conversation.created` from the send to its receipt by a subscriber.

    The send time stands for the commit time: the figure includes the request's own handling.
    """
    tag = uuid.uuid4().hex[:8]
    sent: dict[str, float] = {}
    latencies: list[float] = []
    answered: list[float] = []

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        contact = orjson.loads(message.body)["data"]["object"]["contact_id"]
        if contact in sent:
            latencies.append(time.perf_counter() - sent[contact])

    connection = await aio_pika.connect_robust(amqp_url)
    async with connection, aiohttp.ClientSession(base_url) as http:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(EXCHANGE, routing_key="conversation.created")
        await queue.consume(on_event, no_ack=True)
        failures = 0

        async def create(contact: str, token: str) -> None:
            nonlocal failures
            sent[contact] = time.perf_counter()
            async with http.post(
                "/v1/conversations",
                json={"contact_id": contact},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                await response.read()
                answered.append(time.perf_counter() - sent[contact])
                failures += response.status != 201

        total = int(rate * seconds)
        started = time.perf_counter()
        async with asyncio.TaskGroup() as requests:
            for n in range(total):
                await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
                requests.create_task(create(f"lat{tag}n{n}", tokens[n % len(tokens)]))
            sending = time.perf_counter() - started  # the answers are still coming
        deadline = time.perf_counter() + 10
        while len(latencies) < total - failures and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    latencies.sort()
    answered.sort()
    return LatencyResult(
        events=LoadResult(
            rate=total / sending,
            p50_ms=percentile(latencies, 0.50) * 1000,
            p99_ms=percentile(latencies, 0.99) * 1000,
            requests=total,
            failures=total - len(latencies),  # failed POSTs and events that never came
        ),
        answers=LoadResult(
            rate=total / sending,
            p50_ms=percentile(answered, 0.50) * 1000,
            p99_ms=percentile(answered, 0.99) * 1000,
            requests=total,
            failures=failures,
        ),
    )


@contextlib.asynccontextmanager
async def backlog_sampler(database_url: str, interval: float = 1.0) -> AsyncIterator[list[int]]:
    """Count the pending outbox events every `interval` seconds while the block runs."""
    samples: list[int] = []
    conn = await asyncpg.connect(database_url)

    async def sample() -> None:
        while True:
            samples.append(await conn.fetchval(PENDING))
            await asyncio.sleep(interval)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await conn.close()


# How many partitions each relay's session holds (scenario 9 waits for fair shares first).
PARTITION_HOLDERS = """
SELECT count(*) AS partitions FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = $1::bigint::oid AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY pid
"""
PARTITIONS = "SELECT partitions FROM outbox_settings"
RELAY_BACKENDS = """
SELECT pid FROM pg_stat_activity
WHERE application_name = $1 AND datname = current_database()
"""
SETTLE_TIMEOUT_SECONDS = 30.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command may contain spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def broker_process(state_dir: Path) -> int | None:
    """The local RabbitMQ node's Erlang VM (deploy/dev/services.py keeps its files in
    `state_dir`), or None when the broker runs elsewhere."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"beam" in command and str(state_dir).encode() in command:
            return int(entry.name)
    return None


def _readable(pids: list[int]) -> bool:
    try:
        for pid in pids:
            cpu_seconds(pid)
    except (OSError, ValueError):
        return False
    return True


async def confirmed_events(http: aiohttp.ClientSession, port: int) -> int:
    """The events a relay has had confirmed so far, from its /metrics."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "conversations_events_published_total"
            and sample.labels["outcome"] == "confirmed"
        )
    )


@dataclass(frozen=True)
class SharedDrain:
    """N relays draining one backlog: the aggregate rate; CPU seconds per 1,000 events of all
    the relays together, and of each relay per 1,000 of the events it published; of the relays'
    database sessions and of the broker per 1,000 events (None: not readable here)."""

    relays: int
    rate: float
    relay_cpu_per_1k: float
    each_relay_cpu_per_1k: tuple[float, ...]
    database_cpu_per_1k: float | None
    broker_cpu_per_1k: float | None


async def _settled(conn: asyncpg.Connection, relays: int) -> None:
    """Until `relays` sessions hold the partitions in fair shares (the relays have rebalanced)."""
    count = await conn.fetchval(PARTITIONS)
    share = -(-count // relays)
    deadline = time.perf_counter() + SETTLE_TIMEOUT_SECONDS
    while True:
        held = [r["partitions"] for r in await conn.fetch(PARTITION_HOLDERS, PARTITION_LOCK_CLASS)]
        if len(held) == relays and sum(held) == count and max(held) <= share:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{relays} relays did not share the partitions: {held}")
        await asyncio.sleep(0.1)


async def shared_drain(
    database_url: str, count: int, relays: list[tuple[int, int]], broker_pid: int | None
) -> SharedDrain:
    """The relays (pid, HTTP port; running, idle) drain `count` events committed at once; the
    rate is timed on the database's clock, as in `relay_drain`, and CPU is read around it."""
    relay_pids = [pid for pid, _ in relays]
    conn = await asyncpg.connect(database_url)
    http = aiohttp.ClientSession()
    try:
        await _until_drained(conn)
        # Each run from the same start: an empty outbox without dead rows (and free event ids).
        await conn.execute("DELETE FROM outbox")
        await conn.execute("VACUUM outbox")
        await _settled(conn, len(relay_pids))
        backends = [
            r["pid"] for r in await conn.fetch(RELAY_BACKENDS, SESSION_SETTINGS["application_name"])
        ]
        database = backends if _readable(backends) else []
        broker = [broker_pid] if broker_pid is not None and _readable([broker_pid]) else []
        watched = [*relay_pids, *database, *broker]
        published = [await confirmed_events(http, port) for _, port in relays]
        before = [cpu_seconds(pid) for pid in watched]
        await conn.execute(FILL, PAYLOAD, count)
        committed = await conn.fetchval("SELECT clock_timestamp()")
        await _until_drained(conn)
        seconds = await conn.fetchval(
            "SELECT extract(epoch FROM max(published_at) - $1)::float8 FROM outbox", committed
        )
        used = [cpu_seconds(pid) - start for pid, start in zip(watched, before, strict=True)]
        published = [
            await confirmed_events(http, port) - earlier
            for (_, port), earlier in zip(relays, published, strict=True)
        ]
    finally:
        await http.close()
        await conn.close()
    n = len(relays)
    relay_cpu, database_cpu, broker_cpu = (
        used[:n],
        used[n : n + len(database)],
        used[n + len(database) :],
    )
    return SharedDrain(
        relays=n,
        rate=count / seconds,
        relay_cpu_per_1k=1000 * sum(relay_cpu) / count,
        each_relay_cpu_per_1k=tuple(
            1000 * cpu / max(1, events) for cpu, events in zip(relay_cpu, published, strict=True)
        ),
        database_cpu_per_1k=1000 * sum(database_cpu) / count if database else None,
        broker_cpu_per_1k=1000 * sum(broker_cpu) / count if broker else None,
    )
