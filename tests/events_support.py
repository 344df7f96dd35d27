"""Helpers for tests that need RabbitMQ: its URL, a subscriber that collects messages, and
relays run in the test's own event loop."""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import asyncpg
import pytest

from service.events.broker import Broker, declare_topology
from service.events.relay import Relay
from service.settings import Settings


def amqp_url() -> str:
    url = os.environ.get("AMQP_URL")
    if not url:
        pytest.exit("AMQP_URL is not set: run the tests with `make test`", returncode=2)
    return url


class Subscriber:
    """An exclusive queue bound to the test's exchange, collecting every message."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def start(self, exchange: str) -> None:
        self.connection = await aio_pika.connect_robust(amqp_url())
        channel = await self.connection.channel()
        topic = await declare_topology(channel, exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topic, routing_key="#")

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            await self.messages.put(message)

        await queue.consume(collect)

    async def receive(self, count: int, timeout: float = 20.0) -> list:
        """Exactly `count` messages (fails on a timeout)."""
        got = []
        async with asyncio.timeout(timeout):
            while len(got) < count:
                got.append(await self.messages.get())
        return got

    async def nothing_more(self, wait: float = 0.5) -> None:
        await asyncio.sleep(wait)
        assert self.messages.empty(), "an unexpected extra message arrived"


class RecordingBroker(Broker):
    """A broker that notes each confirmed publish: (relay name, partition, start, end, message
    id), from the start of its batch to the end of the batch's confirms (so a span contains the
    message's own)."""

    def __init__(self, url: str, exchange: str, log: list, name: str) -> None:
        super().__init__(url, exchange)
        self._log = log
        self._name = name

    async def publish_batch(self, messages, confirm_timeout) -> tuple[int, BaseException | None]:
        start = time.monotonic()
        confirmed, failure = await super().publish_batch(messages, confirm_timeout)
        end = time.monotonic()
        for message in messages[:confirmed]:
            properties = message.properties
            partition = properties.headers["partition"]
            self._log.append((self._name, partition, start, end, properties.message_id))
        return confirmed, failure


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, broker: Broker, **options
) -> AsyncIterator[tuple[Relay, asyncio.Task]]:
    """A relay publishing through `broker`, stopped (after its batch) at the end of the block."""
    stopping = asyncio.Event()
    await broker.connect(stopping)
    relay = Relay(settings.database_url, broker, settings.events, **options)
    task = asyncio.create_task(relay.run())
    try:
        yield relay, task
    finally:
        relay.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        await broker.close()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)


# The relay's session of this test's database, by what it last ran: $1, a pattern of it.
RELAY_SESSION_LAST_RAN = """
SELECT count(*) > 0 FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'conversations-relay'
  AND state = 'idle' AND query LIKE $1
"""


async def relay_last_ran(db: asyncpg.Connection, pattern: str) -> bool:
    """Whether a relay's session is idle, its last statement matching `pattern` (LIKE)."""
    await db.execute("SELECT pg_stat_clear_snapshot()")  # pg_stat_activity as of now
    return await db.fetchval(RELAY_SESSION_LAST_RAN, pattern)


async def pending_is(db: asyncpg.Connection, count: int) -> bool:
    """Whether the outbox has exactly `count` events not yet published."""
    return await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == count
