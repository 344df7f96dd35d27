"""Raw SQL for conversations. Every function takes the connection it runs on; every statement
is scoped by account."""

from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from schemas.cursor import Position, Sort

# The resource's fields, in the contract's order; `version` travels beside them.
RESOURCE_FIELDS = (
    "id",
    "contact_id",
    "group_id",
    "pinned_message_id",
    "is_pinned",
    "is_muted",
    "last_active_at",
    "last_opened_at",
    "created_at",
    "archived_at",
    "metadata",
)
# What an update may change, in the order UPDATE_CONVERSATION takes them.
WRITABLE_FIELDS = (
    "pinned_message_id",
    "is_pinned",
    "is_muted",
    "last_active_at",
    "last_opened_at",
    "archived_at",
    "metadata",
)
_COLUMNS = ", ".join(RESOURCE_FIELDS) + ", version"


@dataclass(frozen=True, slots=True)
class StoredConversation:
    """A conversation as stored: the resource and its version."""

    resource: dict[str, Any]
    version: int


def resource_of(record: asyncpg.Record) -> dict[str, Any]:
    """The resource of a row read with the resource's columns."""
    return {field: record[field] for field in RESOURCE_FIELDS}


async def init_connection(conn: asyncpg.Connection) -> None:
    """Prepare a new connection: jsonb (metadata) is read and written as Python dicts."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
    )


def _stored(record: asyncpg.Record) -> StoredConversation:
    return StoredConversation(resource_of(record), record["version"])


def _with_event(change: str, first: int, *, also: str = "") -> str:
    """`change` (an INSERT, UPDATE or DELETE returning the row) and, if it touched a row, that
    change's outbox row, in one statement: one round trip, atomic without BEGIN/COMMIT.

    The event's values are parameters `first` to `first + 6`, in `outbox.event_row` order;
    `also` is any further data-modifying CTE on `changed` (a delete's tombstone).
    """
    n = first
    return f"""
WITH changed AS ({change}),{also}
event AS (
    INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload,
                        traceparent)
    SELECT ${n}, ${n + 1}, ${n + 2}, ${n + 3}, ${n + 4}, ${n + 5}::json, ${n + 6} FROM changed
)
SELECT {_COLUMNS} FROM changed
"""


INSERT_CONVERSATION = _with_event(
    f"""
    INSERT INTO conversations (account_id, id, contact_id, group_id, pinned_message_id,
                               is_pinned, is_muted, last_active_at, last_opened_at, created_at,
                               metadata)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT DO NOTHING
    RETURNING {_COLUMNS}""",
    12,
)


async def insert(
    conn: asyncpg.Connection,
    account_id: str,
    resource: dict[str, Any],
    event: tuple[object, ...],
) -> StoredConversation | None:
    """Insert a new conversation and its event; None (and no event) when the contact or group
    already has one."""
    record = await conn.fetchrow(
        INSERT_CONVERSATION,
        account_id,
        resource["id"],
        resource["contact_id"],
        resource["group_id"],
        resource["pinned_message_id"],
        resource["is_pinned"],
        resource["is_muted"],
        resource["last_active_at"],
        resource["last_opened_at"],
        resource["created_at"],
        resource["metadata"],
        *event,
    )
    return _stored(record) if record else None


SELECT_BY_CONTACT = (
    f"SELECT {_COLUMNS} FROM conversations WHERE account_id = $1 AND contact_id = $2"
)
SELECT_BY_GROUP = f"SELECT {_COLUMNS} FROM conversations WHERE account_id = $1 AND group_id = $2"


async def find_by_participant(
    conn: asyncpg.Connection, account_id: str, contact_id: str | None, group_id: str | None
) -> StoredConversation | None:
    """The account's conversation with this contact or group, if any."""
    if contact_id is not None:
        record = await conn.fetchrow(SELECT_BY_CONTACT, account_id, contact_id)
    else:
        record = await conn.fetchrow(SELECT_BY_GROUP, account_id, group_id)
    return _stored(record) if record else None


SELECT_BY_ID = f"SELECT {_COLUMNS} FROM conversations WHERE account_id = $1 AND id = $2"
SELECT_BY_ID_FOR_UPDATE = SELECT_BY_ID + " FOR UPDATE"


async def get(
    conn: asyncpg.Connection, account_id: str, conversation_id: str, *, for_update: bool = False
) -> StoredConversation | None:
    """One conversation of the account (locked until the transaction ends, if `for_update`)."""
    query = SELECT_BY_ID_FOR_UPDATE if for_update else SELECT_BY_ID
    record = await conn.fetchrow(query, account_id, conversation_id)
    return _stored(record) if record else None


# change_xid: every change moves the row's delta-sync position (service/conversations/sync.py).
UPDATE_CONVERSATION = _with_event(
    f"""
    UPDATE conversations
    SET pinned_message_id = $4, is_pinned = $5, is_muted = $6,
        last_active_at = $7, last_opened_at = $8, archived_at = $9, metadata = $10,
        version = version + 1, change_xid = pg_current_xact_id()
    WHERE account_id = $1 AND id = $2 AND version = $3
    RETURNING {_COLUMNS}""",
    11,
)


