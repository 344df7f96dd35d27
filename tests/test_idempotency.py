"""Idempotency-Key: replays, conflicts, mismatches, expiry and crashes, against the real
PostgreSQL and RabbitMQ."""

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import uuid

import aiohttp
import asyncpg
import orjson
import pytest

from service.api.app import create_app
from service.api.auth import mint_token
from service.api.keys import DB_POOL
from service.conversations import housekeeping, idempotency
from tests.error_bodies import error_body
from tests.events_support import amqp_url, wait_until
from tests.proxy import free_port
from tests.races import lose_races_until_locked

KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


def keyed(headers: dict[str, str], key: str, **more: str) -> dict[str, str]:
    return {**headers, KEY: key, **more}


async def counts(db: asyncpg.Connection) -> tuple[int, int]:
    """(conversations, outbox rows): what a write changes."""
    return (
        await db.fetchval("SELECT count(*) FROM conversations"),
        await db.fetchval("SELECT count(*) FROM outbox"),
    )


async def wait_for_lock_wait(db: asyncpg.Connection, statement: str) -> int:
    """The pid of the backend blocked on a lock while running a statement that says so."""
    async with asyncio.timeout(20):
        while True:
            pid = await db.fetchval(
                """SELECT pid FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'
                     AND strpos(query, $1) > 0""",
                statement,
            )
            if pid is not None:
                return pid
            await asyncio.sleep(0.02)


# --- replays ------------------------------------------------------------------------------------


async def test_replayed_writes_change_one_row_once_and_publish_one_event_each(
    event_settings, aiohttp_client, headers, subscriber, db
):
    client = await aiohttp_client(create_app(event_settings))
    first = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "create-1")
    )
    assert first.status == 201
    assert REPLAYED not in first.headers
    again = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "create-1")
    )
    assert again.status == 201
    assert again.headers[REPLAYED] == "true"
    assert await again.read() == await first.read()
    assert again.headers["ETag"] == first.headers["ETag"] == '"1"'
    assert again.headers["Location"] == first.headers["Location"]
    assert again.content_type == "application/json"
    url = first.headers["Location"]

    for _ in range(2):
        resp = await client.put(url, json={"is_muted": True}, headers=keyed(headers, "update-1"))
        assert resp.status == 200
        assert resp.headers["ETag"] == '"2"'
        assert (await resp.json())["is_muted"] is True
    # Another write in between: the retried update must not undo it.
    assert (await client.put(url, json={"is_muted": False}, headers=headers)).status == 200
    resp = await client.put(url, json={"is_muted": True}, headers=keyed(headers, "update-1"))
    assert resp.headers[REPLAYED] == "true"
    assert resp.headers["ETag"] == '"2"'  # the stored answer, not a new write
    assert (await (await client.get(url, headers=headers)).json())["is_muted"] is False

    for _ in range(2):
        resp = await client.delete(url, headers=keyed(headers, "delete-1"))
        assert resp.status == 200  # a retried delete is its answer again, not a 404
        assert await resp.json() == {"id": url.rsplit("/", 1)[1], "deleted": True}
    assert resp.headers[REPLAYED] == "true"
    assert await counts(db) == (0, 4)  # created, updated, updated back, deleted

    # A write after all of them: its event arrives last, so nothing else is still on the way.
    marker = await client.post("/v1/conversations", json={"contact_id": "marker"}, headers=headers)
    assert marker.status == 201
    messages = await subscriber.receive(5)
    assert [m.type for m in messages] == [
        "conversation.created",
        "conversation.updated",
        "conversation.updated",
        "conversation.deleted",
        "conversation.created",
    ]
    assert len({m.message_id for m in messages}) == 5


