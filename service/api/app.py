"""The application factory: middlewares, routes and the resources' lifetimes."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Literal

import asyncpg
from aiohttp import web

from service.api import handlers, probes
from service.api.auth import TokenVerifier
from service.api.bodies import MAX_BODY_BYTES
from service.api.keys import (
    DB_POOL,
    EVENTS,
    LIFECYCLE,
    METRICS,
    OPENAPI_DOCUMENT,
    ROLE,
    SETTINGS,
    TOKEN_VERIFIER,
    Lifecycle,
)
from service.api.middleware import (
    auth_middleware,
    error_middleware,
    metrics_middleware,
    request_id_middleware,
)
from service.api.openapi import render_openapi
from service.conversations import housekeeping, idempotency
from service.errors import DATABASE_UNAVAILABLE
from service.events.runtime import events_running
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class PooledConnection(asyncpg.Connection):
    """A pool connection released without asyncpg's reset query (one round trip saved per request).

    The reset undoes session state: SET, LISTEN, advisory locks, cursors. Code on pool
    connections creates none of these: the repository runs plain statements in transactions,
    and the relay and the migrations LISTEN and lock on connections of their own. asyncpg still
    rolls back a transaction left open. tests/test_pool.py checks that requests leave no state.
    """

    def get_reset_query(self) -> str:
        return ""


async def database_pool(app: web.Application) -> AsyncIterator[None]:
    """The asyncpg pool, open for the application's lifetime.

    If PostgreSQL is down at start-up the service still starts, with a pool that connects on
    demand: requests get 503 and /readyz fails until the database is back, then all recovers.
    """
    settings = app[SETTINGS]

    def create_pool(min_size: int) -> asyncpg.Pool:
        return asyncpg.create_pool(
            settings.database_url,
            connection_class=PooledConnection,
            min_size=min_size,
            max_size=settings.db_pool_max,
            # Bound every statement: a stuck query must not hold a request (and a connection).
            server_settings={"statement_timeout": str(settings.db_statement_timeout_ms)},
        )

    try:
        pool = await create_pool(settings.db_pool_min)
    except DATABASE_UNAVAILABLE as error:
        log.warning(
            "PostgreSQL unreachable at start-up (%s); connecting on demand", type(error).__name__
        )
        pool = await create_pool(0)
    app[DB_POOL] = pool
    yield
    await pool.close()


async def events(app: web.Application) -> AsyncIterator[None]:
    """RabbitMQ (topology declared at start-up) and the relay where this process runs one."""
    settings = app[SETTINGS]
    relay = app[ROLE] == "relay" or settings.events.relay_enabled
    async with events_running(settings, relay=relay, metrics=app[METRICS]) as running:
        app[EVENTS] = running
        yield


async def housekeeping_jobs(app: web.Application) -> AsyncIterator[None]:
    """Removal of expired rows (idempotency keys), one process of all replicas at a time."""
    task = asyncio.create_task(
        housekeeping.run_periodically(app[DB_POOL], [idempotency.EXPIRED_KEYS])
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def stop_being_ready(app: web.Application) -> None:
    """First thing on SIGTERM: /readyz fails, so no new traffic is routed here."""
    app[LIFECYCLE].stopping = True


def create_app(settings: Settings, *, role: Literal["api", "relay"] = "api") -> web.Application:
    """The service for `settings`; `web.run_app` serves it.

    `api` serves /v1/conversations (and runs the relay too unless RELAY_ENABLED=false);
    `relay` runs the relay and serves only the probes and /metrics.
    """
    app = web.Application(
        middlewares=[metrics_middleware, request_id_middleware, error_middleware, auth_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    app[ROLE] = role
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics()
    app[TOKEN_VERIFIER] = TokenVerifier(settings.auth)
    app[OPENAPI_DOCUMENT] = render_openapi()
    app.cleanup_ctx.append(database_pool)
    app.cleanup_ctx.append(events)
    app.on_shutdown.append(stop_being_ready)

    app.router.add_get("/healthz", probes.healthz)
    app.router.add_get("/readyz", probes.readyz)
    app.router.add_get("/metrics", probes.metrics)
    if role == "relay":
        return app
    app.cleanup_ctx.append(housekeeping_jobs)
    app.router.add_get("/openapi.json", probes.openapi_document)
    app.router.add_get("/v1/conversations", handlers.list_conversations)
    app.router.add_post("/v1/conversations", handlers.create_conversation)
    item = app.router.add_resource("/v1/conversations/{id}", name="conversation")
    item.add_route("GET", handlers.retrieve_conversation)
    item.add_route("HEAD", handlers.retrieve_conversation)
    item.add_route("PUT", handlers.update_conversation)
    item.add_route("PATCH", handlers.update_conversation)
    item.add_route("DELETE", handlers.delete_conversation)
    return app
