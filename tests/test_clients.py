"""Clients that misbehave at the socket: one that hangs up mid-body is not a failure of ours,
one that trickles its body is cut off at the deadline."""

import asyncio
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from service.api import bodies
from tests.error_bodies import ERROR_DOCS_URL, ERROR_KEYS
from tests.log_capture import captured_logs
from tests.test_operations import samples


@pytest.fixture
def logs():
    with captured_logs() as stream:
        yield stream


async def connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(base)
    return await asyncio.open_connection(parts.hostname, parts.port)


def post_head(headers: dict[str, str], length: int) -> bytes:
    lines = [
        "POST /v1/conversations HTTP/1.1",
        "Host: localhost",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def statuses(base: str) -> dict[str, float]:
    """POST /v1/conversations request counts by status, from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return {
        sample.labels["status"]: sample.value
        for sample in samples(text, "http_server_request_duration_seconds_count")
        if sample.labels["method"] == "POST" and sample.labels["route"] == "/v1/conversations"
    }


async def test_a_client_that_hangs_up_mid_body_is_no_5xx_and_no_database_alarm(
    served, headers, db, logs
):
    _, writer = await connect(served)
    writer.write(post_head(headers, 100) + b'{"contact_id": ')
    await writer.drain()
    writer.transport.abort()  # gone, as a client killed mid-upload

    async with asyncio.timeout(30):  # a safety bound, not a timing assertion
        while not (counts := await statuses(served)):
            await asyncio.sleep(0.05)
    assert counts == {"499": 1}  # recorded as "client closed request", not as a 5xx
    assert "database unavailable" not in logs.getvalue()
    assert "unexpected error" not in logs.getvalue()
    assert await db.fetchval("select count(*) from conversations") == 0


async def test_a_body_that_trickles_past_the_deadline_is_408(
    served, headers, db, logs, monkeypatch
):
    monkeypatch.setattr(bodies, "BODY_TIMEOUT_SECONDS", 1)
    reader, writer = await connect(served)
    try:
        body = b'{"contact_id": "slow"}'
        writer.write(post_head(headers, len(body)) + body[:1])  # and nothing more
        await writer.drain()
        async with asyncio.timeout(30):  # a safety bound, not a timing assertion
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode().split("\r\n")
            answer_headers = {
                name.lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines if line)
            }
            error = orjson.loads(await reader.readexactly(int(answer_headers["content-length"])))
    finally:
        writer.close()
    assert status_line.split()[1] == "408"
    assert answer_headers["connection"] == "close"
    assert set(error) == ERROR_KEYS
    assert error["type"] == "invalid_request"
    assert error["documentation_url"] == f"{ERROR_DOCS_URL}#invalid_request"
    assert "1 s" in error["message"]
    assert await db.fetchval("select count(*) from conversations") == 0
    assert "ERROR" not in logs.getvalue()
