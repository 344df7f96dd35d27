"""What the event side's loops do after a failure: back off, say so, and wait.

The relay's database loop, its broker loop and the broker's first connect share it: full-jitter
backoff (service.backoff), one WARNING per kind of failure per interval with a count of the
lines held back (service.logs.Throttle), and a wait that stopping, or whatever the caller knows
to mean "back", cuts short.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from service.backoff import Backoff, sleep_unless
from service.logs import Throttle

# During an outage a loop fails alike every time: one line per kind this often, with a count.
LOG_INTERVAL_SECONDS = 10.0


class Retry:
    """A loop's backoff and its throttled log of failures; `succeeded()` after a success."""

    def __init__(
        self,
        log: logging.Logger,
        stopping: asyncio.Event,
        *,
        backoff: Callable[[], Backoff] = Backoff,
        log_interval: float = LOG_INTERVAL_SECONDS,
    ) -> None:
        self._log = log
        self._stopping = stopping
        self._backoff = backoff()
        self._throttle = Throttle(log_interval)

    def succeeded(self) -> None:
        """Back to short delays."""
        self._backoff.reset()

    async def wait(
        self,
        what: str | None,
        error: BaseException | None = None,
        *,
        at_most: float | None = None,
        until: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        """Back off after a failure: log `what` (None: nothing to say) and wait the next delay,
        at most `at_most` seconds; `until(delay)` waits instead of a plain sleep when something
        (a reconnect) may end the wait sooner. Returns at once if stopping."""
        delay = self._backoff.next_delay()
        if at_most is not None:
            delay = min(delay, at_most)
        if what is not None:
            self._report(what, error, delay, "" if until is None else " or once reconnected")
        if until is None:
            await sleep_unless(self._stopping, delay)
        else:
            await until(delay)

    def _report(self, what: str, error: BaseException | None, delay: float, also: str) -> None:
        held_back = self._throttle.admit((what, type(error)))
        if held_back is None:
            return
        reason = f" ({type(error).__name__})" if error is not None else ""
        more = f" (and {held_back} more like it since the last line)" if held_back else ""
        self._log.warning(
            "%s%s; retrying in %.1fs%s%s",
            what,
            reason,
            delay,
            also,
            more,
            extra={"held_back": held_back or None},
        )
