"""The benchmark harness behind `make bench`: seed, start each server, drive it, report.

    python -m tests.bench.run [--quick] [--profile] [--only SCENARIO ...]

Needs DATABASE_URL (a server where it may drop and create `conversations_bench`), AMQP_URL and
JWT_HS256_SECRETS, as `make env` prints them (`make bench` sets them). Prints each figure as it
is measured, then the tables, and rewrites docs/benchmarks.md (not with `--only`, which runs
one scenario and prints its tables). Every server it starts listens
on 127.0.0.1 only and is stopped by its pid when its scenarios end, also on failure.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import uvloop
from aio_pika.abc import AbstractQueue

from service.conversations import repository
from service.settings import load_auth_settings
from tests.bench import report
from tests.bench.jwks import jwks_provider
from tests.bench.load import Commands, LoadResult, find_pgbench, pgbench, wrk
from tests.bench.otlp_sink import otlp_sink
from tests.bench.processes import Server, free_port, running
from tests.bench.profile import record, summarize
from tests.bench.relay import (
    EXCHANGE,
    SharedDrain,
    backlog_sampler,
    broker_process,
    broker_sink,
    broker_version,
    commit_to_subscriber,
    cpu_seconds,
    raw_publisher,
    relay_drain,
    shared_drain,
    wait_drained,
)
from tests.bench.report import Check, Measurement
from tests.bench.seed import BENCH_DATABASE, Dataset, SeedPlan, reset_muted, seed
from tests.bench.sync import list_walk, sync_walk

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / ".dev" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
WORKERS = 2
POOL_PER_WORKER = 20
LATENCY_WRITES_PER_SECOND = 500
# The mixed run's outbox backlog is bounded when it stops growing (give or take one relay
# batch) and is empty soon after the load.
BACKLOG_GROWTH_SLACK = 500
BACKLOG_DRAIN_SECONDS = 10.0
SERVICE_GET = "service GET /v1/conversations/{id}"
MIXED_WRITE_SHARE = 0.2  # tests/bench/wrk/mixed.lua: 10% POST, 10% PUT
REQUIRED_VARIABLES = ("DATABASE_URL", "AMQP_URL", "JWT_HS256_SECRETS", "RATE_LIMIT_REDIS_URL")
# Budgets no run can spend: with them every request is checked and counted, and none refused.
_UNSPENDABLE = {"RATE_LIMIT_READS": "1000000000", "RATE_LIMIT_WRITES": "1000000000"}
# The service's rate limits in each run: off (every scenario but 8), in-process, in Redis.
RATE_LIMITS = {
    "off": {"RATE_LIMIT_READS": "0", "RATE_LIMIT_WRITES": "0", "RATE_LIMIT_REDIS_URL": ""},
    "in-process": {**_UNSPENDABLE, "RATE_LIMIT_REDIS_URL": ""},
    "Redis": _UNSPENDABLE,  # RATE_LIMIT_REDIS_URL: `make env`'s
}
SYNC_PAGE = 1000
SYNC_WALK_ROUNDS = 2


_OUTCOME = {True: "target met", False: "TARGET NOT MET", None: "for scale, no target"}


@dataclass(frozen=True)
class Plan:
    """How long and how big: quick mode finishes in under 3 minutes here, full in under 15."""

    mode: str
    seconds: int  # each measured wrk or pgbench run
    warmup_seconds: int  # before each server's first measured run
    mixed_seconds: int
    latency_seconds: int
    relay_events: int
    profile: bool
    rounds: int  # of scenario 1, whose targets use each subject's best round
    data: SeedPlan
    # Just these scenarios (ALONE, relay, and those with their own services); no document.
    only: tuple[str, ...] = ()


QUICK = Plan("quick", 5, 2, 15, 5, 20_000, False, 1, SeedPlan(1_000, 100, 100_000))
FULL = Plan("full", 15, 5, 60, 15, 100_000, True, 2, SeedPlan(1_000, 100, 1_000_000))
ONLY_SEED = SeedPlan(10, 10, 10_000)


@dataclass
class Bench:
    """One run: its plan, data and environment, and what it has measured so far."""

    plan: Plan
    dataset: Dataset
    commands: Commands
    started: float
    measurements: list[Measurement] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    profile_text: str = report.NO_PROFILE
    relay_scaling_text: str = report.NO_RELAY_SCALING

    def say(self, text: str) -> None:
        """A progress line, with the time since the start."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def add(self, measurement: Measurement) -> Measurement:
        """Keep and print a measurement."""
        self.measurements.append(measurement)
        load = measurement.load
        rss = " / ".join(f"{mb:.0f}" for mb in measurement.rss_mb)
        latency = (
            f", p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms"
            if load.p50_ms == load.p50_ms  # NaN: a throughput without latencies
            else ""
        )
        self.say(
            f"  {measurement.subject}: {load.rate:,.0f} {measurement.unit}{latency}, "
            f"failures {load.failures}" + (f", peak RSS per worker {rss} MB" if rss else "")
        )
        return measurement

    def check(self, check: Check) -> None:
        """Keep and print a target's outcome."""
        self.checks.append(check)
        ratio = f" ratio {check.ratio:.2f}" if check.ratio is not None else ""
        target = f" (target {check.target})" if check.met is not None else ""
        self.say(
            f"  {check.what}: {check.measured} vs {check.baseline}{ratio}{target}: "
            f"{_OUTCOME[check.met]}"
        )


