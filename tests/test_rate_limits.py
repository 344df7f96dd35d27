"""Per-account rate limits: the headers, 429 and Retry-After, budgets shared through a real
Redis by two `conversations serve` processes, and a Redis that stops and comes back."""

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from service.api.app import create_app
from service.api.auth import mint_token
from service.api.ratelimit import Count, RateLimiter, seconds_until
from service.metrics import Metrics
from service.settings import ConfigError, RateLimitSettings, Settings, load_settings
from tests.error_bodies import error_body
from tests.events_support import amqp_url
from tests.proxy import free_port
from tests.test_operations import samples

HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def redis_url() -> str:
    url = os.environ.get("RATE_LIMIT_REDIS_URL")
    if not url:
        pytest.exit("RATE_LIMIT_REDIS_URL is not set: run the tests with `make test`", returncode=2)
    return url


def limited(settings: Settings, **budgets: object) -> Settings:
    return dataclasses.replace(
        settings, rate_limits=dataclasses.replace(settings.rate_limits, **budgets)
    )


def quota(resp: aiohttp.ClientResponse) -> tuple[int, int, int]:
    return tuple(int(resp.headers[name]) for name in HEADERS)


def unlimited(resp: aiohttp.ClientResponse) -> bool:
    return not any(name in resp.headers for name in HEADERS)


async def rate_limited(resp: aiohttp.ClientResponse) -> int:
    """The Retry-After of a 429, after checking its body is the contract's."""
    body = await error_body(resp, 429, "rate_limit_error", errors=False)
    retry_after = int(resp.headers["Retry-After"])
    assert body["retry_after"] == retry_after >= 1
    # The client may retry at X-RateLimit-Reset or after Retry-After: the same moment, to the second.
    assert abs(int(resp.headers["X-RateLimit-Reset"]) - (time.time() + retry_after)) <= 1
    assert int(resp.headers["X-RateLimit-Remaining"]) == 0
    return retry_after


async def inside_a_window(window: int, needed: float) -> None:
    """Windows are aligned on the clock: start where `needed` seconds remain in this one, so that
    an exact count-down is not blurred by a new window taking over meanwhile."""
    if window - time.time() % window < needed:
        await asyncio.sleep(window - time.time() % window + 0.05)


# --- one process, in-process budgets -----------------------------------------------------------


@pytest.fixture
async def small(settings, aiohttp_client) -> TestClient:
    """Reads 3, writes 2 per 60 s, counted in the process."""
    return await aiohttp_client(create_app(limited(settings, reads=3, writes=2, window_seconds=60)))


async def test_headers_count_down_then_429_with_the_error_body(small, headers):
    await inside_a_window(60, 5)
    seen = []
    for _ in range(3):
        resp = await small.get("/v1/conversations", headers=headers)
        assert resp.status == 200
        seen.append(quota(resp))
    assert [(limit, remaining) for limit, remaining, _ in seen] == [(3, 2), (3, 1), (3, 0)]
    for _, _, reset in seen:  # a request is forgotten gradually over the window after its own
        assert time.time() < reset <= time.time() + 2 * 60 + 1
    retry_after = await rate_limited(await small.get("/v1/conversations", headers=headers))
    assert retry_after <= 2 * 60 + 1


async def test_reads_and_writes_draw_on_separate_budgets(small, headers):
    await inside_a_window(60, 5)
    for n in range(2):
        resp = await small.post("/v1/conversations", json={"contact_id": f"c{n}"}, headers=headers)
        assert resp.status == 201
        assert quota(resp)[:2] == (2, 1 - n)
    await rate_limited(
        await small.post("/v1/conversations", json={"contact_id": "c9"}, headers=headers)
    )
    resp = await small.get("/v1/conversations", headers=headers)
    assert resp.status == 200
    assert len((await resp.json())["data"]) == 2  # the rejected write changed nothing
    assert quota(resp)[:2] == (3, 2)


async def test_accounts_do_not_share_a_budget(small, make_token):
    await inside_a_window(60, 5)
    spender = {"Authorization": f"Bearer {make_token('acct_spender_' + uuid.uuid4().hex)}"}
    other = {"Authorization": f"Bearer {make_token('acct_other_' + uuid.uuid4().hex)}"}
    for _ in range(3):
        assert (await small.get("/v1/conversations", headers=spender)).status == 200
    await rate_limited(await small.get("/v1/conversations", headers=spender))
    resp = await small.get("/v1/conversations", headers=other)
    assert resp.status == 200
    assert quota(resp)[:2] == (3, 2)


