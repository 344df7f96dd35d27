"""PostgreSQL going away: the service answers 503 (never 500, never a hang), loses no committed
write, and recovers by itself when the database returns."""

import asyncio
import dataclasses
import socket
from urllib.parse import urlsplit, urlunsplit

import pytest

from service.app import create_app


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that the test can cut and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = _free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones, as a crashed database would."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@pytest.fixture
async def proxy(db_url):
    parts = urlsplit(db_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    if proxy._server is not None and proxy._server.is_serving():
        await proxy.cut()


async def test_the_service_starts_and_answers_503_while_the_database_is_down(
    aiohttp_client, settings, headers
):
    down = dataclasses.replace(settings, database_url=_via(settings.database_url, _free_port()))
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
            dataclasses.replace(settings, database_url=_via(settings.database_url, proxy.port))
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
