"""Trying again: at once after a lost race, or with exponential backoff and full jitter when
reconnecting to what is down."""

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until_settled(attempts: int, attempt: Callable[[int], Awaitable[T | None]]) -> T:
    """`attempt(number)`, numbered from 0, run again at once while it returns None (it lost a
    race: what it read changed before it wrote), at most `attempts` times.

    RuntimeError after that: each caller allows enough attempts (or makes its last one unable
    to lose, by locking) that running out means something is wrong.
    """
    for number in range(attempts):
        result = await attempt(number)
        if result is not None:
            return result
    raise RuntimeError(f"still losing its race after {attempts} attempts")


class Backoff:
    """Delays of uniform(0, min(cap, base * 2**attempt)): spread out, so replicas do not retry
    in step (the "full jitter" of the AWS architecture blog's backoff study)."""

    def __init__(self, base: float = 0.2, cap: float = 30.0) -> None:
        self._base = base
        self._cap = cap
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the ceiling up to the cap."""
        ceiling = min(self._cap, self._base * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return random.uniform(0, ceiling)  # noqa: S311  # jitter, not cryptography

    def reset(self) -> None:
        """Back to short delays, after a success."""
        self._attempt = 0


async def first_set(*events: asyncio.Event, within: float | None = None) -> None:
    """Until any of `events` is set (or `within` seconds pass)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def sleep_unless(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stopping` is set meanwhile; True if it was."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        return False
    return True