async def test_answers_after_authentication_carry_the_headers_and_401_does_not(small, headers):
    await inside_a_window(60, 5)
    resp = await small.get("/v1/conversations/0000000000000000", headers=headers)
    assert resp.status == 404
    assert quota(resp)[:2] == (3, 2)
    resp = await small.get("/v1/conversations?limit=0", headers=headers)
    assert resp.status == 422
    assert quota(resp)[:2] == (3, 1)
    resp = await small.get("/v1/conversations")
    assert resp.status == 401
    assert unlimited(resp)


async def test_a_token_without_the_scope_draws_on_the_budget_and_says_so(
    small, make_token, account
):
    # The contract: every authenticated answer but a 401 carries the budget it drew on.
    await inside_a_window(60, 5)
    read_only = {"Authorization": f"Bearer {make_token(account, ['conversations:read'])}"}
    for n in range(2):
        resp = await small.post(
            "/v1/conversations", json={"contact_id": f"c{n}"}, headers=read_only
        )
        assert resp.status == 403
        assert quota(resp)[:2] == (2, 1 - n)
    await rate_limited(
        await small.post("/v1/conversations", json={"contact_id": "c9"}, headers=read_only)
    )
    resp = await small.get("/v1/conversations", headers=read_only)  # the read budget is its own
    assert resp.status == 200
    assert quota(resp)[:2] == (3, 2)


async def test_probes_metrics_and_the_openapi_document_are_never_limited(
    settings, aiohttp_client, headers
):
    client = await aiohttp_client(create_app(limited(settings, reads=1, writes=1)))
    assert (await client.get("/v1/conversations", headers=headers)).status == 200
    await rate_limited(await client.get("/v1/conversations", headers=headers))
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json") * 3:
        resp = await client.get(path, headers=headers)  # with the spent account's token, too
        assert resp.status == 200, path
        assert unlimited(resp)


async def test_a_budget_of_0_is_off(settings, aiohttp_client, headers):
    client = await aiohttp_client(create_app(limited(settings, reads=0, writes=1)))
    for _ in range(5):
        resp = await client.get("/v1/conversations", headers=headers)
        assert resp.status == 200
        assert unlimited(resp)
    resp = await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    assert quota(resp)[:2] == (1, 0)
    assert (await (await client.get("/readyz")).json())["checks"]["rate_limits"] == "in-process"
    off = await aiohttp_client(create_app(limited(settings, reads=0, writes=0)))
    assert (await (await off.get("/readyz")).json())["checks"]["rate_limits"] == "off"


async def test_a_retry_after_retry_after_seconds_succeeds(settings, aiohttp_client, headers):
    client = await aiohttp_client(create_app(limited(settings, reads=2, window_seconds=2)))
    # A window's edge may fall in between, where the previous window's weight admits one more.
    for _ in range(4):
        resp = await client.get("/v1/conversations", headers=headers)
        if resp.status == 429:
            break
    retry_after = await rate_limited(resp)
    assert retry_after <= 2 * 2 + 1
    # The thing under test: Retry-After is right against the wall clock the client has.
    await asyncio.sleep(retry_after)
    resp = await client.get("/v1/conversations", headers=headers)
    assert resp.status == 200
    assert quota(resp)[0] == 2


