"""Idempotency keys: a keyed write stores its answer in the write's own statement.

Every keyed outcome ends in one statement that claims the key: it takes a transaction-scoped
advisory lock on (account, key) with `pg_try_advisory_xact_lock` and reads the key's stored
answer. If an answer is stored, nothing else happens and the caller replays it; if the lock is
held by another request, nothing happens and the caller answers 409; otherwise the statement
writes (the row, its outbox event, and the answer, in one transaction) or, for an outcome that
changes nothing (a refusal, a no-op), stores just the answer. A crash before the commit leaves
neither the write nor the answer, and the lock goes with the transaction.
"""

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import asyncpg

from service.backoff import until_settled
from service.conversations.housekeeping import Cleanup
from service.conversations.parameters import Parameters

T = TypeVar("T")

# The key's constraint: an answer insert that meets it found an answer its snapshot missed.
PRIMARY_KEY = "idempotency_keys_pkey"


class KeyValues(NamedTuple):
    """What a keyed statement passes for its key (after the parts before it): the claim's lock
    and key, and the answer stored with the write."""

    lock_id: int
    key: str
    fingerprint: bytes
    status: int
    body: bytes
    etag: str | None
    location: str | None
    ttl_hours: int


def take_key(parameters: Parameters) -> dict[str, str]:
    """The key's placeholders, the next parameters (`KeyedAnswer.values` passes them)."""
    return parameters.take(*KeyValues._fields)


def claim_key(account: str, key: Mapping[str, str]) -> str:
    """The claim CTE's query: the lock, and the key's live stored answer if it has one.

    `account` is the account's placeholder, `key` the key's (`take_key`). `may_write` is true
    when this request holds the key and it has no answer yet.
    """
    return f"""
    SELECT held, held AND stored.fingerprint IS NULL AS may_write,
           stored.fingerprint, stored.status, stored.body, stored.etag, stored.location
    FROM (SELECT pg_try_advisory_xact_lock({key["lock_id"]}) AS held) AS lock
    LEFT JOIN idempotency_keys AS stored
        ON stored.account_id = {account} AND stored.key = {key["key"]}
        AND stored.expires_at > now()"""


def insert_answer(account: str, key: Mapping[str, str], source: str) -> str:
    """An INSERT of the answer for each row of `source`, with the placeholders of `claim_key`.

    No ON CONFLICT: an answer committed after the statement's snapshot (by a request that
    released the lock just before we took it), or an expired one not yet removed, makes the
    whole statement fail with a unique violation, the write with it; the caller runs it again.
    """
    return f"""
    INSERT INTO idempotency_keys (account_id, key, fingerprint, status, body, etag, location,
                                  expires_at)
    SELECT {account}, {key["key"]}, {key["fingerprint"]}, {key["status"]}, {key["body"]},
           {key["etag"]}, {key["location"]}, now() + make_interval(hours => {key["ttl_hours"]})
    FROM {source}"""


# The claim columns a keyed statement returns, for `settle`.
CLAIM_COLUMNS = (
    "claim.held, claim.fingerprint AS stored_fingerprint, claim.status AS stored_status, "
    "claim.body AS stored_body, claim.etag AS stored_etag, claim.location AS stored_location"
)


def _store_answer() -> str:
    parameters = Parameters()
    account = parameters.take("account_id")["account_id"]
    key = take_key(parameters)
    return f"""
WITH claim AS ({claim_key(account, key)}),
answer AS ({insert_answer(account, key, "claim WHERE claim.may_write")})
SELECT {CLAIM_COLUMNS} FROM claim
"""


# An outcome that changes nothing stores only its answer, under the same claim: $1 is the
# account, then the key's values.
STORE_ANSWER = _store_answer()
# Before running a statement again after a unique violation: an expired answer goes.
DELETE_EXPIRED_KEY = """
DELETE FROM idempotency_keys WHERE account_id = $1 AND key = $2 AND expires_at <= now()
"""
DELETE_EXPIRED = """
WITH expired AS (
    DELETE FROM idempotency_keys
    WHERE (account_id, key) IN (
        SELECT account_id, key FROM idempotency_keys
        WHERE expires_at <= now()
        LIMIT $1
    )
    RETURNING 1
)
SELECT count(*) FROM expired
"""
# The housekeeping job that removes answers past IDEMPOTENCY_TTL_HOURS.
EXPIRED_KEYS = Cleanup("expired idempotency keys", DELETE_EXPIRED)

