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
from service.errors import DATABASE_UNAVAILABLE, ApiError
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
    except (*DATABASE_UNAVAILABLE, asyncpg.PostgresError):
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
                else ("active" if relay.is_leader else "standby"),
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
        registry.relay_leader.set(1 if events.relay.is_leader else 0)
        with contextlib.suppress(*DATABASE_UNAVAILABLE, asyncpg.PostgresError):
            async with asyncio.timeout(READINESS_TIMEOUT_SECONDS), pool.acquire() as conn:
                backlog = await conn.fetchrow(OUTBOX_BACKLOG)
            registry.outbox_pending.set(backlog["pending"])
            registry.outbox_oldest_age.set(backlog["oldest_age"])
    return web.Response(body=registry.render(), content_type="text/plain", charset="utf-8")


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json: the document generated from the schemas."""
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")
