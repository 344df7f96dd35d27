"""Operational endpoints: liveness, readiness and the OpenAPI document. No token needed."""

import asyncio

from aiohttp import web

from service.errors import ApiError
from service.handlers import json_response
from service.keys import DB_POOL, EVENTS, OPENAPI_DOCUMENT
from service.migrations import pending_migrations

# A readiness probe must answer before the kubelet's own timeout, even with the database hung.
READINESS_TIMEOUT_SECONDS = 2.0


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

    The broker, the relay and the outbox backlog are reported, never required: while RabbitMQ
    is down the API keeps taking writes, and their events wait in the outbox.
    """
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            async with request.app[DB_POOL].acquire() as conn:
                pending = await pending_migrations(conn)
                backlog = None if pending else await conn.fetchrow(OUTBOX_BACKLOG)
    except (OSError, TimeoutError, Exception):  # any failure means "not ready"
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
                "outbox": {
                    "pending": backlog["pending"],
                    "oldest_pending_age_seconds": round(backlog["oldest_age"], 3),
                },
            },
        }
    )


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json: the document generated from the schemas."""
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")
