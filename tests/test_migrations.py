"""Migrations from empty, the readiness probe, the command line and start-up configuration."""

import asyncio
import dataclasses
import logging
from importlib import resources

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from schemas import HealthSchema, ReadinessSchema
from service.api.app import create_app
from service.api.auth import READ_SCOPE, WRITE_SCOPE, Principal, TokenVerifier
from service.cli import main
from service.conversations.outbox import OutboxRow
from service.conversations.repository import COLUMNS, RESOURCE_FIELDS
from service.migrations import (
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    load_migrations,
    migrate,
    pending_migrations,
)
from service.settings import ConfigError, load_auth_settings, load_settings
from tests.conftest import TEST_SECRET
from tests.error_bodies import error_body

SHIPPED = [migration.version for migration in load_migrations()]
CONFIG_VARIABLES = [
    "DATABASE_URL",
    "HOST",
    "PORT",
    "DB_POOL_MIN",
    "DB_POOL_MAX",
    "DB_STATEMENT_TIMEOUT_MS",
    "ERROR_DOCS_URL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "JWT_HS256_SECRETS",
    "JWT_PUBLIC_KEYS",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "JWT_LEEWAY_SECONDS",
    "AMQP_URL",
    "EVENTS_EXCHANGE",
    "RELAY_ENABLED",
    "RELAY_BATCH_SIZE",
    "RELAY_POLL_INTERVAL_SECONDS",
    "RELAY_LINGER_SECONDS",
    "OUTBOX_RETENTION_HOURS",
    "SYNC_RETENTION_DAYS",
    "RATE_LIMIT_READS",
    "RATE_LIMIT_WRITES",
    "RATE_LIMIT_WINDOW_SECONDS",
    "RATE_LIMIT_REDIS_URL",
    "IDEMPOTENCY_TTL_HOURS",
]
PASSWORD = "s3cr3t-Pa55word"
URL_WITH_PASSWORD = f"postgresql://app:{PASSWORD}@db.example.test:5432/conversations"
AMQP_URL = f"amqp://app:{PASSWORD}@mq.example.test:5672/"
SHORT_SECRET = "tooShort-9"
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnop"


def rsa_public_pem() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return key, pem.decode()


@pytest.fixture
async def conn(empty_database):
    connection = await asyncpg.connect(empty_database)
    yield connection
    await connection.close()


async def applied_versions(connection) -> list[str]:
    return [r["version"] for r in await connection.fetch("select version from schema_migrations")]


