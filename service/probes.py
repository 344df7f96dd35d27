"""Operational endpoints: liveness, readiness and the OpenAPI document. No token needed."""

import asyncio

from aiohttp import web

from service.errors import ApiError
from service.handlers import json_response
from service.keys import DB_POOL, OPENAPI_DOCUMENT
from service.migrations import pending_migrations

# A readiness probe must answer before the kubelet's own timeout, even with the database hung.
READINESS_TIMEOUT_SECONDS = 2.0


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never looks at a dependency."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: PostgreSQL answers and every shipped migration is applied."""
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            async with request.app[DB_POOL].acquire() as conn:
                pending = await pending_migrations(conn)
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
    return json_response({"status": "ready", "checks": {"database": "ok", "migrations": "ok"}})


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json: the document generated from the schemas."""
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")
