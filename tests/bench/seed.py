"""The benchmark database: created afresh, migrated, seeded by COPY, and the files wrk reads.

Every run drops and recreates `conversations_bench`, so that each run measures the same data
(no rows or dead tuples left by the writes of an earlier run). Seeding takes about 3 s per
100,000 rows here, most of it spent making ids with `service.ids.new_id`.
"""

import asyncio
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from schemas.cursor import Position, Sort, encode
from service.api.auth import READ_SCOPE, WRITE_SCOPE, mint_token
from service.conversations.ids import new_id
from service.conversations.repository import RESOURCE_FIELDS
from service.settings import AuthSettings

BENCH_DATABASE = "conversations_bench"
LARGE_ACCOUNT = "acct_large"
COLUMNS = ("account_id", *RESOURCE_FIELDS, "version")  # the table's, in COPY order
COPY_CHUNK = 50_000
# GET-by-id and PUT targets: this many per small account, and this many in the large one.
TARGETS_PER_ACCOUNT = 10
LARGE_TARGETS = 10_000
# Deep-page cursors: ids among the large account's oldest rows, each with >= one full page after it.
DEEP_CURSORS = 1_000
PAGE = 10
# Tokens outlive the longest run by far.
TOKEN_TTL_SECONDS = 4 * 3600
# pgbench cannot read ids from a file: its scripts pick row `n` of this copy of the targets.
CREATE_TARGETS_TABLE = """
CREATE TABLE bench_targets (
    n          integer PRIMARY KEY,
    account_id text NOT NULL,
    id         text COLLATE "C" NOT NULL
)
"""
# The inbox's shape: 5% never active, 10% of the active ones unread, 1% in the segment that the
# inbox scenario filters on (metadata[segment]=vip), a third labelled with one of ten teams.
NEVER_ACTIVE = 0.05
UNREAD = 0.10
SEGMENT = '{"segment": "vip"}'
SEGMENT_SHARE = 0.01
TEAMS = [f'{{"team": "t{n}"}}' for n in range(10)]
# The last positions of the large account's activity order that have a full page after them
# (the deep page of the inbox scenario; the end of that order is the never-active group).
SELECT_ACTIVITY_TAIL = """
SELECT id, last_active_at FROM conversations WHERE account_id = $1
ORDER BY COALESCE(last_active_at, -1) DESC, id DESC OFFSET $2 LIMIT $3
"""
RESET_MUTED = """
UPDATE conversations c SET is_muted = false
FROM bench_targets t
WHERE c.account_id = t.account_id AND c.id = t.id AND c.is_muted
"""


@dataclass(frozen=True)
class SeedPlan:
    """How much data: `accounts` small accounts of `per_account` rows, and one large account."""

    accounts: int
    per_account: int
    large_account_rows: int


@dataclass(frozen=True)
class Dataset:
    """What was seeded, and where the files for wrk are."""

    database_url: str
    accounts: list[str]  # index 0 is LARGE_ACCOUNT
    tokens: dict[str, str]  # account id -> bearer token (read and write scopes)
    targets: list[tuple[str, str]]  # (account_id, conversation id)
    rows: int
    data_dir: Path
    seconds: float