def rate_check(
    key: str,
    what: str,
    subject: Measurement,
    peer: Measurement,
    minimum: float | None,
    *,
    strictly: bool = False,
) -> Check:
    """subject's rate / peer's rate >= minimum (> with `strictly`; None: shown, no target)."""
    ratio = subject.load.rate / peer.load.rate
    if minimum is None:
        target, met = "(no target)", None
    elif strictly:
        target, met = f"> {minimum:g}", ratio > minimum
    else:
        target, met = f">= {minimum:g}", ratio >= minimum
    return Check(
        key,
        subject.scenario,
        what,
        f"{subject.load.rate:,.0f} {subject.unit}",
        f"{peer.load.rate:,.0f} {peer.unit}",
        ratio,
        target,
        met,
    )


def latency_check(
    key: str, what: str, subject: Measurement, peer: Measurement, maximum: float
) -> Check:
    """subject's p50 / peer's p50 <= maximum."""
    ratio = subject.load.p50_ms / peer.load.p50_ms
    return Check(
        key,
        subject.scenario,
        what,
        f"{subject.load.p50_ms:.2f} ms",
        f"{peer.load.p50_ms:.2f} ms",
        ratio,
        f"<= {maximum:g}",
        ratio <= maximum,
    )


def limit_check(key: str, scenario: str, what: str, value: float, limit: float, unit: str) -> Check:
    """value < limit, with no peer."""
    return Check(
        key, scenario, what, f"{value:,.1f} {unit}", "-", None, f"< {limit:g} {unit}", value < limit
    )


async def _answers(url: str, headers: dict[str, str]) -> bool:
    """Whether `url` answers 200 now."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(url, headers=headers) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def _readiness(
    dataset: Dataset, *, probe: str | None = None
) -> Callable[[Server], Awaitable[bool]]:
    """Ready when `probe` (if any) and a GET of a known target answer 200."""
    account, conversation_id = dataset.targets[0]
    headers = {"Authorization": f"Bearer {dataset.tokens[account]}", "X-Account-ID": account}

    async def ready(server: Server) -> bool:
        if probe is not None and not await _answers(server.base_url + probe, {}):
            return False
        return await _answers(f"{server.base_url}/v1/conversations/{conversation_id}", headers)

    return ready


def _common_env(bench: Bench, port: int) -> dict[str, str]:
    return {
        "DATABASE_URL": bench.dataset.database_url,
        "PORT": str(port),
        "WORKERS": str(WORKERS),
        "DB_POOL_MAX": str(POOL_PER_WORKER),
    }


@contextlib.asynccontextmanager
async def service(
    bench: Bench,
    rate_limits: str = "off",
    *,
    extra_env: dict[str, str] | None = None,
    dataset: Dataset | None = None,
) -> AsyncIterator[Server]:
    """The service as in production: `conversations serve` (workers, JSON access log, metrics,
    `RELAY_ENABLED=false`) and `conversations relay` in a process of its own, as the Kubernetes
    manifests deploy them, with the rate limits of RATE_LIMITS[rate_limits] and `extra_env` on
    top (token settings, tracing), ready when a token of `dataset` (default: the seeded one)
    reads. Yields the API server."""
    port = free_port()
    relay_port = free_port()
    env = {
        **_common_env(bench, port),
        "HOST": "127.0.0.1",
        "DB_POOL_MIN": str(POOL_PER_WORKER),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "RELAY_ENABLED": "false",
        "RELAY_HTTP_PORT": str(relay_port),
        "EVENTS_EXCHANGE": EXCHANGE,
        "SHUTDOWN_TIMEOUT_SECONDS": "5",
        **RATE_LIMITS[rate_limits],
        **(extra_env or {}),
    }
    command = str(Path(sys.executable).with_name("conversations"))

    async def relay_ready(server: Server) -> bool:
        return await _answers(f"http://127.0.0.1:{relay_port}/readyz", {})

    async with (
        running(
            bench.commands,
            "relay",
            [command, "relay"],
            {**env, "DB_POOL_MIN": "1", "DB_POOL_MAX": "2"},
            port=relay_port,
            workers=0,
            log_path=BENCH_DIR / "relay.log",
            ready=relay_ready,
        ),
        running(
            bench.commands,
            "service",
            [command, "serve"],
            env,
            port=port,
            workers=WORKERS,
            log_path=BENCH_DIR / "service.log",
            ready=_readiness(dataset or bench.dataset, probe="/readyz"),
        ) as api,
    ):
        yield api


def minimal_aiohttp(bench: Bench) -> contextlib.AbstractAsyncContextManager[Server]:
    """tests/bench/baselines/minimal_aiohttp.py."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.baselines.minimal_aiohttp"]
    return running(
        bench.commands,
        "minimal aiohttp",
        argv,
        _common_env(bench, port),
        port=port,
        workers=WORKERS,
        log_path=BENCH_DIR / "minimal.log",
        ready=_readiness(bench.dataset),
    )


