"""Helpers for tests that need RabbitMQ: its URL and a subscriber that collects messages."""

import asyncio
import os

import aio_pika
import pytest

from service.events.broker import declare_topology


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
