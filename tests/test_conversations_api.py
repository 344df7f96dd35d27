"""The /v1/conversations contract end to end: real HTTP, real PostgreSQL."""

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient

from schemas import ConversationSchema
from schemas.event import EventSchema
from service.conversations import operations
from service.conversations.ids import id_time_ms
from tests.races import lose_races_until_locked

FIELDS = {
    "id",
    "contact_id",
    "group_id",
    "pinned_message_id",
    "is_pinned",
    "is_muted",
    "last_active_at",
    "last_opened_at",
    "created_at",
    "archived_at",
    "metadata",
}
EMPTY_PAGE = {"has_more": False, "data": [], "cursors": {"before": None, "after": None}}


async def create(client: TestClient, headers: dict, **body) -> dict:
    resp = await client.post("/v1/conversations", json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def events(db, conversation_id: str | None = None) -> list[dict]:
    """The outbox's events, oldest first, checked against the event schema."""
    rows = await db.fetch("SELECT payload FROM outbox ORDER BY id")
    loaded = [EventSchema().loads(row["payload"]) for row in rows]
    if conversation_id is not None:
        loaded = [e for e in loaded if e["data"]["object"]["id"] == conversation_id]
    return loaded


# --- create -------------------------------------------------------------------------------


async def test_create_returns_201_location_etag_and_the_object(client, headers, db):
    before = int(time.time())
    resp = await client.post(
        "/v1/conversations", json={"contact_id": "WAz8eIbvDR60rouK"}, headers=headers
    )
    assert resp.status == 201
    body = await resp.json()
    assert set(body) == FIELDS
    assert ConversationSchema().load(body) == body
    assert resp.headers["Location"] == f"/v1/conversations/{body['id']}"
    assert resp.headers["ETag"] == '"1"'
    assert body["contact_id"] == "WAz8eIbvDR60rouK"
    assert body["group_id"] is None
    assert body["is_pinned"] is False
    assert body["is_muted"] is False
    assert body["last_active_at"] is None
    assert body["last_opened_at"] is None
    assert body["archived_at"] is None
    assert body["pinned_message_id"] is None
    assert before <= body["created_at"] <= int(time.time())
    assert id_time_ms(body["id"]) // 1000 == body["created_at"]
    [event] = await events(db)
    assert event["type"] == "conversation.created"
    assert event["sequence"] == 1
    assert event["data"]["object"] == body
    assert "previous_attributes" not in event["data"]


async def test_create_takes_the_optional_fields(client, headers):
    body = await create(
        client,
        headers,
        group_id="grp_1",
        is_pinned=True,
        is_muted=True,
        pinned_message_id="msg_9",
        last_active_at=705103200,
        last_opened_at=0,
    )
    assert body["group_id"] == "grp_1"
    assert body["contact_id"] is None
    assert body["is_pinned"] is True
    assert body["is_muted"] is True
    assert body["pinned_message_id"] == "msg_9"
    assert body["last_active_at"] == 705103200
    assert body["last_opened_at"] == 0


async def test_create_for_a_contact_with_a_conversation_returns_it_with_200(client, headers, db):
    first = await create(client, headers, contact_id="c1")
    resp = await client.post(
        "/v1/conversations", json={"contact_id": "c1", "is_muted": True}, headers=headers
    )
    assert resp.status == 200
    assert await resp.json() == first  # the existing one, unchanged
    assert resp.headers["ETag"] == '"1"'
    assert "Location" not in resp.headers
    assert len(await events(db)) == 1


async def test_a_contact_and_a_group_with_the_same_id_are_different_participants(client, headers):
    contact = await create(client, headers, contact_id="same")
    group = await create(client, headers, group_id="same")
    assert contact["id"] != group["id"]


async def test_concurrent_creates_for_one_contact_make_one_conversation(client, headers, db):
    responses = await asyncio.gather(
        *(
            client.post("/v1/conversations", json={"contact_id": "race"}, headers=headers)
            for _ in range(20)
        )
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 19 + [201]
    ids = {(await r.json())["id"] for r in responses}
    assert len(ids) == 1
    assert await db.fetchval("SELECT count(*) FROM conversations") == 1
    assert [e["type"] for e in await events(db)] == ["conversation.created"]


async def test_after_a_delete_a_create_for_the_same_contact_makes_a_new_conversation(
    client, headers
):
    old = await create(client, headers, contact_id="c1")
    resp = await client.delete(f"/v1/conversations/{old['id']}", headers=headers)
    assert resp.status == 200
    new = await create(client, headers, contact_id="c1")
    assert new["id"] != old["id"]


# --- retrieve -----------------------------------------------------------------------------


async def test_retrieve_returns_the_object_and_etag(client, headers):
    created = await create(client, headers, contact_id="c1")
    resp = await client.get(f"/v1/conversations/{created['id']}", headers=headers)
    assert resp.status == 200
    assert await resp.json() == created
    assert resp.headers["ETag"] == '"1"'


@pytest.mark.parametrize(
    "conversation_id", ["0000000000000000", "short", "zzzzzzzzzzzzzzzzz", "bad!id-000000000"]
)
async def test_retrieve_a_missing_or_malformed_id_is_404(client, headers, conversation_id):
    resp = await client.get(f"/v1/conversations/{conversation_id}", headers=headers)
    assert resp.status == 404
    body = await resp.json()
    assert body["type"] == "not_found_error"
    assert set(body) == {"type", "message", "request_id", "documentation_url"}


# --- update -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_update_changes_only_the_given_fields(client, headers, db, method):
    created = await create(client, headers, contact_id="c1", last_opened_at=100)
    resp = await client.request(
        method,
        f"/v1/conversations/{created['id']}",
        json={"is_muted": True, "last_active_at": 200},
        headers=headers,
    )
    assert resp.status == 200
    body = await resp.json()
    assert body == {**created, "is_muted": True, "last_active_at": 200}
    assert resp.headers["ETag"] == '"2"'
    event = (await events(db))[-1]
    assert event["type"] == "conversation.updated"
    assert event["sequence"] == 2
    assert event["data"]["object"] == body
    assert event["data"]["previous_attributes"] == {"is_muted": False, "last_active_at": None}


async def test_update_accepts_null_for_timestamps_and_pinned_message(client, headers):
    created = await create(
        client, headers, contact_id="c1", last_opened_at=100, pinned_message_id="m1"
    )
    resp = await client.put(
        f"/v1/conversations/{created['id']}",
        json={"last_opened_at": None, "pinned_message_id": None},
        headers=headers,
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["last_opened_at"] is None
    assert body["pinned_message_id"] is None


async def test_an_update_that_changes_nothing_keeps_the_version_and_records_no_event(
    client, headers, db
):
    created = await create(client, headers, contact_id="c1", is_muted=True)
    for body in ({"is_muted": True}, {}):
        resp = await client.put(f"/v1/conversations/{created['id']}", json=body, headers=headers)
        assert resp.status == 200
        assert await resp.json() == created
        assert resp.headers["ETag"] == '"1"'
    assert len(await events(db)) == 1


async def test_archiving_emits_archived_and_unarchiving_emits_updated(client, headers, db):
    created = await create(client, headers, contact_id="c1")
    url = f"/v1/conversations/{created['id']}"
    await client.put(url, json={"archived_at": 1700000000, "is_muted": True}, headers=headers)
    await client.put(
        url, json={"archived_at": 1700000500}, headers=headers
    )  # re-archive: an update
    await client.put(url, json={"archived_at": None}, headers=headers)
    got = await events(db, created["id"])
    assert [e["type"] for e in got] == [
        "conversation.created",
        "conversation.archived",
        "conversation.updated",
        "conversation.updated",
    ]
    assert [e["sequence"] for e in got] == [1, 2, 3, 4]
    assert got[1]["data"]["previous_attributes"] == {"archived_at": None, "is_muted": False}
    assert got[3]["data"]["previous_attributes"] == {"archived_at": 1700000500}
    assert len({e["id"] for e in got}) == 4


async def test_if_match_with_the_current_version_updates(client, headers):
    created = await create(client, headers, contact_id="c1")
    url = f"/v1/conversations/{created['id']}"
    resp = await client.put(url, json={"is_pinned": True}, headers={**headers, "If-Match": '"1"'})
    assert resp.status == 200
    resp = await client.put(
        url, json={"is_pinned": False}, headers={**headers, "If-Match": '"7", "2"'}
    )
    assert resp.status == 200
    resp = await client.put(url, json={"is_muted": True}, headers={**headers, "If-Match": "*"})
    assert resp.status == 200
    assert resp.headers["ETag"] == '"4"'


@pytest.mark.parametrize("if_match", ['"2"', 'W/"1"', "1", "garbage"])
async def test_if_match_with_another_version_is_412_and_changes_nothing(
    client, headers, db, if_match
):
    created = await create(client, headers, contact_id="c1")
    url = f"/v1/conversations/{created['id']}"
    resp = await client.patch(
        url, json={"is_pinned": True}, headers={**headers, "If-Match": if_match}
    )
    assert resp.status == 412
    body = await resp.json()
    assert body["type"] == "invalid_request"
    resp = await client.delete(url, headers={**headers, "If-Match": if_match})
    assert resp.status == 412
    resp = await client.get(url, headers=headers)
    assert await resp.json() == created
    assert len(await events(db)) == 1


async def test_concurrent_if_match_updates_exactly_one_wins(client, headers, db):
    created = await create(client, headers, contact_id="c1")
    url = f"/v1/conversations/{created['id']}"
    responses = await asyncio.gather(
        *(
            client.put(url, json={"last_active_at": n}, headers={**headers, "If-Match": '"1"'})
            for n in range(1, 11)
        )
    )
    assert sorted(r.status for r in responses) == [200] + [412] * 9
    winner = next(r for r in responses if r.status == 200)
    stored = await (await client.get(url, headers=headers)).json()
    assert stored == await winner.json()
    assert [e["sequence"] for e in await events(db, created["id"])] == [1, 2]


async def test_without_if_match_the_last_write_wins(client, headers):
    created = await create(client, headers, contact_id="c1")
    url = f"/v1/conversations/{created['id']}"
    await asyncio.gather(
        *(client.put(url, json={"last_active_at": n}, headers=headers) for n in range(1, 11))
    )
    resp = await client.get(url, headers=headers)
    assert resp.headers["ETag"] == '"11"'


# --- delete -------------------------------------------------------------------------------


async def test_delete_is_permanent(client, headers, db):
    created = await create(client, headers, contact_id="c1", is_muted=True)
    url = f"/v1/conversations/{created['id']}"
    resp = await client.delete(url, headers={**headers, "If-Match": '"1"'})
    assert resp.status == 200
    assert await resp.json() == {"id": created["id"], "deleted": True}
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        body = {"is_muted": False} if method in ("PUT", "PATCH") else None
        resp = await client.request(method, url, json=body, headers=headers)
        assert resp.status == 404, method
    event = (await events(db))[-1]
    assert event["type"] == "conversation.deleted"
    assert event["sequence"] == 2
    assert event["data"]["object"] == created
    assert await db.fetchval("SELECT count(*) FROM conversations") == 0


# --- list ---------------------------------------------------------------------------------


async def test_list_is_newest_first_with_default_limit_10(client, headers):
    created = [await create(client, headers, contact_id=f"c{n}") for n in range(12)]
    resp = await client.get("/v1/conversations", headers=headers)
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"has_more", "data", "cursors"}
    assert body["has_more"] is True
    expected = sorted(created, key=lambda c: c["id"], reverse=True)[:10]
    assert body["data"] == expected
    assert [c["created_at"] for c in body["data"]] == sorted(
        (c["created_at"] for c in body["data"]), reverse=True
    )


async def test_an_empty_list(client, headers):
    resp = await client.get("/v1/conversations", headers=headers)
    assert await resp.json() == EMPTY_PAGE


async def test_list_filters(client, headers):
    plain = await create(client, headers, contact_id="plain")
    muted = await create(client, headers, contact_id="muted", is_muted=True)
    pinned = await create(client, headers, group_id="pinned", is_pinned=True)
    archived = await create(client, headers, contact_id="archived")
    resp = await client.put(
        f"/v1/conversations/{archived['id']}", json={"archived_at": 5}, headers=headers
    )
    archived = await resp.json()

    async def ids(query: str) -> set[str]:
        resp = await client.get(f"/v1/conversations?{query}", headers=headers)
        assert resp.status == 200, await resp.text()
        return {c["id"] for c in (await resp.json())["data"]}

    everything = {c["id"] for c in (plain, muted, pinned, archived)}
    assert await ids("") == everything
    assert await ids("archived=true") == {archived["id"]}
    assert await ids("archived=false") == everything - {archived["id"]}
    assert await ids("muted=true") == {muted["id"]}
    assert await ids("muted=false") == everything - {muted["id"]}
    assert await ids("pinned=true") == {pinned["id"]}
    assert await ids("pinned=false&muted=false&archived=false") == {plain["id"]}
    assert await ids("contact_id=muted") == {muted["id"]}
    assert await ids("group_id=pinned") == {pinned["id"]}
    assert await ids("group_id=muted") == set()


async def test_both_cursors_at_once_is_400(client, headers):
    resp = await client.get(
        "/v1/conversations?starting_after=0000000000000000&ending_before=zzzzzzzzzzzzzzzz",
        headers=headers,
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["type"] == "invalid_request"
    assert body["param"] == "ending_before"


async def walk(
    client, headers, *, limit: int, backwards_from: str | None = None, between=None
) -> list[str]:
    """Follow the cursors page by page; return the ids in the order seen."""
    seen: list[str] = []
    cursor = backwards_from
    while True:
        if backwards_from is None:
            query = f"limit={limit}" + (f"&starting_after={cursor}" if cursor else "")
        else:
            query = f"limit={limit}&ending_before={cursor}"
        resp = await client.get(f"/v1/conversations?{query}", headers=headers)
        assert resp.status == 200
        page = await resp.json()
        ids = [c["id"] for c in page["data"]]
        assert ids == sorted(ids, reverse=True)  # every page newest first
        assert len(ids) <= limit
        if backwards_from is None:
            seen.extend(ids)
            cursor = ids[-1] if ids else cursor
        else:
            seen[:0] = ids
            cursor = ids[0] if ids else cursor
        if between is not None:
            await between()
        if not page["has_more"]:
            return seen


async def test_paging_forwards_and_backwards_with_concurrent_inserts(client, headers):
    original = sorted(
        [(await create(client, headers, contact_id=f"c{n}"))["id"] for n in range(23)], reverse=True
    )
    inserted = []

    async def insert_one() -> None:
        inserted.append((await create(client, headers, contact_id=f"new{len(inserted)}"))["id"])

    forwards = await walk(client, headers, limit=4, between=insert_one)
    # Started before the inserts: all the old ones, once each, in order, and nothing newer.
    assert forwards == original

    oldest = original[-1]
    backwards = await walk(client, headers, limit=5, backwards_from=oldest, between=insert_one)
    assert len(backwards) == len(set(backwards))
    # Walking towards the newest sees every old one and the ones inserted meanwhile, in order.
    assert backwards[-len(original) + 1 :] == original[:-1]
    # Every insert but the one made after the last page was reached.
    assert set(backwards) == (set(original) - {oldest}) | set(inserted[:-1])
    assert backwards == sorted(backwards, reverse=True)


async def test_ending_before_returns_the_page_just_before_the_cursor(client, headers):
    ids = sorted(
        [(await create(client, headers, contact_id=f"c{n}"))["id"] for n in range(7)], reverse=True
    )
    resp = await client.get(f"/v1/conversations?limit=2&ending_before={ids[4]}", headers=headers)
    page = await resp.json()
    assert [c["id"] for c in page["data"]] == ids[2:4]
    assert page["has_more"] is True
    resp = await client.get(f"/v1/conversations?limit=3&ending_before={ids[2]}", headers=headers)
    page = await resp.json()
    assert [c["id"] for c in page["data"]] == ids[0:2]
    assert page["has_more"] is False


async def test_pages_past_either_end_are_empty(client, headers):
    ids = sorted(
        [(await create(client, headers, contact_id=f"c{n}"))["id"] for n in range(3)], reverse=True
    )
    for query in (
        f"starting_after={ids[-1]}",
        f"ending_before={ids[0]}",
        "starting_after=0000000000000000",
    ):
        resp = await client.get(f"/v1/conversations?{query}", headers=headers)
        assert await resp.json() == EMPTY_PAGE, query


async def test_a_deleted_conversation_still_works_as_a_cursor(client, headers):
    ids = sorted(
        [(await create(client, headers, contact_id=f"c{n}"))["id"] for n in range(5)], reverse=True
    )
    await client.delete(f"/v1/conversations/{ids[2]}", headers=headers)
    resp = await client.get(f"/v1/conversations?starting_after={ids[2]}", headers=headers)
    assert [c["id"] for c in (await resp.json())["data"]] == ids[3:]
    resp = await client.get(f"/v1/conversations?ending_before={ids[2]}", headers=headers)
    assert [c["id"] for c in (await resp.json())["data"]] == ids[:2]


# --- tenancy ------------------------------------------------------------------------------


async def test_another_accounts_conversation_is_exactly_like_a_missing_one(
    client, headers, make_token, db
):
    theirs = await create(
        client, {"Authorization": f"Bearer {make_token('someone_else')}"}, contact_id="c1"
    )
    missing = "0000000000000000"

    async def answer(method: str, conversation_id: str, extra: dict) -> tuple[int, dict, set]:
        resp = await client.request(
            method,
            f"/v1/conversations/{conversation_id}",
            headers={**headers, **extra.get("headers", {})},
            json=extra.get("json"),
        )
        body = await resp.json()
        body.pop("request_id")
        return resp.status, body, set(resp.headers) - {"Date", "X-Request-ID", "Content-Length"}

    for method, kwargs in (
        ("GET", {}),
        ("PUT", {"json": {"is_muted": True}}),
        ("PATCH", {"json": {"is_muted": True}}),
        ("DELETE", {}),
        ("DELETE", {"headers": {"If-Match": '"1"'}}),
    ):
        assert await answer(method, theirs["id"], kwargs) == await answer(method, missing, kwargs)
        assert (await answer(method, theirs["id"], kwargs))[0] == 404

    # Not listed, not reachable by filter, and their id as a cursor reveals nothing of theirs.
    mine = await create(client, headers, contact_id="c1")
    for query in (
        "",
        "contact_id=c1",
        f"starting_after={theirs['id']}",
        f"ending_before={theirs['id']}",
    ):
        resp = await client.get(f"/v1/conversations?{query}", headers=headers)
        data = (await resp.json())["data"]
        assert theirs["id"] not in {c["id"] for c in data}
    resp = await client.get(f"/v1/conversations?ending_before={theirs['id']}", headers=headers)
    assert [c["id"] for c in (await resp.json())["data"]] == [mine["id"]]  # a position, by time

    # Their conversation is untouched.
    row = await db.fetchrow(
        "SELECT is_muted, version FROM conversations WHERE id = $1", theirs["id"]
    )
    assert (row["is_muted"], row["version"]) == (False, 1)


async def test_the_same_contact_in_two_accounts_gets_two_conversations(client, headers, make_token):
    mine = await create(client, headers, contact_id="shared")
    theirs = await create(
        client, {"Authorization": f"Bearer {make_token('other')}"}, contact_id="shared"
    )
    assert mine["id"] != theirs["id"]


# --- operations ---------------------------------------------------------------------------


async def test_healthz_and_readyz_need_no_token(client):
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ready"


async def test_a_write_that_keeps_losing_the_race_locks_the_row_on_its_last_try(
    client, headers, db, monkeypatch
):
    created = await create(client, headers, contact_id="c1")
    calls = lose_races_until_locked(monkeypatch)
    resp = await client.put(
        f"/v1/conversations/{created['id']}", json={"is_muted": True}, headers=headers
    )
    assert resp.status == 200
    assert (await resp.json())["is_muted"] is True
    # Optimistic tries outside a transaction, the last one inside the locking transaction.
    assert calls == [False] * (operations._WRITE_ATTEMPTS - 1) + [True]
    assert [e["type"] for e in await events(db)] == ["conversation.created", "conversation.updated"]
