"""Logging set-up: one JSON object per line for machines, or plain lines for people."""

import contextvars
import logging
import time
import traceback

import orjson
from aiohttp import web

# The request being served, set by the request-id middleware: every log line of a request
# carries its id without threading it through every call.
REQUEST_ID_VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """`{"timestamp", "level", "logger", "message", ...extra}` on one line, no traceback text."""

    _second = -1
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # the date part changes once a second: format it once
            self._second, self._second_text = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        entry: dict[str, object] = {
            "timestamp": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID_VAR.get()
        if request_id is not None:
            entry["request_id"] = request_id
        attributes = record.__dict__
        for key in attributes.keys() - _STANDARD:
            value = attributes[key]
            if value is not None:
                entry[key] = value
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, log_format: str) -> None:
    """Route every logger to stderr in `log_format` ("json" or "console")."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Record nothing that no line shows: caller lookup walks the stack on every record (the
    # logging HOWTO's "Optimization" section), and thread and process names are never printed.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def route_template(request: web.Request) -> str | None:
    """The matched route's template (`/v1/conversations/{id}`), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


# The route template, or "unmatched", set by the metrics middleware for the access log: a request
# that aiohttp's parser refused never reached the router and has no route at all.
ROUTE = web.RequestKey("route", str)


def describe_exception(error: BaseException | None) -> str:
    """`TypeName at file:line` where it was raised: never the message, which can carry data."""
    if error is None:
        return "no exception"
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    return (
        f"{type(error).__name__} at {frame.filename}:{frame.lineno}"
        if frame
        else type(error).__name__
    )


class AccessLogger(web.AbstractAccessLogger):
    """One line per request: method, route template, status and duration (seconds).

    Never the headers, the query string or the body: they can carry tokens and personal data.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get(ROUTE, "unmatched")
        self.logger.info(
            "%s %s %s %.1fms",
            request.method,
            route,
            response.status,
            time * 1000,
            extra={
                "request_id": response.headers.get("X-Request-ID"),
                "method": request.method,
                "route": route,
                "status": response.status,
                "duration": round(time, 6),
            },
        )