async def update(
    conn: asyncpg.Connection,
    account_id: str,
    resource: dict[str, Any],
    expected_version: int,
    event: tuple[object, ...],
) -> StoredConversation | None:
    """Write the writable fields of `resource` and its event if the row is still at
    `expected_version`; None (and no event) if it changed or went meanwhile."""
    record = await conn.fetchrow(
        UPDATE_CONVERSATION,
        account_id,
        resource["id"],
        expected_version,
        *(resource[field] for field in WRITABLE_FIELDS),
        *event,
    )
    return _stored(record) if record else None


# The tombstone's position is the deleting transaction's id (the column's default), as an update's.
DELETE_CONVERSATION = _with_event(
    f"""
    DELETE FROM conversations WHERE account_id = $1 AND id = $2 AND version = $3
    RETURNING {_COLUMNS}""",
    4,
    also="""
tombstone AS (INSERT INTO conversation_tombstones (account_id, id) SELECT $1, id FROM changed),""",
)


async def delete(
    conn: asyncpg.Connection,
    account_id: str,
    conversation_id: str,
    expected_version: int,
    event: tuple[object, ...],
) -> bool:
    """Remove a conversation and record its event if it is still at `expected_version`."""
    record = await conn.fetchrow(
        DELETE_CONVERSATION, account_id, conversation_id, expected_version, *event
    )
    return record is not None


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Which conversations a list shows; None means "do not filter on this"."""

    archived: bool | None = None
    muted: bool | None = None
    pinned: bool | None = None
    contact_id: str | None = None
    group_id: str | None = None
    unread: bool | None = None
    # Keys and the exact values they must have (all of them).
    metadata: dict[str, str] | None = None


# The activity order's key: a never-active conversation (null) maps to -1, below every real
# time, so the null group comes last and one index range covers it (0003_inbox.sql).
ACTIVITY_KEY = "COALESCE(last_active_at, -1)"
# Active since last opened; word for word the predicate of the partial unread indexes.
UNREAD = "last_active_at > COALESCE(last_opened_at, -1)"


def list_query(
    account_id: str,
    filters: ListFilter,
    *,
    sort: Sort,
    limit: int,
    after: Position | None = None,
    before: Position | None = None,
) -> tuple[str, list[object]]:
    """The SELECT of `list_page` and its arguments (tests EXPLAIN it)."""
    conditions = ["account_id = $1"]
    args: list[object] = [account_id]

    def param(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    if sort is Sort.CREATED:
        key, order_by = "id", ("id",)

        def place(position: Position) -> str:
            return param(position.id)
    else:
        key, order_by = f"({ACTIVITY_KEY}, id)", (ACTIVITY_KEY, "id")

        def place(position: Position) -> str:
            time = -1 if position.last_active_at is None else position.last_active_at
            return f"({param(time)}, {param(position.id)})"

    if after is not None:
        conditions.append(f"{key} < {place(after)}")
    if before is not None:
        conditions.append(f"{key} > {place(before)}")
    if filters.archived is not None:
        conditions.append("archived_at IS NOT NULL" if filters.archived else "archived_at IS NULL")
    if filters.muted is not None:
        conditions.append(f"is_muted = {param(filters.muted)}")
    if filters.pinned is not None:
        conditions.append(f"is_pinned = {param(filters.pinned)}")
    if filters.contact_id is not None:
        conditions.append(f"contact_id = {param(filters.contact_id)}")
    if filters.group_id is not None:
        conditions.append(f"group_id = {param(filters.group_id)}")
    if filters.unread is not None:
        conditions.append(UNREAD if filters.unread else f"({UNREAD}) IS NOT TRUE")
    if filters.metadata:
        conditions.append(f"metadata @> {param(filters.metadata)}::jsonb")
    direction = "ASC" if before is not None else "DESC"
    query = (
        f"SELECT {_COLUMNS} FROM conversations WHERE {' AND '.join(conditions)} "
        f"ORDER BY {', '.join(f'{column} {direction}' for column in order_by)} "
        f"LIMIT {param(limit)}"
    )
    return query, args


async def list_page(
    conn: asyncpg.Connection,
    account_id: str,
    filters: ListFilter,
    *,
    sort: Sort,
    limit: int,
    after: Position | None = None,
    before: Position | None = None,
) -> list[StoredConversation]:
    """Up to `limit` conversations in the direction of travel, in `sort` order.

    `after` walks on in the order (keys below the position, descending), `before` back (keys
    above it, ascending, so the nearest come first; the caller reverses). Keyset on an index of
    the order: no OFFSET, flat cost at any depth.
    """
    query, args = list_query(
        account_id, filters, sort=sort, limit=limit, after=after, before=before
    )
    if filters.metadata:
        # Planned afresh with the filter's value, never from a cached generic plan: a rare value
        # is best found in the GIN index, a common one by walking the order's index.
        statement = await conn.prepare(query)
        records = await statement.fetch(*args)
    else:
        records = await conn.fetch(query, *args)
    return [_stored(record) for record in records]