async def test_the_same_request_in_another_spelling_is_replayed(client, headers, db):
    raw = b'{"contact_id":"c1","is_muted":true}'
    respaced = b'{ "is_muted" : true,\n  "contact_id" : "c1" }'
    json_headers = keyed(headers, "spelling", **{"Content-Type": "application/json"})
    first = await client.post("/v1/conversations", data=raw, headers=json_headers)
    again = await client.post("/v1/conversations", data=respaced, headers=json_headers)
    form = await client.post(
        "/v1/conversations",
        data="is_muted=true&contact_id=c1",
        headers=keyed(headers, "spelling", **{"Content-Type": "application/x-www-form-urlencoded"}),
    )
    assert first.status == again.status == form.status == 201
    assert again.headers[REPLAYED] == form.headers[REPLAYED] == "true"
    assert await counts(db) == (1, 1)


async def test_refusals_of_the_domain_are_stored_too(client, headers, db):
    created = await (
        await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    ).json()
    url = f"/v1/conversations/{created['id']}"
    stale = keyed(headers, "stale", **{"If-Match": '"7"'})
    first = await client.put(url, json={"is_muted": True}, headers=stale)
    body = await error_body(first, 412, "invalid_request", param="If-Match")
    again = await client.put(url, json={"is_muted": True}, headers=stale)
    assert again.status == 412
    assert again.headers[REPLAYED] == "true"
    assert await again.json() == body  # the stored answer, its request_id included

    missing = "/v1/conversations/0000000000000000"
    first = await client.delete(missing, headers=keyed(headers, "missing"))
    await error_body(first, 404, "not_found_error")
    again = await client.delete(missing, headers=keyed(headers, "missing"))
    assert again.status == 404
    assert again.headers[REPLAYED] == "true"
    assert await counts(db) == (1, 1)


async def test_outcomes_that_write_nothing_are_stored_too(client, headers, db):
    existing = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    url = existing.headers["Location"]
    for _ in range(2):  # the contact's conversation: 200, and the same 200 again
        resp = await client.post(
            "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "has-one")
        )
        assert resp.status == 200
        assert await resp.read() == await existing.read()
    assert resp.headers[REPLAYED] == "true"
    for _ in range(2):  # an update that changes nothing
        resp = await client.patch(url, json={"is_muted": False}, headers=keyed(headers, "no-op"))
        assert resp.status == 200
        assert resp.headers["ETag"] == '"1"'
    assert resp.headers[REPLAYED] == "true"
    # Changed meanwhile: the retry still gets the answer the first request got.
    assert (await client.patch(url, json={"is_muted": True}, headers=headers)).status == 200
    resp = await client.patch(url, json={"is_muted": False}, headers=keyed(headers, "no-op"))
    assert resp.headers[REPLAYED] == "true"
    assert resp.headers["ETag"] == '"1"'
    assert (await (await client.get(url, headers=headers)).json())["is_muted"] is True
    assert await counts(db) == (1, 2)


async def test_a_keyed_write_in_the_locked_last_try_stores_its_answer(
    client, headers, db, monkeypatch
):
    created = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    url = created.headers["Location"]
    calls = lose_races_until_locked(monkeypatch)
    first = await client.put(url, json={"is_muted": True}, headers=keyed(headers, "locked"))
    assert first.status == 200
    assert calls[-1] is True  # the last try ran in the locking transaction
    monkeypatch.undo()
    again = await client.put(url, json={"is_muted": True}, headers=keyed(headers, "locked"))
    assert again.headers[REPLAYED] == "true"
    assert await again.read() == await first.read()
    assert await counts(db) == (1, 2)


# --- what is not stored -------------------------------------------------------------------------


async def test_answers_rejected_before_the_domain_are_not_stored(client, headers, make_token, db):
    key = keyed(headers, "early")
    resp = await client.post("/v1/conversations", json={"contact_id": "c1", "x": 1}, headers=key)
    await error_body(resp, 422, "validation_error", param="x")
    resp = await client.post(
        "/v1/conversations",
        data=b"{not json",
        headers={**key, "Content-Type": "application/json"},
    )
    await error_body(resp, 400, "invalid_request")
    resp = await client.post(
        "/v1/conversations", data=b"x", headers={**key, "Content-Type": "text/plain"}
    )
    await error_body(resp, 415, "invalid_request")
    read_only = {"Authorization": f"Bearer {make_token('acct_x', ['conversations:read'])}"}
    resp = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(read_only, "early")
    )
    assert resp.status == 403
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    # The retry, now valid, runs afresh.
    resp = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=key)
    assert resp.status == 201
    assert REPLAYED not in resp.headers


