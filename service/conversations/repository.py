"""Raw SQL for conversations. Every function takes the connection it runs on; every statement
is scoped by account."""

from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from schemas.cursor import Position, Sort
from service.conversations import idempotency, outbox
from service.conversations.idempotency import KeyedAnswer
from service.conversations.outbox import OutboxRow
from service.conversations.parameters import Parameters


@dataclass(frozen=True, slots=True)
class Column:
    """A column of `conversations` that is a field of the resource (same name)."""

    name: str
    type: str  # PostgreSQL's: the cast of a parameter whose type a statement cannot infer
    writable: bool = False  # an update may change it


# The resource's columns, in the contract's order: every statement's column list, its
# parameters and the row's mapping to the resource are derived from these.
COLUMNS = (
    Column("id", "text"),
    Column("contact_id", "text"),
    Column("group_id", "text"),
    Column("pinned_message_id", "text", writable=True),
    Column("is_pinned", "boolean", writable=True),
    Column("is_muted", "boolean", writable=True),
    Column("last_active_at", "bigint", writable=True),
    Column("last_opened_at", "bigint", writable=True),
    Column("created_at", "bigint"),
    Column("archived_at", "bigint", writable=True),
    Column("metadata", "jsonb", writable=True),
)
RESOURCE_FIELDS = tuple(column.name for column in COLUMNS)
# What an update may change; `update` passes them in this order.
WRITABLE_FIELDS = tuple(column.name for column in COLUMNS if column.writable)
# What a statement returns of the row: the resource, and `version` beside it.
_COLUMNS = ", ".join(RESOURCE_FIELDS) + ", version"
# A listed page goes straight into its response: its jsonb (metadata) is read as the JSON text
# PostgreSQL writes and passed on as it is (orjson.Fragment), never decoded and encoded again.
_TEXT_FIELDS = tuple(column.name for column in COLUMNS if column.type == "jsonb")
_LISTED = [
    f"{field}::text AS {field}" if field in _TEXT_FIELDS else field for field in RESOURCE_FIELDS
]


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


def _listed(record: asyncpg.Record) -> StoredConversation:
    """A row read with the `_LISTED` columns: its jsonb is JSON text, to be sent as it is."""
    resource = resource_of(record)
    for field in _TEXT_FIELDS:
        resource[field] = orjson.Fragment(resource[field])
    return StoredConversation(resource, record["version"])


# A keyed change runs only if its claim allows it (see idempotency.claim_key).
MAY_WRITE = "(SELECT may_write FROM claim)"


def _statement(
    change: str, parameters: Parameters, account: str, *, keyed: bool, also: str = ""
) -> str:
    """`change` (an INSERT, UPDATE or DELETE returning the row) and, if it touched a row, that
    change's outbox row, in one statement: one round trip, atomic without BEGIN/COMMIT.

    The outbox row's values follow the change's (an `OutboxRow`); `also` is any further
    data-modifying CTE on `changed` (a delete's tombstone). `keyed`: under an idempotency key,
    the claim first and, with the row and its event, the answer, whose values come last
    (`KeyedAnswer.values`); `change` then runs only if MAY_WRITE, and the statement returns one
    row always: the claim, and the changed row's columns (null when nothing changed).
    """
    event = outbox.insert_row(parameters, "changed")
    if not keyed:
        return f"""
WITH changed AS ({change}),{also}
event AS ({event})
SELECT {_COLUMNS} FROM changed
"""
    key = idempotency.take_key(parameters)
    return f"""
WITH claim AS ({idempotency.claim_key(account, key)}),
changed AS ({change}),{also}
event AS ({event}),
answer AS ({idempotency.insert_answer(account, key, "changed")})
SELECT {idempotency.CLAIM_COLUMNS}, changed.* FROM claim LEFT JOIN changed ON true
"""


async def _run(
    conn: asyncpg.Connection,
    plain: str,
    keyed_query: str,
    args: tuple[object, ...],
    keyed: KeyedAnswer | None,
) -> StoredConversation | None:
    """The changed row of `plain`, or under a key of `keyed_query` (whose claim may raise)."""
    if keyed is None:
        record = await conn.fetchrow(plain, *args)
    else:
        record = await idempotency.run_claimed(conn, keyed_query, args, keyed)
        if record["id"] is None:
            record = None
    return _stored(record) if record else None


