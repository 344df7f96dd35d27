"""The event side of a process: the broker connection and, where enabled, the outbox relay."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.events.broker import Broker
from service.events.relay import Relay
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

# How long shutdown waits for the relay's batch in hand before cancelling it (rows stay pending).
RELAY_STOP_TIMEOUT_SECONDS = 15.0
BROKER_CONNECT_WAIT_SECONDS = 5.0


@dataclass
class Events:
    """What runs: the broker (always: it declares the topology) and the relay (if enabled)."""

    broker: Broker
    relay: Relay | None
    relay_task: asyncio.Task[None] | None


@contextlib.asynccontextmanager
async def events_running(
    settings: Settings, *, relay: bool, metrics: Metrics | None = None
) -> AsyncIterator[Events]:
    """Connect to RabbitMQ in the background (never blocking start-up on it), run the relay if
    asked, and on exit stop the relay after its current batch, then close the connection."""
    stopping = asyncio.Event()
    broker = Broker(settings.events.amqp_url, settings.events.exchange)
    connecting = asyncio.create_task(broker.connect(stopping), name="broker-connect")
    running = Relay(settings.database_url, broker, settings.events, metrics) if relay else None
    relay_task = asyncio.create_task(running.run(), name="relay") if running else None
    try:
        yield Events(broker, running, relay_task)
    finally:
        stopping.set()
        if running is not None and relay_task is not None:
            running.stop()
            try:
                await asyncio.wait_for(relay_task, RELAY_STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning(
                    "relay did not stop in %ss; its unconfirmed rows stay pending",
                    RELAY_STOP_TIMEOUT_SECONDS,
                )
        # A connect cut short by cancelling leaks aio-pika's tasks: let an attempt under way end.
        try:
            await asyncio.wait_for(asyncio.shield(connecting), BROKER_CONNECT_WAIT_SECONDS)
        except TimeoutError:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        await broker.close()
