"""The service's one exception type for answers that are not a success."""

from collections.abc import Mapping
from typing import Any

import asyncpg

# The contract's error `type` for each status the service answers with.
ERROR_TYPE_BY_STATUS = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request",
    410: "invalid_request",
    412: "invalid_request",
    413: "invalid_request",
    415: "invalid_request",
    422: "validation_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
}


class DatabaseUnreachable(Exception):
    """Opening a connection to PostgreSQL failed: refused, unreachable, or timed out.

    The pool's connect raises it instead of the bare OSError or TimeoutError, which in a request
    could as well come from the client hanging up.
    """


# Failures of the database connection: the database is not there right now (503, worth a retry).
DATABASE_CONNECTION_FAILURES = (
    DatabaseUnreachable,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08; the connection closed mid-operation
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: the server was stopped under the session
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed, the server restarts
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,  # 57014: statement_timeout, the database is too slow to answer
    # asyncpg's protocol when the connection drops under it ("unexpected connection_lost").
    asyncpg.InternalClientError,
)

# The same for code that talks to nothing but the database (the relay, start-up, the probes):
# there an OSError or a TimeoutError can only be the database's, and an InterfaceError is a
# connection asyncpg already closed.
DATABASE_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    *DATABASE_CONNECTION_FAILURES,
)
# Everything a database session can fail with in such code, the server's refusals included
# (a migration not applied yet, a lock timeout): what a probe reports as "not ready" and what
# makes the relay start again on a new session.
DATABASE_SESSION_FAILURES = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database went away: a connection failure, or an error raised
    while cleaning up after one (a rollback on the closed connection)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, DATABASE_CONNECTION_FAILURES):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def error_type(status: int) -> str:
    """The contract's `type` for an HTTP status (unlisted client errors are invalid requests)."""
    return ERROR_TYPE_BY_STATUS.get(status, "invalid_request" if status < 500 else "api_error")


class ApiError(Exception):
    """An answer in the contract's error body: raised anywhere, rendered by the error middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        errors: Mapping[str, Any] | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.param = param
        self.headers = dict(headers or {})
        self.retry_after = retry_after  # seconds, in the body of a 429


def validation_error(messages: Mapping[str, Any], summary: str = "Invalid parameters.") -> ApiError:
    """A 422 naming each invalid field, with the first one as `param`."""
    messages = dict(messages)
    param = next(iter(messages), None)
    if param is not None:
        summary = f"{summary[:-1]}: {param}: {_first_message(messages[param])}"
    return ApiError(422, summary, errors=messages, param=param)


def _first_message(messages: Any) -> str:
    if isinstance(messages, list) and messages:
        return _first_message(messages[0])
    if isinstance(messages, dict) and messages:
        return _first_message(next(iter(messages.values())))
    return str(messages)


NOT_FOUND = "No such conversation."


def not_found() -> ApiError:
    """The one 404 for a missing conversation, another account's included."""
    return ApiError(404, NOT_FOUND)