async def test_a_failed_write_is_rolled_back_with_its_key_and_the_retry_runs(
    settings, aiohttp_client, headers, db_url, db
):
    # A short statement timeout turns a write stuck behind a lock into a 5xx (503: a statement
    # the database cancelled counts as the database being unavailable).
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, db_statement_timeout_ms=300))
    )
    created = await (
        await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    ).json()
    url = f"/v1/conversations/{created['id']}"
    blocker = await asyncpg.connect(db_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM conversations FOR UPDATE")
            resp = await client.put(url, json={"is_muted": True}, headers=keyed(headers, "k"))
            await error_body(resp, 503, "api_error")
    finally:
        await blocker.close()
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    resp = await client.put(url, json={"is_muted": True}, headers=keyed(headers, "k"))
    assert resp.status == 200
    assert REPLAYED not in resp.headers
    assert resp.headers["ETag"] == '"2"'
    assert await counts(db) == (1, 2)


# --- mismatches, accounts, malformed keys ------------------------------------------------------


async def test_a_key_reused_for_another_request_is_422_and_changes_nothing(client, headers, db):
    created = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "k1")
    )
    url = created.headers["Location"]
    await client.put(url, json={"is_muted": True}, headers=keyed(headers, "k2"))
    before = await counts(db)
    for method, path, body, extra in (
        ("POST", "/v1/conversations", {"contact_id": "c2"}, {}),  # another body
        ("POST", "/v1/conversations?x=1", {"contact_id": "c1"}, {}),  # another query
        ("PUT", url, {"is_muted": True}, {}),  # another method and path
    ):
        resp = await client.request(method, path, json=body, headers=keyed(headers, "k1", **extra))
        await error_body(resp, 422, "validation_error", param=KEY)
    for method, extra in (("PATCH", {}), ("PUT", {"If-Match": '"2"'})):
        resp = await client.request(
            method, url, json={"is_muted": True}, headers=keyed(headers, "k2", **extra)
        )
        await error_body(resp, 422, "validation_error", param=KEY)
    assert await counts(db) == before


async def test_keys_belong_to_one_account(client, make_token, db):
    for account in ("acct_a", "acct_b"):
        auth = {"Authorization": f"Bearer {make_token(account)}", KEY: "shared"}
        resp = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=auth)
        assert resp.status == 201
        assert REPLAYED not in resp.headers
    assert await counts(db) == (2, 2)


@pytest.mark.parametrize(
    "key",
    ["k" * 256, "", "clé", "tab\there"],
    ids=["256-characters", "empty", "non-ascii", "tab"],
)
async def test_a_malformed_key_is_400_and_changes_nothing(client, headers, db, key):
    resp = await client.post(
        "/v1/conversations",
        data=b'{"contact_id": "c1"}',
        headers={**headers, "Content-Type": "application/json", KEY: key},
    )
    await error_body(resp, 400, "invalid_request", param=KEY)
    assert await counts(db) == (0, 0)


