"""From the outbox table to RabbitMQ and to subscribers: the relay, the broker connection and
topology, the in-process runtime that `serve` starts, `events tail`, and the AsyncAPI document.
Reads the outbox table only; imports nothing from `service.api` or `service.conversations`."""