def fastapi(bench: Bench) -> contextlib.AbstractAsyncContextManager[Server]:
    """tests/bench/baselines/fastapi_app.py on uvicorn, uvloop and httptools."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.bench.baselines.fastapi_app:app",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--workers={WORKERS}",
        "--loop=uvloop",
        "--http=httptools",
    ]
    return running(
        bench.commands,
        "fastapi",
        argv,
        {**_common_env(bench, port), "JWT_HS256_SECRETS": os.environ["JWT_HS256_SECRETS"]},
        port=port,
        workers=WORKERS,
        log_path=BENCH_DIR / "fastapi.log",
        ready=_readiness(bench.dataset),
    )


async def measure(
    bench: Bench,
    server: Server,
    scenario: str,
    subject: str,
    script: str,
    seconds: float,
    args: tuple[str, ...] = (),
) -> Measurement:
    """One wrk run against `server`, with its workers' peak RSS over the run."""
    server.reset_peak_rss()
    load = await wrk(
        bench.commands, script, server.base_url, seconds, bench.dataset.data_dir, args=args
    )
    return bench.add(Measurement(scenario, subject, load, rss_mb=tuple(server.peak_rss_mb())))


async def warm_up(bench: Bench, server: Server, subject: str, scenario: str) -> None:
    """GET /v1/conversations/{id} for the warm-up time, unmeasured."""
    bench.say(f"scenario {scenario}: {subject}: warm-up {bench.plan.warmup_seconds} s")
    await wrk(
        bench.commands,
        "get_by_id.lua",
        server.base_url,
        bench.plan.warmup_seconds,
        bench.dataset.data_dir,
    )


async def get_by_id(bench: Bench, server: Server, subject: str, scenario: str = "1") -> Measurement:
    """Warm up, then measure GET /v1/conversations/{id}."""
    await warm_up(bench, server, subject, scenario)
    return await measure(bench, server, scenario, subject, "get_by_id.lua", bench.plan.seconds)


async def run_pgbench(bench: Bench, scenario: str, subject: str, script: str) -> Measurement:
    """pgbench with as many clients as the service's pools hold, on the same database."""
    load = await pgbench(
        bench.commands,
        script,
        bench.dataset.database_url,
        bench.plan.seconds,
        WORKERS * POOL_PER_WORKER,
        {"targets": len(bench.dataset.targets), "accounts": len(bench.dataset.accounts) - 1},
        BENCH_DIR / "pgbench-log",
    )
    return bench.add(Measurement(scenario, subject, load, unit="tx/s"))


async def profile_get_by_id(bench: Bench, server: Server) -> str:
    """py-spy on one worker during an extra GET-by-id run (not one of the measured runs); the
    report's section. A profile that cannot be taken (no ptrace) is reported, not fatal."""
    seconds = bench.plan.seconds
    bench.say(f"profile: py-spy on worker {server.workers[0]} for {seconds - 2} s")
    raw = BENCH_DIR / "profile-get-by-id.txt"
    failure = None
    try:
        async with asyncio.TaskGroup() as group:  # one failing stops the other
            group.create_task(
                wrk(
                    bench.commands,
                    "get_by_id.lua",
                    server.base_url,
                    seconds,
                    bench.dataset.data_dir,
                )
            )
            group.create_task(record(bench.commands, server.workers[0], seconds - 2, raw))
    except* RuntimeError as errors:
        failure = "\n".join(str(error) for error in errors.exceptions)
    if failure is not None:
        bench.say(f"  no profile: {failure}")
        return report.profile_failed(failure)
    return report.profile_section(summarize(raw), raw.relative_to(ROOT))


def _best(runs: tuple[Measurement, ...]) -> Measurement:
    """The fastest of a subject's rounds: interference from other work only slows a run."""
    return max(runs, key=lambda run: run.load.rate)


async def scenario_get_by_id(bench: Bench) -> list[Measurement]:
    """Scenario 1 without the service's last round: each round starts the minimal endpoint,
    FastAPI and (but in the last round) the service afresh, and runs pgbench. Returns, per
    round, the measurements in that order."""
    rounds = []
    for number in range(1, bench.plan.rounds + 1):
        label = f" (round {number} of {bench.plan.rounds})" if bench.plan.rounds > 1 else ""
        async with minimal_aiohttp(bench) as server:
            minimal = await get_by_id(bench, server, "minimal aiohttp + asyncpg" + label)
        async with fastapi(bench) as server:
            fastapi_peer = await get_by_id(bench, server, "FastAPI + uvicorn + asyncpg" + label)
        bench.say("scenario 1: pgbench, the same SELECT")
        ceiling = await run_pgbench(
            bench, "1", "pgbench: the same SELECT" + label, "select_by_id.sql"
        )
        rounds.append([minimal, fastapi_peer, ceiling])
        if number < bench.plan.rounds:
            async with service(bench) as server:
                rounds[-1].append(await get_by_id(bench, server, SERVICE_GET + label))
    return rounds


def check_get_by_id(bench: Bench, rounds: list[list[Measurement]]) -> Measurement:
    """Scenario 1's targets, on each subject's best round; the service's best GET."""
    minimal, fastapi_peer, ceiling, get = (_best(runs) for runs in zip(*rounds, strict=True))
    bench.check(rate_check("get_vs_minimal", "GET by id / minimal aiohttp", get, minimal, 0.75))
    bench.check(
        rate_check("get_vs_fastapi", "GET by id / FastAPI", get, fastapi_peer, 1, strictly=True)
    )
    bench.check(
        limit_check("get_p99", "1", "GET by id p99, 64 connections", get.load.p99_ms, 20, "ms")
    )
    what = "GET by id / pgbench SELECT (the database's ceiling)"
    bench.check(rate_check("get_vs_pgbench", what, get, ceiling, None))
    return get


