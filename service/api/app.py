"""The application factory: middlewares, routes and the resources' lifetimes."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import asyncpg
from aiohttp import web

from service import tracing
from service.api import handlers, openapi, probes
from service.api.auth import TokenVerifier
from service.api.bodies import MAX_BODY_BYTES
from service.api.keys import (
    DB_POOL,
    DEPENDENCY_LOG,
    EVENTS,
    LIFECYCLE,
    METRICS,
    OPENAPI_DOCUMENT,
    RATE_LIMITER,
    ROLE,
    SETTINGS,
    TOKEN_VERIFIER,
    Lifecycle,
)
from service.api.middleware import (
    add_rate_limit_headers,
    auth_middleware,
    error_middleware,
    metrics_middleware,
    rate_limit_middleware,
    request_id_middleware,
    scope_middleware,
)
from service.api.ratelimit import RateLimiter
from service.api.routes import API_PREFIX, add_routes
from service.api.tracing import server_span_middleware
from service.conversations import housekeeping, idempotency, repository, sync
from service.errors import DATABASE_UNAVAILABLE, DatabaseUnreachable
from service.events.runtime import events_running
from service.logs import Throttle
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

# During an outage every request fails alike: one "database unavailable" line per type of
# failure this often, counting the ones held back, instead of one per request.
DEPENDENCY_LOG_INTERVAL_SECONDS = 10.0


class PooledConnection(asyncpg.Connection):
    """A pool connection released without asyncpg's reset query (one round trip saved per request).

    The reset undoes session state: SET, LISTEN, advisory locks, cursors. Code on pool
    connections creates none of these: the repository runs plain statements in transactions,
    and the relay and the migrations LISTEN and lock on connections of their own. asyncpg still
    rolls back a transaction left open. tests/test_pool.py checks that requests leave no state.
    """

    def get_reset_query(self) -> str:
        return ""


async def _connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """`asyncpg.connect` for the pool; failing to reach the server is `DatabaseUnreachable`."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except (OSError, TimeoutError) as error:
        raise DatabaseUnreachable(type(error).__name__) from error


async def tracing_provider(app: web.Application) -> AsyncIterator[None]:
    """OpenTelemetry tracing, set up in this process (each worker, after the fork); at the end
    the spans still batched are exported, for a few seconds at most."""
    provider = tracing.start(app[SETTINGS].tracing, sql=app[ROLE] == "api")
    yield
    await tracing.stop_within(provider)


async def database_pool(app: web.Application) -> AsyncIterator[None]:
    """The asyncpg pool, open for the application's lifetime.

    If PostgreSQL is down at start-up the service still starts, with a pool that connects on
    demand: requests get 503 and /readyz fails until the database is back, then all recovers.
    """
    settings = app[SETTINGS]

    def create_pool(min_size: int) -> asyncpg.Pool:
        return asyncpg.create_pool(
            settings.database_url,
            connect=_connect,
            connection_class=PooledConnection,
            min_size=min_size,
            max_size=settings.db_pool_max,
            init=repository.init_connection,
            server_settings={
                # Bound every statement: a stuck query must not hold a request (and a connection).
                "statement_timeout": str(settings.db_statement_timeout_ms),
                # A session whose client is gone (the service answered 503 when its connection
                # dropped) is ended while its statement waits, e.g. on a row lock, instead of
                # committing a write nobody was told about.
                "client_connection_check_interval": "1000",
            },
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


async def housekeeping_task(app: web.Application) -> AsyncIterator[None]:
    """Rows past their retention (sync tombstones, idempotency keys, published outbox rows)
    removed every minute or so, in bounded batches, by one process of all replicas at a time (a
    PostgreSQL advisory lock). Every `serve` process runs it, with or without its relay."""
    settings = app[SETTINGS]
    cleanups = [
        sync.expired_tombstones(settings.sync_retention_seconds),
        idempotency.EXPIRED_KEYS,
        housekeeping.published_outbox_rows(settings.events.outbox_retention_hours * 3600),
    ]
    task = asyncio.create_task(housekeeping.run_periodically(app[DB_POOL], cleanups))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def rate_limits(app: web.Application) -> AsyncIterator[None]:
    """The per-account budgets: in Redis when RATE_LIMIT_REDIS_URL is set, else in-process."""
    limiter = RateLimiter(app[SETTINGS].rate_limits, app[METRICS])
    app[RATE_LIMITER] = limiter
    yield
    await limiter.close()


async def signing_keys(app: web.Application) -> AsyncIterator[None]:
    """The JWKS signing keys: a first fetch started at start-up (not awaited: a provider that is
    down must not keep the service from starting), refreshed from then on by the verifier."""
    jwks = app[TOKEN_VERIFIER].jwks
    if jwks is None:
        yield
        return
    await jwks.start()
    yield
    await jwks.close()


async def stop_being_ready(app: web.Application) -> None:
    """First thing on SIGTERM: /readyz fails, so no new traffic is routed here."""
    app[LIFECYCLE].stopping = True


def create_app(settings: Settings, *, role: Literal["api", "relay"] = "api") -> web.Application:
    """The service for `settings`; `service.api.server.run` serves it.

    `api` serves /v1/conversations (and runs the relay too unless RELAY_ENABLED=false);
    `relay` runs the relay and serves only the probes and /metrics.

    The routes come from the operations the handlers declare (`routes.py`). The root
    application's middlewares apply to every request, unknown paths' 404s and 405s included;
    /v1 is a sub-application whose own middlewares run inside them. The shared state and the
    resources' lifetimes are the root's.
    """
    app = web.Application(
        middlewares=[metrics_middleware, request_id_middleware, error_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    app[ROLE] = role
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics()
    app[DEPENDENCY_LOG] = Throttle(DEPENDENCY_LOG_INTERVAL_SECONDS)
    app[TOKEN_VERIFIER] = TokenVerifier(settings.auth, metrics=app[METRICS])
    if settings.tracing.enabled:  # else no provider, no instrumentation, no middleware
        app.middlewares.insert(0, server_span_middleware)
        app.cleanup_ctx.append(tracing_provider)
    app.cleanup_ctx.append(database_pool)
    app.cleanup_ctx.append(events)
    if role == "api":
        app.cleanup_ctx.append(housekeeping_task)
    app.on_shutdown.append(stop_being_ready)

    add_routes(app.router, probes.routes)
    if role == "relay":
        return app
    app.cleanup_ctx.append(rate_limits)
    app.cleanup_ctx.append(signing_keys)  # only here: the relay role verifies no token
    app[OPENAPI_DOCUMENT] = openapi.render_openapi()
    add_routes(app.router, openapi.routes)
    app.add_subapp(API_PREFIX, api_application())
    return app


def api_application() -> web.Application:
    """The /v1 sub-application: every request needs a token (401), draws on its account's
    budget (429) and needs the scope of its method (403), in that order."""
    api = web.Application(middlewares=[auth_middleware, rate_limit_middleware, scope_middleware])
    # Routes and hooks first: mounting freezes them, and prefixes the routes with API_PREFIX.
    add_routes(api.router, handlers.routes, prefix=API_PREFIX)
    api.on_response_prepare.append(add_rate_limit_headers)
    return api
