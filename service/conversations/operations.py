"""Domain operations on conversations. Each write changes the row and records its event in one
statement (so one transaction), and only if the row is still as it was read; under an
idempotency key, the same statement also claims the key and stores the answer."""

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from schemas.cursor import Position, Sort
from schemas.fields import METADATA_MAX_KEYS
from service.backoff import until_settled
from service.conversations import idempotency, outbox, repository
from service.conversations.idempotency import Keyed
from service.conversations.ids import new_id
from service.conversations.repository import ListFilter, StoredConversation

T = TypeVar("T")

# An If-Match header as a set of entity-tag values ("3", or "*" for any version); None if absent.
IfMatch = frozenset[str] | None

# Inserting can meet a conflict whose row is deleted before we read it; then we simply try again.
_CREATE_ATTEMPTS = 3
# Optimistic writes that lose the race to a concurrent change read again; the last try locks.
_WRITE_ATTEMPTS = 5


class ConversationNotFound(Exception):
    """No such conversation in this account (another account's looks exactly the same)."""


class VersionMismatch(Exception):
    """The caller's If-Match names a version the conversation no longer has."""


class TooManyMetadataKeys(Exception):
    """The metadata would have more keys than allowed; `count` is how many it would have."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def merge_metadata(current: dict[str, str], changes: dict[str, str | None]) -> dict[str, str]:
    """`current` with `changes` applied key by key: a string sets the key, None removes it,
    keys not named are kept. The limit on keys applies to the result."""
    merged = {**current, **changes}
    result = {key: value for key, value in merged.items() if value is not None}
    if len(result) > METADATA_MAX_KEYS:
        raise TooManyMetadataKeys(len(result))
    return result


@dataclass(frozen=True, slots=True)
class Page:
    """A page of the list in its order, and whether another exists in the direction of travel."""

    conversations: list[StoredConversation]
    has_more: bool


def _check_version(current: StoredConversation, if_match: IfMatch) -> None:
    if if_match is not None and "*" not in if_match and str(current.version) not in if_match:
        raise VersionMismatch


async def create(
    pool: asyncpg.Pool,
    account_id: str,
    fields: dict[str, Any],
    traceparent: str | None = None,
    keyed: Keyed[tuple[StoredConversation, bool]] | None = None,
) -> tuple[StoredConversation, bool]:
    """A new conversation for the contact or group, or the one it already has.

    Returns the conversation and whether it was created. Race-safe: concurrent creates for one
    contact meet the unique index, and all but one find the winner's row. Under a key, its
    answer is stored with the outcome (see `idempotency`).
    """
    async with pool.acquire() as conn:
        return await until_settled(
            _CREATE_ATTEMPTS, lambda _: _create_once(conn, account_id, fields, traceparent, keyed)
        )


async def _create_once(
    conn: asyncpg.Connection,
    account_id: str,
    fields: dict[str, Any],
    traceparent: str | None,
    keyed: Keyed[tuple[StoredConversation, bool]] | None,
) -> tuple[StoredConversation, bool] | None:
    """`create`'s insert, or else the lookup of the conversation it conflicted with; None if
    that one was deleted before the lookup."""
    now_ms = time.time_ns() // 1_000_000
    resource = {
        "id": new_id(now_ms),
        "contact_id": fields.get("contact_id"),
        "group_id": fields.get("group_id"),
        "pinned_message_id": fields.get("pinned_message_id"),
        "is_pinned": fields.get("is_pinned", False),
        "is_muted": fields.get("is_muted", False),
        "last_active_at": fields.get("last_active_at"),
        "last_opened_at": fields.get("last_opened_at"),
        "created_at": now_ms // 1000,
        "archived_at": None,
        "metadata": merge_metadata({}, fields.get("metadata", {})),
    }
    event = outbox.build_event(outbox.CREATED, account_id, resource, 1)
    created = await repository.insert(
        conn,
        account_id,
        resource,
        outbox.event_row(event, traceparent),
        keyed.answer((StoredConversation(resource, 1), True)) if keyed else None,
    )
    if created is not None:
        return created, True
    existing = await repository.find_by_participant(
        conn, account_id, resource["contact_id"], resource["group_id"]
    )
    if existing is None:
        return None
    if keyed:
        await idempotency.store(conn, keyed.answer((existing, False)))
    return existing, False


async def get(pool: asyncpg.Pool, account_id: str, conversation_id: str) -> StoredConversation:
    """One conversation of the account."""
    async with pool.acquire() as conn:
        found = await repository.get(conn, account_id, conversation_id)
    if found is None:
        raise ConversationNotFound
    return found


async def list_page(
    pool: asyncpg.Pool,
    account_id: str,
    filters: ListFilter,
    *,
    sort: Sort = Sort.CREATED,
    limit: int,
    starting_after: Position | None = None,
    ending_before: Position | None = None,
) -> Page:
    """One page in `sort` order. A cursor is a position, not a lookup: any well-formed one works,
    also one whose conversation is gone or moved."""
    async with pool.acquire() as conn:
        rows = await repository.list_page(
            conn,
            account_id,
            filters,
            sort=sort,
            limit=limit + 1,
            after=starting_after,
            before=ending_before,
        )
    has_more = len(rows) > limit
    rows = rows[:limit]
    if ending_before is not None:
        rows.reverse()  # fetched backwards from the cursor; pages are always in the order asked
    return Page(rows, has_more)


@contextlib.asynccontextmanager
async def _current(
    conn: asyncpg.Connection, account_id: str, conversation_id: str, *, lock: bool
) -> AsyncIterator[StoredConversation]:
    """The conversation as it is now. Writes are optimistic (the row must still be at the
    version read); only a write that lost that race too often reads it locked, in a transaction,
    so that it cannot lose again."""
    transaction = conn.transaction() if lock else contextlib.nullcontext()
    async with transaction:
        current = await repository.get(conn, account_id, conversation_id, for_update=lock)
        if current is None:
            raise ConversationNotFound
        yield current


async def _write(
    pool: asyncpg.Pool,
    account_id: str,
    conversation_id: str,
    if_match: IfMatch,
    attempt: Callable[[asyncpg.Connection, StoredConversation], Awaitable[T | None]],
) -> T:
    """Run `attempt` on the conversation as read now, after the If-Match check, until it
    returns something other than None (None: it lost the race to a concurrent change)."""

    async def read_then_attempt(conn: asyncpg.Connection, number: int) -> T | None:
        last = number == _WRITE_ATTEMPTS - 1
        async with _current(conn, account_id, conversation_id, lock=last) as current:
            _check_version(current, if_match)
            return await attempt(conn, current)

    async with pool.acquire() as conn:
        return await until_settled(_WRITE_ATTEMPTS, lambda number: read_then_attempt(conn, number))


async def update(
    pool: asyncpg.Pool,
    account_id: str,
    conversation_id: str,
    changes: dict[str, Any],
    if_match: IfMatch = None,
    traceparent: str | None = None,
    keyed: Keyed[StoredConversation] | None = None,
) -> StoredConversation:
    """Apply `changes` (writable fields only; metadata is merged into the current object). A
    change that changes nothing keeps the version and records no event. Under a key, its answer
    is stored with the outcome."""

    async def attempt(
        conn: asyncpg.Connection, current: StoredConversation
    ) -> StoredConversation | None:
        wanted = changes
        if "metadata" in changes:
            merged = merge_metadata(current.resource["metadata"], changes["metadata"])
            wanted = {**changes, "metadata": merged}
        # Metadata compares as a whole object: previous_attributes carries all of it.
        previous = {
            field: current.resource[field]
            for field, value in wanted.items()
            if current.resource[field] != value
        }
        if not previous:
            if keyed:
                await idempotency.store(conn, keyed.answer(current))
            return current
        after = StoredConversation({**current.resource, **wanted}, current.version + 1)
        archived = "archived_at" in previous and previous["archived_at"] is None
        event = outbox.build_event(
            outbox.ARCHIVED if archived else outbox.UPDATED,
            account_id,
            after.resource,
            after.version,
            previous,
        )
        return await repository.update(
            conn,
            account_id,
            after.resource,
            current.version,
            outbox.event_row(event, traceparent),
            keyed.answer(after) if keyed else None,
        )

    return await _write(pool, account_id, conversation_id, if_match, attempt)


async def delete(
    pool: asyncpg.Pool,
    account_id: str,
    conversation_id: str,
    if_match: IfMatch = None,
    traceparent: str | None = None,
    keyed: Keyed[StoredConversation] | None = None,
) -> StoredConversation:
    """Delete permanently; the event carries the last state, one sequence past its version.
    Returns that last state. Under a key, its answer is stored with the delete."""

    async def attempt(
        conn: asyncpg.Connection, current: StoredConversation
    ) -> StoredConversation | None:
        event = outbox.build_event(
            outbox.DELETED, account_id, current.resource, current.version + 1
        )
        row = outbox.event_row(event, traceparent)
        answer = keyed.answer(current) if keyed else None
        deleted = await repository.delete(
            conn, account_id, conversation_id, current.version, row, answer
        )
        return current if deleted else None

    return await _write(pool, account_id, conversation_id, if_match, attempt)
