"""Delta sync (GET /v1/conversations/changes) against the real PostgreSQL: walks reproduce the
account, a change that commits late is delivered late and never skipped, random interleavings
converge, and tokens are checked (malformed 422, past the retention 410)."""

import asyncio
import base64
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas import ConversationChangesSchema
from service.api.app import create_app, housekeeping_task
from service.conversations import housekeeping, outbox, repository, sync
from service.conversations.ids import new_id
from service.conversations.repository import RESOURCE_FIELDS, StoredConversation
from tests.error_bodies import error_body
from tests.events_support import wait_until

CHANGES = "/v1/conversations/changes"
DAY = 86_400
RETENTION = 30 * DAY

Copy = dict[str, dict[str, Any]]


def apply(copy: Copy, items: list[dict[str, Any]]) -> None:
    """What a client does with a page: the later item wins, a deletion removes."""
    for item in items:
        if item.get("deleted") is True:
            copy.pop(item["id"], None)
        else:
            copy[item["id"]] = item


STATE = f"SELECT {', '.join(RESOURCE_FIELDS)} FROM conversations WHERE account_id = $1"  # noqa: S608


async def state(db: asyncpg.Connection | asyncpg.Pool, account: str) -> Copy:
    """The account as a direct read sees it (metadata decoded, whatever the connection's codecs)."""
    rows = await db.fetch(STATE, account)
    copy = {row["id"]: dict(row) for row in rows}
    for item in copy.values():
        if isinstance(item["metadata"], str):
            item["metadata"] = orjson.loads(item["metadata"])
    return copy


async def connect(db_url: str) -> asyncpg.Connection:
    """A connection that reads and writes metadata as the service's pool does."""
    conn = await asyncpg.connect(db_url)
    await repository.init_connection(conn)
    return conn


def create_pool(db_url: str, **kwargs: Any) -> asyncpg.Pool:
    """A pool whose connections read and write metadata as the service's pool does."""
    return asyncpg.create_pool(db_url, init=repository.init_connection, **kwargs)


