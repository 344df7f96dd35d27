"""What aiormq and aio-pika log about a lost RabbitMQ connection, as one WARNING per interval
with a count, like every other outage.

While RabbitMQ is down the robust connection tries again every second, and each try logs an
ERROR (aiormq: "error when creating transport") and a WARNING (aio-pika: "Connection attempt
... failed"); losing the connection logs a WARNING with a traceback and, from a channel's close
callback, an ERROR. An outage is not a fault of the service: the lines that repeat what another
says are dropped, the rest pass one per kind per interval, counting those held back.
"""

import asyncio
import logging

import aio_pika
import aiormq

from service.events.retry import LOG_INTERVAL_SECONDS
from service.logs import Throttle

# aiormq logs every failed connect, and every caller is told of it too: aio-pika's reconnect
# loop logs its own line, the broker's first connect retries and logs.
TRANSPORT_FAILED = ("aiormq.connection", "error when creating transport: %r")
RECONNECT_FAILED = (
    "aio_pika.robust_connection",
    'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.',
)
READER_FAILED = ("aiormq.connection", "Cancelling cause reader exited abnormally")
CLOSED_BY_BROKER = (
    "aiormq.connection",
    'Unexpected connection close from remote "%s", Connection.Close(reply_code=%r, reply_text=%r)',
)
# aio-pika's robust channel, closing with its connection, fails in its own close callback.
CALLBACK_FAILED = ("aio_pika.tools", "Callback %r error: %s: %s")
# What a lost connection fails the reader with. Anything else (a malformed frame) is a fault,
# not an outage: its record passes as aiormq wrote it, traceback included.
CONNECTION_LOST = (
    ConnectionError,
    OSError,
    asyncio.IncompleteReadError,
    aiormq.exceptions.AMQPConnectionError,
)
# The broker's reply code when it closes connections itself (stopping, or an operator closing
# them): an outage. Other codes (access refused, a protocol error) pass as aiormq wrote them.
CONNECTION_FORCED = 320


class ConnectionLogs(logging.Filter):
    """Installed on the library loggers (`install`): drops or throttles their outage lines."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.throttle = Throttle(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        if key == TRANSPORT_FAILED or (key == CALLBACK_FAILED and _closing_channel(record)):
            return False
        if key == RECONNECT_FAILED:
            args = record.args if isinstance(record.args, tuple) else ()
            error = args[1] if len(args) > 1 else None
            reconnect = f"; reconnecting every {args[2]:g}s" if len(args) > 2 else ""
            return self._summary(record, "RabbitMQ unreachable", error, reconnect)
        if key == READER_FAILED:
            error = record.exc_info[1] if record.exc_info else None
            if error is not None and not isinstance(error, CONNECTION_LOST):
                return True
            return self._summary(record, "RabbitMQ connection lost", error, "")
        if key == CLOSED_BY_BROKER:
            args = record.args if isinstance(record.args, tuple) else ()
            if len(args) < 3 or args[1] != CONNECTION_FORCED:
                return True
            code = f" ({args[1]} {args[2]})"
            return self._summary(record, f"RabbitMQ closed the connection{code}", None, "")
        return True

    def _summary(self, record: logging.LogRecord, what: str, error: object, then: str) -> bool:
        """Rewrite `record` as this kind's one WARNING of the interval, or hold it back."""
        held_back = self.throttle.admit(what)
        if held_back is None:
            return False
        reason = f" ({type(error).__name__})" if error is not None else ""
        more = f" (and {held_back} more like it since the last line)" if held_back else ""
        record.msg, record.args = "%s%s%s%s", (what, reason, then, more)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None  # the type says it; the trace is aiormq's
        record.held_back = held_back or None
        return True


def _closing_channel(record: logging.LogRecord) -> bool:
    """Whether the record is a robust channel's close callback failing on a closed connection."""
    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) < 3 or not isinstance(args[2], (RuntimeError, aiormq.exceptions.AMQPError)):
        return False
    callback = getattr(args[0], "callback", args[0])
    return getattr(callback, "__func__", None) is aio_pika.RobustChannel._on_close


LOGGERS = ("aiormq.connection", "aio_pika.robust_connection", "aio_pika.tools")
FILTER = ConnectionLogs()


def install() -> None:
    """Put the filter on the library loggers (once; a process has one broker connection)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if FILTER not in logger.filters:
            logger.addFilter(FILTER)
