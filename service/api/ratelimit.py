"""Per-account rate limits: a read and a write budget, counted in Redis or in the process.

The algorithm is the sliding window counter (as in the `limits` library and Cloudflare's rate
limiting): windows aligned on the clock, and a request is admitted while the previous window's
count, weighted by how much of it the sliding window still covers, plus the current window's
count stays within the budget. It admits no double burst at a window edge, unlike a fixed
window, and keeps two counters per account and budget whatever the traffic. In Redis one Lua
script counts and answers the figures for the headers, for all the draws a worker makes in one
turn of its event loop at once: see docs/architecture.md for why this is not the `limits`
library's own storage. If Redis is unreachable requests are served unlimited, and a
probe every few seconds finds it again.
"""

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.backoff import Backoff
from service.logs import Throttle
from service.metrics import Metrics
from service.settings import RateLimitSettings

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Redis answers in well under a millisecond: a request never waits longer than this on it.
REDIS_TIMEOUT_SECONDS = 0.25
# While Redis is unreachable one request probes it after a jittered pause of at most this.
PROBE_INTERVAL_CAP_SECONDS = 2.0
# At most one "still unreachable" log line per this many seconds during an outage.
LOG_INTERVAL_SECONDS = 60.0
_UNCHECKED = "unchecked"  # the kind of those lines
# Clocks differ a little between replicas and Redis is reached over a network: a retry after
# Retry-After lands this much past the computed moment, never just before it.
CLOCK_MARGIN_SECONDS = 0.05
STORE_UNAVAILABLE = (RedisError, OSError)
KEY_PREFIX = "conversations:rate-limit"

# Several draws at once, in order. KEYS: per draw, this window's counter and the previous
# window's. ARGV: per draw, the budget, the previous window's weight (1 at this window's start,
# falling to 0 at its end) and the counter's lifetime (two windows: it is the previous window's
# during the next one). Returns per draw: admitted (1 or 0) and both counts, the draw included.
COUNT_SCRIPT = """
local answers = {}
for draw = 0, #KEYS / 2 - 1 do
    local this, before = KEYS[2 * draw + 1], KEYS[2 * draw + 2]
    local limit, weight = tonumber(ARGV[3 * draw + 1]), tonumber(ARGV[3 * draw + 2])
    local current = tonumber(redis.call('GET', this) or '0')
    local previous = tonumber(redis.call('GET', before) or '0')
    local admitted = 0
    if previous * weight + current + 1 <= limit then
        admitted = 1
        current = redis.call('INCR', this)
        if current == 1 then
            redis.call('EXPIRE', this, ARGV[3 * draw + 3])
        end
    end
    answers[3 * draw + 1], answers[3 * draw + 2], answers[3 * draw + 3] = admitted, current, previous
end
return answers
"""


class Count(NamedTuple):  # a tuple: built on every request, cheaply
    """One draw as the store counted it."""

    admitted: bool
    current: int  # this window's requests, the admitted one included
    previous: int  # the previous window's


class Counters(Protocol):
    """Where the budgets are counted."""

    async def count(self, key: str, limit: int, window: int, index: int, weight: float) -> Count:
        """Admit one request on `key` if the weighted count stays within `limit`, and count it."""
        ...

    async def reachable(self) -> bool:
        """Whether the store answers now."""
        ...

    async def close(self) -> None:
        """Release what the store holds."""
        ...


class InProcessCounters:
    """The counters of this process alone (no RATE_LIMIT_REDIS_URL)."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int, int]] = {}  # key: (index, current, previous)
        self._index = 0

    async def count(self, key: str, limit: int, window: int, index: int, weight: float) -> Count:
        """As Counters.count; never waits."""
        if index > self._index:  # once per window: forget the accounts idle for two windows
            self._windows = {k: v for k, v in self._windows.items() if v[0] >= index - 1}
            self._index = index
        stored_index, current, previous = self._windows.get(key, (index, 0, 0))
        if stored_index < index:  # a new window: the stored one is its previous, or older
            previous = current if stored_index == index - 1 else 0
            current = 0
        admitted = previous * weight + current + 1 <= limit
        if admitted:
            current += 1
        self._windows[key] = (index, current, previous)
        return Count(admitted, current, previous)

    async def reachable(self) -> bool:
        """Always."""
        return True

    async def close(self) -> None:
        """Nothing to release."""


class RedisCounters:
    """Counters in Redis, shared by every process that uses the same URL."""

    def __init__(self, url: str) -> None:
        self._redis = Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            # No client-side retries: an unreachable Redis must cost a request one short
            # attempt; the limiter's own backoff decides when to try again.
            retry=Retry(NoBackoff(), 0),
        )
        self._batch: list[tuple[tuple[str, int, int, int, float], asyncio.Future[Count]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def count(self, key: str, limit: int, window: int, index: int, weight: float) -> Count:
        """As Counters.count. The draws of one event-loop turn go to Redis together, in one
        script call: a command each would cost redis-py several times the CPU."""
        future = asyncio.get_running_loop().create_future()
        if not self._batch:  # the task starts on the next turn, with every draw of this one
            task = asyncio.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._batch.append(((key, limit, window, index, weight), future))
        return await future

    async def _send(self) -> None:
        batch, self._batch = self._batch, []
        keys: list[str] = []
        args: list[str | int] = []
        for (key, limit, window, index, weight), _ in batch:
            keys += (f"{KEY_PREFIX}:{key}:{index}", f"{KEY_PREFIX}:{key}:{index - 1}")
            args += (limit, repr(weight), 2 * window + 1)
        try:
            # EVAL, not EVALSHA: a restarted Redis has forgotten every loaded script.
            answers = await self._redis.eval(COUNT_SCRIPT, len(keys), *keys, *args)
        except Exception as error:
            for _, future in batch:
                if not future.done():  # its request may have been cancelled meanwhile
                    future.set_exception(error)
            return
        except asyncio.CancelledError:  # shutting down: no request may wait on this forever
            for _, future in batch:
                future.cancel()
            raise
        for n, (_, future) in enumerate(batch):
            if not future.done():
                admitted, current, previous = answers[3 * n : 3 * n + 3]
                future.set_result(Count(admitted == 1, current, previous))

    async def reachable(self) -> bool:
        """Whether Redis answers a ping (bounded by REDIS_TIMEOUT_SECONDS)."""
        try:
            return bool(await self._redis.ping())
        except STORE_UNAVAILABLE:
            return False

    async def close(self) -> None:
        """Close the connections, once the draws sent are answered."""
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self._redis.aclose()


class Quota(NamedTuple):
    """One request's draw on a budget: whether it may run, and what its answer tells."""

    budget: str  # "read" or "write"
    limit: int
    remaining: int
    reset_at: float  # Unix time at which `remaining` next goes up (on a 429: a retry is admitted)
    allowed: bool

    def retry_after(self, now: float) -> int:
        """Whole seconds, rounded up, until a request on this budget is admitted again."""
        return max(1, math.ceil(self.reset_at + CLOCK_MARGIN_SECONDS - now))

    def headers(self) -> dict[str, str]:
        """The X-RateLimit-* headers of the answer."""
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at + CLOCK_MARGIN_SECONDS)),
        }


