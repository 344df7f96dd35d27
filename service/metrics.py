"""Prometheus metrics: one registry per application, exposed at /metrics."""

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets for an API whose reads take about a millisecond and whose writes a few.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric the service exports; each process (and each test app) has its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_duration = Histogram(
            "http_server_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status.",
            ["method", "route", "status"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.db_pool_size = Gauge(
            "db_pool_connections", "Connections open in the database pool.", registry=r
        )
        self.db_pool_in_use = Gauge(
            "db_pool_connections_in_use", "Pool connections lent to a request now.", registry=r
        )
        self.db_pool_max = Gauge(
            "db_pool_connections_max", "The most connections the pool may open.", registry=r
        )
        self.outbox_pending = Gauge(
            "conversations_outbox_pending_events",
            "Events committed but not yet confirmed by RabbitMQ.",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "conversations_outbox_oldest_pending_age_seconds",
            "Age of the oldest event not yet confirmed by RabbitMQ (0 when none).",
            registry=r,
        )
        self.events_published = Counter(
            "conversations_events_published",
            "Events the relay tried to publish, by type and outcome (confirmed or failed).",
            ["type", "outcome"],
            registry=r,
        )
        self.publish_confirm_seconds = Histogram(
            "conversations_event_publish_confirm_seconds",
            "Time from publishing a batch of events to the broker's last confirm.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.outbox_partition_pending = Gauge(
            "conversations_outbox_partition_pending_events",
            "Events committed but not yet confirmed by RabbitMQ, by outbox partition.",
            ["partition"],
            registry=r,
        )
        self.outbox_partition_oldest_age = Gauge(
            "conversations_outbox_partition_oldest_pending_age_seconds",
            "Age of the partition's oldest event not yet confirmed (0 when none), by partition.",
            ["partition"],
            registry=r,
        )
        self.outbox_partitions = Gauge(
            "conversations_outbox_partitions",
            "P: the number of outbox partitions the relays share.",
            registry=r,
        )
        self.relay_leader = Gauge(
            "conversations_relay_leader",
            "1 while this process's relay holds at least one outbox partition, else 0.",
            registry=r,
        )
        self.relay_partitions = Gauge(
            "conversations_relay_partitions_owned",
            "Outbox partitions this process's relay holds now.",
            registry=r,
        )
        self.broker_connected = Gauge(
            "conversations_broker_connected", "1 while connected to RabbitMQ, else 0.", registry=r
        )
        self.rate_limit_store_up = Gauge(
            "conversations_rate_limit_store_up",
            "1 while the rate-limit store (Redis, or the in-process one) answers, else 0.",
            registry=r,
        )
        self.rate_limit_unchecked = Counter(
            "conversations_rate_limit_unchecked_requests",
            "Requests served without a rate-limit check because the store was unreachable.",
            registry=r,
        )

        self.jwks_fetches = Counter(
            "conversations_jwks_fetches",
            "Fetches of the JWKS signing keys, by outcome: ok, unreachable (network, timeout or "
            "HTTP status) or invalid (a document refused).",
            ["outcome"],
            registry=r,
        )
        self.jwks_keys = Gauge(
            "conversations_jwks_keys",
            "Signing keys cached from the JWKS sources (the last good document of each).",
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return prometheus_client.generate_latest(self.registry)
