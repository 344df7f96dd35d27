"""What aiohttp's HTTP parser refuses gets the contract's error body, echoing nothing of the
request, and a log line without the request's content or a traceback."""

import asyncio
import logging
import time
from urllib.parse import urlsplit

import jwt
import orjson
import pytest

from service.api.server import MAX_FIELD_SIZE
from tests.conftest import TEST_SECRET
from tests.error_bodies import ERROR_DOCS_URL, ERROR_KEYS
from tests.log_capture import captured_logs

SECRET_MARKER = "SeCrEtToKeNmArKeR"  # appears in no answer or log unless the request is echoed


async def exchange(
    base: str, raw: bytes, *, until_closed: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` bytes as they are; the status, headers (lower-case names) and body answered.

    `until_closed`: also wait for the server to close the connection.
    """
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(30):  # a safety bound, not a timing assertion
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if until_closed:
                assert await reader.read() == b""
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, body


def request(*header_lines: bytes, start: bytes = b"GET /v1/conversations HTTP/1.1") -> bytes:
    return b"\r\n".join([start, b"Host: localhost", *header_lines, b"", b""])


def bearer(padding: int) -> str:
    """A valid token for both scopes with a claim of `padding` characters: a JWT with many claims."""
    claims = {
        "sub": "acct_bigtoken",
        "scope": "conversations:read conversations:write",
        "exp": int(time.time()) + 600,
        "claims": SECRET_MARKER + "x" * padding,
    }
    return jwt.encode(claims, TEST_SECRET, algorithm="HS256")


@pytest.fixture
def console_logs():
    """Every record at DEBUG and above, as the console format prints them (tracebacks included)."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    with captured_logs(formatter, logging.DEBUG) as stream:
        yield stream


MALFORMED = {
    "bad request line": b"GARBAGE " + SECRET_MARKER.encode() + b"\r\n\r\n",
    "header over the limit": request(
        b"Authorization: Bearer " + bearer(MAX_FIELD_SIZE).encode(), b"X-Other: 1"
    ),
    "too many headers": request(*(b"X-H%d: %s" % (n, SECRET_MARKER.encode()) for n in range(200))),
    "bad chunk size": request(
        b"Transfer-Encoding: chunked",
        b"Content-Type: application/json",
        start=b"POST /v1/conversations HTTP/1.1",
    )
    + SECRET_MARKER.encode()
    + b"\r\n{}\r\n0\r\n\r\n",
    "Transfer-Encoding with Content-Length": request(
        b"Transfer-Encoding: chunked",
        b"Content-Length: 3",
        start=b"POST /v1/conversations HTTP/1.1",
    )
    + b"0\r\n\r\n",
    "bad Content-Length": request(
        b"Content-Length: 12" + SECRET_MARKER.encode(), start=b"POST /v1/conversations HTTP/1.1"
    ),
    "NUL in a header": request(b"X-Note: a\x00" + SECRET_MARKER.encode()),
    "CR in a header": request(b"X-Note: a\r" + SECRET_MARKER.encode()),
    "header line without a colon": request(b"Authorization Bearer " + SECRET_MARKER.encode()),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_what_the_parser_refuses_gets_the_error_body_and_echoes_nothing(
    served, raw, console_logs
):
    status, headers, body = await exchange(served, raw, until_closed=True)
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = orjson.loads(body)
    assert set(error) == ERROR_KEYS
    assert error["type"] == "invalid_request"
    assert error["request_id"] == headers["x-request-id"]
    assert error["documentation_url"] == f"{ERROR_DOCS_URL}#invalid_request"
    assert SECRET_MARKER not in body.decode()
    logs = console_logs.getvalue()
    assert SECRET_MARKER not in logs
    assert "Traceback" not in logs
    assert "Unhandled exception" not in logs


async def test_a_refused_request_has_its_access_log_line(served, console_logs):
    status, _, _ = await exchange(served, MALFORMED["bad request line"])
    assert status == 400
    access = [line for line in console_logs.getvalue().splitlines() if "aiohttp.access" in line]
    assert access == [f"INFO aiohttp.access: UNKNOWN unmatched 400 {access[0].split()[-1]}"]


async def test_a_token_over_8_kib_is_accepted(served):
    token = bearer(12 * 1024)
    assert len(token) > 16 * 1024  # over aiohttp's default 8190 bytes, twice
    status, _, body = await exchange(served, request(f"Authorization: Bearer {token}".encode()))
    assert status == 200, body
    assert orjson.loads(body)["data"] == []


async def test_a_bad_chunk_after_the_headers_were_accepted_is_400_at_once(served, headers, db):
    parts = urlsplit(served)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            request(
                f"Authorization: {headers['Authorization']}".encode(),
                b"Content-Type: application/json",
                b"Transfer-Encoding: chunked",
                b"Expect: 100-continue",
                start=b"POST /v1/conversations HTTP/1.1",
            )
        )
        async with asyncio.timeout(30):  # a safety bound, not a timing assertion
            # The handler is reading the body: what comes now is parsed as its chunks.
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b'3\r\n{"c\r\nZZ' + SECRET_MARKER.encode() + b"\r\n\r\n")
            answer = await reader.read()  # everything, until the server closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in head
    error = orjson.loads(body)
    assert error["type"] == "invalid_request"
    assert "chunk" in error["message"]
    assert SECRET_MARKER not in answer.decode()
    assert await db.fetchval("select count(*) from conversations") == 0