# Bytes outside ASCII, as a caller may send them. (Control characters never reach the service:
# the HTTP parser refuses such a request before any handler runs.)
@pytest.mark.parametrize(
    "key",
    ["clé".encode(), b"\xff\xfe", "ключ".encode()],
    ids=["utf-8", "latin-1", "cyrillic"],
)
async def test_a_key_of_other_bytes_is_400(client, headers, db, key):
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    body = b'{"contact_id": "c1"}'
    writer.write(
        b"POST /v1/conversations HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        + f"Authorization: {headers['Authorization']}\r\n".encode()
        + b"Content-Type: application/json\r\nIdempotency-Key: "
        + key
        + b"\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    error = orjson.loads(payload)
    assert error["type"] == "invalid_request"
    assert error["param"] == KEY
    assert await counts(db) == (0, 0)


async def test_two_keys_in_one_request_are_400(client, headers):
    resp = await client.post(
        "/v1/conversations",
        json={"contact_id": "c1"},
        headers=[*headers.items(), (KEY, "a"), (KEY, "b")],
    )
    await error_body(resp, 400, "invalid_request", param=KEY)


async def test_the_longest_and_plainest_keys_work(client, headers):
    for number, key in enumerate(["k" * 255, "a key with spaces ~!@#$%^&*()", "x"]):
        body = {"contact_id": f"c{number}"}
        for _ in range(2):
            resp = await client.post("/v1/conversations", json=body, headers=keyed(headers, key))
            assert resp.status == 201
        assert resp.headers[REPLAYED] == "true"


# --- concurrency across app instances ------------------------------------------------------------


async def test_the_same_key_while_the_first_runs_is_409_in_another_instance(
    settings, aiohttp_client, headers, db_url, db
):
    first_app = await aiohttp_client(create_app(settings))
    second_app = await aiohttp_client(create_app(settings))  # its own pool: another process's
    created = await (
        await first_app.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    ).json()
    url = f"/v1/conversations/{created['id']}"
    blocker = await asyncpg.connect(db_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM conversations FOR UPDATE")
        running = asyncio.create_task(
            first_app.put(url, json={"is_muted": True}, headers=keyed(headers, "busy"))
        )
        await wait_for_lock_wait(db, "UPDATE conversations")  # the first is inside its write
        for body in ({"is_muted": True}, {"is_muted": False}):
            resp = await second_app.put(url, json=body, headers=keyed(headers, "busy"))
            await error_body(resp, 409, "invalid_request", param=KEY)
            assert resp.headers["Retry-After"] == "1"
        await transaction.rollback()
        first = await running
    finally:
        await blocker.close()
    assert first.status == 200
    assert REPLAYED not in first.headers
    again = await second_app.put(url, json={"is_muted": True}, headers=keyed(headers, "busy"))
    assert again.status == 200
    assert again.headers[REPLAYED] == "true"
    assert await again.read() == await first.read()
    assert await counts(db) == (1, 2)


async def test_concurrent_retries_from_two_instances_write_once(
    settings, aiohttp_client, headers, db
):
    apps = [await aiohttp_client(create_app(settings)) for _ in range(2)]

    async def post(number: int) -> aiohttp.ClientResponse:
        return await apps[number % 2].post(
            "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "race")
        )

    answers = await asyncio.gather(*(post(n) for n in range(12)))
    statuses = [(r.status, r.headers.get(REPLAYED, "")) for r in answers]
    assert set(statuses) <= {(201, ""), (201, "true"), (409, "")}
    assert statuses.count((201, "")) == 1  # exactly one ran
    ids = {(await r.json())["id"] for r in answers if r.status == 201}
    assert len(ids) == 1
    assert await counts(db) == (1, 1)


# --- expiry and housekeeping --------------------------------------------------------------------


async def test_an_expired_key_runs_afresh(client, headers, db):
    first = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "old")
    )
    assert first.status == 201
    kept = await db.fetchval("SELECT expires_at - created_at FROM idempotency_keys")
    assert kept.total_seconds() == 24 * 3600  # IDEMPOTENCY_TTL_HOURS' default
    await db.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
    # Expired: the key is free, even for another request.
    again = await client.post(
        "/v1/conversations", json={"contact_id": "c2"}, headers=keyed(headers, "old")
    )
    assert again.status == 201
    assert REPLAYED not in again.headers
    replay = await client.post(
        "/v1/conversations", json={"contact_id": "c2"}, headers=keyed(headers, "old")
    )
    assert replay.headers[REPLAYED] == "true"
    assert await counts(db) == (2, 2)


