"""Delta sync: an account's changes since a token, in an order a late commit cannot overtake.

A change's position is the id of the transaction that wrote it (`change_xid` on the row, the
`position` of a deletion's tombstone). Transactions get their ids when they first write, not
when they commit, so a walk reads a snapshot's xmin with every page: every transaction below it
has ended, so nothing can still commit there. The token remembers the walk's floor (the xmin of
its first page) and the last (position, id) delivered; docs/architecture.md ("Delta sync") has
the argument, why a late commit is never skipped and when an item comes twice.
"""

import base64
import binascii
import hashlib
import struct
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.conversations.housekeeping import Cleanup
from service.conversations.ids import ALPHABET
from service.conversations.repository import RESOURCE_FIELDS, resource_of

_TOKEN_VERSION = 1
# version, flags, floor, position, issued at (Unix seconds); then the id (0 or 16 bytes).
_HEAD = struct.Struct(">BBQQQ")
_ID_LENGTH = 16
_DIGEST_LENGTH = 8
_FRESH = 0x01
_ID_CHARACTERS = frozenset(ALPHABET.encode())


class MalformedSyncToken(Exception):
    """The token cannot be decoded, or was made for another account."""


class ExpiredSyncToken(Exception):
    """The token is older than the retention: a deletion it needs may be forgotten."""


@dataclass(frozen=True, slots=True)
class SyncToken:
    """Where a client stands.

    `floor`: every change below it is in the client's copy, as of the walk's first page.
    (`position`, `after_id`): the last item delivered; `after_id` "" marks the start of a walk
    at `position` (everything below it is in the copy). `fresh`: the walk began from nothing,
    so deletions below the floor concern nothing the client holds.
    """

    fresh: bool
    floor: int
    position: int
    after_id: str

    @property
    def starts_walk(self) -> bool:
        return self.after_id == ""


# A walk from nothing: every conversation, and no deletion from before the walk.
FROM_NOTHING = SyncToken(fresh=True, floor=0, position=0, after_id="")


def _digest(account_id: str, payload: bytes) -> bytes:
    """Binds a token to its account: another account's token, or a changed byte, is refused.
    Not a secret: a token only ever reads its caller's own account."""
    key = hashlib.blake2b(account_id.encode(), digest_size=32).digest()
    return hashlib.blake2b(payload, key=key, digest_size=_DIGEST_LENGTH).digest()


def encode_token(token: SyncToken, account_id: str, issued_at: int) -> str:
    """The opaque `next_since` string: base64url of a versioned binary form and its digest."""
    payload = _HEAD.pack(
        _TOKEN_VERSION,
        _FRESH if token.fresh else 0,
        token.floor,
        token.position,
        issued_at,
    ) + token.after_id.encode("ascii")
    raw = payload + _digest(account_id, payload)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_token(text: str, account_id: str) -> tuple[SyncToken, int]:
    """The token and when it was issued; MalformedSyncToken for anything this service did not
    make for this account."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedSyncToken from None
    payload, digest = raw[:-_DIGEST_LENGTH], raw[-_DIGEST_LENGTH:]
    if len(payload) not in (_HEAD.size, _HEAD.size + _ID_LENGTH):
        raise MalformedSyncToken
    if digest != _digest(account_id, payload):
        raise MalformedSyncToken
    version, flags, floor, position, issued_at = _HEAD.unpack_from(payload)
    after_id = payload[_HEAD.size :]
    if version != _TOKEN_VERSION or flags & ~_FRESH or not set(after_id) <= _ID_CHARACTERS:
        raise MalformedSyncToken
    token = SyncToken(bool(flags & _FRESH), floor, position, after_id.decode("ascii"))
    if token.starts_walk and token.floor != token.position:
        raise MalformedSyncToken
    return token, issued_at


@dataclass(frozen=True, slots=True)
class ChangesPage:
    """Items in position order (a conversation as it is now, or `{"id", "deleted": true}`),
    whether the walk goes on, and the token to call with next."""

    items: list[dict[str, Any]]
    has_more: bool
    next_since: str


_LIVE = ", ".join(RESOURCE_FIELDS)


def _columns(id_column: str) -> str:
    """The resource's columns with `id_column` as the id and NULL for the others; in a UNION
    they take the live branch's types."""
    return ", ".join(
        id_column if field == "id" else f"NULL AS {field}" for field in RESOURCE_FIELDS
    )


# One statement, so one snapshot: a header row (deleted NULL) with the snapshot's xmin (the
# horizon) as its position and how far tombstones were removed as its id, then the items read
# under that snapshot. Both item branches are range scans of an index on (account_id,
# position, id), merged in that order. $2, $3: read after this (position, id); $4: how many;
# $5: deletions from this position only (NULL: from the horizon, for a walk from nothing).
SELECT_CHANGES = f"""
WITH horizon AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT xmin AS position, NULL::boolean AS deleted,
       {_columns("(SELECT through_position FROM conversation_tombstones_removed)::text AS id")}
FROM horizon
UNION ALL
(
    (SELECT change_xid AS position, false AS deleted, {_LIVE}
     FROM conversations
     WHERE account_id = $1 AND (change_xid, id) > ($2::xid8, $3::text)
     ORDER BY change_xid, id
     LIMIT $4)
    UNION ALL
    (SELECT position, true AS deleted, {_columns("id")}
     FROM conversation_tombstones
     WHERE account_id = $1 AND (position, id) > ($2::xid8, $3::text)
       AND position >= coalesce($5::xid8, (SELECT xmin FROM horizon))
     ORDER BY position, id
     LIMIT $4)
    ORDER BY position, id
    LIMIT $4
)
"""  # noqa: S608  # built from constant column lists; values are $n parameters


