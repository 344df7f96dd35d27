"""Idempotency-Key on writes: the header, the request's fingerprint, and the replayed answer.

The key store and its transaction are the domain's (`service.conversations.idempotency`); this
module decides which answers are stored and how a stored one is replayed.
"""

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from service.api.keys import DB_POOL, PRINCIPAL, SETTINGS
from service.api.middleware import error_response
from service.conversations import idempotency
from service.conversations.idempotency import KeyInUse, KeyReused, StoredAnswer
from service.conversations.operations import Database
from service.errors import ApiError

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# 1 to 255 printable ASCII characters (the contract's limit).
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# Refusals of the domain are answers like any other: a retry must get them again, not a
# different answer because the world changed meanwhile. Every other error is not stored.
_STORED_ERRORS = frozenset({404, 412})
# The headers an answer is replayed with (the content type is always JSON).
_STORED_HEADERS = ("ETag", "Location")
# How long a request that finds its key in use is asked to wait.
_RETRY_AFTER_SECONDS = "1"

Write = Callable[[Database], Awaitable[web.Response]]


def _key(request: web.Request) -> str | None:
    """The request's Idempotency-Key; None without one; 400 if it is malformed."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1 or not _KEY.fullmatch(values[0]):
        raise ApiError(
            400,
            f"{HEADER} must be one value of 1 to 255 printable ASCII characters.",
            param=HEADER,
        )
    return values[0]


def fingerprint(request: web.Request, body: dict[str, Any] | None) -> bytes:
    """SHA-256 of what makes two requests the same request: the method, the path with its query,
    If-Match, and the body as parsed (canonical JSON, so key order and spacing do not count)."""
    canonical = orjson.dumps(
        [request.method, request.path_qs, request.headers.get("If-Match"), body],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()


async def run_write(
    request: web.Request, body: dict[str, Any] | None, write: Write
) -> web.Response:
    """Run a write handler's `write`, once per Idempotency-Key if the request carries one.

    Without a key, `write` runs on the pool as always. With one, the first request's answer
    (2xx, 404, 412) is stored with its write, in one transaction; a retry with the same request
    gets it again with `Idempotent-Replayed: true`, a different request under the key a 422,
    and a retry while the first still runs a 409. Other errors are not stored: the write is
    rolled back with them, and the next try runs afresh.
    """
    key = _key(request)
    if key is None:
        return await write(request.app[DB_POOL])

    async def write_and_keep(db: Database) -> StoredAnswer:
        try:
            response = await write(db)
        except ApiError as error:
            if error.status not in _STORED_ERRORS:
                raise
            response = error_response(request, error)
        if not isinstance(response.body, bytes):
            raise TypeError("a write answers with encoded JSON")
        headers = {
            name: response.headers[name] for name in _STORED_HEADERS if name in response.headers
        }
        return StoredAnswer(response.status, response.body, headers)

    try:
        answer, replayed = await idempotency.run_once(
            request.app[DB_POOL],
            request[PRINCIPAL].account_id,
            key,
            fingerprint(request, body),
            request.app[SETTINGS].idempotency_ttl_hours,
            write_and_keep,
        )
    except KeyInUse:
        raise ApiError(
            409,
            f"A request with this {HEADER} is still running; retry after Retry-After seconds.",
            param=HEADER,
            headers={"Retry-After": _RETRY_AFTER_SECONDS},
        ) from None
    except KeyReused:
        message = f"This {HEADER} was already used for a different request."
        raise ApiError(422, message, errors={HEADER: [message]}, param=HEADER) from None
    headers = {**answer.headers, REPLAYED_HEADER: "true"} if replayed else answer.headers
    return web.Response(
        status=answer.status, body=answer.body, content_type="application/json", headers=headers
    )