async def scenario_rate_limits(bench: Bench) -> None:
    """Scenario 8: GET by id with the rate limits off, counted in-process and in Redis; each
    round starts the three afresh, in turn, and the targets take each one's best round."""
    rounds = []
    for number in range(1, bench.plan.rounds + 1):
        label = f" (round {number} of {bench.plan.rounds})" if bench.plan.rounds > 1 else ""
        measured = []
        for mode in RATE_LIMITS:
            async with service(bench, mode) as server:
                subject = f"{SERVICE_GET}, rate limits {mode}{label}"
                measured.append(await get_by_id(bench, server, subject, scenario="8"))
        rounds.append(measured)
    off, in_process, redis = (_best(runs) for runs in zip(*rounds, strict=True))
    what = "GET by id, rate limits in-process / off"
    bench.check(rate_check("limits_in_process_vs_off", what, in_process, off, 0.95))
    what = "GET by id, rate limits in Redis / off"
    bench.check(rate_check("limits_redis_vs_off", what, redis, off, 0.8))


async def scenario_jwks(bench: Bench) -> None:
    """Scenario 10: one service that takes both HS256 tokens and RS256 tokens whose key it
    fetched from a JWKS (tests/bench/jwks.py); GET by id with each kind in turn, at least two
    rounds, and the target on each kind's best round."""
    rounds = []
    async with (
        jwks_provider(bench.dataset, BENCH_DIR / "jwks-data") as provider,
        service(bench, extra_env=provider.service_env(), dataset=provider.rs256) as server,
    ):
        for number in range(1, max(2, bench.plan.rounds) + 1):
            measured = []
            for kind, dataset in (("HS256", provider.hs256), ("RS256 from a JWKS", provider.rs256)):
                # The same run (its lists are shared), reading this kind's tokens for wrk.
                each = dataclasses.replace(bench, dataset=dataset)
                subject = f"{SERVICE_GET}, {kind} (round {number})"
                measured.append(await get_by_id(each, server, subject, "10"))
            rounds.append(measured)
        bench.say(f"  JWKS fetches by the service: {len(provider.requests)}")
    hs256, rs256 = (_best(runs) for runs in zip(*rounds, strict=True))
    bench.check(rate_check("jwks_vs_hs256", "GET by id, JWKS RS256 / HS256", rs256, hs256, 0.9))


async def scenario_list(bench: Bench, server: Server, get: Measurement) -> Measurement:
    """Scenario 2: the first page and a deep page of the large account; the first page."""
    bench.say("scenario 2: list")
    seconds = bench.plan.seconds
    first = await measure(bench, server, "2", "service list, first page", "list_first.lua", seconds)
    deep = await measure(bench, server, "2", "service list, deep page", "list_deep.lua", seconds)
    bench.check(rate_check("list_vs_get", "list first page / GET by id", first, get, 0.6))
    what = "deep page / first page latency (p50)"
    bench.check(latency_check("deep_vs_first", what, deep, first, 1.2))
    return first


# Scenario 6's pages (tests/bench/wrk/inbox.lua), their targets against the default order's
# first page (p50), and what each is.
INBOX_PAGES = (
    ("first", "inbox_first_vs_first", 1.2, "first page"),
    ("deep", "inbox_deep_vs_first", 1.2, "deep page"),
    ("metadata", "inbox_metadata_vs_first", 2.0, "metadata[segment]=vip (1% of the account)"),
    ("unread", "inbox_unread_vs_first", 1.5, "unread=true"),
)


async def scenario_inbox(bench: Bench, server: Server, first: Measurement) -> None:
    """Scenario 6: the large account as an inbox pages it, by last activity: the first page, a
    deep one, one filtered by a metadata value, the unread ones; each against scenario 2's
    first page (the default order) measured in the same run."""
    bench.say("scenario 6: inbox, sort=-last_active_at")
    for page, key, maximum, what in INBOX_PAGES:
        subject = f"service inbox, {what}"
        measured = await measure(
            bench, server, "6", subject, "inbox.lua", bench.plan.seconds, args=(page,)
        )
        label = f"sort=-last_active_at {what} / default order's first page latency (p50)"
        bench.check(latency_check(key, label, measured, first, maximum))


async def scenario_inbox_alone(bench: Bench, server: Server) -> None:
    """Scenario 6 with the page it is measured against (scenario 2's first page) and nothing
    else: for `--only inbox`."""
    seconds = bench.plan.seconds
    first = await measure(bench, server, "2", "service list, first page", "list_first.lua", seconds)
    await scenario_inbox(bench, server, first)


async def scenario_writes(bench: Bench, server: Server) -> None:
    """Scenario 3: POST (also with an Idempotency-Key) and PUT against pgbench running the
    same transactions."""
    bench.say("scenario 3: writes")
    seconds = bench.plan.seconds
    await reset_muted(bench.dataset.database_url)
    post = await measure(
        bench, server, "3", "service POST /v1/conversations", "create.lua", seconds
    )
    keyed = await measure(
        bench, server, "3", "service POST with Idempotency-Key", "create.lua", seconds, ("keyed",)
    )
    put = await measure(
        bench, server, "3", "service PUT /v1/conversations/{id}", "update.lua", seconds
    )
    post_tx = await run_pgbench(bench, "3", "pgbench: the POST's SQL", "create.sql")
    put_tx = await run_pgbench(bench, "3", "pgbench: the PUT's SQL", "update.sql")
    bench.check(rate_check("post_vs_pgbench", "POST / pgbench same SQL", post, post_tx, 0.5))
    what = "POST with Idempotency-Key / POST without"
    bench.check(rate_check("keyed_post_vs_post", what, keyed, post, 0.85))
    bench.check(rate_check("put_vs_pgbench", "PUT / pgbench same SQL", put, put_tx, 0.5))


