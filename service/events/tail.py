"""`conversations events tail`: a throwaway subscriber that prints events as they arrive."""

import asyncio
import sys
from typing import TextIO

import aio_pika

from service.events.broker import declare_topology


async def tail(
    amqp_url: str,
    exchange_name: str,
    types: list[str],
    *,
    count: int | None = None,
    out: TextIO = sys.stdout,
    bound: asyncio.Event | None = None,
) -> int:
    """Bind an exclusive, auto-deleted queue to the events exchange and print each event's body
    on one line; stop after `count` events if given. Returns how many were printed.

    `bound` is set once the queue is bound: events committed after that are all seen.
    """
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": "conversations events tail"}
    )
    printed = 0
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, exchange_name)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for routing_key in types or ["#"]:
            await queue.bind(exchange, routing_key=routing_key)
        print(f"# bound to {exchange_name!r} for {', '.join(types or ['#'])}", file=sys.stderr)
        if bound is not None:
            bound.set()
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    out.write(message.body.decode() + "\n")
                    out.flush()
                printed += 1
                if count is not None and printed >= count:
                    break
    finally:
        await connection.close()
    return printed
