"""Operations: metrics, structured logs, readiness during shutdown, and SIGTERM under load."""

import asyncio
import dataclasses
import logging
import os
import signal
import sys

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.api.auth import mint_token
from service.api.keys import DEPENDENCY_LOG
from service.events.broker import Broker
from service.events.partitions import (
    JOIN,
    PARTITION_LOCK_CLASS,
    RELAY_LOCK_KEY,
)
from service.events.relay import Relay
from service.logs import (
    REQUEST_ID_VAR,
    AccessLogger,
    ConsoleFormatter,
    JsonFormatter,
    Throttle,
    set_request_id,
)
from tests.events_support import amqp_url, wait_until
from tests.log_capture import captured_logs
from tests.proxy import free_port, via_port


def samples(text: str, name: str) -> list:
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


# --- metrics ------------------------------------------------------------------------------------


async def test_request_durations_are_labelled_by_route_template_and_status(client, headers):
    created = await (
        await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    ).json()
    await client.get(f"/v1/conversations/{created['id']}", headers=headers)
    await client.get("/v1/conversations/0000000000000000", headers=headers)
    await client.get("/no/such/path")
    text = await (await client.get("/metrics")).text()
    counts = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in samples(text, "http_server_request_duration_seconds_count")
    }
    assert counts[("POST", "/v1/conversations", "201")] == 1
    assert counts[("GET", "/v1/conversations/{id}", "200")] == 1
    assert counts[("GET", "/v1/conversations/{id}", "404")] == 1
    assert counts[("GET", "unmatched", "404")] == 1
    assert created["id"] not in text  # never a raw path or an id in a label


async def test_pool_gauges(client):
    text = await (await client.get("/metrics")).text()
    assert samples(text, "db_pool_connections_max")[0].value == 10
    assert samples(text, "db_pool_connections")[0].value >= 1
    assert samples(text, "db_pool_connections_in_use")[0].value >= 0


async def test_metrics_can_require_a_token(settings, aiohttp_client):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, metrics_token="m" * 40)))
    assert (await client.get("/metrics")).status == 401
    resp = await client.get("/metrics", headers={"Authorization": "Bearer " + "m" * 40})
    assert resp.status == 200


async def test_relay_metrics_count_events_and_report_the_backlog(
    event_settings, aiohttp_client, headers, subscriber
):
    client = await aiohttp_client(create_app(event_settings))
    for n in range(3):
        await client.post("/v1/conversations", json={"contact_id": f"c{n}"}, headers=headers)
    await subscriber.receive(3)
    async with asyncio.timeout(20):
        while True:
            text = await (await client.get("/metrics")).text()
            published = samples(text, "conversations_events_published_total")
            pending = samples(text, "conversations_outbox_pending_events")[0].value
            if sum(s.value for s in published) == 3 and pending == 0:  # confirmed, then marked
                break
            await asyncio.sleep(0.05)
    assert {(s.labels["type"], s.labels["outcome"]): s.value for s in published} == {
        ("conversation.created", "confirmed"): 3
    }
    assert samples(text, "conversations_relay_leader")[0].value == 1
    assert samples(text, "conversations_relay_partitions_owned")[0].value == 16  # alone: all
    assert samples(text, "conversations_outbox_partitions")[0].value == 16
    per_partition = samples(text, "conversations_outbox_partition_pending_events")
    assert {int(s.labels["partition"]): s.value for s in per_partition} == dict.fromkeys(
        range(16), 0
    )
    assert samples(text, "conversations_broker_connected")[0].value == 1
    assert samples(text, "conversations_outbox_oldest_pending_age_seconds")[0].value == 0
    assert samples(text, "conversations_event_publish_confirm_seconds_count")[0].value >= 1


async def test_readyz_and_metrics_say_which_partitions_wait_and_which_the_relay_holds(
    event_settings, aiohttp_client, db
):
    # Another "relay" (this connection) holds every partition: the app's relay gets none.
    await db.execute("SELECT pg_advisory_lock_shared($1)", RELAY_LOCK_KEY)
    for partition in range(16):
        await db.execute("SELECT pg_advisory_lock($1, $2)", PARTITION_LOCK_CLASS, partition)
    await db.execute(
        """
        INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload)
        SELECT 'evt_' || n, 'conversation.updated', 'a', 'conv' || (n % 5), n, '{}'
        FROM generate_series(1, 20) AS n
        """
    )
    waiting = dict(await db.fetch("SELECT partition, count(*) FROM outbox GROUP BY partition"))
    client = await aiohttp_client(create_app(event_settings, role="relay"))

    async def check(name: str, value: object) -> bool:
        return (await (await client.get("/readyz")).json())["checks"][name] == value

    await wait_until(lambda: check("broker", "connected"))

    async def relay_has_looked_for_partitions() -> bool:
        # Its session holds the relays' member lock (JOIN) and has run a statement since (the
        # shares it then reads and acts on, in the same turn).
        return await db.fetchval(
            """SELECT count(*) FROM pg_stat_activity AS a JOIN pg_locks AS l ON l.pid = a.pid
               WHERE a.datname = current_database() AND a.application_name = 'conversations-relay'
                 AND l.locktype = 'advisory' AND l.mode = 'ShareLock'
                 AND a.state = 'idle' AND a.query <> $1""",
            JOIN,
        )

    await wait_until(relay_has_looked_for_partitions)
    checks = (await (await client.get("/readyz")).json())["checks"]
    assert (checks["relay"], checks["relay_partitions"]) == ("standby", [])
    text = await (await client.get("/metrics")).text()
    assert samples(text, "conversations_relay_partitions_owned")[0].value == 0
    pending = samples(text, "conversations_outbox_partition_pending_events")
    assert {int(s.labels["partition"]): s.value for s in pending if s.value} == waiting
    ages = samples(text, "conversations_outbox_partition_oldest_pending_age_seconds")
    assert {int(s.labels["partition"]) for s in ages if s.value > 0} <= set(waiting)
    assert samples(text, "conversations_outbox_pending_events")[0].value == 20

    await db.execute("SELECT pg_advisory_unlock_all()")  # the other relay is gone
    await wait_until(lambda: check("outbox", {"pending": 0, "oldest_pending_age_seconds": 0}))
    checks = (await (await client.get("/readyz")).json())["checks"]
    assert (checks["relay"], checks["relay_partitions"]) == ("active", list(range(16)))