async def scenario_sync(bench: Bench, server: Server) -> None:
    """Scenario 7: a delta-sync walk of the large account against a keyset list walk at the same
    page size, then an incremental sync with nothing changed against one list page."""
    account = bench.dataset.accounts[0]
    bench.say(f"scenario 7: delta sync, {SYNC_WALK_ROUNDS} walks each way of {account}")
    bench.commands.note(
        f"scenario 7, in the harness (tests/bench/sync.py): {SYNC_WALK_ROUNDS} list walks and "
        f"{SYNC_WALK_ROUNDS} sync walks of {account}, {SYNC_PAGE} a page, alternating"
    )
    lists, syncs = [], []
    async with asyncpg.create_pool(
        bench.dataset.database_url, min_size=1, max_size=2, init=repository.init_connection
    ) as pool:
        for _ in range(SYNC_WALK_ROUNDS):
            lists.append(await list_walk(pool, account, SYNC_PAGE))
            syncs.append(await sync_walk(pool, account, SYNC_PAGE))
    list_rate, listed_rows = max(lists)
    sync_rate, synced_rows, token = max(syncs)
    listed = bench.add(
        Measurement(
            "7", f"list walk, {SYNC_PAGE} a page", _rate_only(list_rate, listed_rows), "rows/s"
        )
    )
    synced = bench.add(
        Measurement(
            "7",
            f"sync walk from nothing, {SYNC_PAGE} a page",
            _rate_only(sync_rate, synced_rows),
            "rows/s",
        )
    )
    what = "sync walk / keyset list walk, same page size"
    bench.check(rate_check("sync_walk_vs_list_walk", what, synced, listed, 0.8))
    (bench.dataset.data_dir / "sync_token.txt").write_text(token + "\n")
    seconds = bench.plan.seconds
    empty = await measure(
        bench, server, "7", "service sync, nothing changed", "sync_empty.lua", seconds
    )
    first = await measure(bench, server, "7", "service list, first page", "list_first.lua", seconds)
    what = "incremental sync, nothing changed / list first page"
    bench.check(rate_check("sync_empty_vs_list_page", what, empty, first, 1))


async def scenario_relay(bench: Bench, server: Server, sink: AbstractQueue) -> None:
    """Scenario 4: relay throughput against a raw publisher, then commit-to-subscriber latency."""
    amqp_url = os.environ["AMQP_URL"]
    count = bench.plan.relay_events
    bench.say(f"scenario 4: relay, {count:,} events")
    await wait_drained(bench.dataset.database_url)  # the writes' events first
    await sink.purge()
    bench.commands.note(f"scenario 4, in the harness (tests/bench/relay.py): {count:,} events")
    raw_rate = await raw_publisher(amqp_url, count)
    raw = bench.add(Measurement("4", "raw aio-pika publisher", _rate_only(raw_rate, count), "ev/s"))
    await sink.purge()
    relay_rate = await relay_drain(bench.dataset.database_url, count)
    relay = bench.add(
        Measurement("4", "service relay, outbox drain", _rate_only(relay_rate, count), "ev/s")
    )
    await sink.purge()
    bench.check(rate_check("relay_vs_raw", "relay / raw publisher", relay, raw, 0.8))
    rate, seconds = LATENCY_WRITES_PER_SECOND, bench.plan.latency_seconds
    bench.say(f"  commit-to-subscriber latency at {rate} POST/s for {seconds} s")
    bench.commands.note(f"then POST at {rate}/s for {seconds} s, a subscriber timing the events")
    server.reset_peak_rss()
    latency = await commit_to_subscriber(
        server.base_url,
        amqp_url,
        [bench.dataset.tokens[a] for a in bench.dataset.accounts[1:]],
        rate,
        seconds,
    )
    rss = tuple(server.peak_rss_mb())
    bench.add(Measurement("4", "POST at a steady rate: its answer", latency.answers, "POST/s", rss))
    events = bench.add(
        Measurement("4", "POST at a steady rate: its event", latency.events, "POST/s", rss)
    )
    await sink.purge()
    what = f"commit-to-subscriber p99 at {rate} writes/s"
    bench.check(limit_check("relay_latency", "4", what, events.load.p99_ms, 50, "ms"))


RELAY_COUNTS = (1, 2, 4)


