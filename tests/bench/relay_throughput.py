"""Relay throughput vs a raw aio-pika publisher, measured in the same run on the same broker.

    python -m tests.bench.relay_throughput [--events N]

Needs DATABASE_URL (a server where it may create and drop a database) and AMQP_URL, as
`make env` prints them. Both sides publish persistent messages with batched publisher confirms
to a durable topic exchange bound to one durable queue, so the broker writes every message.
"""

import argparse
import asyncio
import os
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import uvloop

from service.broker import Broker, declare_topology
from service.migrations import migrate
from service.relay import Relay
from service.settings import EventSettings

BATCH = 500
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


def _database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def raw_publisher(amqp_url: str, exchange_name: str, count: int) -> float:
    """Messages/s of a bare aio-pika publisher: batches of BATCH, confirms awaited per batch."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_topology(channel, exchange_name)
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


async def relay_drain(database_url: str, amqp_url: str, exchange: str, count: int) -> float:
    """Messages/s of the relay draining a pre-filled outbox of `count` events."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(FILL, PAYLOAD, count)
        settings = EventSettings(amqp_url, exchange, True, BATCH, 1.0, 72.0)
        broker = Broker(amqp_url, exchange)
        await broker.connect(asyncio.Event())
        relay = Relay(database_url, broker, settings)
        started = time.perf_counter()
        task = asyncio.create_task(relay.run())
        while relay.published < count:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        relay.stop()
        await task
        await broker.close()
        return count / elapsed
    finally:
        await conn.close()


async def main(count: int) -> None:
    server_url, amqp_url = os.environ["DATABASE_URL"], os.environ["AMQP_URL"]
    name = f"conversations_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    exchange = f"conversations_bench_{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    topic = await declare_topology(channel, exchange)
    queue = await channel.declare_queue(f"{exchange}.sink", durable=True)
    await queue.bind(topic, routing_key="#")
    try:
        conn = await asyncpg.connect(_database(server_url, name))
        await migrate(conn)
        await conn.close()
        raw = await raw_publisher(amqp_url, exchange, count)
        await queue.purge()
        relayed = await relay_drain(_database(server_url, name), amqp_url, exchange, count)
        print(f"events: {count}")
        print(f"raw aio-pika publisher (batched confirms): {raw:,.0f} msg/s")
        print(f"relay (outbox -> RabbitMQ, marked published): {relayed:,.0f} msg/s")
        print(f"ratio relay / raw: {relayed / raw:.2f}")
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await channel.exchange_delete(exchange)
        await channel.exchange_delete(f"{exchange}.unrouted")
        await channel.queue_delete(f"{exchange}.unrouted")
        await connection.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    uvloop.run(main(parser.parse_args().events))
