"""A relay's published batches awaiting their confirms, oldest first, within a bound of rows."""

import asyncio
from asyncio import FIRST_COMPLETED
from collections import deque

# The ids of a batch's confirmed prefix, and its first failure (None: all confirmed).
PublishOutcome = tuple[list[int], BaseException | None]


class InFlight:
    """Batches published on one channel, in outbox order, and not settled yet.

    A batch goes out as soon as it is read while earlier ones wait for their confirms, up to
    `capacity` rows unconfirmed; outcomes are taken oldest first, so rows are marked in order.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._batches: deque[tuple[list[int], asyncio.Future[PublishOutcome]]] = deque()

    def __bool__(self) -> bool:
        return bool(self._batches)

    @property
    def room(self) -> int:
        """How many more rows may go out before the oldest batch is settled."""
        return self._capacity - sum(len(ids) for ids, _ in self._batches)

    @property
    def ids(self) -> list[int]:
        """The rows in flight: the next read skips them."""
        return [row_id for ids, _ in self._batches for row_id in ids]

    def add(self, ids: list[int], publishing: asyncio.Future[PublishOutcome]) -> None:
        self._batches.append((ids, publishing))

    async def wait(self, commit: asyncio.Event | None = None) -> None:
        """Until the oldest batch is settled or, if given, `commit` is set (a NOTIFY: there is
        more to read before the confirm comes)."""
        oldest = self._batches[0][1]
        if commit is None:
            await asyncio.wait((oldest,))
            return
        committed = asyncio.ensure_future(commit.wait())
        await asyncio.wait((oldest, committed), return_when=FIRST_COMPLETED)
        committed.cancel()

    def settled(self) -> PublishOutcome | None:
        """The oldest batch's outcome, taken out of the window, if it is settled."""
        if not self._batches or not self._batches[0][1].done():
            return None
        return self._batches.popleft()[1].result()

    async def drop(self) -> None:
        """After a failure or a cancellation: let every batch settle, and take no outcome."""
        batches = [publishing for _, publishing in self._batches]
        self._batches.clear()
        await asyncio.gather(*batches, return_exceptions=True)