def _item(record: asyncpg.Record) -> dict[str, Any]:
    if record["deleted"]:
        return {"id": record["id"], "deleted": True}
    return resource_of(record)


@dataclass(frozen=True, slots=True)
class _Read:
    horizon: int  # the snapshot's xmin: every transaction below it has ended
    removed_through: int  # tombstones up to this position may have been removed
    rows: list[asyncpg.Record]


async def _read(
    conn: asyncpg.Connection, account_id: str, token: SyncToken, after: tuple[int, str], limit: int
) -> _Read:
    """Up to `limit` items after `after`, and the snapshot's horizon, in one statement."""
    # A walk from nothing needs no deletion from before it began: below its floor (the horizon
    # of its first page), nothing was ever delivered.
    deletions_from = (None if token.starts_walk else token.floor) if token.fresh else 0
    records = await conn.fetch(SELECT_CHANGES, account_id, *after, limit, deletions_from)
    header = next(record for record in records if record["deleted"] is None)
    rows = [record for record in records if record["deleted"] is not None]
    return _Read(header["position"], int(header["id"]), rows)


def _check_current(token: SyncToken, read: _Read) -> None:
    """ExpiredSyncToken if the token may need a removed tombstone, or is from the future."""
    needed = token.floor if token.fresh else min(token.floor, token.position)
    # Above the horizon, the token comes from another history of this database (a restore).
    if needed <= read.removed_through or token.floor > read.horizon:
        raise ExpiredSyncToken


def _walk_on(token: SyncToken, floor: int, last: asyncpg.Record) -> SyncToken:
    return SyncToken(token.fresh, floor, last["position"], last["id"])


async def changes(
    pool: asyncpg.Pool,
    account_id: str,
    since: str | None,
    *,
    limit: int,
    retention_seconds: float,
) -> ChangesPage:
    """One page of the account's changes since `since` (None: from nothing).

    A walk's last page holds every change from the walk's floor on, read in one snapshot, so
    the client's copy then equals the account in that snapshot. If more than `limit` changes
    arrived during the walk, it ends without that promise and the next walk starts again from
    the floor (those items come twice; none is skipped).
    """
    now = int(time.time())
    if since is None:
        token = FROM_NOTHING
    else:
        token, issued_at = decode_token(since, account_id)
        if now - issued_at > retention_seconds:
            raise ExpiredSyncToken
    cursor = (token.position, token.after_id)
    past_floor = not token.starts_walk and cursor >= (token.floor, "")
    async with pool.acquire() as conn:
        # Past the floor, read from the floor again: everything since it may fit in this page.
        read = await _read(
            conn, account_id, token, (token.floor, "") if past_floor else cursor, limit + 1
        )
        if since is not None:
            _check_current(token, read)
        if len(read.rows) <= limit:
            items, has_more = read.rows, False
            next_token = SyncToken(False, read.horizon, read.horizon, "")
        elif not past_floor:
            floor = read.horizon if token.starts_walk else token.floor
            items, has_more = read.rows[:limit], True
            next_token = _walk_on(token, floor, items[-1])
        else:
            # Too many changes since the floor for one page: walk on after the cursor, and let
            # the next walk start from the floor again.
            read = await _read(conn, account_id, token, cursor, limit + 1)
            items, has_more = read.rows[:limit], len(read.rows) > limit
            next_token = (
                _walk_on(token, token.floor, items[-1])
                if has_more
                else SyncToken(False, token.floor, token.floor, "")
            )
    return ChangesPage(
        [_item(record) for record in items], has_more, encode_token(next_token, account_id, now)
    )


# Expired tombstones, oldest first, and how far removal has reached, in one statement: a sync
# read sees both or neither. $1: batch size, $2: retention in seconds.
DELETE_EXPIRED_TOMBSTONES = """
WITH expired AS (
    DELETE FROM conversation_tombstones
    WHERE (account_id, position, id) IN (
        SELECT account_id, position, id FROM conversation_tombstones
        WHERE deleted_at < now() - make_interval(secs => $2)
        ORDER BY deleted_at
        LIMIT $1
    )
    RETURNING position
),
reached AS (
    UPDATE conversation_tombstones_removed
    SET through_position = greatest(through_position, (SELECT max(position) FROM expired))
    WHERE EXISTS (SELECT FROM expired)
)
SELECT count(*) FROM expired
"""


def expired_tombstones(retention_seconds: float) -> Cleanup:
    """The housekeeping job that forgets deletions older than the retention."""
    return Cleanup("expired sync tombstones", DELETE_EXPIRED_TOMBSTONES, (retention_seconds,))