@contextlib.asynccontextmanager
async def relay_processes(bench: Bench, count: int) -> AsyncIterator[list[tuple[int, int]]]:
    """`count` processes of `conversations relay`, as the relay Deployment runs them; yields
    their pids and HTTP ports once each answers /readyz."""
    command = str(Path(sys.executable).with_name("conversations"))
    async with contextlib.AsyncExitStack() as stack:
        relays = []
        for number in range(1, count + 1):
            port = free_port()
            env = {
                "DATABASE_URL": bench.dataset.database_url,
                "HOST": "127.0.0.1",
                "RELAY_HTTP_PORT": str(port),
                "EVENTS_EXCHANGE": EXCHANGE,
                "LOG_FORMAT": "json",
                "DB_POOL_MIN": "1",
                "DB_POOL_MAX": "2",
                "SHUTDOWN_TIMEOUT_SECONDS": "5",
            }

            async def ready(server: Server, port: int = port) -> bool:
                return await _answers(f"http://127.0.0.1:{port}/readyz", {})

            server = await stack.enter_async_context(
                running(
                    bench.commands,
                    f"relay {number} of {count}",
                    [command, "relay"],
                    env,
                    port=port,
                    workers=0,
                    log_path=BENCH_DIR / f"relay-{count}-{number}.log",
                    ready=ready,
                )
            )
            relays.append((server.process.pid, port))
        yield relays


def cpu_check(key: str, drain: SharedDrain, single: SharedDrain, maximum: float | None) -> Check:
    """The relays' CPU per event, N relays against one (None: no target)."""
    ratio = drain.relay_cpu_per_1k / single.relay_cpu_per_1k
    each = " / ".join(f"{cpu:.3f}" for cpu in drain.each_relay_cpu_per_1k)
    return Check(
        key,
        "9",
        f"relay CPU per event, {drain.relays} relays / 1 relay",
        f"{drain.relay_cpu_per_1k:.3f} CPU s per 1,000 (each relay: {each})",
        f"{single.relay_cpu_per_1k:.3f} CPU s per 1,000",
        ratio,
        "(no target)" if maximum is None else f"<= {maximum:g}",
        None if maximum is None else ratio <= maximum,
    )


async def scenario_relays(bench: Bench, sink: AbstractQueue) -> None:
    """Scenario 9: the same backlog drained by 1, 2 and 4 relays sharing the partitions."""
    amqp_url = os.environ["AMQP_URL"]
    count = bench.plan.relay_events
    bench.say(f"scenario 9: relays sharing the outbox, {count:,} events each run")
    bench.commands.note(
        f"scenario 9, in the harness (tests/bench/relay.py): {count:,} events, raw publisher, "
        f"then drained by {', '.join(map(str, RELAY_COUNTS))} `conversations relay` processes"
    )
    await sink.purge()
    raw_rate = await raw_publisher(amqp_url, count)
    raw = bench.add(Measurement("9", "raw aio-pika publisher", _rate_only(raw_rate, count), "ev/s"))
    await sink.purge()
    broker = broker_process(ROOT / ".dev" / "rabbitmq")
    drains: dict[int, SharedDrain] = {}
    rows: dict[int, Measurement] = {}
    for relays in RELAY_COUNTS:
        async with relay_processes(bench, relays) as running_relays:
            drain = await shared_drain(bench.dataset.database_url, count, running_relays, broker)
        await sink.purge()
        drains[relays] = drain
        each = ", ".join(f"{cpu:.3f}" for cpu in drain.each_relay_cpu_per_1k)
        rows[relays] = bench.add(
            Measurement(
                "9",
                f"{relays} relay{'s' if relays > 1 else ''} sharing the outbox (aggregate)",
                _rate_only(drain.rate, count),
                "ev/s",
            )
        )
        bench.say(
            f"    CPU s per 1,000 events: relays {drain.relay_cpu_per_1k:.3f} (each relay, per "
            f"1,000 of its own: {each}); {_others(drain)}"
        )
    one, two, four = (rows[n] for n in RELAY_COUNTS)
    bench.check(
        rate_check("relays_2_vs_1", "2 relays / 1 relay, aggregate events/s", two, one, 1.0)
    )
    bench.check(
        rate_check("relays_4_vs_1", "4 relays / 1 relay, aggregate events/s", four, one, None)
    )
    bench.check(cpu_check("relays_cpu_2_vs_1", drains[2], drains[1], 1.1))
    bench.check(cpu_check("relays_cpu_4_vs_1", drains[4], drains[1], None))
    bench.check(rate_check("relays_4_vs_raw", "4 relays / raw publisher", four, raw, None))
    most = drains[RELAY_COUNTS[-1]]  # the broker's and database's cost where many publish
    bench.relay_scaling_text = report.relay_scaling(
        drains[1].relay_cpu_per_1k,
        most.database_cpu_per_1k,
        most.broker_cpu_per_1k,
        {n: d.rate for n, d in drains.items()},
        raw_rate,
    )


def _others(drain: SharedDrain) -> str:
    database = drain.database_cpu_per_1k
    broker = drain.broker_cpu_per_1k
    return (
        f"their database sessions {'-' if database is None else f'{database:.3f}'}, "
        f"RabbitMQ {'-' if broker is None else f'{broker:.3f}'}"
    )


# Scenario 11's services: tracing off, then on (to the harness's OTLP sink) at two ratios.
TRACING_RUNS = {"off": None, "ratio 0.01": 0.01, "ratio 1.0": 1.0}