async def test_the_relay_role_serves_only_probes_and_metrics(
    event_settings, aiohttp_client, headers
):
    client = await aiohttp_client(create_app(event_settings, role="relay"))
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/v1/conversations", headers=headers)).status == 404

    async def relay_active() -> bool:
        return (await (await client.get("/readyz")).json())["checks"]["relay"] == "active"

    await wait_until(relay_active)


# --- logs ---------------------------------------------------------------------------------------


@pytest.fixture
def json_logs():
    """Every log record of the test, formatted as the service formats them in production."""
    with captured_logs(JsonFormatter()) as stream:
        yield stream


async def test_logs_are_json_lines_with_the_access_fields_and_no_token(
    settings, aiohttp_client, make_token, json_logs
):
    token = make_token("acct_logs")
    server = TestServer(create_app(settings))
    await server.start_server(access_log_class=AccessLogger)  # as `conversations serve` runs
    client = await aiohttp_client(server)
    body_marker = "contact-body-marker-not-hex"  # no random id can contain it
    resp = await client.post(
        "/v1/conversations",
        json={"contact_id": body_marker},
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-123"},
    )
    assert resp.status == 201
    await client.get("/v1/conversations", headers={"Authorization": "Bearer not-a-token"})
    lines = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "aiohttp.access"]
    assert access, lines
    post = next(line for line in access if line["method"] == "POST")
    assert post["request_id"] == "req-123"
    assert post["route"] == "/v1/conversations"
    assert post["status"] == 201
    assert post["duration"] > 0
    assert {"timestamp", "level", "message", "logger"} <= set(post)
    text = json_logs.getvalue()
    assert token not in text
    assert "not-a-token" not in text
    assert body_marker not in text  # no body


async def test_no_database_password_in_logs_when_the_database_is_down(
    settings, aiohttp_client, headers, json_logs
):
    password = "Sup3r-S3cret-pw"
    url = f"postgresql://conversations:{password}@127.0.0.1:{free_port()}/nowhere"
    client = await aiohttp_client(create_app(dataclasses.replace(settings, database_url=url)))
    assert (await client.get("/v1/conversations", headers=headers)).status == 503
    assert (await client.get("/readyz")).status == 503
    text = json_logs.getvalue()
    assert "database unavailable" in text or "unreachable" in text
    assert password not in text


async def test_an_outage_logs_one_line_per_interval_with_a_count(
    settings, aiohttp_client, headers, json_logs
):
    url = via_port(settings.database_url, free_port())  # nothing listens there
    client = await aiohttp_client(create_app(dataclasses.replace(settings, database_url=url)))
    for _ in range(20):
        assert (await client.get("/v1/conversations", headers=headers)).status == 503

    def outage_lines() -> list[dict]:
        lines = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
        return [line for line in lines if line["message"].startswith("database unavailable")]

    [first] = outage_lines()
    assert first["level"] == "ERROR"
    assert "held_back" not in first
    client.app[DEPENDENCY_LOG].interval = 0  # the interval has passed
    assert (await client.get("/v1/conversations", headers=headers)).status == 503
    _, second = outage_lines()
    assert second["held_back"] == 19
    assert "and 19 more like it since the last line" in second["message"]


def test_the_throttle_admits_a_line_per_interval_and_counts_the_ones_held_back():
    now = [100.0]
    throttle = Throttle(10, clock=lambda: now[0])
    assert throttle.admit("a") == 0  # the first line of a kind goes out
    assert [throttle.admit("a") for _ in range(3)] == [None] * 3
    assert throttle.admit("b") == 0  # kinds are apart
    now[0] += 10
    assert throttle.admit("a") == 3
    # A line logged outside it (an outage's end) takes the count and starts a new interval.
    throttle.admit("a")
    assert throttle.restart("a") == 1
    now[0] += 9.9
    assert throttle.admit("a") is None
    now[0] += 0.1
    assert throttle.admit("a") == 1
    assert throttle.restart("never seen") == 0