async def page(client: TestClient, headers: dict, **query) -> dict:
    resp = await client.get(CHANGES, params=query, headers=headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert ConversationChangesSchema().load(body) == body
    return body


async def walk(
    client: TestClient, headers: dict, copy: Copy, since: str | None = None, limit: int = 100
) -> tuple[str, list[list[dict]]]:
    """Pages until has_more is false, applied to `copy`; the token to keep, and the pages."""
    pages = []
    while True:
        query: dict[str, Any] = {"limit": limit}
        if since is not None:
            query["since"] = since
        body = await page(client, headers, **query)
        apply(copy, body["data"])
        pages.append(body["data"])
        since = body["next_since"]
        if not body["has_more"]:
            return since, pages


async def create(client: TestClient, headers: dict, contact: str) -> dict:
    resp = await client.post("/v1/conversations", json={"contact_id": contact}, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_full_then_incremental_walks_reproduce_the_account(client, headers, db, account):
    made = [await create(client, headers, f"ct_{n}") for n in range(23)]
    copy: Copy = {}
    token, pages = await walk(client, headers, copy, limit=5)
    assert len(pages) == 5  # 23 items, 5 a page
    assert copy == await state(db, account)

    # Updates, deletes, and a new conversation for a deleted one's contact.
    for conversation in made[:4]:
        resp = await client.patch(
            f"/v1/conversations/{conversation['id']}", json={"is_muted": True}, headers=headers
        )
        assert resp.status == 200
    for conversation in made[4:8]:
        resp = await client.delete(f"/v1/conversations/{conversation['id']}", headers=headers)
        assert resp.status == 200
    again = await create(client, headers, made[4]["contact_id"])
    assert again["id"] != made[4]["id"]

    token, pages = await walk(client, headers, copy, since=token, limit=3)
    assert copy == await state(db, account)
    delivered = [item for items in pages for item in items]
    assert {item["id"] for item in delivered if item.get("deleted")} == {c["id"] for c in made[4:8]}
    assert again in delivered
    # Nothing from before this sync's start comes again but what was changed since.
    assert {item["id"] for item in delivered} <= {c["id"] for c in made[:8]} | {again["id"]}

    # Nothing changed: at most the last walk's tail again, then nothing at all.
    token, _ = await walk(client, headers, copy, since=token)
    token, pages = await walk(client, headers, copy, since=token)
    assert pages == [[]]
    assert copy == await state(db, account)


async def test_a_walk_from_nothing_skips_earlier_deletions_and_other_accounts(
    client, headers, make_token, db, account
):
    kept = await create(client, headers, "ct_kept")
    gone = await create(client, headers, "ct_gone")
    assert (await client.delete(f"/v1/conversations/{gone['id']}", headers=headers)).status == 200
    other = {"Authorization": f"Bearer {make_token('acct_other_' + uuid.uuid4().hex[:6])}"}
    await create(client, other, "ct_kept")

    body = await page(client, headers)
    assert body["data"] == [kept]
    assert body["has_more"] is False
    other_body = await page(client, other)
    assert [item["contact_id"] for item in other_body["data"]] == ["ct_kept"]
    assert other_body["data"][0]["id"] != kept["id"]


# --- late commits ----------------------------------------------------------------------------


def _event(kind: str, account: str, conversation: StoredConversation, sequence: int) -> tuple:
    event = outbox.build_event(kind, account, conversation.resource, sequence)
    return outbox.event_row(event, None)


def _new_resource(contact: str) -> dict[str, Any]:
    now_ms = time.time_ns() // 1_000_000
    return {
        "id": new_id(now_ms),
        "contact_id": contact,
        "group_id": None,
        "pinned_message_id": None,
        "is_pinned": False,
        "is_muted": False,
        "last_active_at": None,
        "last_opened_at": None,
        "created_at": now_ms // 1000,
        "archived_at": None,
        "metadata": {},
    }


async def write(conn: asyncpg.Connection, account: str, action: str, target: str | None) -> None:
    """One write through the repository's own statements: `create` (target: a contact),
    `update` or `delete` (target: a conversation id)."""
    if action == "create":
        resource = _new_resource(target)
        stored = StoredConversation(resource, 1)
        await repository.insert(conn, account, resource, _event(outbox.CREATED, account, stored, 1))
        return
    current = await repository.get(conn, account, target)
    assert current is not None
    if action == "update":
        resource = {**current.resource, "is_muted": not current.resource["is_muted"]}
        after = StoredConversation(resource, current.version + 1)
        event = _event(outbox.UPDATED, account, after, after.version)
        assert await repository.update(conn, account, resource, current.version, event)
    else:
        event = _event(outbox.DELETED, account, current, current.version + 1)
        assert await repository.delete(conn, account, target, current.version, event)


@contextlib.asynccontextmanager
async def written_and_open(
    db_url: str, account: str, action: str, target: str
) -> AsyncIterator[None]:
    """A transaction on a connection of its own that writes first (so its position is the lower
    one) and stays open while the block runs; it commits when the block ends."""
    conn = await connect(db_url)
    try:
        async with conn.transaction():
            await write(conn, account, action, target)
            yield
    finally:
        await conn.close()


@pytest.mark.parametrize("action", ["create", "update", "delete"])
async def test_a_change_that_commits_late_is_delivered_late(
    client, headers, db, db_url, account, action
):
    first = await create(client, headers, "ct_first")
    second = await create(client, headers, "ct_second")
    copy: Copy = {}
    token, _ = await walk(client, headers, copy)

    # A writes first (so its transaction id, the position, is the lower one)...
    target = "ct_late" if action == "create" else first["id"]
    async with written_and_open(db_url, account, action, target):
        # ...B writes and commits after it...
        resp = await client.patch(
            f"/v1/conversations/{second['id']}", json={"is_pinned": True}, headers=headers
        )
        assert resp.status == 200
        # ...a sync reads between B's commit and A's: B's change only.
        token, pages = await walk(client, headers, copy, since=token)
        assert [item["id"] for items in pages for item in items] == [second["id"]]
        assert copy == await state(db, account)  # A's change is not visible yet

    token, pages = await walk(client, headers, copy, since=token)
    delivered = [item for items in pages for item in items]
    assert copy == await state(db, account)
    if action == "create":
        assert any(item.get("contact_id") == "ct_late" for item in delivered)
    elif action == "update":
        assert copy[first["id"]]["is_muted"] is True
    else:
        assert {"id": first["id"], "deleted": True} in delivered
        assert first["id"] not in copy


async def test_a_change_that_commits_in_the_middle_of_a_walk_is_not_skipped(
    client, headers, db, db_url, account
):
    a, b, c = [await create(client, headers, f"ct_{n}") for n in range(3)]
    copy: Copy = {}
    token, _ = await walk(client, headers, copy)
    # A: the lowest position of the three, committed in the middle of the walk.
    async with written_and_open(db_url, account, "update", a["id"]):
        for conversation in (b, c):
            resp = await client.patch(
                f"/v1/conversations/{conversation['id']}", json={"is_pinned": True}, headers=headers
            )
            assert resp.status == 200
        # The walk's first page passes A's position while A is still open...
        body = await page(client, headers, since=token, limit=1)
        assert [item["id"] for item in body["data"]] == [b["id"]]
        assert body["has_more"] is True
        apply(copy, body["data"])
    # ...and A has committed before the walk ends.
    token, _ = await walk(client, headers, copy, since=body["next_since"], limit=1)
    token, _ = await walk(client, headers, copy, since=token, limit=1)
    assert copy == await state(db, account)
    assert copy[a["id"]]["is_muted"] is True


async def test_a_transaction_held_open_across_many_pages_is_not_skipped(
    client, headers, db, db_url, account
):
    made = [await create(client, headers, f"ct_{n}") for n in range(6)]
    copy: Copy = {}
    token, _ = await walk(client, headers, copy)
    async with written_and_open(db_url, account, "update", made[0]["id"]):
        # Many more changes than a page while it stays open: every walk still ends.
        for _ in range(3):
            for conversation in made[1:]:
                resp = await client.patch(
                    f"/v1/conversations/{conversation['id']}",
                    json={"last_active_at": int(time.time()) + _},
                    headers=headers,
                )
                assert resp.status == 200
            token, _pages = await walk(client, headers, copy, since=token, limit=2)
    token, _ = await walk(client, headers, copy, since=token, limit=2)
    assert copy == await state(db, account)
    assert copy[made[0]["id"]]["is_muted"] is True


async def test_concurrent_writers_with_held_locks_converge_over_http(
    client, headers, db, db_url, account
):
    """Writers over HTTP while another session keeps taking row locks (so that writes wait
    inside their statement, with their transaction id already taken, and commit late), and a
    client syncing in small pages all along: after the last write, a walk equals the account."""
    contacts = [f"ct_{n}" for n in range(12)]
    for contact in contacts:
        await create(client, headers, contact)
    copy: Copy = {}
    token, _ = await walk(client, headers, copy)
    writing = True
    rng = random.Random(11)

    async def writer(seed: int, reader: asyncpg.Pool) -> None:
        own = random.Random(seed)
        for _ in range(30):
            ids = list(await state(reader, account))
            action = own.choice(["patch", "patch", "delete", "create"])
            if action == "create" or not ids:
                resp = await client.post(
                    "/v1/conversations", json={"contact_id": own.choice(contacts)}, headers=headers
                )
                assert resp.status in (200, 201)
            elif action == "patch":
                resp = await client.patch(
                    f"/v1/conversations/{own.choice(ids)}",
                    json={"last_active_at": own.randrange(10**9)},
                    headers=headers,
                )
                assert resp.status in (200, 404)
            else:
                resp = await client.delete(f"/v1/conversations/{own.choice(ids)}", headers=headers)
                assert resp.status in (200, 404)

    async def locker() -> None:
        conn = await connect(db_url)
        try:
            while writing:
                async with conn.transaction():
                    await conn.fetch(
                        "SELECT id FROM conversations WHERE account_id = $1 "
                        "ORDER BY id LIMIT 3 OFFSET $2 FOR UPDATE",
                        account,
                        rng.randrange(8),
                    )
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    async def syncer() -> None:
        nonlocal token
        while writing:
            body = await page(client, headers, since=token, limit=3)
            apply(copy, body["data"])
            token = body["next_since"]

    background = [asyncio.create_task(locker()), asyncio.create_task(syncer())]
    try:
        async with create_pool(db_url, min_size=1, max_size=3) as reader:
            await asyncio.gather(*(writer(seed, reader) for seed in range(3)))
    finally:
        writing = False
        await asyncio.gather(*background)
    token, _ = await walk(client, headers, copy, since=token, limit=3)
    assert copy == await state(db, account)


# --- random interleavings ----------------------------------------------------------------------

CONNECTIONS = 3
_writer = st.integers(0, CONNECTIONS - 1)
# Writes and one-item sync pages often, so that walks span many pages while transactions stay
# open across them; the occasional big page ends a walk in one snapshot.
_action = st.one_of(
    st.tuples(st.just("begin"), _writer),
    st.tuples(st.just("commit"), _writer),
    st.tuples(st.just("rollback"), _writer),
    st.tuples(st.just("create"), _writer, st.integers(0, 5)),
    st.tuples(st.just("update"), _writer, st.integers(0, 30)),
    st.tuples(st.just("update"), _writer, st.integers(0, 30)),
    st.tuples(st.just("delete"), _writer, st.integers(0, 30)),
    st.tuples(st.just("sync"), st.sampled_from([1, 1, 1, 2, 1000])),
    st.tuples(st.just("sync"), st.just(1)),
)


class Interleaving:
    """Writers on several connections (each maybe inside a transaction left open), and a sync
    client that pages along; nothing a writer does may wait on another's lock."""

    def __init__(self, pool: asyncpg.Pool, writers: list[asyncpg.Connection]) -> None:
        self.pool = pool
        self.writers = writers
        self.account = f"acct_{uuid.uuid4().hex[:10]}"
        self.open: dict[int, Any] = {}
        self.touched: dict[int, set[str]] = {i: set() for i in range(len(writers))}
        self.copy: Copy = {}
        self.since: str | None = None

    def _free(self, writer: int, key: str) -> bool:
        return all(key not in keys for other, keys in self.touched.items() if other != writer)

    async def run(self, step: tuple) -> None:
        kind, argument = step[0], step[1]
        if kind == "sync":
            await self.sync(argument)
            return
        conn = self.writers[argument]
        if kind == "begin" and argument not in self.open:
            self.open[argument] = conn.transaction()
            await self.open[argument].start()
        elif kind in ("commit", "rollback") and argument in self.open:
            transaction = self.open.pop(argument)
            await (transaction.commit() if kind == "commit" else transaction.rollback())
            self.touched[argument].clear()
        elif kind == "create":
            contact = f"ct_{step[2]}"
            visible = await repository.find_by_participant(conn, self.account, contact, None)
            if visible is None and self._free(argument, contact):
                await self._write(argument, "create", contact, contact)
        elif kind in ("update", "delete"):
            rows = await conn.fetch(
                "SELECT id, contact_id FROM conversations WHERE account_id = $1 ORDER BY id",
                self.account,
            )
            if rows:
                row = rows[step[2] % len(rows)]
                if self._free(argument, row["id"]) and self._free(argument, row["contact_id"]):
                    await self._write(argument, kind, row["id"], row["contact_id"])

    async def _write(self, writer: int, action: str, target: str, contact: str) -> None:
        await write(self.writers[writer], self.account, action, target)
        if writer in self.open:  # its row and contact stay locked until it ends
            self.touched[writer] |= {target, contact}

    async def sync(self, limit: int) -> None:
        page = await sync.changes(
            self.pool, self.account, self.since, limit=limit, retention_seconds=RETENTION
        )
        apply(self.copy, page.items)
        self.since = page.next_since
        if limit > 100 and not page.has_more:
            # Fewer changes than a page since the walk began: its last page read them all in
            # one snapshot, so the copy is the committed state (nothing committed since).
            async with self.pool.acquire() as conn:
                assert self.copy == await state(conn, self.account)

    async def finish(self) -> None:
        """Every transaction ends; then a walk to the end must equal the account."""
        for writer in list(self.open):
            await self.run(("commit", writer))
        for _ in range(1000):
            page = await sync.changes(
                self.pool, self.account, self.since, limit=3, retention_seconds=RETENTION
            )
            apply(self.copy, page.items)
            self.since = page.next_since
            if not page.has_more:
                break
        async with self.pool.acquire() as conn:
            assert self.copy == await state(conn, self.account)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(_action, max_size=60))
# Always tried: a transaction open while a walk's page passes its position, committing before
# the walk ends.
@example(
    steps=[
        ("create", 0, 1),
        ("create", 0, 2),
        ("create", 0, 3),
        ("sync", 1000),
        ("begin", 1),
        ("update", 1, 0),
        ("update", 2, 1),
        ("update", 2, 2),
        ("sync", 1),
        ("commit", 1),
    ]
)
def test_random_interleavings_converge(db_url, steps):
    async def scenario() -> None:
        async with create_pool(db_url, min_size=1, max_size=2) as pool:
            writers = [await connect(db_url) for _ in range(CONNECTIONS)]
            try:
                interleaving = Interleaving(pool, writers)
                for step in steps:
                    await interleaving.run(step)
                await interleaving.finish()
            finally:
                for conn in writers:
                    await conn.close()

    asyncio.run(scenario())


async def test_a_walk_that_fits_a_page_equals_the_account_while_transactions_are_open(db_url, db):
    """The promise's "state at some moment": a walk's last page holds everything since its
    floor in one snapshot, so with uncommitted work around, the copy equals what is committed."""
    async with create_pool(db_url, min_size=1, max_size=2) as pool:
        writers = [await connect(db_url) for _ in range(2)]
        try:
            run = Interleaving(pool, writers)
            for step in [
                ("create", 0, 1),
                ("create", 1, 2),
                ("begin", 0),
                ("create", 0, 3),
                ("sync", 1000),
                ("update", 1, 0),
                ("begin", 1),
                ("delete", 1, 1),
                ("sync", 1000),
            ]:
                await run.run(step)
                if step[0] == "sync":
                    assert run.copy == await state(db, run.account)
            await run.finish()
        finally:
            for conn in writers:
                await conn.close()


# --- tokens and retention ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        {"since": "not a token"},
        {"since": "AAAA"},
        {"since": base64.urlsafe_b64encode(b"\x01" * 41).decode().rstrip("=")},
    ],
)
async def test_a_malformed_token_is_422_with_param_since(client, headers, query):
    resp = await client.get(CHANGES, params=query, headers=headers)
    await error_body(resp, 422, "validation_error", param="since")