async def test_housekeeping_removes_expired_keys_in_batches_one_process_at_a_time(
    client, headers, db, db_url
):
    for number in range(7):
        resp = await client.post(
            "/v1/conversations",
            json={"contact_id": f"c{number}"},
            headers=keyed(headers, f"key-{number}"),
        )
        assert resp.status == 201
    await db.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 hour' WHERE key <> 'key-6'"
    )
    pool = client.app[DB_POOL]
    jobs = [idempotency.EXPIRED_KEYS]

    # Another process is at it: this one skips its pass and removes nothing.
    other = await asyncpg.connect(db_url)
    try:
        async with other.transaction():
            await other.execute(housekeeping.TRY_LOCK, housekeeping.HOUSEKEEPING_LOCK_KEY)
            assert await housekeeping.run_once(pool, jobs, batch_size=2) is None
    finally:
        await other.close()
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 7

    assert await housekeeping.run_once(pool, jobs, batch_size=2) == {EXPIRED: 6}
    assert await db.fetchval("SELECT array_agg(key) FROM idempotency_keys") == ["key-6"]
    assert await housekeeping.run_once(pool, jobs, batch_size=2) == {EXPIRED: 0}


EXPIRED = idempotency.EXPIRED_KEYS.name


async def test_housekeeping_runs_periodically_past_a_failing_job(client, headers, db):
    resp = await client.post(
        "/v1/conversations", json={"contact_id": "c1"}, headers=keyed(headers, "old")
    )
    assert resp.status == 201
    await db.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 hour'")
    broken = housekeeping.Cleanup(
        "a job that fails", "SELECT count(*) FROM no_such_table WHERE $1 > 0"
    )
    task = asyncio.create_task(
        housekeeping.run_periodically(
            client.app[DB_POOL], [broken, idempotency.EXPIRED_KEYS], interval=0.05
        )
    )
    try:
        await wait_until(lambda: keys_are(db, 0))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_expiry_scan_uses_its_index(db):
    await db.execute("SET enable_seqscan = off")  # the table is empty: force the planner's hand
    plan = await db.fetchval("EXPLAIN (FORMAT JSON) " + idempotency.DELETE_EXPIRED, 1000)
    assert "idempotency_keys_expires_at_idx" in orjson.dumps(plan).decode()


# --- a server killed between the write and the answer -----------------------------------------


class Server:
    """`conversations serve` in a subprocess, with the relay on and the test's exchange."""

    def __init__(self, event_settings, db_url: str, log_path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "AMQP_URL": amqp_url(),
            "EVENTS_EXCHANGE": event_settings.events.exchange,
            "JWT_HS256_SECRETS": event_settings.auth.hs256_secrets[0],
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "RELAY_ENABLED": "true",
            "LOG_FORMAT": "json",
        }
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:  # a file: a pipe nobody reads could block it
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.cli", "serve", env=self.env, stderr=log
            )
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status == 200:
                        return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


def raw_post(token: str, key: str, body: bytes) -> bytes:
    return (
        b"POST /v1/conversations HTTP/1.1\r\nHost: test\r\n"
        + f"Authorization: Bearer {token}\r\nIdempotency-Key: {key}\r\n".encode()
        + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def post_with_key(port: int, token: str, key: str, body: dict) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"http://127.0.0.1:{port}/v1/conversations",
            json=body,
            headers={"Authorization": f"Bearer {token}", KEY: key},
        )
        await resp.read()
        return resp