async def test_work_started_by_a_request_logs_without_the_request_id(json_logs):
    log = logging.getLogger("tests.background")

    async def background() -> None:
        log.warning("from a task the request started")

    token = set_request_id("req-own")
    try:
        log.info("from the request")
        await asyncio.create_task(background())
    finally:
        REQUEST_ID_VAR.reset(token)
    own, other = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    assert own["request_id"] == "req-own"
    assert "request_id" not in other


@pytest.mark.parametrize("formatter", [JsonFormatter, ConsoleFormatter])
def test_no_log_format_prints_a_traceback(formatter):
    try:
        raise ValueError("secret-row-data")
    except ValueError:
        record = logging.getLogger("asyncpg.pool").makeRecord(
            "asyncpg.pool", logging.WARNING, __file__, 1, "retrying", (), sys.exc_info()
        )
    line = formatter().format(record)
    assert "Traceback" not in line
    assert "secret-row-data" not in line
    assert "ValueError at " in line
    assert "\n" not in line


# --- shutdown -----------------------------------------------------------------------------------


async def test_readiness_fails_from_the_first_moment_of_shutdown(client):
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert resp.headers.get("Connection") != "close"
    await client.app.on_shutdown.send(client.app)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["type"] == "api_error"
    resp = await client.get("/healthz")
    assert resp.status == 200  # alive, just not taking new traffic
    # Answers from now on close their connection and say so: a kept-alive client opens a new
    # one (to another replica) for its next request instead of having it reset.
    assert resp.headers["Connection"] == "close"


async def test_sigterm_under_load_fails_no_accepted_request_and_loses_no_event(
    event_settings, db_url, subscriber, db, tmp_path
):
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "AMQP_URL": amqp_url(),
        "EVENTS_EXCHANGE": event_settings.events.exchange,
        "JWT_HS256_SECRETS": event_settings.auth.hs256_secrets[0],
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "RELAY_ENABLED": "true",
        "SHUTDOWN_TIMEOUT_SECONDS": "10",
        "LOG_FORMAT": "json",
        # The load is one account's writes as fast as they go: a test of shutdown, not of budgets.
        "RATE_LIMIT_WRITES": "0",
    }
    # Its log goes to a file: a pipe nobody reads while the load runs fills up and blocks it.
    log = tmp_path / "serve.log"
    with log.open("wb") as log_file:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "serve", env=env, stderr=log_file
        )
    token = mint_token(event_settings.auth, "acct_sigterm", ["conversations:write"], 600)
    base = f"http://127.0.0.1:{port}"
    ok: list[str] = []
    unanswered: list[str] = []
    failures: list[str] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        if (await http.get(f"{base}/readyz")).status == 200:
                            break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.1)

            async def worker(number: int) -> None:
                for n in range(2000):  # bounded; ends much earlier, when the server is gone
                    contact = f"w{number}-{n}"
                    try:
                        async with http.post(
                            f"{base}/v1/conversations",
                            json={"contact_id": contact},
                            headers={"Authorization": f"Bearer {token}"},
                        ) as resp:
                            if resp.status == 201:
                                ok.append(contact)
                            else:
                                failures.append(f"{contact}: {resp.status} {await resp.text()}")
                    except aiohttp.ClientError:
                        # Refused (the listener is closed) or reset before any answer: not
                        # accepted, which the database check below holds it to.
                        unanswered.append(contact)
                        return

            workers = [asyncio.create_task(worker(n)) for n in range(8)]

            async def under_load() -> bool:
                assert not failures, failures[:5]
                return len(ok) > 20

            await wait_until(under_load)
            server.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*workers), 30)
        await asyncio.wait_for(server.wait(), 30)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    assert server.returncode == 0, log.read_text()[-3000:]
    assert not failures, failures[:5]
    assert len(ok) > 20  # there was real load when SIGTERM came

    # Every answered write is stored, and nothing unanswered was: no accepted request failed.
    stored = {r["contact_id"] for r in await db.fetch("SELECT contact_id FROM conversations")}
    assert stored == set(ok)

    # Every committed change has its event; what the relay had not confirmed is still pending,
    # and a relay started now delivers it: nothing lost.
    assert await db.fetchval("SELECT count(*) FROM outbox") == len(ok)
    broker = Broker(amqp_url(), event_settings.events.exchange)
    await broker.connect(asyncio.Event())
    relay = Relay(db_url, broker, event_settings.events)
    task = asyncio.create_task(relay.run())
    outbox_ids = {r["event_id"] for r in await db.fetch("SELECT event_id FROM outbox")}
    received: set[str] = set()
    try:
        while received != outbox_ids:  # duplicates are allowed (at least once), gaps are not
            [message] = await subscriber.receive(1, timeout=60)
            received.add(message.message_id)
            assert message.message_id in outbox_ids
    finally:
        relay.stop()
        await task
        await broker.close()