def seconds_until(target: float, count: Count, window: int, weight: float) -> float:
    """How long until the weighted count falls to `target`, with no new request meanwhile.

    The previous window's weight falls linearly to 0 at this window's end; then this window's
    count becomes the previous one, and its weight falls from 1 over the next window.
    """
    used = count.previous * weight + count.current
    if used <= target:
        return 0.0
    if count.current <= target:  # within this window (previous > 0, or used would be current)
        return (used - target) * window / count.previous
    return weight * window + (count.current - target) * window / count.current


class RateLimiter:
    """The budgets of every account, in the store the settings name."""

    def __init__(
        self,
        settings: RateLimitSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,  # the Unix time; the windows are aligned on it
    ) -> None:
        self._clock = clock
        self.shared = settings.redis_url is not None
        self._counters: Counters = (
            RedisCounters(settings.redis_url) if settings.redis_url else InProcessCounters()
        )
        self._limits = {"read": settings.reads, "write": settings.writes}
        self._window = settings.window_seconds
        self._metrics = metrics
        self._backoff = Backoff(base=0.1, cap=PROBE_INTERVAL_CAP_SECONDS)
        self._paused_until = 0.0  # monotonic time; requests before it skip the unreachable store
        self._down_since: float | None = None
        # The "still unreachable" lines; each counts the requests served unlimited since the last.
        self._unchecked_log = Throttle(LOG_INTERVAL_SECONDS)
        metrics.rate_limit_store_up.set(1)

    @property
    def enabled(self) -> bool:
        """Whether any budget is on."""
        return any(self._limits.values())

    async def draw(self, account_id: str, budget: str) -> Quota | None:
        """Count one request of `account_id` on `budget` ("read" or "write").

        None when the request draws on no budget: that budget is off, or the store is
        unreachable (the request is then served without a limit, and counted as such).
        """
        limit = self._limits[budget]
        if not limit:
            return None
        if time.monotonic() < self._paused_until:
            self._serve_unchecked()
            return None
        now = self._clock()
        index, elapsed = divmod(now, self._window)
        weight = 1 - elapsed / self._window
        try:
            count = await self._counters.count(
                f"{budget}:{account_id}", limit, self._window, int(index), weight
            )
        except STORE_UNAVAILABLE as error:
            self._store_failed(error)
            self._serve_unchecked()
            return None
        if self._down_since is not None:
            self._store_recovered()
        used = math.ceil(round(count.previous * weight + count.current, 9))
        # Admitted: when Remaining next goes up. Refused: when the count leaves room for one.
        target = used - 1 if count.admitted else limit - 1
        reset_at = now + seconds_until(target, count, self._window, weight)
        return Quota(budget, limit, max(0, limit - used), reset_at, count.admitted)

    async def store_reachable(self) -> bool:
        """Whether the store answers now (bounded by the Redis timeouts)."""
        return await self._counters.reachable()

    async def close(self) -> None:
        """Release the Redis connections, if any."""
        await self._counters.close()

    def _serve_unchecked(self) -> None:
        self._metrics.rate_limit_unchecked.inc()
        held_back = self._unchecked_log.admit(_UNCHECKED)
        if held_back is not None:
            log.warning(
                "rate limits not enforced: Redis still unreachable; %d request(s) served "
                "without a limit since the last report",
                held_back + 1,
            )

    def _store_failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if now < self._paused_until:
            return  # a request that was already waiting on the store when it went away
        self._paused_until = now + self._backoff.next_delay()
        self._metrics.rate_limit_store_up.set(0)
        if self._down_since is None:
            log.warning(
                "rate limits not enforced: Redis unreachable (%s); serving without limits "
                "and probing it again every few seconds",
                type(error).__name__,
            )
            self._down_since = now
            self._unchecked_log.restart(_UNCHECKED)

    def _store_recovered(self) -> None:
        down_for = time.monotonic() - (self._down_since or 0.0)
        log.warning(
            "rate limits enforced again: Redis reachable after %.1f s; %d request(s) were "
            "served without a limit since the last report",
            down_for,
            self._unchecked_log.restart(_UNCHECKED),
        )
        self._down_since = None
        self._backoff.reset()
        self._metrics.rate_limit_store_up.set(1)