async def keys_are(db: asyncpg.Connection, count: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM idempotency_keys") == count


async def wait_until_gone(db: asyncpg.Connection, pid: int) -> None:
    async def gone() -> bool:
        return not await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

    await wait_until(gone)


@pytest.fixture
def server(event_settings, db_url, tmp_path):
    servers: list[Server] = []

    def make() -> Server:
        servers.append(Server(event_settings, db_url, tmp_path / "serve.log"))
        return servers[-1]

    yield make
    for each in servers:
        if each.process is not None and each.process.returncode is None:
            each.process.kill()


async def test_killed_after_the_commit_the_retry_is_the_replay_not_a_second_write(
    event_settings, server, db, subscriber
):
    token = mint_token(event_settings.auth, "acct_kill", ["conversations:write"], 600)
    key = f"kill-{uuid.uuid4().hex}"
    first = server()
    await first.start()
    # The client sends, then never reads: the server commits and dies before anyone gets the
    # answer, as when a caller's connection is cut or its call times out.
    _, writer = await asyncio.open_connection("127.0.0.1", first.port)
    writer.write(raw_post(token, key, b'{"contact_id": "c1"}'))
    await writer.drain()
    await wait_until(lambda: keys_are(db, 1))  # committed
    await first.kill()
    writer.close()
    written = await db.fetchrow("SELECT id, version FROM conversations")

    second = server()
    await second.start()
    try:
        retry = await post_with_key(second.port, token, key, {"contact_id": "c1"})
        assert retry.status == 201
        assert retry.headers[REPLAYED] == "true"
        assert (await retry.json())["id"] == written["id"]
        assert await counts(db) == (1, 1)
        marker = await post_with_key(second.port, token, "marker", {"contact_id": "marker"})
        assert marker.status == 201
        # Delivery is at least once: a repeat of an event has its message id.
        ids: list[str] = []
        while len(set(ids)) < 2:
            [message] = await subscriber.receive(1, timeout=60)
            ids.append(message.message_id)
        outbox = [r["event_id"] for r in await db.fetch("SELECT event_id FROM outbox ORDER BY id")]
        assert list(dict.fromkeys(ids)) == outbox
    finally:
        await second.kill()


@pytest.mark.parametrize("ending", ["commits", "is cut off"])
async def test_killed_while_its_write_is_in_flight_the_retry_gets_what_the_database_did(
    event_settings, server, db, db_url, subscriber, ending
):
    """The server sent its write and died before any answer. The write, its event and its
    answer are one statement: PostgreSQL commits all three (the retry is the replay) or,
    if the session is cut off first, none (the retry runs afresh). Never one without the
    others, so never a second write."""
    token = mint_token(event_settings.auth, "acct_kill", ["conversations:write"], 600)
    key = "kill-in-flight"
    first = server()
    await first.start()
    # An open transaction holds the key's answer row: the server's statement has claimed
    # the key and inserted the conversation and its event, and waits to insert the answer.
    blocker = await asyncpg.connect(db_url)
    transaction = blocker.transaction()
    await transaction.start()
    try:
        await blocker.execute(
            """INSERT INTO idempotency_keys
                   (account_id, key, fingerprint, status, body, expires_at)
               VALUES ('acct_kill', $1, $2, 200, '', now() + interval '1 hour')""",
            key,
            bytes(32),
        )
        request = asyncio.create_task(post_with_key(first.port, token, key, {"contact_id": "c1"}))
        pid = await wait_for_lock_wait(db, "pg_try_advisory_xact_lock")
        await first.kill()
        with pytest.raises(aiohttp.ClientError):
            await request
        if ending == "is cut off":
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await transaction.rollback()
        await blocker.close()
    await wait_until_gone(db, pid)
    committed = ending == "commits"
    assert await counts(db) == ((1, 1) if committed else (0, 0))
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == int(committed)

    second = server()
    await second.start()
    try:
        retry = await post_with_key(second.port, token, key, {"contact_id": "c1"})
        assert retry.status == 201
        assert retry.headers.get(REPLAYED) == ("true" if committed else None)
        again = await post_with_key(second.port, token, key, {"contact_id": "c1"})
        assert again.headers[REPLAYED] == "true"
        assert await again.read() == await retry.read()
        assert await counts(db) == (1, 1)
        [message] = await subscriber.receive(1, timeout=60)
        assert message.message_id == await db.fetchval("SELECT event_id FROM outbox")
    finally:
        await second.kill()
