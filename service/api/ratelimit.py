"""Per-account rate limits: a read and a write budget, counted in Redis or in the process.

The algorithm and the storages are the `limits` library's: the sliding window counter (the
previous window's count, weighted by how much of it still overlaps the sliding window, plus
the current one), which admits no double burst at a window boundary and keeps two counters per
account and budget whatever the traffic. Redis, when configured, makes every process and replica
draw on one budget; if it is unreachable requests are served unlimited, and a probe every few
seconds finds it again.
"""

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.backoff import Backoff
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
# Redis keeps TTLs in whole milliseconds and the client's clock is not Redis's: a retry after
# Retry-After lands this much past the computed moment, never just before it.
CLOCK_MARGIN_SECONDS = 0.05
STORE_UNAVAILABLE = (StorageError, OSError)


@dataclass(frozen=True)
class Quota:
    """One request's draw on a budget: whether it may run, and what its answer tells."""

    budget: str  # "read" or "write"
    limit: int
    remaining: int
    reset_at: float  # Unix time at which `remaining` next goes up (a retry is admitted)
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


class RateLimiter:
    """The budgets of every account, in the store the settings name."""

    def __init__(self, settings: RateLimitSettings, metrics: Metrics) -> None:
        self.shared = settings.redis_url is not None
        self._storage = _storage(settings.redis_url)
        self._strategy = SlidingWindowCounterRateLimiter(self._storage)
        self._items: dict[str, RateLimitItem | None] = {
            budget: RateLimitItemPerSecond(amount, settings.window_seconds) if amount else None
            for budget, amount in (("read", settings.reads), ("write", settings.writes))
        }
        self._metrics = metrics
        self._backoff = Backoff(base=0.1, cap=PROBE_INTERVAL_CAP_SECONDS)
        self._paused_until = 0.0  # monotonic time; requests before it skip the unreachable store
        self._down_since: float | None = None
        self._last_log = 0.0
        self._unchecked = 0  # since the last log line
        metrics.rate_limit_store_up.set(1)

    @property
    def enabled(self) -> bool:
        """Whether any budget is on."""
        return any(item is not None for item in self._items.values())

    async def draw(self, account_id: str, budget: str) -> Quota | None:
        """Count one request of `account_id` on `budget` ("read" or "write").

        None when the request draws on no budget: that budget is off, or the store is
        unreachable (the request is then served without a limit, and counted as such).
        """
        item = self._items[budget]
        if item is None:
            return None
        if time.monotonic() < self._paused_until:
            self._serve_unchecked()
            return None
        try:
            allowed = await self._strategy.hit(item, budget, account_id)
            stats = await self._strategy.get_window_stats(item, budget, account_id)
        except STORE_UNAVAILABLE as error:
            self._store_failed(error)
            self._serve_unchecked()
            return None
        if self._down_since is not None:
            self._store_recovered()
        return Quota(budget, item.amount, stats.remaining, stats.reset_time, allowed)

    async def store_reachable(self) -> bool:
        """Whether the store answers a ping now (bounded by the Redis timeouts)."""
        return await self._storage.check()

    async def close(self) -> None:
        """Release the Redis connections, if any."""
        if isinstance(self._storage, RedisStorage):
            await self._storage.bridge.storage.aclose()

    def _serve_unchecked(self) -> None:
        self._metrics.rate_limit_unchecked.inc()
        self._unchecked += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_SECONDS:
            log.warning(
                "rate limits not enforced: Redis still unreachable; %d request(s) served "
                "without a limit since the last report",
                self._unchecked,
            )
            self._last_log = now
            self._unchecked = 0

    def _store_failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if now < self._paused_until:
            return  # a request that was already waiting on the store when it went away
        self._paused_until = now + self._backoff.next_delay()
        self._metrics.rate_limit_store_up.set(0)
        if self._down_since is None:
            cause = error.__cause__ or error
            log.warning(
                "rate limits not enforced: Redis unreachable (%s); serving without limits "
                "and probing it again every few seconds",
                type(cause).__name__,
            )
            self._down_since = now
            self._last_log = now
            self._unchecked = 0

    def _store_recovered(self) -> None:
        assert self._down_since is not None
        log.warning(
            "rate limits enforced again: Redis reachable after %.1f s; %d request(s) were "
            "served without a limit since the last report",
            time.monotonic() - self._down_since,
            self._unchecked,
        )
        self._down_since = None
        self._unchecked = 0
        self._backoff.reset()
        self._metrics.rate_limit_store_up.set(1)


def _storage(redis_url: str | None) -> Storage:
    if redis_url is None:
        return MemoryStorage()
    return RedisStorage(
        f"async+{redis_url}",
        implementation="redispy",
        wrap_exceptions=True,
        key_prefix="conversations-rate-limits",
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        # No client-side retries: an unreachable Redis must cost a request one short attempt;
        # the limiter's own backoff decides when to try again.
        retry=Retry(NoBackoff(), 0),
    )