async def lock_is_free(url: str) -> bool:
    """Whether another session can take the migration lock right now (and give it back)."""
    other = await asyncpg.connect(url)
    try:
        taken = await other.fetchval("select pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY)
        if taken:
            await other.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        return taken
    finally:
        await other.close()


# --- the runner ---------------------------------------------------------------------------------


def test_every_sql_file_is_a_migration_in_order():
    files = sorted(
        entry.name.removesuffix(".sql")
        for entry in (resources.files("sql") / "migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    assert files
    assert files == SHIPPED


async def test_migrate_from_empty_applies_every_file_once(conn, empty_database):
    assert await pending_migrations(conn) == SHIPPED
    assert await migrate(conn) == SHIPPED
    rows = await conn.fetch("select version, checksum, applied_at from schema_migrations")
    assert {r["version"]: r["checksum"] for r in rows} == {
        m.version: m.checksum for m in load_migrations()
    }
    assert all(r["applied_at"] is not None for r in rows)
    assert await pending_migrations(conn) == []
    assert await migrate(conn) == []
    assert sorted(await applied_versions(conn)) == SHIPPED
    assert await lock_is_free(empty_database)


async def test_the_schema_is_what_the_service_expects(conn):
    await migrate(conn)
    tables = {
        r["table_name"]
        for r in await conn.fetch(
            "select table_name from information_schema.tables where table_schema = 'public'"
        )
    }
    assert tables == {
        "conversations",
        "conversation_labels",
        "conversation_tombstones",
        "conversation_tombstones_removed",
        "idempotency_keys",
        "outbox",
        "outbox_settings",
        "schema_migrations",
    }

    rows = await conn.fetch(
        """select table_name, column_name, data_type, is_nullable, collation_name
           from information_schema.columns where table_schema = 'public'"""
    )
    columns = {(r["table_name"], r["column_name"]): r for r in rows}

    def shape(table: str) -> dict[str, tuple[str, str]]:
        return {
            column: (row["data_type"], row["is_nullable"])
            for (name, column), row in columns.items()
            if name == table
        }

    assert shape("conversations") == {
        "account_id": ("text", "NO"),
        "id": ("text", "NO"),
        "contact_id": ("text", "YES"),
        "group_id": ("text", "YES"),
        "pinned_message_id": ("text", "YES"),
        "is_pinned": ("boolean", "NO"),
        "is_muted": ("boolean", "NO"),
        "last_active_at": ("bigint", "YES"),
        "last_opened_at": ("bigint", "YES"),
        "created_at": ("bigint", "NO"),
        "archived_at": ("bigint", "YES"),
        "version": ("bigint", "NO"),
        "metadata": ("jsonb", "NO"),
        "change_xid": ("xid8", "NO"),
    }
    assert shape("conversation_tombstones") == {
        "account_id": ("text", "NO"),
        "id": ("text", "NO"),
        "position": ("xid8", "NO"),
        "deleted_at": ("timestamp with time zone", "NO"),
    }
    # The repository's declared columns are the table's, with the table's types (its statements
    # cast parameters to them).
    table = shape("conversations")
    assert {column.name: column.type for column in COLUMNS} == {
        name: table[name][0] for name in RESOURCE_FIELDS
    }
    # Every column the outbox row names is the table's.
    assert set(OutboxRow._fields) <= set(shape("outbox"))
    assert shape("outbox") == {
        "id": ("bigint", "NO"),
        "event_id": ("text", "NO"),
        "event_type": ("text", "NO"),
        "account_id": ("text", "NO"),
        "conversation_id": ("text", "NO"),
        "sequence": ("bigint", "NO"),
        "payload": ("json", "NO"),
        "traceparent": ("text", "YES"),
        "created_at": ("timestamp with time zone", "NO"),
        "published_at": ("timestamp with time zone", "YES"),
        "partition": ("integer", "NO"),
    }
    assert shape("outbox_settings") == {
        "singleton": ("boolean", "NO"),
        "partitions": ("integer", "NO"),
    }
    assert shape("idempotency_keys") == {
        "account_id": ("text", "NO"),
        "key": ("text", "NO"),
        "fingerprint": ("bytea", "NO"),
        "status": ("smallint", "NO"),
        "body": ("bytea", "NO"),
        "etag": ("text", "YES"),
        "location": ("text", "YES"),
        "created_at": ("timestamp with time zone", "NO"),
        "expires_at": ("timestamp with time zone", "NO"),
    }
    assert columns["conversations", "id"]["collation_name"] == "C"
    assert columns["outbox", "conversation_id"]["collation_name"] == "C"

    indexes = {
        r["name"]: r
        for r in await conn.fetch(
            """select c.relname as name, t.relname as table_name, i.indisunique as is_unique,
                      i.indisprimary as is_primary,
                      pg_get_expr(i.indpred, i.indrelid) as predicate,
                      array(select a.attname from unnest(i.indkey) with ordinality k(n, o)
                            join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n
                            order by k.o) as columns
               from pg_index i
               join pg_class c on c.oid = i.indexrelid
               join pg_class t on t.oid = i.indrelid
               join pg_namespace s on s.oid = t.relnamespace
               where s.nspname = 'public'"""
        )
    }

    def index(name: str) -> tuple:
        r = indexes[name]
        return (r["table_name"], r["is_unique"], list(r["columns"]), r["predicate"])

    primary = [
        r for r in indexes.values() if r["is_primary"] and r["table_name"] == "conversations"
    ]
    assert [list(r["columns"]) for r in primary] == [["account_id", "id"]]
    assert index("conversations_account_contact_key") == (
        "conversations",
        True,
        ["account_id", "contact_id"],
        "(contact_id IS NOT NULL)",
    )
    assert index("conversations_account_group_key") == (
        "conversations",
        True,
        ["account_id", "group_id"],
        "(group_id IS NOT NULL)",
    )
    assert index("outbox_pending_idx") == ("outbox", False, ["id"], "(published_at IS NULL)")
    assert index("conversations_account_change_idx") == (
        "conversations",
        False,
        ["account_id", "change_xid", "id"],
        None,
    )
    assert index("conversation_tombstones_pkey") == (
        "conversation_tombstones",
        True,
        ["account_id", "position", "id"],
        None,
    )
    # The inbox's indexes (0003), as PostgreSQL spells them back.
    definitions = dict(
        await conn.fetch(
            """select c.relname, pg_get_indexdef(i.indexrelid) from pg_index i
               join pg_class c on c.oid = i.indexrelid
               where i.indrelid = 'conversations'::regclass"""
        )
    )
    activity = "(account_id, COALESCE(last_active_at, ('-1'::integer)::bigint) DESC, id DESC)"
    unread = "WHERE (last_active_at > COALESCE(last_opened_at, ('-1'::integer)::bigint))"
    using = "ON public.conversations USING"
    assert definitions["conversations_activity_idx"].endswith(f"{using} btree {activity}")
    assert definitions["conversations_unread_activity_idx"].endswith(
        f"{using} btree {activity} {unread}"
    )
    assert definitions["conversations_unread_id_idx"].endswith(
        f"{using} btree (account_id, id DESC) {unread}"
    )
    # 0007 replaced the GIN index of metadata by the labels' two orders.
    assert "conversations_metadata_idx" not in definitions
    assert index("conversation_labels_pkey") == (
        "conversation_labels",
        True,
        ["account_id", "key", "value", "id"],
        None,
    )
    assert index("conversation_labels_activity_idx") == (
        "conversation_labels",
        False,
        ["account_id", "key", "value", "activity", "id"],
        None,
    )
    # Keys are per account; housekeeping scans by expiry (BRIN: rows arrive in expiry order).
    assert index("idempotency_keys_pkey") == (
        "idempotency_keys",
        True,
        ["account_id", "key"],
        None,
    )
    assert index("idempotency_keys_expires_at_idx") == (
        "idempotency_keys",
        False,
        ["expires_at"],
        None,
    )


INSERT = """insert into conversations (account_id, id, contact_id, group_id, created_at)
            values ($1, $2, $3, $4, 0)"""


async def test_the_partitions_migration_gives_pending_events_their_partition(conn):
    before = tuple(m for m in load_migrations() if m.version < "0006")
    await migrate(conn, migrations=before)
    await conn.execute(
        """INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence,
                               payload, published_at)
           SELECT 'evt_' || n, 'conversation.updated', 'a', 'conv' || n, 1, '{}',
                  CASE WHEN n > 10 THEN now() END
           FROM generate_series(1, 20) AS n"""
    )
    await migrate(conn)
    rows = await conn.fetch(
        "SELECT partition, outbox_partition(conversation_id, 16) AS hashed, published_at"
        " FROM outbox"
    )
    pending = [r for r in rows if r["published_at"] is None]
    assert [r["partition"] for r in pending] == [r["hashed"] for r in pending]
    assert len({r["partition"] for r in pending}) > 1
    assert {r["partition"] for r in rows if r["published_at"] is not None} == {0}


# Every label the conversations' metadata implies, and every label stored; equal when in step.
IMPLIED_LABELS = """
    SELECT c.account_id, m.key, m.value, COALESCE(c.last_active_at, -1) AS activity, c.id
    FROM conversations AS c, jsonb_each_text(c.metadata) AS m ORDER BY 1, 2, 3, 5"""
STORED_LABELS = (
    "SELECT account_id, key, value, activity, id FROM conversation_labels ORDER BY 1, 2, 3, 5"
)


async def test_the_labels_migration_labels_the_conversations_written_before_it(conn):
    await migrate(conn, migrations=tuple(m for m in load_migrations() if m.version < "0007"))
    await conn.execute(
        """INSERT INTO conversations (account_id, id, contact_id, created_at, last_active_at,
                                      metadata)
           SELECT 'a' || n % 2, lpad(n::text, 16, '0'), 'c' || n, 0,
                  CASE WHEN n % 3 > 0 THEN n END,
                  CASE WHEN n % 4 = 0 THEN '{}'
                       ELSE jsonb_build_object('team', 't' || n % 5, 'k' || n, 'v') END
           FROM generate_series(1, 40) AS n"""
    )
    await migrate(conn)
    implied = await conn.fetch(IMPLIED_LABELS)
    assert len(implied) == 60
    assert await conn.fetch(STORED_LABELS) == implied


async def test_the_labels_follow_every_write_of_the_conversations(conn):
    """Inserts, updates of metadata, of activity, of neither, and deletes, plain SQL: the
    triggers keep the labels those rows imply, and only those."""
    await migrate(conn)
    await conn.execute(
        """INSERT INTO conversations (account_id, id, contact_id, created_at, last_active_at,
                                      metadata)
           SELECT 'a', lpad(n::text, 16, '0'), 'c' || n, 0, CASE WHEN n % 2 = 0 THEN n END,
                  CASE WHEN n % 3 = 0 THEN '{}' ELSE jsonb_build_object('x', 'y' || n) END
           FROM generate_series(1, 30) AS n"""
    )
    steps = [
        "UPDATE conversations SET metadata = metadata || '{\"z\": \"1\"}' WHERE id < '0000000000000010'",
        "UPDATE conversations SET metadata = metadata - 'x' WHERE id > '0000000000000025'",
        "UPDATE conversations SET last_active_at = 999 WHERE id::int % 4 = 1",
        "UPDATE conversations SET last_active_at = NULL WHERE id::int % 5 = 0",
        "UPDATE conversations SET is_muted = true",
        "UPDATE conversations SET metadata = '{}' WHERE id::int % 7 = 0",
        "DELETE FROM conversations WHERE id::int % 6 = 1",
    ]
    for step in steps:
        await conn.execute(step)
        assert await conn.fetch(STORED_LABELS) == await conn.fetch(IMPLIED_LABELS), step
    assert await conn.fetchval("SELECT count(*) FROM conversation_labels") > 10


async def test_the_schema_enforces_order_and_uniqueness(conn):
    await migrate(conn)
    # Digits < upper < lower case, whatever the database's default collation says.
    ids = ["z" * 16, "a" + "0" * 15, "Z0000000000000zz", "A" * 16, "9" * 16]
    for number, conversation_id in enumerate(ids):
        await conn.execute(INSERT, "acct", conversation_id, f"c{number}", None)
    ordered = [r["id"] for r in await conn.fetch("select id from conversations order by id")]
    assert ordered == sorted(ids, key=str.encode)
    assert ordered == ["9" * 16, "A" * 16, "Z0000000000000zz", "a" + "0" * 15, "z" * 16]

    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(INSERT, "acct", "1" * 16, "c0", None)
    await conn.execute(INSERT, "acct", "2" * 16, None, "g1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(INSERT, "acct", "3" * 16, None, "g1")
    await conn.execute(INSERT, "other_acct", "1" * 16, "c0", None)
    await conn.execute(INSERT, "other_acct", "3" * 16, None, "g1")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(INSERT, "acct", "4" * 16, "c9", "g9")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(INSERT, "acct", "5" * 16, None, None)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(INSERT, "acct", "short", "c8", None)


async def test_an_edited_migration_is_refused_and_nothing_new_is_applied(conn, empty_database):
    await migrate(conn)
    first = load_migrations()[0]
    edited = Migration(first.version, first.sql + "\n-- an innocent-looking edit\n")
    # The new migration comes first: the check must happen before anything is applied.
    new = Migration("0000_new", "CREATE TABLE should_not_exist (x int)")
    with pytest.raises(MigrationError, match=first.version):
        await migrate(conn, migrations=(new, edited, *load_migrations()[1:]))
    assert await conn.fetchval("select to_regclass('should_not_exist')") is None
    assert sorted(await applied_versions(conn)) == SHIPPED
    assert await lock_is_free(empty_database)


async def test_a_new_migration_is_applied_alone(conn):
    await migrate(conn)
    extra = Migration("9999_extra", "CREATE TABLE extra (x int)")
    assert await migrate(conn, migrations=(*load_migrations(), extra)) == ["9999_extra"]
    assert await conn.fetchval("select to_regclass('extra') is not null")
    assert await migrate(conn, migrations=(*load_migrations(), extra)) == []


async def test_a_failing_migration_is_rolled_back_and_not_recorded(conn, empty_database):
    broken = Migration(
        "9999_broken", "CREATE TABLE half_done (x int); SELECT no_such_function_anywhere();"
    )
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(conn, migrations=(*load_migrations(), broken))
    # What came before it is applied; the broken one left nothing behind.
    assert sorted(await applied_versions(conn)) == SHIPPED
    assert await conn.fetchval("select to_regclass('half_done')") is None
    assert await lock_is_free(empty_database)
    assert await migrate(conn) == []


async def test_concurrent_runs_apply_each_migration_once(empty_database):
    connections = [await asyncpg.connect(empty_database) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in connections))
        assert sorted(results) == [[], [], SHIPPED]
        rows = await connections[0].fetch(
            "select version, count(*) as n from schema_migrations group by version"
        )
        assert {r["version"]: r["n"] for r in rows} == dict.fromkeys(SHIPPED, 1)
    finally:
        for c in connections:
            await c.close()
    assert await lock_is_free(empty_database)


async def test_pending_migrations_before_and_after(conn):
    assert await pending_migrations(conn) == SHIPPED
    # The history table alone (a run that stopped early) still leaves every file pending.
    await conn.execute("create table schema_migrations (version text primary key, checksum text)")
    assert await pending_migrations(conn) == SHIPPED
    await conn.execute("drop table schema_migrations")
    await migrate(conn)
    assert await pending_migrations(conn) == []


# --- readiness ----------------------------------------------------------------------------------


async def test_readyz_is_200_on_the_migrated_database(client):
    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["migrations"] == "ok"
    assert body["checks"]["relay"] == "disabled"  # the test settings run no relay
    assert body["checks"]["outbox"] == {"pending": 0, "oldest_pending_age_seconds": 0}
    assert ReadinessSchema().validate(body) == {}
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert HealthSchema().validate(await resp.json()) == {}


async def test_readyz_stays_200_when_the_backlog_cannot_be_counted_in_time(client, db):
    # A backlog too large to count inside the probe (here: the count waits on a table lock) is
    # reported as unknown (null); it never makes the pod unready.
    async with db.transaction():
        await db.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert ReadinessSchema().validate(body) == {}
    assert body["checks"]["outbox"] == {"pending": None, "oldest_pending_age_seconds": None}
    assert body["checks"]["migrations"] == "ok"
    body = await (await client.get("/readyz")).json()  # the lock is gone: counted again
    assert body["checks"]["outbox"] == {"pending": 0, "oldest_pending_age_seconds": 0}


async def test_readyz_is_503_until_migrations_are_applied(settings, empty_database, aiohttp_client):
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, database_url=empty_database))
    )
    resp = await client.get("/readyz")
    body = await error_body(resp, 503, "api_error", errors=True)
    assert body["errors"] == {"migrations": [f"pending: {version}" for version in SHIPPED]}
    assert int(resp.headers["Retry-After"]) > 0
    # Liveness never looks at the database.
    assert (await client.get("/healthz")).status == 200

    connection = await asyncpg.connect(empty_database)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    resp = await client.get("/readyz")
    assert resp.status == 200


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch):
    """An environment holding none of the service's variables; returns a setter.

    Request it after `empty_database`: that fixture's teardown needs the real DATABASE_URL.
    The commands also configure the root logger, so pytest's handlers are given back after.
    """
    for name in CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.fixture