async def test_a_changed_token_or_another_accounts_token_is_422(client, headers, make_token):
    await create(client, headers, "ct_1")
    token = (await page(client, headers))["next_since"]
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[5] ^= 0x01
    changed = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    resp = await client.get(CHANGES, params={"since": changed}, headers=headers)
    await error_body(resp, 422, "validation_error", param="since")

    other = {"Authorization": f"Bearer {make_token('acct_someone_else')}"}
    resp = await client.get(CHANGES, params={"since": token}, headers=other)
    await error_body(resp, 422, "validation_error", param="since")


@pytest.mark.parametrize(
    ("query", "param"),
    [({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"after": "x"}, "after")],
)
async def test_bad_query_parameters_are_422(client, headers, query, param):
    resp = await client.get(CHANGES, params=query, headers=headers)
    await error_body(resp, 422, "validation_error", param=param)


async def test_limit_defaults_to_100_and_goes_to_1000(client, headers, db, account):
    await db.execute(
        """INSERT INTO conversations (account_id, id, contact_id, created_at)
           SELECT $1, lpad(n::text, 16, '0'), 'ct_' || n, 0 FROM generate_series(1, 1001) n""",
        account,
    )
    assert len((await page(client, headers))["data"]) == 100
    body = await page(client, headers, limit=1000)
    assert len(body["data"]) == 1000
    assert body["has_more"] is True


