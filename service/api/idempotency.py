"""Idempotency-Key on writes: the header, the request's fingerprint, and the replayed answer.

The key store and the statements that claim keys are the domain's
(`service.conversations.idempotency`); this module decides what a request's key and
fingerprint are, which answers are stored, and how a stored one is replayed.
"""

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from service.api.keys import DB_POOL, PRINCIPAL, SETTINGS, shared
from service.api.middleware import error_response
from service.conversations import idempotency
from service.conversations.idempotency import (
    AlreadyAnswered,
    IdempotencyKey,
    Keyed,
    KeyedAnswer,
    KeyInUse,
    KeyReused,
    StoredAnswer,
)
from service.errors import ApiError

T = TypeVar("T")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# 1 to 255 printable ASCII characters (the contract's limit).
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# Refusals of the domain are answers like any other: a retry must get them again, not a
# different answer because the world changed meanwhile. Every other error is not stored.
STORED_ERRORS = frozenset({404, 412})
# The headers an answer is replayed with (the content type is always JSON).
_STORED_HEADERS = ("ETag", "Location")
# How long a request that finds its key in use is asked to wait.
_RETRY_AFTER_SECONDS = "1"


def fingerprint(request: web.Request, body: dict[str, Any] | None) -> bytes:
    """SHA-256 of what makes two requests the same request: the method, the path with its query,
    If-Match, and the body as parsed (canonical JSON, so key order and spacing do not count)."""
    canonical = orjson.dumps(
        [request.method, request.path_qs, request.headers.get("If-Match"), body],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()


def idempotency_key(request: web.Request, body: dict[str, Any] | None) -> IdempotencyKey | None:
    """The request's Idempotency-Key in its account; None without one; 400 if malformed."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1 or not _KEY.fullmatch(values[0]):
        raise ApiError(
            400,
            f"{HEADER} must be one value of 1 to 255 printable ASCII characters.",
            param=HEADER,
        )
    return IdempotencyKey(
        request[PRINCIPAL].account_id,
        values[0],
        fingerprint(request, body),
        shared(request)[SETTINGS].idempotency_ttl_hours,
    )


def json_answer(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> StoredAnswer:
    """A JSON answer, encoded with orjson."""
    return StoredAnswer(status, orjson.dumps(data), headers or {})


def response(answer: StoredAnswer, *, replayed: bool = False) -> web.Response:
    """The HTTP response for an answer (a replayed one says so)."""
    headers = {**answer.headers, REPLAYED_HEADER: "true"} if replayed else answer.headers
    return web.Response(
        status=answer.status, body=answer.body, content_type="application/json", headers=headers
    )


def _refusal(request: web.Request, error: ApiError) -> StoredAnswer:
    rendered = error_response(request, error)
    assert isinstance(rendered.body, bytes)  # error_response encodes the body itself
    kept = {name: rendered.headers[name] for name in _STORED_HEADERS if name in rendered.headers}
    return StoredAnswer(rendered.status, rendered.body, kept)


async def run_write(
    request: web.Request,
    body: dict[str, Any] | None,
    operation: Callable[[Keyed[T] | None], Awaitable[T]],
    render: Callable[[T], StoredAnswer],
) -> web.Response:
    """Run a write `operation` and answer with `render` of its result, once per key.

    Without an Idempotency-Key the operation runs as always. With one, the domain stores the
    answer with the write (and a 404 or 412 refusal is stored here); a retry of the same
    request gets the stored answer with `Idempotent-Replayed: true`, a different request under
    the key a 422, a retry while the first still runs a 409. Other errors store nothing.
    """
    key = idempotency_key(request, body)
    keyed = Keyed(key, render) if key is not None else None
    try:
        try:
            answer = render(await operation(keyed))
        except ApiError as error:
            if keyed is None or error.status not in STORED_ERRORS:
                raise
            answer = _refusal(request, error)
            await idempotency.store_refusal(
                shared(request)[DB_POOL], KeyedAnswer(keyed.key, answer)
            )
    except AlreadyAnswered as stored:
        return response(stored.answer, replayed=True)
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
    return response(answer)