async def scenario_tracing(bench: Bench) -> None:
    """Scenario 11: GET by id with tracing off, then on at sampling ratios 0.01 and 1.0,
    exporting to a local OTLP sink; the service started afresh for each, the workers' CPU time
    read around each measured run. Each round runs the three in turn, every other round in
    the reverse order (so that a load on the machine that grows or fades during the run
    favours none of them); each one's best rate and lowest CPU per request count."""
    rounds: list[dict[str, tuple[Measurement, float]]] = []
    async with otlp_sink() as sink:
        for number in range(1, bench.plan.rounds + 1):
            label = f" (round {number} of {bench.plan.rounds})" if bench.plan.rounds > 1 else ""
            measured = {}
            order = list(TRACING_RUNS.items())
            for name, ratio in order if number % 2 else reversed(order):
                extra = {"OTEL_SDK_DISABLED": "true"}
                if ratio is not None:
                    extra = {
                        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": str(ratio),
                    }
                async with service(bench, extra_env=extra) as server:
                    subject = f"{SERVICE_GET}, tracing {name}{label}"
                    measured[name] = await _get_by_id_with_cpu(bench, server, subject)
            rounds.append(measured)
        bench.say(f"  the OTLP sink received {sink.exports:,} exports, {sink.bytes:,} bytes")
    best = {name: _best(tuple(measured[name][0] for measured in rounds)) for name in TRACING_RUNS}
    what = "GET by id, tracing at ratio 0.01 / off"
    bench.check(rate_check("tracing_001_vs_off", what, best["ratio 0.01"], best["off"], 0.95))
    what = "GET by id, tracing at ratio 1.0 / off"
    bench.check(rate_check("tracing_1_vs_off", what, best["ratio 1.0"], best["off"], None))
    for name in TRACING_RUNS:
        cpu = min(measured[name][1] for measured in rounds)
        bench.check(
            Check(
                f"tracing_cpu_{name}",
                "11",
                f"service CPU per GET by id, tracing {name} (lowest of the rounds)",
                f"{cpu:.0f} us",
                "-",
                None,
                "(no target)",
                None,
            )
        )


async def _get_by_id_with_cpu(
    bench: Bench, server: Server, subject: str
) -> tuple[Measurement, float]:
    """Warm up, then measure GET by id; also the workers' CPU microseconds per request."""
    await warm_up(bench, server, subject, "11")
    before = sum(cpu_seconds(pid) for pid in server.workers)
    measured = await measure(bench, server, "11", subject, "get_by_id.lua", bench.plan.seconds)
    used = sum(cpu_seconds(pid) for pid in server.workers) - before
    cpu = used / max(1, measured.load.requests) * 1e6
    bench.say(f"    workers' CPU: {cpu:.0f} us per request")
    return measured, cpu


# Scenarios that `--only` can run alone, against the service only (no peers, no document).
ALONE: dict[str, Callable[[Bench, Server], Awaitable[None]]] = {
    "inbox": scenario_inbox_alone,
    "writes": scenario_writes,
    "sync": scenario_sync,
}


def _rate_only(rate: float, count: int) -> LoadResult:
    return LoadResult(rate, float("nan"), float("nan"), count, 0)


