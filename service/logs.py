"""Logging set-up: one JSON object per line for machines, or plain lines for people."""

import asyncio
import contextvars
import logging
import math
import time
import traceback
from collections.abc import Callable, Hashable
from typing import Any

import orjson
from aiohttp import web
from opentelemetry import trace

# The request being served and the task serving it, set by the request-id middleware: every log
# line of a request carries its id without threading it through every call. Tasks started while
# a request runs (a pool's reconnect, a relay wake-up) inherit the variable but are not the
# request's work: the task kept with the id tells them apart.
REQUEST_ID_VAR: contextvars.ContextVar[tuple[str, asyncio.Task[Any] | None] | None] = (
    contextvars.ContextVar("request_id", default=None)
)


def set_request_id(request_id: str) -> contextvars.Token[Any]:
    """Make `request_id` the id of this task's log lines (until `REQUEST_ID_VAR.reset`)."""
    return REQUEST_ID_VAR.set((request_id, asyncio.current_task()))


def current_request_id() -> str | None:
    """The id of the request this task serves; None in background work and outside requests."""
    value = REQUEST_ID_VAR.get()
    if value is None:
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # a thread without an event loop: not the request's task
        return None
    return value[0] if task is value[1] else None


class Throttle:
    """One log line per kind per `interval` seconds; the lines held back are counted in the next.

    An outage fails every request the same way: one line with a count says as much as thousands.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._windows: dict[Hashable, tuple[float, int]] = {}  # kind -> (window start, held back)

    def admit(self, kind: Hashable) -> int | None:
        """None if this line is held back; otherwise how many were since the last one."""
        now = self._clock()
        start, held = self._windows.get(kind, (-math.inf, 0))
        if now - start >= self.interval:
            self._windows[kind] = (now, 0)
            return held
        self._windows[kind] = (start, held + 1)
        return None

    def restart(self, kind: Hashable) -> int:
        """How many lines of `kind` were held back, for a line logged now outside `admit` (an
        outage's first or last); the next one is admitted `interval` seconds from now."""
        _, held = self._windows.get(kind, (-math.inf, 0))
        self._windows[kind] = (self._clock(), 0)
        return held


# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def trace_fields(span: trace.SpanContext | None) -> dict[str, str]:
    """A log line's `trace_id` and `span_id` (hex, as W3C traceparent spells them); none
    outside a span."""
    if span is None or not span.is_valid:
        return {}
    return {"trace_id": f"{span.trace_id:032x}", "span_id": f"{span.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    """`{"timestamp", "level", "logger", "message", ...extra}` on one line, with `trace_id` and
    `span_id` when written inside a span; of an exception, only its type and where it was raised
    (`error`), never a traceback."""

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
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        # Written inside a span (tracing on): the line joins its trace.
        entry.update(trace_fields(trace.get_current_span().get_span_context()))
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = describe_exception(record.exc_info[1])
        attributes = record.__dict__
        for key in attributes.keys() - _STANDARD:
            value = attributes[key]
            if value is not None:
                entry[key] = value
        return orjson.dumps(entry, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """`time LEVEL logger: message` for people; of an exception, only its type and where it was
    raised, never a traceback: libraries (asyncpg, aiormq) log them with `exc_info`, and their
    text can carry SQL, data or credentials."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and record.exc_info[1] is not None:
            line += f" [{describe_exception(record.exc_info[1])}]"
        return line


def configure_logging(level: str, log_format: str) -> None:
    """Route every logger to stderr in `log_format` ("json" or "console")."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter())
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
# The request's SERVER span, set by the tracing middleware for the access log, which is written
# after the span has ended (and is no longer current).
SPAN_CONTEXT = web.RequestKey("span_context", trace.SpanContext)


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
        span = request.get(SPAN_CONTEXT)
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
                **trace_fields(span),
            },
        )