async def test_read_scope_is_needed(client, make_token, account):
    resp = await client.get(CHANGES)
    await error_body(resp, 401, "authentication_error")
    writer = {"Authorization": f"Bearer {make_token(account, ['conversations:write'])}"}
    resp = await client.get(CHANGES, headers=writer)
    await error_body(resp, 403, "permission_error")


async def expire_tombstones(db_url: str, retention: float = RETENTION) -> dict[str, int] | None:
    async with create_pool(db_url, min_size=1, max_size=1) as pool:
        return await housekeeping.run_once(pool, [sync.expired_tombstones(retention)])


async def test_a_token_older_than_the_oldest_remembered_deletion_is_410(
    client, headers, db, db_url, account
):
    made = [await create(client, headers, f"ct_{n}") for n in range(3)]
    copy: Copy = {}
    old_token, _ = await walk(client, headers, copy)
    resp = await client.delete(f"/v1/conversations/{made[0]['id']}", headers=headers)
    assert resp.status == 200
    await db.execute(
        "UPDATE conversation_tombstones SET deleted_at = now() - interval '31 days' "
        "WHERE account_id = $1",
        account,
    )
    assert await expire_tombstones(db_url) == {"expired sync tombstones": 1}

    resp = await client.get(CHANGES, params={"since": old_token}, headers=headers)
    await error_body(resp, 410, "invalid_request", param="since", errors=False)
    # The client starts again without since, and converges.
    fresh: Copy = {}
    token, _ = await walk(client, headers, fresh, limit=2)
    assert fresh == await state(db, account)
    assert made[0]["id"] not in fresh
    # Tokens issued after the removal keep working.
    await create(client, headers, "ct_after")
    await walk(client, headers, fresh, since=token)
    assert fresh == await state(db, account)