def _quarter_means(samples: list[int]) -> list[float]:
    """The mean of each quarter of the samples (fewer than four samples: each on its own)."""
    size = max(1, len(samples) // 4)
    quarters = [samples[i : i + size] for i in range(0, size * 4, size)]
    return [sum(quarter) / len(quarter) for quarter in quarters if quarter]


async def scenario_mixed(bench: Bench, server: Server) -> None:
    """Scenario 5: sustained 80/20 load; no failure, a bounded backlog, bounded memory."""
    seconds = bench.plan.mixed_seconds
    bench.say(f"scenario 5: mixed load for {seconds} s")
    await wait_drained(bench.dataset.database_url)
    await reset_muted(bench.dataset.database_url)
    async with backlog_sampler(bench.dataset.database_url) as samples:
        mixed = await measure(
            bench, server, "5", "service mixed 80% read / 20% write", "mixed.lua", seconds
        )
    drain = await wait_drained(bench.dataset.database_url)
    bench.say(f"  outbox backlog, pending events every second: {samples}")
    writes = mixed.load.rate * MIXED_WRITE_SHARE
    growth = (samples[-1] - samples[0]) / max(1, len(samples) - 1) if samples else 0.0
    bench.say(
        f"  writes about {writes:,.0f}/s, backlog growth {growth:,.0f}/s: the relay published "
        f"about {writes - growth:,.0f} events/s under this load; empty {drain:.1f} s after it"
    )
    quarters = _quarter_means(samples)
    # Bounded: no sustained growth (the last quarter's mean within one relay batch of the second
    # quarter's), and the relay catches up soon after the load.
    sustained = quarters[-1] - quarters[min(1, len(quarters) - 1)]
    bounded = sustained <= BACKLOG_GROWTH_SLACK and drain <= BACKLOG_DRAIN_SECONDS
    failures = mixed.load.failures
    bench.check(
        Check(
            "mixed_failures",
            "5",
            "mixed: failed requests",
            f"{failures:,} of {mixed.load.requests:,}",
            "-",
            None,
            "0",
            failures == 0,
        )
    )
    bench.check(
        Check(
            "mixed_backlog",
            "5",
            "mixed: outbox backlog (pending, mean per quarter of the run; empty after)",
            " / ".join(f"{mean:,.0f}" for mean in quarters) + f"; {drain:.1f} s",
            f"writes {writes:,.0f}/s, relay {writes - growth:,.0f}/s",
            None,
            f"4th - 2nd <= {BACKLOG_GROWTH_SLACK}; <= {BACKLOG_DRAIN_SECONDS:g} s",
            bounded,
        )
    )
    largest = max(mixed.rss_mb)
    bench.check(limit_check("mixed_rss", "5", "mixed: peak RSS per worker", largest, 150, "MB"))


async def versions(database_url: str) -> dict[str, str]:
    """PostgreSQL's and RabbitMQ's versions, from the servers themselves."""
    conn = await asyncpg.connect(database_url)
    try:
        postgres = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {"PostgreSQL": postgres, "RabbitMQ": await broker_version(os.environ["AMQP_URL"])}


async def main(plan: Plan) -> None:
    """Seed, measure every scenario, print the tables, rewrite docs/benchmarks.md."""
    missing = [name for name in REQUIRED_VARIABLES if not os.environ.get(name)]
    if missing:
        sys.exit(f"{', '.join(missing)} not set: run the benchmarks with `make bench`")
    # SIGINT or SIGTERM cancels the run, so that every `async with` stops what it started (a
    # background job's SIGINT may be ignored, and SIGTERM would end the process without that).
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    if task is not None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
    started, load_before = time.monotonic(), report.load_average()
    server_url = os.environ["DATABASE_URL"]
    print(f"make bench ({plan.mode}): seeding {BENCH_DIR.relative_to(ROOT)} data", flush=True)
    dataset = await seed(server_url, plan.data, load_auth_settings(), BENCH_DIR)
    bench = Bench(plan, dataset, Commands(server_url, ROOT), started)
    bench.say(f"seeded {dataset.rows:,} rows in {dataset.seconds:.1f} s")
    bench.commands.note(
        f"seed (tests/bench/seed.py): drop and create {BENCH_DATABASE}, `conversations migrate`, "
        f"COPY {dataset.rows:,} rows, VACUUM ANALYZE"
    )
    async with broker_sink(os.environ["AMQP_URL"]) as sink:
        if plan.only:
            # Scenarios that start their own services (or relays, and no service).
            own: dict[str, Callable[[], Awaitable[None]]] = {
                "relays": lambda: scenario_relays(bench, sink),
                "ratelimits": lambda: scenario_rate_limits(bench),
                "jwks": lambda: scenario_jwks(bench),
                "tracing": lambda: scenario_tracing(bench),
            }
            for name in plan.only:
                if name in own:
                    await own[name]()
                    continue
                async with service(bench) as server:
                    if name == "relay":  # the service's relay, and the broker's sink
                        await scenario_relay(bench, server, sink)
                    else:
                        await ALONE[name](bench, server)
            _print_tables(bench)
            return
        rounds = await scenario_get_by_id(bench)
        async with service(bench) as server:
            label = f" (round {plan.rounds} of {plan.rounds})" if plan.rounds > 1 else ""
            rounds[-1].append(await get_by_id(bench, server, SERVICE_GET + label))
            get = check_get_by_id(bench, rounds)
            if plan.profile:
                bench.profile_text = await profile_get_by_id(bench, server)
            first = await scenario_list(bench, server, get)
            await scenario_inbox(bench, server, first)
            await scenario_sync(bench, server)  # before the writes: nothing changes meanwhile
            await scenario_writes(bench, server)
            await scenario_relay(bench, server, sink)
            await scenario_mixed(bench, server)
        await scenario_rate_limits(bench)
        await scenario_jwks(bench)
        await scenario_tracing(bench)
        await scenario_relays(bench, sink)  # its own relays: the service's would join them
    elapsed = time.monotonic() - started
    machine = report.machine(
        ROOT,
        await versions(dataset.database_url),
        mode=plan.mode,
        seconds=elapsed,
        rows=dataset.rows,
        pgbench=find_pgbench(),
        load_before=load_before,
    )
    document = report.render(
        machine_text=machine,
        measurements=bench.measurements,
        checks=bench.checks,
        profile_text=bench.profile_text,
        relay_scaling_text=bench.relay_scaling_text,
        commands=bench.commands.lines,
    )
    DOC.write_text(document)
    _print_tables(bench)
    print(f"\n{DOC.relative_to(ROOT)} rewritten; {elapsed / 60:.1f} min in all", flush=True)


def _print_tables(bench: Bench) -> None:
    print()
    print(report.measurements_table(bench.measurements))
    print()
    print(report.targets_table(bench.checks))
    print()
    print(report.missed_notes(bench.checks))
    if bench.relay_scaling_text != report.NO_RELAY_SCALING:
        print()
        print(bench.relay_scaling_text)


def parse_args(argv: list[str] | None = None) -> Plan:
    """The plan the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="less data and 5 s runs (under 3 min)")
    parser.add_argument("--profile", action="store_true", help="profile in quick mode too (py-spy)")
    parser.add_argument(
        "--only",
        choices=sorted([*ALONE, "relay", "relays", "ratelimits", "jwks", "tracing"]),
        action="append",
        default=[],
        help="run only this scenario (repeatable); prints, writes no document",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.only and set(args.only) <= {"relay", "relays"}:  # no seeded rows read: seed the least
        plan = dataclasses.replace(plan, data=ONLY_SEED)
    return dataclasses.replace(plan, profile=plan.profile or args.profile, only=tuple(args.only))


if __name__ == "__main__":
    try:
        uvloop.run(main(parse_args()))
    except (KeyboardInterrupt, asyncio.CancelledError):  # the servers are stopped by then
        sys.exit("make bench: interrupted; every process it started is stopped")
