"""RabbitMQ: the connection, the publishing channel with confirms, and the events topology."""

import asyncio
import logging
from collections.abc import Sequence
from typing import NamedTuple, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection

from service.backoff import first_set
from service.events import amqp_logs
from service.events.retry import Retry

log = logging.getLogger(__name__)

# What can go wrong talking to the broker; the relay backs off and retries on any of these.
BROKER_UNAVAILABLE = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.PublishError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aiormq raises it for a channel or connection closed under a publish
)


# How often the robust connection retries once an established connection is lost.
RECONNECT_INTERVAL_SECONDS = 1.0


class BrokerUnavailable(Exception):
    """No connection to RabbitMQ right now."""


class Outgoing(NamedTuple):
    """A message to publish: its routing key, body and AMQP properties."""

    routing_key: str
    body: bytes
    properties: aiormq.spec.Basic.Properties


async def declare_topology(channel: aio_pika.abc.AbstractChannel, name: str) -> AbstractExchange:
    """The events exchange (durable topic) and where unroutable events go instead of vanishing.

    `<name>.unrouted` is the exchange's alternate exchange, with a durable quorum queue of the
    same name bound to it: an event that no subscriber's binding matches waits there for an
    operator. Declaring is idempotent; it fails only if the names exist with other settings.
    """
    unrouted = await channel.declare_exchange(
        f"{name}.unrouted", aio_pika.ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(
        f"{name}.unrouted", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(unrouted)
    return await channel.declare_exchange(
        name,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": f"{name}.unrouted"},
    )


class Broker:
    """One robust connection and a confirming channel; publishes count only once confirmed."""

    def __init__(self, url: str, exchange: str, *, connection_name: str = "conversations") -> None:
        self._url = url
        self._exchange_name = exchange
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self.first_connected = asyncio.Event()
        # Counts the robust connection's reconnects; each one sets the event of its time.
        self.generation = 0
        self._reconnected = asyncio.Event()
        self._queueing = asyncio.Lock()  # publish_batch: calls queue their messages in turn

    @property
    def connected(self) -> bool:
        """Whether a publish could go out now."""
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def connect(self, stopping: asyncio.Event) -> None:
        """Connect and declare the topology, retrying with backoff until done or `stopping`.

        After the first success the robust connection reconnects (and re-declares) by itself.
        """
        amqp_logs.install()
        retry = Retry(log, stopping)
        while not stopping.is_set():
            try:
                connection = await aio_pika.connect_robust(
                    self._url,
                    client_properties={"connection_name": self._connection_name},
                    reconnect_interval=RECONNECT_INTERVAL_SECONDS,
                )
            except BROKER_UNAVAILABLE as error:
                await retry.wait("RabbitMQ unreachable", error)
                continue
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await declare_topology(channel, self._exchange_name)
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel  # type: ignore[assignment]
            connection.reconnect_callbacks.add(self._on_reconnect)
            self.first_connected.set()
            log.info("connected to RabbitMQ; exchange %r declared", self._exchange_name)
            return

    def _on_reconnect(self, *_: object) -> None:
        """The robust connection is back, its channel and topology restored."""
        log.info("reconnected to RabbitMQ")
        self.generation += 1
        self._reconnected.set()
        self._reconnected = asyncio.Event()

    async def reconnected_since(
        self, generation: int, stopping: asyncio.Event, seconds: float
    ) -> None:
        """Sleep `seconds`, or less: until the connection is re-established after `generation`
        (at once if it already was), or `stopping` is set."""
        if self.generation == generation:
            await first_set(self._reconnected, stopping, within=seconds)

    async def publish_batch(
        self, messages: Sequence[Outgoing], confirm_timeout: float
    ) -> tuple[int, BaseException | None]:
        """Publish `messages` in order, pipelined on the confirming channel, and wait for the
        broker's confirms, all within `confirm_timeout`. Return how many of them, from the
        first, the broker confirmed, and the first failure (None when it confirmed them all).

        Each is published `mandatory` on the events exchange: an event that cannot be routed
        fails. The publishes go through aio-pika's channel below its `Exchange.publish`: one
        deadline for the batch instead of a timer per message, and no writer round trip per
        message before the next one is queued (the order is kept: each takes the channel's
        next delivery tag as it queues its frames). Batches published by concurrent calls
        reach the broker in the order of the calls.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + confirm_timeout
        if self._channel is None or self._exchange is None:
            return 0, BrokerUnavailable("not connected to RabbitMQ yet")
        try:
            async with asyncio.timeout_at(deadline), self._queueing:
                # A robust channel waits here while reconnecting.
                channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                publishes = [
                    asyncio.ensure_future(
                        channel.basic_publish(
                            message.body,
                            exchange=self._exchange_name,
                            routing_key=message.routing_key,
                            properties=message.properties,
                            mandatory=True,
                            wait=False,
                        )
                    )
                    for message in messages
                ]
        except BROKER_UNAVAILABLE as error:
            return 0, error
        try:
            await asyncio.wait(publishes, timeout=max(0.0, deadline - loop.time()))
        finally:  # past the deadline, or this batch cancelled: no publish outlives it
            unconfirmed = [publish for publish in publishes if not publish.done()]
            for publish in unconfirmed:
                publish.cancel()
            await asyncio.gather(*unconfirmed, return_exceptions=True)
        # Every outcome is taken, also after the first failure: a publish's exception left
        # unread is logged as an ERROR ("Task exception was never retrieved") when collected.
        failures = [
            TimeoutError(f"not confirmed within {confirm_timeout:g}s")
            if publish.cancelled()
            else publish.exception()
            for publish in publishes
        ]
        for confirmed, failure in enumerate(failures):
            if failure is not None:
                return confirmed, failure
        return len(publishes), None

    async def close(self) -> None:
        """Close the connection (unconfirmed publishes fail and stay pending in the outbox)."""
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._exchange = None
