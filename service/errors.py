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
    412: "invalid_request",
    413: "invalid_request",
    415: "invalid_request",
    422: "validation_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
}


# Failures that mean "the database is not there right now": 503, worth a retry.
DATABASE_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


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
