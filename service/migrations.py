"""The migration runner: versioned SQL files applied once each, in order, under a lock."""

import functools
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# One advisory lock key for "migrations in progress", so two runners never interleave.
MIGRATION_LOCK_KEY = 0x636F6E76_6D696772  # "convmigr"

CREATE_HISTORY_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
SELECT_APPLIED = "SELECT version, checksum FROM schema_migrations ORDER BY version"
INSERT_APPLIED = "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)"
HISTORY_TABLE_EXISTS = "SELECT to_regclass('schema_migrations') IS NOT NULL"


class MigrationError(Exception):
    """The database and the migration files disagree; nothing was applied."""


@dataclass(frozen=True)
class Migration:
    """One SQL file: its version is the file name without `.sql`."""

    version: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text: an applied file must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@functools.cache
def load_migrations() -> tuple[Migration, ...]:
    """Every migration shipped with the package, in version order (read once per process)."""
    folder = resources.files("sql") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return tuple(
        Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8")) for entry in files
    )


async def migrate(
    conn: asyncpg.Connection, migrations: tuple[Migration, ...] | None = None
) -> list[str]:
    """Apply the pending migrations, each in its own transaction; return the versions applied."""
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(CREATE_HISTORY_TABLE)
        applied = dict(await conn.fetch(SELECT_APPLIED))
        for migration in migrations:
            recorded = applied.get(migration.version)
            if recorded is not None and recorded != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version} was edited after it was applied; "
                    "add a new migration instead of changing an applied one"
                )
        done = []
        for migration in migrations:
            if migration.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(INSERT_APPLIED, migration.version, migration.checksum)
            log.info("applied migration %s", migration.version)
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """The shipped migrations that the database has not applied yet (readiness uses this)."""
    shipped = [migration.version for migration in load_migrations()]
    if not await conn.fetchval(HISTORY_TABLE_EXISTS):
        return shipped
    applied = {record["version"] for record in await conn.fetch(SELECT_APPLIED)}
    return [version for version in shipped if version not in applied]