def _insert(*, keyed: bool) -> str:
    """INSERT_CONVERSATION; `keyed`: INSERT_CONVERSATION_KEYED. $1 is the account, then the
    resource's fields (RESOURCE_FIELDS), then the outbox row."""
    parameters = Parameters()
    values = parameters.take("account_id", *RESOURCE_FIELDS)
    if keyed:  # a SELECT's parameters have no column to take their types from
        types = {"account_id": "text", **{column.name: column.type for column in COLUMNS}}
        rows = "SELECT " + ", ".join(f"{values[name]}::{types[name]}" for name in values)
        rows += f" WHERE {MAY_WRITE}"
    else:
        rows = f"VALUES ({', '.join(values.values())})"
    change = f"""
    INSERT INTO conversations ({", ".join(values)})
    {rows}
    ON CONFLICT DO NOTHING
    RETURNING {_COLUMNS}"""
    return _statement(change, parameters, values["account_id"], keyed=keyed)


INSERT_CONVERSATION = _insert(keyed=False)
INSERT_CONVERSATION_KEYED = _insert(keyed=True)


async def insert(
    conn: asyncpg.Connection,
    account_id: str,
    resource: dict[str, Any],
    event: OutboxRow,
    keyed: KeyedAnswer | None = None,
) -> StoredConversation | None:
    """Insert a new conversation and its event (and, under a key, its answer); None (and no
    event) when the contact or group already has one."""
    args = (account_id, *(resource[field] for field in RESOURCE_FIELDS), *event)
    return await _run(conn, INSERT_CONVERSATION, INSERT_CONVERSATION_KEYED, args, keyed)


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


def _update(*, keyed: bool) -> str:
    """UPDATE_CONVERSATION; `keyed`: UPDATE_CONVERSATION_KEYED. The account, the id and the
    version read, then the writable fields (WRITABLE_FIELDS), then the outbox row."""
    parameters = Parameters()
    row = parameters.take("account_id", "id", "version")
    values = parameters.take(*WRITABLE_FIELDS)
    guard = f" AND {MAY_WRITE}" if keyed else ""
    # change_xid: every change moves the row's delta-sync position (sync.py).
    change = f"""
    UPDATE conversations
    SET {", ".join(f"{field} = {value}" for field, value in values.items())},
        version = version + 1, change_xid = pg_current_xact_id()
    WHERE account_id = {row["account_id"]} AND id = {row["id"]} AND version = {row["version"]}{guard}
    RETURNING {_COLUMNS}"""
    return _statement(change, parameters, row["account_id"], keyed=keyed)


UPDATE_CONVERSATION = _update(keyed=False)
UPDATE_CONVERSATION_KEYED = _update(keyed=True)


async def update(
    conn: asyncpg.Connection,
    account_id: str,
    resource: dict[str, Any],
    expected_version: int,
    event: OutboxRow,
    keyed: KeyedAnswer | None = None,
) -> StoredConversation | None:
    """Write the writable fields of `resource` and its event (and, under a key, its answer) if
    the row is still at `expected_version`; None (and no event) if it changed or went."""
    args = (
        account_id,
        resource["id"],
        expected_version,
        *(resource[field] for field in WRITABLE_FIELDS),
        *event,
    )
    return await _run(conn, UPDATE_CONVERSATION, UPDATE_CONVERSATION_KEYED, args, keyed)


def _delete(*, keyed: bool) -> str:
    """DELETE_CONVERSATION; `keyed`: DELETE_CONVERSATION_KEYED. The account, the id and the
    version read, then the outbox row."""
    parameters = Parameters()
    row = parameters.take("account_id", "id", "version")
    guard = f" AND {MAY_WRITE}" if keyed else ""
    change = f"""
    DELETE FROM conversations
    WHERE account_id = {row["account_id"]} AND id = {row["id"]} AND version = {row["version"]}{guard}
    RETURNING {_COLUMNS}"""
    # The tombstone's position is the deleting transaction's id (the column's default), as an
    # update's.
    tombstone = f"""
tombstone AS (
    INSERT INTO conversation_tombstones (account_id, id) SELECT {row["account_id"]}, id FROM changed
),"""
    return _statement(change, parameters, row["account_id"], keyed=keyed, also=tombstone)


DELETE_CONVERSATION = _delete(keyed=False)
DELETE_CONVERSATION_KEYED = _delete(keyed=True)


async def delete(
    conn: asyncpg.Connection,
    account_id: str,
    conversation_id: str,
    expected_version: int,
    event: OutboxRow,
    keyed: KeyedAnswer | None = None,
) -> bool:
    """Remove a conversation and record its event (and, under a key, its answer) if it is
    still at `expected_version`."""
    args = (account_id, conversation_id, expected_version, *event)
    deleted = await _run(conn, DELETE_CONVERSATION, DELETE_CONVERSATION_KEYED, args, keyed)
    return deleted is not None


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


