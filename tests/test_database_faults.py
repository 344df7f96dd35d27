"""PostgreSQL going away: the service answers 503 (never 500, never a hang), loses no committed
write, and recovers by itself when the database returns."""

import asyncio
import dataclasses
import logging
import time
from urllib.parse import urlsplit

import asyncpg
import pytest

from service.api.app import create_app
from service.backoff import Backoff
from service.errors import DatabaseUnreachable, database_unavailable
from service.events.broker import Broker
from tests.error_bodies import error_body
from tests.events_support import amqp_url, running_relay, wait_until
from tests.proxy import TcpProxy, free_port, via_port


@pytest.fixture
async def proxy(db_url):
    parts = urlsplit(db_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    if proxy.running:
        await proxy.cut()


@pytest.fixture
async def proxied_client(aiohttp_client, settings, proxy):
    """The service with its database reached through `proxy`, which a test can cut."""
    proxied = dataclasses.replace(
        settings, database_url=via_port(settings.database_url, proxy.port)
    )
    return await aiohttp_client(create_app(proxied))


async def test_the_service_starts_and_answers_503_while_the_database_is_down(
    aiohttp_client, settings, headers
):
    down = dataclasses.replace(settings, database_url=via_port(settings.database_url, free_port()))
    client = await aiohttp_client(create_app(down))
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["type"] == "api_error"
    for method, body in (("GET", None), ("POST", {"contact_id": "c1"})):
        resp = await client.request(method, "/v1/conversations", json=body, headers=headers)
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        payload = await resp.json()
        assert payload["type"] == "api_error"
        assert "asyncpg" not in str(payload)
        assert "Traceback" not in str(payload)


async def test_a_database_outage_is_503_then_recovers_with_nothing_lost(
    proxied_client, headers, proxy, db
):
    client = proxied_client
    resp = await client.post("/v1/conversations", json={"contact_id": "before"}, headers=headers)
    assert resp.status == 201
    before = await resp.json()

    await proxy.cut()
    for _ in range(3):  # pooled connections are dead and new ones are refused
        resp = await client.post(
            "/v1/conversations", json={"contact_id": "during"}, headers=headers
        )
        assert resp.status == 503
    assert (await client.get("/readyz")).status == 503

    await proxy.start()
    resp = await client.post("/v1/conversations", json={"contact_id": "after"}, headers=headers)
    assert resp.status == 201
    assert (await client.get("/readyz")).status == 200
    rows = await db.fetch("SELECT contact_id FROM conversations ORDER BY id")
    assert [r["contact_id"] for r in rows] == ["before", "after"]
    resp = await client.get(f"/v1/conversations/{before['id']}", headers=headers)
    assert await resp.json() == before
    assert await db.fetchval("SELECT count(*) FROM outbox") == 2


async def sessions(db, query: str, *args: object) -> int | None:
    """`query` on pg_stat_activity as of now: inside a transaction it would keep showing the
    first snapshot taken."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    return await db.fetchval(query, *args)


async def gone(db, pid: int) -> bool:
    return not await sessions(db, ALIVE, pid)


LOCK_WAITER = (
    "SELECT pid FROM pg_stat_activity"
    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
)
ALIVE = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"


async def update_waiting_on_a_row_lock(client, headers, db):
    """A conversation, a transaction of `db` holding its row, and a PATCH of it from `client`
    that waits inside PostgreSQL for that lock: (the conversation, the holding transaction, the
    PATCH's task, the pid of the waiting session)."""
    resp = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    assert resp.status == 201
    created = await resp.json()
    lock = db.transaction()
    await lock.start()
    await db.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", created["id"])
    item = f"/v1/conversations/{created['id']}"
    update = asyncio.create_task(client.patch(item, json={"is_muted": True}, headers=headers))
    async with asyncio.timeout(30):  # a safety bound, not a timing assertion
        while not (pid := await sessions(db, LOCK_WAITER)):
            await asyncio.sleep(0.02)
    return created, lock, update, pid


async def test_a_write_cut_off_by_the_database_going_away_is_503_and_never_commits(
    proxied_client, headers, proxy, db
):
    # Hold the row so that the update waits inside PostgreSQL when its connection drops.
    created, lock, update, pid = await update_waiting_on_a_row_lock(proxied_client, headers, db)
    await proxy.cut()
    resp = await update
    body = await error_body(resp, 503, "api_error")
    assert resp.headers["Retry-After"] == "1"
    assert body["message"] == "The service is unavailable; retry shortly."

    # The abandoned session ends while it still waits; only then is the row let go, so a
    # session that lived on would commit the update now, after its caller was told 503.
    await wait_until(lambda: gone(db, pid), timeout=30)
    await lock.rollback()
    row = await db.fetchrow(
        "SELECT is_muted, version FROM conversations WHERE id = $1", created["id"]
    )
    assert (row["is_muted"], row["version"]) == (False, 1)
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1  # the create's event alone


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InternalClientError("unexpected connection_lost() call"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        DatabaseUnreachable("ConnectionRefusedError"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_failures_of_the_database_connection_mean_unavailable(error):
    assert database_unavailable(error)


def test_an_error_raised_while_cleaning_up_after_a_lost_connection_means_unavailable():
    error = asyncpg.InterfaceError("cannot perform operation: connection is closed")
    error.__context__ = asyncpg.ConnectionDoesNotExistError("closed mid-operation")
    assert database_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("Connection lost"),  # the client hung up
        TimeoutError(),
        OSError("not the database's"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.UniqueViolationError("duplicate key"),
        ValueError("a bug"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_other_failures_do_not_mean_the_database_is_unavailable(error):
    assert not database_unavailable(error)


async def test_a_session_the_server_terminates_mid_write_is_503_then_the_service_recovers(
    client, headers, db
):
    """What a PostgreSQL restart (or a failover) does to the sessions it finds: FATAL 57P01."""
    created, lock, update, pid = await update_waiting_on_a_row_lock(client, headers, db)
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    resp = await update
    await error_body(resp, 503, "api_error")
    assert resp.headers["Retry-After"] == "1"
    await lock.rollback()

    item = f"/v1/conversations/{created['id']}"
    resp = await client.get(item, headers=headers)  # the pool replaced the lost connection
    assert resp.status == 200
    assert await resp.json() == created
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


class _CountedLongBackoff(Backoff):
    """Every retry waits two minutes, longer than the test may take; counts the retries."""

    retries = 0

    def next_delay(self) -> float:
        type(self).retries += 1
        return 120.0


async def _true(value: bool) -> bool:
    return value


async def test_the_relay_resumes_within_a_second_of_the_database_accepting_connections(
    event_settings, subscriber, proxy, db, caplog, monkeypatch
):
    # Measured from outside, the relay once resumed 4.3 s and 15.7 s after PostgreSQL was back:
    # it slept out its backoff. The API recovered in 0.02 s (its pool connects on demand).
    caplog.set_level(logging.WARNING, logger="service.events.relay")
    monkeypatch.setattr(_CountedLongBackoff, "retries", 0)
    proxied = dataclasses.replace(
        event_settings, database_url=via_port(event_settings.database_url, proxy.port)
    )
    broker = Broker(amqp_url(), event_settings.events.exchange)
    async with running_relay(proxied, broker, backoff=_CountedLongBackoff) as (relay, _):
        await wait_until(lambda: _true(relay.is_active))
        await proxy.cut()
        await wait_until(lambda: _true(not relay.is_active))  # its session is gone
        await db.execute(
            "INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence,"
            " payload) VALUES ('evt_during', 'conversation.updated', 'a', 'c', 1, '{}')"
        )
        # Refused again and again, well past the first retry.
        await wait_until(lambda: _true(_CountedLongBackoff.retries >= 5))
        await proxy.start()
        back = time.monotonic()
        [message] = await subscriber.receive(1, timeout=30)
        resumed = time.monotonic() - back
    print(f"\nthe relay published {resumed:.2f} s after the database was back")
    assert message.message_id == "evt_during"
    assert resumed < 1.5  # within a second, give or take a busy machine
    # One line per kind of failure for the whole outage, not one per retry.
    lines = [r.getMessage() for r in caplog.records if r.name == "service.events.relay"]
    assert len([line for line in lines if line.startswith("PostgreSQL unreachable")]) == 1
