"""Pool connections are released without asyncpg's reset query, so requests must leave no
session state behind on them: this proves it for every kind of request the API serves."""

from service.api.keys import DB_POOL

SESSION_STATE = """
SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())
           AS advisory_locks,
       (SELECT count(*) FROM pg_listening_channels()) AS listening,
       (SELECT count(*) FROM pg_settings WHERE source = 'session') AS session_settings,
       (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors,  -- '' is this query
       (SELECT count(*) FROM pg_prepared_xacts) AS prepared_transactions,
       pg_current_xact_id_if_assigned() IS NULL AS outside_transaction
"""


async def test_requests_leave_no_session_state_on_pool_connections(client, headers):
    created = await (
        await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)
    ).json()
    url = f"/v1/conversations/{created['id']}"
    await client.post("/v1/conversations", json={"contact_id": "c1"}, headers=headers)  # existing
    await client.put(url, json={"is_muted": True}, headers=headers)
    await client.put(url, json={"is_muted": False}, headers={**headers, "If-Match": '"9"'})  # 412
    keyed = {**headers, "Idempotency-Key": "k1"}  # its statement takes an advisory lock
    await client.put(url, json={"is_pinned": True}, headers=keyed)
    await client.put(url, json={"is_pinned": True}, headers=keyed)  # the replay
    await client.get(url, headers=headers)
    await client.get("/v1/conversations?archived=false&limit=5", headers=headers)
    await client.get("/readyz")
    await client.get("/metrics")
    await client.delete(url, headers=headers)

    pool = client.app[DB_POOL]
    connections = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        for conn in connections:
            state = dict(await conn.fetchrow(SESSION_STATE))
            assert state == {
                "advisory_locks": 0,
                "listening": 0,
                "session_settings": 0,
                "cursors": 0,
                "prepared_transactions": 0,
                "outside_transaction": True,
            }
            assert not conn.is_in_transaction()
    finally:
        for conn in connections:
            await pool.release(conn)


async def test_the_pool_skips_the_reset_query(client):
    pool = client.app[DB_POOL]
    async with pool.acquire() as conn:
        assert conn.get_reset_query() == ""
