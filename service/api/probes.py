"""Operational endpoints: liveness, readiness, metrics and the OpenAPI document."""

import asyncio
import contextlib
import hmac

import asyncpg
from aiohttp import web

from service.api.handlers import json_response
from service.api.keys import (
    DB_POOL,
    EVENTS,
    LIFECYCLE,
    METRICS,
    OPENAPI_DOCUMENT,
    RATE_LIMITER,
    SETTINGS,
)
from service.errors import DATABASE_SESSION_FAILURES, ApiError
from service.metrics import Metrics
from service.migrations import pending_migrations

# A readiness probe must answer before the kubelet's own timeout, even with the database hung.
READINESS_TIMEOUT_SECONDS = 2.0
# The backlog is counted row by row (about 0.1 s per million pending here): after a long broker
# outage that could outlast the probe, and a report must never make the pod unready.
BACKLOG_TIMEOUT_SECONDS = 0.5


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never looks at a dependency."""
    return json_response({"status": "ok"})


OUTBOX_BACKLOG = """
SELECT count(*) AS pending,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age
FROM outbox WHERE published_at IS NULL
"""

# The same per partition, every partition listed (0 when it has nothing pending).
PARTITION_BACKLOG = """
WITH pending AS (
    SELECT partition, count(*) AS pending, min(created_at) AS oldest
    FROM outbox WHERE published_at IS NULL
    GROUP BY partition
)
SELECT p AS partition, coalesce(pending.pending, 0) AS pending,
       coalesce(extract(epoch FROM now() - pending.oldest), 0)::float8 AS oldest_age
FROM outbox_settings AS s
CROSS JOIN generate_series(0, s.partitions - 1) AS p
LEFT JOIN pending ON pending.partition = p
ORDER BY p
"""


async def readyz(request: web.Request) -> web.Response:
    """Readiness: PostgreSQL answers and every shipped migration is applied.

    The broker, the relay, the outbox backlog and the rate-limit store are reported, never
    required: while RabbitMQ is down the API keeps taking writes, and their events wait in the
    outbox; while Redis is down requests are served without limits.
    """
    if request.app[LIFECYCLE].stopping:
        raise ApiError(503, "Not ready: shutting down.", headers={"Retry-After": "5"})
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            async with request.app[DB_POOL].acquire() as conn:
                pending = await pending_migrations(conn)
                backlog = None if pending else await _outbox_backlog(conn)
    except DATABASE_SESSION_FAILURES:
        raise ApiError(
            503,
            "Not ready: PostgreSQL is unreachable.",
            errors={"database": ["unreachable"]},
            headers={"Retry-After": "5"},
        ) from None
    if pending:
        raise ApiError(
            503,
            "Not ready: migrations are pending; run `conversations migrate`.",
            errors={"migrations": [f"pending: {version}" for version in pending]},
            headers={"Retry-After": "5"},
        )
    events = request.app[EVENTS]
    relay = events.relay
    return json_response(
        {
            "status": "ready",
            "checks": {
                "database": "ok",
                "migrations": "ok",
                "broker": "connected" if events.broker.connected else "disconnected",
                "relay": "disabled"
                if relay is None
                else ("active" if relay.is_active else "standby"),
                "relay_partitions": None if relay is None else list(relay.partitions),
                "outbox": backlog,
                "rate_limits": await _rate_limits(request),
            },
        }
    )


async def _outbox_backlog(conn: asyncpg.Connection) -> dict[str, float | None]:
    """The pending events and the oldest one's age; both None if counting takes too long."""
    try:
        row = await conn.fetchrow(OUTBOX_BACKLOG, timeout=BACKLOG_TIMEOUT_SECONDS)
    except TimeoutError:  # asyncpg has cancelled the query on the server
        return {"pending": None, "oldest_pending_age_seconds": None}
    return {"pending": row["pending"], "oldest_pending_age_seconds": round(row["oldest_age"], 3)}


async def _rate_limits(request: web.Request) -> str:
    limiter = request.app.get(RATE_LIMITER)
    if limiter is None or not limiter.enabled:
        return "off"
    if not limiter.shared:
        return "in-process"
    return "connected" if await limiter.store_reachable() else "disconnected"


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format; the gauges are read now, at scrape time."""
    token = request.app[SETTINGS].metrics_token
    if token is not None and not hmac.compare_digest(
        request.headers.get("Authorization", ""), f"Bearer {token}"
    ):
        raise ApiError(
            401, "A bearer token is required for /metrics.", headers={"WWW-Authenticate": "Bearer"}
        )
    registry = request.app[METRICS]
    pool = request.app[DB_POOL]
    registry.db_pool_size.set(pool.get_size())
    registry.db_pool_in_use.set(pool.get_size() - pool.get_idle_size())
    registry.db_pool_max.set(pool.get_max_size())
    events = request.app[EVENTS]
    registry.broker_connected.set(1 if events.broker.connected else 0)
    if events.relay is not None:  # the outbox is the relay's business: API replicas skip the query
        registry.relay_leader.set(1 if events.relay.is_active else 0)
        registry.relay_partitions.set(len(events.relay.partitions))
        with contextlib.suppress(*DATABASE_SESSION_FAILURES):
            async with asyncio.timeout(READINESS_TIMEOUT_SECONDS), pool.acquire() as conn:
                partitions = await conn.fetch(PARTITION_BACKLOG)
            _set_backlog(registry, partitions)
    return web.Response(body=registry.render(), content_type="text/plain", charset="utf-8")


def _set_backlog(registry: Metrics, partitions: list[asyncpg.Record]) -> None:
    """The backlog gauges: per partition, and the totals (the sum, and the oldest of all)."""
    registry.outbox_partitions.set(len(partitions))
    registry.outbox_partition_pending.clear()  # P may have been lowered: no stale partitions
    registry.outbox_partition_oldest_age.clear()
    for row in partitions:
        label = str(row["partition"])
        registry.outbox_partition_pending.labels(label).set(row["pending"])
        registry.outbox_partition_oldest_age.labels(label).set(row["oldest_age"])
    registry.outbox_pending.set(sum(row["pending"] for row in partitions))
    registry.outbox_oldest_age.set(max((row["oldest_age"] for row in partitions), default=0))


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json: the document generated from the schemas."""
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")
