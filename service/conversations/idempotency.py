"""Idempotency keys: a keyed write and its stored answer commit in one transaction.

While a keyed request runs, its transaction holds an advisory lock on (account, key); a request
with the same key that finds the lock taken is told to retry later. When the transaction
commits, the write and its answer become visible together; when it ends any other way (rollback,
a crash, the session's death) neither exists and the lock is gone, so the next try runs afresh.
"""

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import orjson

from service.conversations.housekeeping import Job

# The claim: the lock, and in the same round trip the stored answer if the key has one. The
# lookup's snapshot may predate a commit that released the lock just before we took it; then
# STORE_ANSWER meets that answer's row and the attempt is rolled back and run again.
CLAIM_KEY = """
SELECT pg_try_advisory_xact_lock($1) AS locked,
       stored.fingerprint, stored.status, stored.body, stored.headers
FROM (VALUES (1)) AS one
LEFT JOIN idempotency_keys AS stored
    ON stored.account_id = $2 AND stored.key = $3 AND stored.expires_at > now()
"""
# An expired answer not yet removed by housekeeping is replaced; a live one never is.
STORE_ANSWER = """
INSERT INTO idempotency_keys (account_id, key, fingerprint, status, body, headers, expires_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, now() + make_interval(hours => $7))
ON CONFLICT (account_id, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, body = EXCLUDED.body,
    headers = EXCLUDED.headers, created_at = EXCLUDED.created_at,
    expires_at = EXCLUDED.expires_at
WHERE idempotency_keys.expires_at <= now()
RETURNING 1
"""
DELETE_EXPIRED = """
DELETE FROM idempotency_keys
WHERE (account_id, key) IN (
    SELECT account_id, key FROM idempotency_keys
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
)
"""
# The housekeeping job that removes answers past IDEMPOTENCY_TTL_HOURS.
EXPIRED_KEYS = Job("expired idempotency keys", DELETE_EXPIRED)

# Two tries cover the one race CLAIM_KEY can lose (see there); a third would be a bug.
_ATTEMPTS = 2


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An answer as it is replayed: status, body bytes, and the headers that go with them."""

    status: int
    body: bytes
    headers: dict[str, str]


class KeyInUse(Exception):
    """Another request with this key is still running."""


class KeyReused(Exception):
    """The key already answered a different request."""


class _AnswerExists(Exception):
    """The key's answer was committed after the claim's snapshot: roll back and look again."""


def lock_key(account_id: str, key: str) -> int:
    """The advisory lock id for a key of an account: 64 bits of SHA-256, as a signed bigint."""
    digest = hashlib.sha256(f"{len(account_id)}:{account_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def run_once(
    pool: asyncpg.Pool,
    account_id: str,
    key: str,
    fingerprint: bytes,
    ttl_hours: int,
    write: Callable[[asyncpg.Connection], Awaitable[StoredAnswer]],
) -> tuple[StoredAnswer, bool]:
    """The answer for a keyed request, and whether it is a replay.

    A live stored answer for the key is returned as it is (KeyReused if `fingerprint` differs);
    otherwise, if no other request holds the key (KeyInUse), `write` runs on a transaction's
    connection and the answer it returns is stored in that transaction. If `write` raises,
    the transaction rolls back: no write and no answer, and the key is free again.
    """
    lock = lock_key(account_id, key)
    async with pool.acquire() as conn:
        for _ in range(_ATTEMPTS):
            try:
                async with conn.transaction():
                    claim = await conn.fetchrow(CLAIM_KEY, lock, account_id, key)
                    if claim["fingerprint"] is not None:
                        if claim["fingerprint"] != fingerprint:
                            raise KeyReused
                        answer = StoredAnswer(
                            claim["status"], claim["body"], orjson.loads(claim["headers"])
                        )
                        return answer, True
                    if not claim["locked"]:
                        raise KeyInUse
                    answer = await write(conn)
                    stored = await conn.fetchval(
                        STORE_ANSWER,
                        account_id,
                        key,
                        fingerprint,
                        answer.status,
                        answer.body,
                        orjson.dumps(answer.headers).decode(),
                        ttl_hours,
                    )
                    if stored is None:
                        raise _AnswerExists
                    return answer, False
            except _AnswerExists:
                continue
    raise RuntimeError("an idempotency key's answer kept changing under its lock")