# A filter on several metadata pairs walks the labels of the one with the fewest rows, counted
# up to this many (index entries only): past it, the filter's first pair in key order.
LABEL_COUNT_CAP = 1000


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
    args: list[object] = [account_id]

    def param(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    # What the row itself must be.
    row: list[str] = []
    if filters.archived is not None:
        row.append("archived_at IS NOT NULL" if filters.archived else "archived_at IS NULL")
    if filters.muted is not None:
        row.append(f"is_muted = {param(filters.muted)}")
    if filters.pinned is not None:
        row.append(f"is_pinned = {param(filters.pinned)}")
    if filters.contact_id is not None:
        row.append(f"contact_id = {param(filters.contact_id)}")
    if filters.group_id is not None:
        row.append(f"group_id = {param(filters.group_id)}")
    if filters.unread is not None:
        row.append(UNREAD if filters.unread else f"({UNREAD}) IS NOT TRUE")

    # The order's key: the row's own, or its label's (which holds both orders' keys).
    activity, id_ = ("l.activity", "l.id") if filters.metadata else (ACTIVITY_KEY, "id")
    if sort is Sort.CREATED:
        key, order_by = id_, (id_,)

        def place(position: Position) -> str:
            return param(position.id)
    else:
        key, order_by = f"({activity}, {id_})", (activity, id_)

        def place(position: Position) -> str:
            time = -1 if position.last_active_at is None else position.last_active_at
            return f"({param(time)}, {param(position.id)})"

    walk = ["account_id = $1" if not filters.metadata else "l.account_id = $1"]
    if after is not None:
        walk.append(f"{key} < {place(after)}")
    if before is not None:
        walk.append(f"{key} > {place(before)}")
    direction = "ASC" if before is not None else "DESC"
    order = f"ORDER BY {', '.join(f'{column} {direction}' for column in order_by)}"

    if not filters.metadata:
        return (
            f"SELECT {', '.join(_LISTED)}, version FROM conversations "
            f"WHERE {' AND '.join(walk + row)} "
            f"{order} LIMIT {param(limit)}"
        ), args

    # A metadata-filtered page walks one pair's labels in the order's index
    # (0007_metadata_labels.sql): only rows that have that value, already in order. Each is then
    # read by its key and checked against the other filters (its LIMIT, one row by the key
    # anyway, keeps that lookup inside the walk: no estimate can turn the plan into a scan of
    # the account and a sort).
    pairs = filters.metadata
    if len(pairs) == 1:
        [(label_key, label_value)] = pairs.items()
        walk.append(f"l.key = {param(label_key)} AND l.value = {param(label_value)}")
    else:
        wanted = param(pairs)
        walk.append(
            f"(l.key, l.value) = (SELECT key, value FROM jsonb_each_text({wanted}::jsonb) AS pair "
            "ORDER BY (SELECT count(*) FROM (SELECT FROM conversation_labels AS r "
            "WHERE r.account_id = $1 AND r.key = pair.key AND r.value = pair.value "
            f"LIMIT {LABEL_COUNT_CAP}) AS capped), key LIMIT 1)"
        )
        # The other pairs are looked up in the labels' primary key, one unique entry each
        # (index only), before the row: a conversation of the walked pair that lacks another
        # costs a probe, not its row. (Only the label in them: a filter run before the read.)
        for key, value in pairs.items():
            key_, value_ = param(key), param(value)
            row.append(
                f"(l.key = {key_} OR EXISTS (SELECT FROM conversation_labels AS o "
                f"WHERE o.account_id = $1 AND o.key = {key_} AND o.value = {value_} "
                "AND o.id = l.id))"
            )
    lookup = " AND ".join(["account_id = l.account_id", "id = l.id", *row])
    columns = ", ".join(f"c.{column}" for column in (*_LISTED, "version"))
    return (
        f"SELECT {columns} FROM conversation_labels AS l CROSS JOIN LATERAL "
        f"(SELECT {_COLUMNS} FROM conversations WHERE {lookup} LIMIT 1) AS c "
        f"WHERE {' AND '.join(walk)} {order} LIMIT {param(limit)}"
    ), args


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
    """Up to `limit` conversations in the direction of travel, in `sort` order (each one's
    metadata as JSON text in an `orjson.Fragment`, for the response).

    `after` walks on in the order (keys below the position, descending), `before` back (keys
    above it, ascending, so the nearest come first; the caller reverses). Keyset on an index of
    the order: no OFFSET, flat cost at any depth.
    """
    query, args = list_query(
        account_id, filters, sort=sort, limit=limit, after=after, before=before
    )
    records = await conn.fetch(query, *args)
    return [_listed(record) for record in records]
