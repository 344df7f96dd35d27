"""Metadata: set on create, merged on update (JSON and form bodies), limits, and its events."""

import orjson
import pytest

from schemas.event import EventSchema
from service.conversations.operations import TooManyMetadataKeys, merge_metadata
from tests.error_bodies import error_body

URL = "/v1/conversations"
FORM = "application/x-www-form-urlencoded"


async def create(client, headers, **body) -> dict:
    resp = await client.post(URL, json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def patch(client, headers, conversation_id: str, body: dict) -> tuple[dict, str]:
    resp = await client.patch(f"{URL}/{conversation_id}", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json(), resp.headers["ETag"]


async def events(db, conversation_id: str) -> list[dict]:
    """The conversation's events as the relay will publish them (the outbox rows' payloads)."""
    rows = await db.fetch(
        "SELECT payload FROM outbox WHERE conversation_id = $1 ORDER BY id", conversation_id
    )
    return [EventSchema().load(orjson.loads(row["payload"])) for row in rows]


# --- the domain's merge -------------------------------------------------------------------------


def test_merge_sets_removes_and_keeps():
    current = {"team": "sales", "tier": "gold", "region": "eu"}
    assert merge_metadata(current, {"team": "support", "tier": None, "new": "x"}) == {
        "team": "support",
        "region": "eu",
        "new": "x",
    }
    assert merge_metadata(current, {}) == current
    assert merge_metadata({}, {"absent": None}) == {}


def test_merge_limits_the_result_not_the_change():
    full = {f"k{n}": "v" for n in range(20)}
    result = merge_metadata(full, {"k0": None, "k20": "v"})
    assert set(result) == {f"k{n}" for n in range(1, 21)}
    with pytest.raises(TooManyMetadataKeys) as raised:
        merge_metadata(full, {"k20": "v", "k21": "v"})
    assert raised.value.count == 22


# --- create and read ------------------------------------------------------------------------------


async def test_every_conversation_carries_metadata(client, headers):
    plain = await create(client, headers, contact_id="c1")
    assert plain["metadata"] == {}
    labelled = await create(
        client, headers, contact_id="c2", metadata={"team": "sales", "deal.id": "D-1:7"}
    )
    assert labelled["metadata"] == {"team": "sales", "deal.id": "D-1:7"}
    resp = await client.get(f"{URL}/{labelled['id']}", headers=headers)
    assert (await resp.json())["metadata"] == {"team": "sales", "deal.id": "D-1:7"}
    resp = await client.get(URL, headers=headers)
    assert [c["metadata"] for c in (await resp.json())["data"]] == [labelled["metadata"], {}]


async def test_create_with_removals_or_empty_metadata_stores_only_set_keys(client, headers):
    created = await create(
        client, headers, contact_id="c1", metadata={"a": "1", "b": None, "c": ""}
    )
    assert created["metadata"] == {"a": "1"}
    assert (await create(client, headers, contact_id="c2", metadata={}))["metadata"] == {}


# --- update: the merge --------------------------------------------------------------------------


async def test_update_merges_key_by_key(client, headers, db):
    created = await create(
        client, headers, contact_id="c1", metadata={"team": "sales", "tier": "gold", "x": "1"}
    )
    body, etag = await patch(
        client, headers, created["id"], {"metadata": {"team": "support", "tier": None, "x": ""}}
    )
    assert body["metadata"] == {"team": "support"}
    assert etag == '"2"'
    body, etag = await patch(client, headers, created["id"], {"metadata": {"new": "yes"}})
    assert body["metadata"] == {"team": "support", "new": "yes"}
    assert etag == '"3"'
    stored = await db.fetchval("SELECT metadata::text FROM conversations WHERE id = $1", body["id"])
    assert orjson.loads(stored) == {"team": "support", "new": "yes"}


@pytest.mark.parametrize(
    "change",
    [
        {"metadata": {}},
        {"metadata": {"team": "sales"}},
        {"metadata": {"absent": None}},
        {"metadata": {"absent": ""}},
        {"metadata": {"team": "sales", "gone": None}, "is_muted": False},
    ],
)
async def test_a_merge_that_changes_nothing_keeps_the_version_and_publishes_nothing(
    client, headers, db, change
):
    created = await create(client, headers, contact_id="c1", metadata={"team": "sales"})
    body, etag = await patch(client, headers, created["id"], change)
    assert body == created
    assert etag == '"1"'
    assert [event["type"] for event in await events(db, created["id"])] == ["conversation.created"]


async def test_null_metadata_is_refused_and_changes_nothing(client, headers, db):
    created = await create(client, headers, contact_id="c1", metadata={"team": "sales"})
    resp = await client.patch(f"{URL}/{created['id']}", json={"metadata": None}, headers=headers)
    await error_body(resp, 422, "validation_error", param="metadata")
    resp = await client.post(URL, json={"contact_id": "c2", "metadata": None}, headers=headers)
    await error_body(resp, 422, "validation_error", param="metadata")
    resp = await client.get(f"{URL}/{created['id']}", headers=headers)
    assert await resp.json() == created
    assert len(await events(db, created["id"])) == 1


# --- limits ---------------------------------------------------------------------------------------


async def test_each_bad_key_and_value_gets_its_own_message(client, headers, db):
    bad = {
        "k" * 41: "x",
        "has space": "x",
        "": "x",
        "long": "v" * 501,
        "nul": "a\x00b",
        "number": 7,
        "flag": True,
        "nested": {"a": "b"},
        "list": ["a"],
        "fine": "ok",
    }
    for method, url, body in [
        ("POST", URL, {"contact_id": "c1", "metadata": bad}),
        ("PATCH", None, {"metadata": bad}),
    ]:
        if url is None:
            url = f"{URL}/{(await create(client, headers, contact_id='c2'))['id']}"
        resp = await client.request(method, url, json=body, headers=headers)
        errors = (await error_body(resp, 422, "validation_error", param="metadata"))["errors"]
        assert set(errors["metadata"]) == set(bad) - {"fine"}
        assert errors["metadata"]["k" * 41] == [
            "Keys are 1 to 40 characters of A-Z, a-z, 0-9, _, ., : or -."
        ]
        assert all(isinstance(messages, list) for messages in errors["metadata"].values())
    assert await db.fetchval("SELECT count(*) FROM conversations") == 1
    assert await db.fetchval("SELECT count(*) FROM outbox") == 1


async def test_the_limits_themselves_are_allowed(client, headers):
    # 40-character keys of every allowed character; 500 code points (multi-byte in UTF-8).
    key = ("Az09_.:-" * 5)[:40]
    # 2,000 bytes that do not compress: each pair is also an index entry (conversation_labels),
    # and must fit one whole.
    emoji = "".join(chr(0x1F300 + n * 7919 % 1536) for n in range(500))
    metadata = {key: "é" * 500, "emoji": "🙂" * 500, f"{key[:-1]}x": emoji}
    metadata |= {f"k{n}": "v" for n in range(17)}
    created = await create(client, headers, contact_id="c1", metadata=metadata)
    assert created["metadata"] == metadata
    assert len(created["metadata"]) == 20
    for sort in ("-created_at", "-last_active_at"):
        resp = await client.get(
            URL, params={"sort": sort, f"metadata[{key[:-1]}x]": emoji}, headers=headers
        )
        assert resp.status == 200, await resp.text()
        assert [c["id"] for c in (await resp.json())["data"]] == [created["id"]]


async def test_twenty_keys_at_most_after_the_merge(client, headers, db):
    resp = await client.post(
        URL,
        json={"contact_id": "c0", "metadata": {f"k{n}": "v" for n in range(21)}},
        headers=headers,
    )
    body = await error_body(resp, 422, "validation_error", param="metadata")
    assert "21" in body["errors"]["metadata"][0]

    created = await create(
        client, headers, contact_id="c1", metadata={f"k{n}": "v" for n in range(19)}
    )
    url = f"{URL}/{created['id']}"
    resp = await client.patch(url, json={"metadata": {"a": "1", "b": "2"}}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param="metadata")
    assert body["errors"]["metadata"] == ["At most 20 keys; this change would leave 21."]
    # Removing one in the same change makes room.
    changed, etag = await patch(
        client, headers, created["id"], {"metadata": {"a": "1", "b": "2", "k0": None}}
    )
    assert len(changed["metadata"]) == 20
    assert etag == '"2"'
    assert len(await events(db, created["id"])) == 2


# --- form bodies ----------------------------------------------------------------------------------


async def test_form_bodies_set_and_remove_keys(client, headers):
    form = {**headers, "Content-Type": FORM}
    resp = await client.post(
        URL, data="contact_id=c1&metadata[team]=sales&metadata[tier]=gold", headers=form
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["metadata"] == {"team": "sales", "tier": "gold"}

    url = f"{URL}/{created['id']}"
    resp = await client.put(url, data="metadata[tier]=&metadata[region]=eu%20west", headers=form)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["metadata"] == {"team": "sales", "region": "eu west"}
    # Brackets percent-encoded, as curl --data-urlencode sends them.
    resp = await client.put(url, data="metadata%5Bteam%5D=&is_muted=true", headers=form)
    body = await resp.json()
    assert body["metadata"] == {"region": "eu west"}
    assert body["is_muted"] is True


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ("metadata=sales", "metadata"),
        ("metadata=x&metadata[team]=sales", "metadata"),
        ("metadata[bad key]=x", "metadata"),
        ("metadata[team]=a&metadata[team]=b", "metadata[team]"),
        ("other[team]=x", "other[team]"),
    ],
)
async def test_bad_form_metadata_is_refused(client, headers, db, data, param):
    created = await create(client, headers, contact_id="c1")
    resp = await client.put(
        f"{URL}/{created['id']}", data=data, headers={**headers, "Content-Type": FORM}
    )
    await error_body(resp, 422, "validation_error", param=param)
    assert await db.fetchval("SELECT version FROM conversations") == 1


# --- events ---------------------------------------------------------------------------------------


async def test_events_carry_metadata_and_the_whole_previous_object(client, headers, db):
    created = await create(client, headers, contact_id="c1", metadata={"team": "sales", "a": "1"})
    conversation_id = created["id"]
    await patch(client, headers, conversation_id, {"metadata": {"a": None, "b": "2"}})
    await patch(client, headers, conversation_id, {"is_muted": True})
    await patch(
        client, headers, conversation_id, {"archived_at": 1700000000, "metadata": {"team": "x"}}
    )
    await client.delete(f"{URL}/{conversation_id}", headers=headers)

    created_event, merged, muted, archived, deleted = await events(db, conversation_id)
    assert created_event["data"]["object"]["metadata"] == {"team": "sales", "a": "1"}
    assert merged["type"] == "conversation.updated"
    assert merged["data"]["object"]["metadata"] == {"team": "sales", "b": "2"}
    assert merged["data"]["previous_attributes"] == {"metadata": {"team": "sales", "a": "1"}}
    # A change that leaves metadata alone names only what it changed; the object still has it.
    assert muted["data"]["previous_attributes"] == {"is_muted": False}
    assert muted["data"]["object"]["metadata"] == {"team": "sales", "b": "2"}
    assert archived["type"] == "conversation.archived"
    assert archived["data"]["previous_attributes"] == {
        "archived_at": None,
        "metadata": {"team": "sales", "b": "2"},
    }
    assert deleted["data"]["object"]["metadata"] == {"team": "x", "b": "2"}
    assert [event["sequence"] for event in (merged, muted, archived, deleted)] == [2, 3, 4, 5]