async def test_a_token_issued_longer_ago_than_the_retention_is_410(client, headers, account):
    await create(client, headers, "ct_1")
    token, issued_at = sync.decode_token((await page(client, headers))["next_since"], account)
    old = sync.encode_token(token, account, issued_at - RETENTION - 60)
    resp = await client.get(CHANGES, params={"since": old}, headers=headers)
    await error_body(resp, 410, "invalid_request", param="since", errors=False)


async def test_a_token_from_beyond_this_databases_history_is_410(client, headers, account):
    future = sync.SyncToken(False, 2**62, 2**62, "")
    resp = await client.get(
        CHANGES,
        params={"since": sync.encode_token(future, account, int(time.time()))},
        headers=headers,
    )
    await error_body(resp, 410, "invalid_request", param="since", errors=False)


def test_tokens_round_trip_and_are_bound_to_the_account():
    token = sync.SyncToken(True, 12345, 678, "0ujsswThIGTUYm2K")
    text = sync.encode_token(token, "acct_a", 1_700_000_000)
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert sync.decode_token(text, "acct_a") == (token, 1_700_000_000)
    with pytest.raises(sync.MalformedSyncToken):
        sync.decode_token(text, "acct_b")
    start = sync.SyncToken(False, 99, 99, "")
    assert sync.decode_token(sync.encode_token(start, "a", 1), "a") == (start, 1)


