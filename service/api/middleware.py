"""Request id, error rendering, authentication, rate limits and scopes: the layers around every
handler."""

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from marshmallow import ValidationError

from service.api.auth import READ_SCOPE, WRITE_SCOPE, InvalidToken
from service.api.jwks import SigningKeysUnavailable
from service.api.keys import (
    DEPENDENCY_LOG,
    LIFECYCLE,
    METRICS,
    PRINCIPAL,
    RATE_LIMIT_QUOTA,
    RATE_LIMITER,
    REQUEST_ID,
    SETTINGS,
    TOKEN_VERIFIER,
)
from service.api.ratelimit import WRITE_METHODS
from service.errors import ApiError, database_unavailable, error_type, validation_error
from service.logs import REQUEST_ID_VAR, ROUTE, describe_exception, route_template, set_request_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

# A caller's X-Request-ID is echoed only if it is short and plain; otherwise we make one.
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def new_request_id() -> str:
    """A fresh request id: 32 hex characters."""
    return os.urandom(16).hex()


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id (the caller's X-Request-ID if sane) and echo it on the response;
    once shutdown has begun, answers say `Connection: close`."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _REQUEST_ID_PATTERN.fullmatch(given) else new_request_id()
    request[REQUEST_ID] = request_id
    token = set_request_id(request_id)
    try:
        response = await handler(request)
    finally:
        REQUEST_ID_VAR.reset(token)
    response.headers["X-Request-ID"] = request_id
    if request.app[LIFECYCLE].stopping:
        # Shutting down: the connection closes after this answer, and the client is told so
        # (Connection: close) instead of finding out with its next request.
        response.force_close()
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure, aiohttp's own 404/405/413 and crashes included, into the error body."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(request, error)
    except ValidationError as error:
        return error_response(request, validation_error(error.normalized_messages()))
    except web.HTTPException as error:
        if error.status < 400:
            raise  # redirects and the like are answers, not errors
        return error_response(request, _from_http_exception(error))
    except Exception as error:
        if not database_unavailable(error):
            _log_failure(request, error, "unexpected error")
            return error_response(request, ApiError(500, "An unexpected error occurred."))
        held_back = request.app[DEPENDENCY_LOG].admit(type(error))
        if held_back is not None:
            _log_failure(request, error, "database unavailable", held_back=held_back)
        return error_response(
            request,
            ApiError(
                503, "The service is unavailable; retry shortly.", headers={"Retry-After": "1"}
            ),
        )


def _from_http_exception(error: web.HTTPException) -> ApiError:
    headers = {}
    if isinstance(error, web.HTTPMethodNotAllowed):
        headers["Allow"] = error.headers["Allow"]
        message = f"Method {error.method} is not allowed here; allowed: {headers['Allow']}."
    elif isinstance(error, web.HTTPNotFound):
        message = "No such resource."
    elif isinstance(error, web.HTTPRequestEntityTooLarge):
        message = "The request body is larger than 64 KiB."
    else:
        message = error.reason or "The request was not valid."
    return ApiError(error.status, message, headers=headers)


def _log_failure(
    request: web.Request, error: BaseException, what: str, *, held_back: int = 0
) -> None:
    # Only the exception's type and where it was raised: messages and traces can carry SQL or data.
    log.error(
        "%s: %s%s",
        what,
        describe_exception(error),
        f" (and {held_back} more like it since the last line)" if held_back else "",
        extra={
            "request_id": request.get(REQUEST_ID),
            "route": request.get(ROUTE),
            "held_back": held_back or None,
        },
    )


def error_response(request: web.Request, error: ApiError) -> web.Response:
    """The contract's error body for `error`, answering `request`."""
    return render_error(error, request.get(REQUEST_ID, ""), request.app[SETTINGS].error_docs_url)


def render_error(error: ApiError, request_id: str, docs_url: str) -> web.Response:
    """The contract's error body for `error`: the one shape every failure answers with."""
    body: dict[str, object] = {"type": error_type(error.status), "message": error.message}
    if error.errors is not None:
        body["errors"] = error.errors
    if error.param is not None:
        body["param"] = error.param
    if error.retry_after is not None:
        body["retry_after"] = error.retry_after
    body["request_id"] = request_id
    body["documentation_url"] = f"{docs_url}#{body['type']}"
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=error.headers,
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1 request needs a valid bearer token (401 otherwise); its scope is checked by
    `scope_middleware`, after the request drew on its budget."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    credentials = request.headers.getall("Authorization", [])
    if len(credentials) > 1:  # which one counts is ambiguous: a proxy may have added one
        raise ApiError(
            401,
            "Send exactly one Authorization header.",
            headers={"WWW-Authenticate": 'Bearer realm="conversations", error="invalid_request"'},
        )
    scheme, _, token = (credentials[0] if credentials else "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "A bearer token is required: Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": 'Bearer realm="conversations"'},
        )
    try:
        principal = await request.app[TOKEN_VERIFIER].authenticate(token.strip())
    except InvalidToken as error:
        raise ApiError(
            401,
            str(error),
            headers={"WWW-Authenticate": 'Bearer realm="conversations", error="invalid_token"'},
        ) from None
    except SigningKeysUnavailable as error:
        # Not the caller's fault: the key may well be good, we cannot fetch it to know.
        held_back = request.app[DEPENDENCY_LOG].admit(SigningKeysUnavailable)
        if held_back is not None:
            _log_failure(
                request, error, "signing key unknown, JWKS provider down", held_back=held_back
            )
        raise ApiError(
            503,
            "The token's signing key cannot be fetched now; retry shortly.",
            headers={"Retry-After": str(error.retry_after)},
        ) from None
    request[PRINCIPAL] = principal
    return await handler(request)


@web.middleware
async def scope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A /v1 request's token must carry the scope its method calls for: 403 otherwise. It runs
    after the rate limits, so a 403 is an authenticated answer that drew on its budget and
    carries the X-RateLimit-* headers, as the contract says of every one but a 401."""
    principal = request.get(PRINCIPAL)
    if principal is None:  # not /v1: no token was asked for
        return await handler(request)
    needed = READ_SCOPE if request.method in _READ_METHODS else WRITE_SCOPE
    if needed not in principal.scopes:
        raise ApiError(
            403,
            f"The bearer token lacks the {needed} scope.",
            headers={
                "WWW-Authenticate": (
                    f'Bearer realm="conversations", error="insufficient_scope", scope="{needed}"'
                )
            },
        )
    return await handler(request)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request; label it by route template, never by raw path."""
    started = time.perf_counter()
    route = request[ROUTE] = route_template(request) or "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        request.app[METRICS].http_duration.labels(request.method, route, str(status)).observe(
            time.perf_counter() - started
        )


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Draw each authenticated request on its account's read or write budget; 429 when spent.

    Runs after authentication and before the scope check: what has no principal (the probes,
    /metrics, /openapi.json, a 401) draws on nothing; a 403 draws like any other answer.
    """
    principal = request.get(PRINCIPAL)
    limiter = request.app.get(RATE_LIMITER)  # the relay role serves no /v1 and has none
    if principal is None or limiter is None:
        return await handler(request)
    budget = "write" if request.method in WRITE_METHODS else "read"
    quota = await limiter.draw(principal.account_id, budget)
    if quota is not None:
        request[RATE_LIMIT_QUOTA] = quota
        if not quota.allowed:
            retry_after = quota.retry_after(time.time())
            raise ApiError(
                429,
                f"Rate limit exceeded: this account's {budget} budget is spent; "
                f"retry in {retry_after} s.",
                headers={"Retry-After": str(retry_after)},
                retry_after=retry_after,
            )
    return await handler(request)


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to a request that drew on a budget, an error included,
    carries the X-RateLimit-* headers of that budget."""
    quota = request.get(RATE_LIMIT_QUOTA)
    if quota is not None:
        response.headers.update(quota.headers())