# A unique violation means a snapshot missed an answer (the next one sees it) or an expired
# answer was in the way (now removed): the second run settles; a third would be a bug.
_ATTEMPTS = 2


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An answer as it is replayed: status, body bytes, and its ETag and Location headers."""

    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A request's key in its account, and the fingerprint of the request it names."""

    account_id: str
    key: str
    fingerprint: bytes
    ttl_hours: int

    @property
    def lock_id(self) -> int:
        """The advisory lock id: 64 bits of SHA-256 of (account, key), as a signed bigint."""
        account = self.account_id
        digest = hashlib.sha256(f"{len(account)}:{account}:{self.key}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class Keyed(Generic[T]):
    """A keyed operation: its key, and how its result is answered (the caller's rendering)."""

    key: IdempotencyKey
    render: Callable[[T], StoredAnswer]

    def answer(self, result: T) -> "KeyedAnswer":
        """The answer to store if the operation ends with `result`."""
        return KeyedAnswer(self.key, self.render(result))


@dataclass(frozen=True, slots=True)
class KeyedAnswer:
    """An answer to store under a key, with the write that produces it."""

    key: IdempotencyKey
    answer: StoredAnswer

    def values(self) -> KeyValues:
        """The values of the key's placeholders (`take_key`)."""
        return KeyValues(  # positional, in the fields' order: the cheaper way to build one
            self.key.lock_id,
            self.key.key,
            self.key.fingerprint,
            self.answer.status,
            self.answer.body,
            self.answer.headers.get("ETag"),
            self.answer.headers.get("Location"),
            self.key.ttl_hours,
        )


class AlreadyAnswered(Exception):
    """The key has a stored answer for this very request: replay it."""

    def __init__(self, answer: StoredAnswer) -> None:
        super().__init__("already answered")
        self.answer = answer


class KeyInUse(Exception):
    """Another request with this key is still running."""


class KeyReused(Exception):
    """The key already answered a different request."""


def settle(record: asyncpg.Record, keyed: KeyedAnswer) -> None:
    """Raise unless the claim let this request write: the stored answer, a different request
    under the key, or a key held by a running request."""
    stored = record["stored_fingerprint"]
    if stored is not None:
        if stored != keyed.key.fingerprint:
            raise KeyReused
        headers = {
            name: value
            for name, value in (
                ("ETag", record["stored_etag"]),
                ("Location", record["stored_location"]),
            )
            if value is not None
        }
        raise AlreadyAnswered(StoredAnswer(record["stored_status"], record["stored_body"], headers))
    if not record["held"]:
        raise KeyInUse


async def run_claimed(
    conn: asyncpg.Connection, query: str, args: tuple[object, ...], keyed: KeyedAnswer
) -> asyncpg.Record:
    """Run a keyed statement (`args`, then the key's values: it took their placeholders last)
    and settle its claim: the record if this request may write, else AlreadyAnswered, KeyInUse
    or KeyReused."""

    async def claim(_: int) -> asyncpg.Record | None:
        try:
            record = await _fetch(conn, query, (*args, *keyed.values()))
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name != PRIMARY_KEY:
                raise
            await conn.execute(DELETE_EXPIRED_KEY, keyed.key.account_id, keyed.key.key)
            return None
        settle(record, keyed)
        return record

    return await until_settled(_ATTEMPTS, claim)


async def _fetch(conn: asyncpg.Connection, query: str, args: tuple[object, ...]) -> asyncpg.Record:
    if not conn.is_in_transaction():
        return await conn.fetchrow(query, *args)
    # In a transaction (a write's locked last try), a savepoint: a unique violation must not
    # abort the whole transaction.
    async with conn.transaction():
        return await conn.fetchrow(query, *args)


async def store(conn: asyncpg.Connection, keyed: KeyedAnswer) -> None:
    """Store the answer of an outcome that wrote nothing; raises as `run_claimed` does."""
    await run_claimed(conn, STORE_ANSWER, (keyed.key.account_id,), keyed)


async def store_refusal(pool: asyncpg.Pool, keyed: KeyedAnswer) -> None:
    """`store` for a refusal (404, 412), on a connection of the pool."""
    async with pool.acquire() as conn:
        await store(conn, keyed)