def database_url(server_url: str, name: str = BENCH_DATABASE) -> str:
    """`server_url` pointed at database `name`."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def _row(
    rng: random.Random, account_id: str, conversation_id: str, position: int, created_ms: int
) -> tuple[object, ...]:
    """One conversation as stored: a realistic mix of contacts, groups, flags, timestamps and
    labels."""
    created_at = created_ms // 1000
    is_group = rng.random() < 0.1
    is_pinned = rng.random() < 0.03
    last_active_at = None
    last_opened_at = None
    if rng.random() >= NEVER_ACTIVE:
        last_active_at = created_at + rng.randrange(0, 3 * 86_400)
        unread = rng.random() < UNREAD
        last_opened_at = last_active_at - rng.randrange(1, 86_400) if unread else last_active_at
    labels = rng.random()
    if labels < SEGMENT_SHARE:
        metadata = SEGMENT
    elif labels < 0.34:
        metadata = rng.choice(TEAMS)
    else:
        metadata = "{}"
    return (
        account_id,
        conversation_id,
        None if is_group else f"ct_{position}",
        f"grp_{position}" if is_group else None,
        f"msg_{position}" if is_pinned else None,
        is_pinned,
        rng.random() < 0.1,
        last_active_at,
        last_opened_at,
        created_at,
        created_at + 86_400 if rng.random() < 0.05 else None,
        metadata,
        1,
    )


class _Generator:
    """Rows in creation order (each 1 s after the previous), remembering the sampled ids."""

    def __init__(self, plan: SeedPlan, seed: int = 20_250_101) -> None:
        self.rng = random.Random(seed)
        self.plan = plan
        total = plan.accounts * plan.per_account + plan.large_account_rows
        self.next_ms = (time.time_ns() // 1_000_000) - (total + 60) * 1000
        self.targets: list[tuple[str, str]] = []
        self.cursors: list[str] = []

    def account(self, account_id: str, count: int, sampled: int) -> Iterator[tuple[object, ...]]:
        picks = set(self.rng.sample(range(count), sampled))
        deep = range(PAGE + 1, PAGE + 1 + DEEP_CURSORS) if account_id == LARGE_ACCOUNT else ()
        for position in range(count):
            conversation_id = new_id(self.next_ms)
            yield _row(self.rng, account_id, conversation_id, position, self.next_ms)
            self.next_ms += 1000
            if position in picks:
                self.targets.append((account_id, conversation_id))
            if position in deep:
                self.cursors.append(conversation_id)

    def rows(self, accounts: list[str]) -> Iterator[tuple[object, ...]]:
        yield from self.account(LARGE_ACCOUNT, self.plan.large_account_rows, LARGE_TARGETS)
        for account_id in accounts[1:]:
            yield from self.account(account_id, self.plan.per_account, TARGETS_PER_ACCOUNT)


async def _recreate(server_url: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    finally:
        await admin.close()


async def _migrate(url: str) -> None:
    """`conversations migrate`, the command operators run."""
    command = Path(sys.executable).with_name("conversations")
    process = await asyncio.create_subprocess_exec(
        str(command),
        "migrate",
        env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"conversations migrate failed:\n{output.decode()}")


async def _copy(conn: asyncpg.Connection, rows: Iterator[tuple[object, ...]]) -> int:
    total = 0
    chunk: list[tuple[object, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == COPY_CHUNK:
            await conn.copy_records_to_table("conversations", records=chunk, columns=COLUMNS)
            total += len(chunk)
            chunk = []
    if chunk:
        await conn.copy_records_to_table("conversations", records=chunk, columns=COLUMNS)
        total += len(chunk)
    return total


async def _activity_cursors(conn: asyncpg.Connection, rows: int) -> list[str]:
    """Cursors of sort=-last_active_at at the end of the large account's activity order, each
    with a full page after it."""
    count = min(DEEP_CURSORS, max(0, rows - PAGE - 1))
    records = await conn.fetch(SELECT_ACTIVITY_TAIL, LARGE_ACCOUNT, rows - PAGE - 1 - count, count)
    return [encode(Sort.ACTIVITY, Position(r["id"], r["last_active_at"])) for r in records]


def _write_files(
    data_dir: Path,
    accounts: list[str],
    tokens: dict[str, str],
    generator: _Generator,
    activity_cursors: list[str],
) -> None:
    """tokens.txt (`account token`, line 1 is the large account), targets.txt (`line id`, the
    line of the account in tokens.txt), cursors.txt (one id a line), activity_cursors.txt (one
    cursor of sort=-last_active_at a line)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    line_of = {account_id: line for line, account_id in enumerate(accounts, start=1)}
    (data_dir / "tokens.txt").write_text("".join(f"{a} {tokens[a]}\n" for a in accounts))
    targets = (f"{line_of[account_id]} {cid}\n" for account_id, cid in generator.targets)
    (data_dir / "targets.txt").write_text("".join(targets))
    (data_dir / "cursors.txt").write_text("".join(f"{cid}\n" for cid in generator.cursors))
    (data_dir / "activity_cursors.txt").write_text("".join(f"{c}\n" for c in activity_cursors))


async def seed(server_url: str, plan: SeedPlan, auth: AuthSettings, data_dir: Path) -> Dataset:
    """Drop, create, migrate and fill the benchmark database; write the files wrk reads."""
    started = time.perf_counter()
    url = database_url(server_url)
    await _recreate(server_url)
    await _migrate(url)
    accounts = [LARGE_ACCOUNT] + [f"acct_{n:05d}" for n in range(1, plan.accounts + 1)]
    generator = _Generator(plan)
    conn = await asyncpg.connect(url)
    try:
        rows = await _copy(conn, generator.rows(accounts))
        await conn.execute(CREATE_TARGETS_TABLE)
        await conn.copy_records_to_table(
            "bench_targets",
            records=[(n, a, cid) for n, (a, cid) in enumerate(generator.targets, start=1)],
        )
        await conn.execute("VACUUM ANALYZE")
        activity_cursors = await _activity_cursors(conn, plan.large_account_rows)
    finally:
        await conn.close()
    scopes = [READ_SCOPE, WRITE_SCOPE]
    tokens = {a: mint_token(auth, a, scopes, TOKEN_TTL_SECONDS) for a in accounts}
    _write_files(data_dir, accounts, tokens, generator, activity_cursors)
    return Dataset(
        url, accounts, tokens, generator.targets, rows, data_dir, time.perf_counter() - started
    )


async def reset_muted(url: str) -> None:
    """Unmute every target, so that each PUT of a write scenario (which toggles from the state
    it last set, starting at false) is a real change: a version bump and an outbox row."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(RESET_MUTED)
    finally:
        await conn.close()