def test_the_settings_read_the_budgets(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example.test/conversations")
    monkeypatch.setenv("AMQP_URL", "amqp://app@mq.example.test/")
    monkeypatch.setenv("JWT_HS256_SECRETS", "s" * 40)
    for name in ("RATE_LIMIT_READS", "RATE_LIMIT_WRITES", "RATE_LIMIT_WINDOW_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "")
    assert load_settings().rate_limits == RateLimitSettings(6000, 1200, 60, None)
    monkeypatch.setenv("RATE_LIMIT_REDIS_URL", "rediss://:pw@redis.example.test:6380/2")
    monkeypatch.setenv("RATE_LIMIT_READS", "0")
    assert load_settings().rate_limits.redis_url == "rediss://:pw@redis.example.test:6380/2"
    assert load_settings().rate_limits.reads == 0
    for name, value in (
        ("RATE_LIMIT_REDIS_URL", "http://:Secret-pw@redis/"),
        ("RATE_LIMIT_READS", "-1"),
        ("RATE_LIMIT_WRITES", "many"),
        ("RATE_LIMIT_WINDOW_SECONDS", "0"),
    ):
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(ConfigError, match=name) as raised:
                load_settings()
            assert "Secret-pw" not in str(raised.value)


# --- two processes, one budget in Redis --------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    """`conversations serve` in a process of its own; yields its base URL once it is ready."""
    port = free_port()
    with log.open("wb") as log_file:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            env={**env, "PORT": str(port)},
            stderr=log_file,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                assert server.returncode is None, f"serve exited at start-up; see {log}"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    if (await http.get(f"{base}/readyz")).status == 200:
                        break
                await asyncio.sleep(0.1)
        yield base
    finally:
        server.terminate()
        await server.wait()


async def test_two_processes_share_one_budget_through_redis(settings, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "AMQP_URL": amqp_url(),
        "EVENTS_EXCHANGE": settings.events.exchange,
        "RELAY_ENABLED": "false",
        "JWT_HS256_SECRETS": settings.auth.hs256_secrets[0],
        "HOST": "127.0.0.1",
        "LOG_FORMAT": "json",
        "ERROR_DOCS_URL": settings.error_docs_url,
        "RATE_LIMIT_REDIS_URL": redis_url(),
        "RATE_LIMIT_READS": "5",
        "RATE_LIMIT_WRITES": "2",
        "RATE_LIMIT_WINDOW_SECONDS": "3",
    }
    first_account, second_account = (f"acct_{uuid.uuid4().hex[:10]}" for _ in range(2))
    auth = {
        account: {
            "Authorization": f"Bearer {mint_token(settings.auth, account, ['conversations:read', 'conversations:write'], 600)}"
        }
        for account in (first_account, second_account)
    }
    async with (
        serving(env, tmp_path / "one.log") as one,
        serving(env, tmp_path / "two.log") as two,
        aiohttp.ClientSession() as http,
    ):
        ready = await (await http.get(f"{one}/readyz")).json()
        assert ready["checks"]["rate_limits"] == "connected"
        await inside_a_window(3, 1.5)
        # Alternating between the processes, the account's one budget counts down.
        remaining = []
        for n in range(5):
            resp = await http.get(
                f"{(one, two)[n % 2]}/v1/conversations", headers=auth[first_account]
            )
            assert resp.status == 200
            remaining.append(quota(resp)[:2])
        assert remaining == [(5, 4), (5, 3), (5, 2), (5, 1), (5, 0)]
        for base in (one, two):
            await rate_limited(
                await http.get(f"{base}/v1/conversations", headers=auth[first_account])
            )
        # Another account, and the writes of the first, have budgets of their own.
        resp = await http.get(f"{two}/v1/conversations", headers=auth[second_account])
        assert (resp.status, quota(resp)[:2]) == (200, (5, 4))
        resp = await http.post(
            f"{one}/v1/conversations", json={"contact_id": "c1"}, headers=auth[first_account]
        )
        assert (resp.status, quota(resp)[:2]) == (201, (2, 1))
        # Obeying Retry-After, to the second, is enough. (Real time: the windows are on the
        # clocks of two processes and Redis, which no test can move.)
        resp = await http.get(f"{two}/v1/conversations", headers=auth[first_account])
        await asyncio.sleep(await rate_limited(resp))
        resp = await http.get(f"{one}/v1/conversations", headers=auth[first_account])
        assert resp.status == 200
        # Two windows after the last request, the whole budget is back.
        await asyncio.sleep(2 * 3)
        resp = await http.get(f"{two}/v1/conversations", headers=auth[first_account])
        assert (resp.status, quota(resp)[:2]) == (200, (5, 4))


async def test_concurrent_requests_never_overdraw_a_budget(settings, aiohttp_client, headers):
    shared = limited(settings, reads=5, window_seconds=60, redis_url=redis_url())
    in_process = limited(settings, reads=5, window_seconds=60)
    for app_settings in (shared, in_process):
        client = await aiohttp_client(create_app(app_settings))
        await inside_a_window(60, 10)
        account = {
            "Authorization": f"Bearer {mint_token(settings.auth, uuid.uuid4().hex, ['conversations:read'], 600)}"
        }
        answers = await asyncio.gather(
            *(client.get("/v1/conversations", headers=account) for _ in range(20))
        )
        assert sorted(resp.status for resp in answers) == [200] * 5 + [429] * 15
        assert sorted(quota(resp)[1] for resp in answers if resp.status == 200) == [0, 1, 2, 3, 4]


# --- Redis stops and comes back ---------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that the test stops and starts."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make test` installs it"
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        await self.process.wait()


@pytest.fixture
async def private_redis(tmp_path) -> AsyncIterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    await redis.start()
    yield redis
    if redis.process is not None and redis.process.returncode is None:
        await redis.stop()


async def test_without_redis_requests_are_served_unlimited_until_it_is_back(
    settings, aiohttp_client, headers, private_redis, caplog
):
    caplog.set_level(logging.WARNING, logger="service.api.ratelimit")
    app = create_app(limited(settings, reads=2, window_seconds=60, redis_url=private_redis.url))
    client = await aiohttp_client(app)
    await inside_a_window(60, 10)
    for _ in range(2):
        assert (await client.get("/v1/conversations", headers=headers)).status == 200
    await rate_limited(await client.get("/v1/conversations", headers=headers))

    await private_redis.stop()
    for _ in range(20):
        resp = await client.get("/v1/conversations", headers=headers)
        assert resp.status == 200  # served, not failed
        assert unlimited(resp)  # drew on no budget
    resp = await client.get("/readyz")
    assert resp.status == 200  # Redis is reported, never required
    assert (await resp.json())["checks"]["rate_limits"] == "disconnected"
    text = await (await client.get("/metrics")).text()
    assert samples(text, "conversations_rate_limit_store_up")[0].value == 0
    assert samples(text, "conversations_rate_limit_unchecked_requests_total")[0].value >= 20
    down_lines = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(down_lines) == 1  # one line for the outage, not one per request

    await inside_a_window(60, 15)
    await private_redis.start()  # empty: the budget starts afresh
    async with asyncio.timeout(30):  # the limiter finds Redis again by itself
        while unlimited(resp := await client.get("/v1/conversations", headers=headers)):
            await asyncio.sleep(0.1)
    assert resp.status == 200
    assert quota(resp)[:2] == (2, 1)
    assert (await client.get("/v1/conversations", headers=headers)).status == 200
    await rate_limited(await client.get("/v1/conversations", headers=headers))
    assert (await (await client.get("/readyz")).json())["checks"]["rate_limits"] == "connected"
    text = await (await client.get("/metrics")).text()
    assert samples(text, "conversations_rate_limit_store_up")[0].value == 1
    assert any("enforced again" in r.getMessage() for r in caplog.records)


# --- the algorithm -----------------------------------------------------------------------------


async def test_no_double_burst_at_a_window_edge():
    """A fixed window would admit a second full budget right after its edge: a sliding one
    admits the budget again only as the earlier requests slide out of the window."""
    now = [6000.0 - 0.5]  # half a second before a 60 s window's edge
    limiter = RateLimiter(RateLimitSettings(10, 10, 60, None), Metrics(), clock=lambda: now[0])
    assert all([(await limiter.draw("a", "read")).allowed for _ in range(10)])
    now[0] += 1  # half a second after the edge
    refused = await limiter.draw("a", "read")
    assert not refused.allowed
    assert refused.retry_after(now[0]) == 6  # 1/10 of the window: one request's weight
    now[0] += 5.9
    assert (await limiter.draw("a", "read")).allowed
    assert not (await limiter.draw("a", "read")).allowed
    now[0] += 60
    admitted = [(await limiter.draw("a", "read")).allowed for _ in range(11)]
    assert admitted.count(True) == 9  # the previous window's one request still weighs 0.89


def used_after(count: Count, weight: float, window: int, t: float) -> float:
    """The weighted count `t` seconds on, with no new request meanwhile, computed step by step."""
    if t <= weight * window:
        return count.previous * (weight - t / window) + count.current
    return count.current * max(0.0, 1 - (t - weight * window) / window)


@pytest.mark.parametrize("seed", range(5))
def test_seconds_until_is_the_moment_the_weighted_count_falls_to_the_target(seed):
    rng = random.Random(seed)
    window = 60
    for _ in range(2000):
        count = Count(True, rng.randint(0, 50), rng.randint(0, 50))
        weight = rng.random()
        used = count.previous * weight + count.current
        target = rng.randint(0, 60)
        wait = seconds_until(target, count, window, weight)
        assert used_after(count, weight, window, wait) <= target + 1e-9
        if used > target:
            assert used_after(count, weight, window, max(0.0, wait - 0.01)) > target - 1e-9
        else:
            assert wait == 0