# --- housekeeping ----------------------------------------------------------------------------


async def test_expired_tombstones_go_in_bounded_batches_and_the_horizon_follows(db, db_url):
    await db.execute(
        """INSERT INTO conversation_tombstones (account_id, id, position, deleted_at)
           SELECT 'acct_x', lpad(n::text, 16, '0'), (n + 1000)::text::xid8,
                  now() - make_interval(days => CASE WHEN n <= 2500 THEN 40 ELSE 1 END)
           FROM generate_series(1, 2600) n"""
    )
    async with create_pool(db_url, min_size=1, max_size=1) as pool:
        removed = await housekeeping.run_once(
            pool, [sync.expired_tombstones(RETENTION)], batch_size=1000
        )
    assert removed == {"expired sync tombstones": 2500}
    assert await db.fetchval("SELECT count(*) FROM conversation_tombstones") == 100
    assert await db.fetchval(
        "SELECT through_position::text FROM conversation_tombstones_removed"
    ) == str(2500 + 1000)


async def test_housekeeping_runs_on_one_replica_at_a_time(db, db_url):
    await db.execute("SELECT pg_advisory_lock($1)", housekeeping.HOUSEKEEPING_LOCK_KEY)
    assert await expire_tombstones(db_url) is None
    await db.execute("SELECT pg_advisory_unlock($1)", housekeeping.HOUSEKEEPING_LOCK_KEY)
    assert await expire_tombstones(db_url) == {"expired sync tombstones": 0}
    # The lock ended with each batch's transaction: another session can take it.
    assert await db.fetchval("SELECT pg_try_advisory_lock($1)", housekeeping.HOUSEKEEPING_LOCK_KEY)


