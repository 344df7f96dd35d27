"""PostgreSQL going away: the service answers 503 (never 500, never a hang), loses no committed
write, and recovers by itself when the database returns."""

import dataclasses
from urllib.parse import urlsplit

import pytest

from service.api.app import create_app
from tests.proxy import TcpProxy, free_port, via_port


@pytest.fixture
async def proxy(db_url):
    parts = urlsplit(db_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    if proxy.running:
        await proxy.cut()


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
    aiohttp_client, settings, headers, proxy, db
):
    client = await aiohttp_client(
        create_app(
            dataclasses.replace(settings, database_url=via_port(settings.database_url, proxy.port))
        )
    )
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
