"""Writes that keep losing the optimistic race, for tests of the locked last try."""

import pytest

from service.conversations import operations, repository


def lose_races_until_locked(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make every update lose its race (as if another writer had changed the row in between)
    until the last try; returns, per try so far, whether it ran inside a transaction."""
    real_update = repository.update
    calls: list[bool] = []

    async def loses_until_locked(conn, *args, **kwargs):
        calls.append(conn.is_in_transaction())
        if len(calls) < operations._WRITE_ATTEMPTS:
            return None
        return await real_update(conn, *args, **kwargs)

    monkeypatch.setattr(repository, "update", loses_until_locked)
    return calls