# --- the walk stays an index range scan ------------------------------------------------------


async def test_the_sync_read_is_an_index_range_scan(db):
    await db.execute(
        """INSERT INTO conversations (account_id, id, contact_id, created_at)
           SELECT 'acct_' || (n % 5), lpad(n::text, 16, '0'), 'ct_' || n, 0
           FROM generate_series(1, 20000) n"""
    )
    await db.execute("ANALYZE conversations")
    for after in ("", "0000000000000007"):
        plan = "\n".join(
            row[0]
            for row in await db.fetch("EXPLAIN " + sync.SELECT_CHANGES, "acct_2", 1, after, 101, 0)
        )
        assert "Index Scan using conversations_account_change_idx" in plan, plan
        assert "Scan on conversations " not in plan, plan  # no sequential or bitmap scan
        assert "Sort  (" not in plan, plan  # pages merge in index order, never sorted


async def test_the_periodic_job_removes_expired_tombstones(db, db_url):
    await db.execute(
        """INSERT INTO conversation_tombstones (account_id, id, deleted_at)
           VALUES ('acct_x', '0000000000000001', now() - interval '40 days')"""
    )
    async with create_pool(db_url, min_size=1, max_size=1) as pool:
        job = asyncio.create_task(
            housekeeping.run_periodically(pool, [sync.expired_tombstones(RETENTION)], interval=0.05)
        )
        try:

            async def removed() -> bool:
                return not await db.fetchval("SELECT count(*) FROM conversation_tombstones")

            await wait_until(removed)
        finally:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job


def test_serve_runs_housekeeping_and_the_relay_role_does_not(settings):
    assert housekeeping_task in create_app(settings).cleanup_ctx
    assert housekeeping_task not in create_app(settings, role="relay").cleanup_ctx


async def test_the_periodic_job_outlives_a_failing_round(db_url, caplog):
    failing = housekeeping.Cleanup("broken", "SELECT 1 / 0 + $1")
    async with create_pool(db_url, min_size=1, max_size=1) as pool:
        job = asyncio.create_task(housekeeping.run_periodically(pool, [failing], interval=0.02))
        try:

            async def failed_twice() -> bool:  # it failed, and ran again
                return sum("DivisionByZeroError" in r.getMessage() for r in caplog.records) >= 2

            await wait_until(failed_twice)
            assert not job.done()
        finally:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
