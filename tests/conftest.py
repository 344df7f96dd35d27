"""Fixtures: a real PostgreSQL (the server `make test` starts), a migrated template database
cloned into a fresh database per test, the app under pytest-aiohttp, and token helpers."""

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service.api.app import create_app
from service.api.auth import mint_token
from service.api.server import ServiceRunner
from service.migrations import migrate
from service.settings import AuthSettings, EventSettings, RateLimitSettings, Settings
from tests.events_support import Subscriber, amqp_url
from tests.proxy import free_port

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnop"
ALL_SCOPES = ["conversations:read", "conversations:write"]


def _server_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        pytest.exit("DATABASE_URL is not set: run the tests with `make test`", returncode=2)
    return url


def database_url(name: str) -> str:
    """The test server's URL for database `name`."""
    parts = urlsplit(_server_url())
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(_server_url())
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A database migrated from empty once per run: every test's database is a copy of it."""
    name = f"conversations_template_{os.getpid()}"

    async def create() -> None:
        await _admin(f'DROP DATABASE IF EXISTS "{name}"')
        await _admin(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(database_url(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A new, empty database's URL (for the migration tests)."""
    name = f"conversations_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    yield database_url(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db_url(template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    name = f"conversations_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield database_url(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_auth_settings() -> AuthSettings:
    """The tests' token settings: one HS256 secret, no audience or issuer, no leeway."""
    return AuthSettings(
        hs256_secrets=(TEST_SECRET,),
        public_keys_pem=(),
        audience=None,
        issuer=None,
        leeway_seconds=0,
    )


@pytest.fixture
def auth_settings() -> AuthSettings:
    return make_auth_settings()


@pytest.fixture
def settings(db_url: str, auth_settings: AuthSettings) -> Settings:
    return make_settings(db_url, auth_settings)


def make_settings(db_url: str, auth_settings: AuthSettings) -> Settings:
    """The tests' settings for the database at `db_url`."""
    return Settings(
        database_url=db_url,
        host="127.0.0.1",
        port=0,
        db_pool_min=1,
        db_pool_max=10,
        db_statement_timeout_ms=5000,
        error_docs_url="https://docs.example.test/errors",
        log_level="INFO",
        log_format="console",
        shutdown_timeout_seconds=5,
        workers=1,
        relay_http_port=0,
        metrics_token=None,
        sync_retention_days=30,
        auth=auth_settings,
        events=EventSettings(
            amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/"),
            # One exchange for the HTTP tests (declared, never published to); the event tests
            # use their own, so that they see only their own events.
            exchange="conversations_test",
            # The relay runs only in the event tests; elsewhere events wait in the outbox.
            relay_enabled=False,
            relay_batch_size=100,
            relay_poll_interval_seconds=0.2,
            relay_linger_seconds=0.003,
            outbox_retention_hours=72,
        ),
        # The defaults, in-process: no test outside tests/test_rate_limits.py comes near them.
        rate_limits=RateLimitSettings(reads=6000, writes=1200, window_seconds=60, redis_url=None),
    )


@pytest.fixture
async def client(settings: Settings, aiohttp_client: Callable) -> TestClient:
    """The app, served on a loopback port, with a test client.

    `settings` comes first so that its database outlives the app (teardown runs in reverse).
    """
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to this test's database, to look behind the API."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture
def make_token(auth_settings: AuthSettings) -> Callable[..., str]:
    def make(account: str, scopes: list[str] | None = None, ttl: int = 600) -> str:
        return mint_token(auth_settings, account, ALL_SCOPES if scopes is None else scopes, ttl)

    return make


@pytest.fixture
def account() -> str:
    return f"acct_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def headers(make_token: Callable[..., str], account: str) -> dict[str, str]:
    """Authorization for `account` with read and write scopes."""
    return {"Authorization": f"Bearer {make_token(account)}"}


# --- RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture
async def exchange() -> AsyncIterator[str]:
    """An exchange of this test's own; removed, with its unrouted queue, afterwards."""
    name = f"conversations_test_{uuid.uuid4().hex[:10]}"
    yield name
    connection = await aio_pika.connect_robust(amqp_url())
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)
        await channel.exchange_delete(f"{name}.unrouted")
        await channel.queue_delete(f"{name}.unrouted")


@pytest.fixture
async def subscriber(exchange: str) -> AsyncIterator[Subscriber]:
    sub = Subscriber()
    await sub.start(exchange)
    yield sub
    await sub.connection.close()


@pytest.fixture
def event_settings(settings, exchange):
    """The test settings with the relay on, publishing to the test's exchange."""
    events = dataclasses.replace(
        settings.events, amqp_url=amqp_url(), exchange=exchange, relay_enabled=True
    )
    return dataclasses.replace(settings, events=events)


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[str]:
    """The app as `conversations serve` serves it (its runner and connection protocol), on a free
    loopback port: what aiohttp's parser refuses never reaches the test client's server."""
    runner = ServiceRunner(create_app(settings), shutdown_timeout=5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()