def no_serving(monkeypatch):
    """`serve` must give up before it binds a port or touches the event loop policy."""

    def refuse(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr("service.api.server.run", refuse)
    monkeypatch.setattr("uvloop.install", lambda: None)


async def test_cli_migrate_applies_then_has_nothing_to_do(empty_database, environment, capsys):
    environment(DATABASE_URL=empty_database)  # nothing else: the Job gets no other secret
    assert await asyncio.to_thread(main, ["migrate"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"applied {len(SHIPPED)} migration(s): {', '.join(SHIPPED)}"
    )
    assert await asyncio.to_thread(main, ["migrate"]) == 0
    assert capsys.readouterr().out.strip() == "applied 0 migration(s)"
    connection = await asyncpg.connect(empty_database)
    try:
        assert await pending_migrations(connection) == []
    finally:
        await connection.close()


def test_cli_token_prints_a_token_with_both_scopes(environment, capsys):
    environment(JWT_HS256_SECRETS=TEST_SECRET)
    assert main(["token", "--account", "a1"]) == 0
    token = capsys.readouterr().out.strip()
    principal = TokenVerifier(load_auth_settings()).verify(token)
    assert principal == Principal("a1", frozenset({READ_SCOPE, WRITE_SCOPE}))


def test_cli_token_with_a_scope(environment, capsys):
    environment(JWT_HS256_SECRETS=f"{TEST_SECRET},{OTHER_SECRET}")
    assert main(["token", "--account", "a2", "--scope", READ_SCOPE, "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    principal = TokenVerifier(load_auth_settings()).verify(token)
    assert principal == Principal("a2", frozenset({READ_SCOPE}))


def test_cli_token_without_an_hs256_secret_explains(environment, capsys):
    environment(JWT_PUBLIC_KEYS=rsa_public_pem()[1])
    assert main(["token", "--account", "a1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "JWT_HS256_SECRETS" in captured.err


def test_cli_serve_without_a_jwt_secret_returns_2(environment, no_serving, capsys):
    environment(DATABASE_URL=URL_WITH_PASSWORD, AMQP_URL=AMQP_URL)
    assert main(["serve"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("conversations serve: invalid configuration")
    assert "JWT_HS256_SECRETS" in captured.err
    assert PASSWORD not in captured.err


@pytest.mark.parametrize(
    "keys",
    ["not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"],
    ids=["garbage", "bad-key-data"],
)
def test_cli_serve_with_an_unreadable_public_key_returns_2(environment, no_serving, capsys, keys):
    environment(DATABASE_URL=URL_WITH_PASSWORD, JWT_PUBLIC_KEYS=keys, AMQP_URL=AMQP_URL)
    assert main(["serve"]) == 2
    captured = capsys.readouterr()
    assert "JWT_PUBLIC_KEYS" in captured.err
    assert PASSWORD not in captured.err


def test_cli_migrate_with_bad_configuration_returns_2(environment, capsys):
    environment(DATABASE_URL="mysql://app:" + PASSWORD + "@db/x", LOG_FORMAT="xml")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "DATABASE_URL" in err
    assert "LOG_FORMAT" in err
    assert PASSWORD not in err


def test_cli_migrate_without_a_database_url_returns_2(environment, capsys):
    environment(JWT_HS256_SECRETS=TEST_SECRET, AMQP_URL=AMQP_URL)
    assert main(["migrate"]) == 2
    assert "DATABASE_URL" in capsys.readouterr().err


# --- settings -----------------------------------------------------------------------------------


def test_load_settings_reads_the_environment(environment):
    environment(
        DATABASE_URL=URL_WITH_PASSWORD,
        AMQP_URL=AMQP_URL,
        JWT_HS256_SECRETS=f" {TEST_SECRET} , {OTHER_SECRET} ,",
        PORT="9000",
        JWT_AUDIENCE="conversations-api",
    )
    settings = load_settings()
    assert settings.database_url == URL_WITH_PASSWORD
    assert settings.port == 9000
    assert settings.db_pool_min <= settings.db_pool_max
    assert settings.auth.hs256_secrets == (TEST_SECRET, OTHER_SECRET)
    assert settings.auth.audience == "conversations-api"
    assert settings.auth.issuer is None


def test_several_public_keys_in_one_variable(environment):
    keys = [rsa_public_pem(), rsa_public_pem()]
    environment(JWT_PUBLIC_KEYS="\n".join(pem for _, pem in keys))
    auth = load_auth_settings()
    assert [block.strip() for block in auth.public_keys_pem] == [pem.strip() for _, pem in keys]
    verifier = TokenVerifier(auth)
    for key, _ in keys:
        token = jwt.encode({"sub": "a", "exp": 2**40}, key, algorithm="RS256")
        assert verifier.verify(token).account_id == "a"


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "65536"}, "PORT"),
        ({"DATABASE_URL": None}, "DATABASE_URL"),
        ({"DATABASE_URL": f"mysql://app:{PASSWORD}@db/x"}, "DATABASE_URL"),
        ({"DATABASE_URL": PASSWORD}, "DATABASE_URL"),
        ({"JWT_HS256_SECRETS": SHORT_SECRET}, "JWT_HS256_SECRETS"),
        ({"JWT_HS256_SECRETS": f"{TEST_SECRET},{SHORT_SECRET}"}, "JWT_HS256_SECRETS"),
        ({"JWT_HS256_SECRETS": None}, "JWT_HS256_SECRETS"),
        ({"DB_POOL_MIN": "5", "DB_POOL_MAX": "2"}, "DB_POOL_MIN"),
        ({"DB_POOL_MAX": "0"}, "DB_POOL_MAX"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"JWT_LEEWAY_SECONDS": "-1"}, "JWT_LEEWAY_SECONDS"),
        ({"AMQP_URL": None}, "AMQP_URL"),
        ({"AMQP_URL": f"http://app:{PASSWORD}@mq/"}, "AMQP_URL"),
        ({"RELAY_BATCH_SIZE": "0"}, "RELAY_BATCH_SIZE"),
        ({"RELAY_LINGER_SECONDS": "-0.001"}, "RELAY_LINGER_SECONDS"),
        ({"RELAY_ENABLED": "perhaps"}, "RELAY_ENABLED"),
        ({"IDEMPOTENCY_TTL_HOURS": "0"}, "IDEMPOTENCY_TTL_HOURS"),
        ({"IDEMPOTENCY_TTL_HOURS": "1.5"}, "IDEMPOTENCY_TTL_HOURS"),
    ],
)
def test_load_settings_names_the_bad_variable(environment, variables, named):
    good = {
        "DATABASE_URL": URL_WITH_PASSWORD,
        "JWT_HS256_SECRETS": TEST_SECRET,
        "AMQP_URL": AMQP_URL,
    }
    values = {**good, **variables}
    environment(**{name: value for name, value in values.items() if value is not None})
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert named in message
    assert PASSWORD not in message
    assert SHORT_SECRET not in message


def test_every_bad_variable_is_named_at_once(environment):
    environment(
        DATABASE_URL=URL_WITH_PASSWORD,
        AMQP_URL=AMQP_URL,
        JWT_HS256_SECRETS=TEST_SECRET,
        PORT="abc",
        LOG_LEVEL="LOUD",
        DB_STATEMENT_TIMEOUT_MS="0",
    )
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    for name in ("PORT", "LOG_LEVEL", "DB_STATEMENT_TIMEOUT_MS"):
        assert name in message
    assert PASSWORD not in message
