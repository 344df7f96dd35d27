"""Request bodies, query strings and headers: what is read, what is refused, and how errors look."""

import re
from collections.abc import Callable
from urllib.parse import quote

import pytest
from aiohttp.test_utils import make_mocked_request
from cachetools import LRUCache
from marshmallow import ValidationError

from schemas import cursor
from schemas.cursor import Position, Sort
from schemas.fields import MAX_TIMESTAMP
from service.api import bodies, handlers
from service.errors import ApiError
from tests.error_bodies import error_body

URL = "/v1/conversations"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MAX_BODY = 64 * 1024
GENERATED_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


async def create(client, headers, **fields):
    resp = await client.post(URL, json=fields, headers=headers)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def padded(document: bytes, size: int) -> bytes:
    """A JSON document padded with trailing whitespace to exactly `size` bytes."""
    return document + b" " * (size - len(document))


async def chunks(data: bytes, size: int = 8192):
    """The body as an async generator, so that aiohttp sends it chunked, without Content-Length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --- JSON and form bodies -----------------------------------------------------------------------


async def test_json_create_with_every_writable_field(client, headers):
    body = {
        "contact_id": "Contact_1-a",
        "is_pinned": True,
        "is_muted": True,
        "pinned_message_id": "m" * 64,
        "last_active_at": 0,
        "last_opened_at": MAX_TIMESTAMP,
    }
    created = await create(client, headers, **body)
    assert {key: created[key] for key in body} == body
    assert created["group_id"] is None
    assert created["archived_at"] is None


async def test_json_with_a_charset_parameter_is_json(client, headers):
    resp = await client.post(
        URL,
        data=b'{"group_id": "g1"}',
        headers={**headers, "Content-Type": "application/json; charset=utf-8"},
    )
    assert resp.status == 201
    assert (await resp.json())["group_id"] == "g1"


async def test_form_create_reads_booleans_integers_and_empty_as_null(client, headers):
    form = {
        "contact_id": "c1",
        "is_pinned": "true",
        "is_muted": "false",
        "last_active_at": "1700000000",
        "last_opened_at": "",
        "pinned_message_id": "",
    }
    resp = await client.post(URL, data=form, headers=headers)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["contact_id"] == "c1"
    assert created["is_pinned"] is True
    assert created["is_muted"] is False
    assert created["last_active_at"] == 1700000000
    assert created["last_opened_at"] is None
    assert created["pinned_message_id"] is None


async def test_form_update_reads_booleans_integers_and_empty_as_null(client, headers):
    created = await create(client, headers, contact_id="c1")
    item = f"{URL}/{created['id']}"
    form = {"archived_at": "1700000001", "is_muted": "true", "pinned_message_id": "m1"}
    resp = await client.put(item, data=form, headers=headers)
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert (updated["archived_at"], updated["is_muted"], updated["pinned_message_id"]) == (
        1700000001,
        True,
        "m1",
    )
    resp = await client.patch(
        item,
        data=b"archived_at=&pinned_message_id=&is_muted=false&last_opened_at=0",
        headers={**headers, "Content-Type": f"{FORM}; charset=utf-8"},
    )
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert updated["archived_at"] is None
    assert updated["pinned_message_id"] is None
    assert updated["is_muted"] is False
    assert updated["last_opened_at"] == 0


@pytest.mark.parametrize(
    ("form", "param"),
    [
        ({"contact_id": "c1", "is_pinned": "1"}, "is_pinned"),
        ({"contact_id": "c1", "is_pinned": "TRUE"}, "is_pinned"),
        ({"contact_id": "c1", "is_pinned": "yes"}, "is_pinned"),
        ({"contact_id": "c1", "is_muted": ""}, "is_muted"),
        ({"contact_id": "c1", "last_active_at": "1.5"}, "last_active_at"),
        ({"contact_id": "c1", "last_active_at": "+5"}, "last_active_at"),
        ({"contact_id": "c1", "last_active_at": "1e3"}, "last_active_at"),
        ({"contact_id": "c1", "last_active_at": "0x10"}, "last_active_at"),
        ({"contact_id": "c1", "last_active_at": "-1"}, "last_active_at"),
        ({"contact_id": "c1", "last_active_at": str(MAX_TIMESTAMP + 1)}, "last_active_at"),
        ({"contact_id": "c1", "last_active_at": "9" * 21}, "last_active_at"),
        ({"contact_id": ""}, "contact_id"),
        ({"contact_id": "c 1"}, "contact_id"),
        ({"contact_id": "c1", "unknown": "x"}, "unknown"),
        ({"contact_id": "c1", "id": "0000000000000000"}, "id"),
    ],
)
async def test_form_values_of_the_wrong_type_are_422(client, headers, form, param):
    resp = await client.post(URL, data=form, headers=headers)
    await error_body(resp, 422, "validation_error", param=param)


async def test_a_form_field_given_twice_is_422(client, headers):
    resp = await client.post(
        URL, data=b"contact_id=c1&contact_id=c2", headers={**headers, "Content-Type": FORM}
    )
    body = await error_body(resp, 422, "validation_error", param="contact_id")
    assert body["errors"] == {"contact_id": ["Given more than once."]}


@pytest.mark.parametrize("raw", [b"", b"&", b"&&&"], ids=["empty", "ampersand", "ampersands"])
async def test_an_empty_form_is_400(client, headers, raw):
    resp = await client.post(URL, data=raw, headers={**headers, "Content-Type": FORM})
    await error_body(resp, 400, "invalid_request")


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"contact_id=c\xff1", FORM),
        (b"contact_id=c\xc3", f"{FORM}; charset=utf-8"),
        (b"contact_id=c1", f"{FORM}; charset=no-such-charset"),
        (b'{"contact_id": "c\xff1"}', JSON),
    ],
    ids=["form-not-utf-8", "form-truncated-utf-8", "form-unknown-charset", "json-not-utf-8"],
)
async def test_a_body_not_in_its_charset_is_400(client, headers, db, raw, content_type):
    resp = await client.post(URL, data=raw, headers={**headers, "Content-Type": content_type})
    await error_body(resp, 400, "invalid_request")
    assert await db.fetchval("select count(*) from conversations") == 0


# --- content types and unreadable bodies --------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/octet-stream", "multipart/form-data; boundary=x", "text/json"],
)
async def test_another_content_type_is_415(client, headers, content_type):
    created = await create(client, headers, contact_id="c0")
    for method, path in [("POST", URL), ("PUT", f"{URL}/{created['id']}")]:
        resp = await client.request(
            method,
            path,
            data=b'{"contact_id": "c1"}',
            headers={**headers, "Content-Type": content_type},
        )
        await error_body(resp, 415, "invalid_request")


BAD_JSON = {
    "empty": b"",
    "whitespace": b"  \n\t  ",
    "malformed": b'{"contact_id": ',
    "single-quotes": b"{'contact_id': 'c1'}",
    "trailing-comma": b'{"contact_id": "c1",}',
    "array": b'[{"contact_id": "c1"}]',
    "string": b'"c1"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "not-utf8": b'{"contact_id": "\xff"}',
    "nan": b'{"last_active_at": NaN}',
    "two-documents": b'{"contact_id": "c1"} {"contact_id": "c2"}',
}


@pytest.mark.parametrize("raw", BAD_JSON.values(), ids=BAD_JSON.keys())
async def test_a_body_that_is_not_a_json_object_is_400(client, headers, db, raw):
    created = await create(client, headers, contact_id="c0")
    for method, path in [("POST", URL), ("PUT", f"{URL}/{created['id']}")]:
        resp = await client.request(
            method, path, data=raw, headers={**headers, "Content-Type": JSON}
        )
        await error_body(resp, 400, "invalid_request")
    assert await db.fetchval("select count(*) from outbox") == 1


async def test_a_post_without_any_body_is_400(client, headers):
    resp = await client.post(URL, headers=headers)
    await error_body(resp, 400, "invalid_request")


# --- body size ----------------------------------------------------------------------------------


async def test_a_body_of_exactly_64_kib_is_read(client, headers):
    body = padded(b'{"contact_id": "c1"}', MAX_BODY)
    resp = await client.post(URL, data=body, headers={**headers, "Content-Type": JSON})
    assert resp.status == 201, await resp.text()
    body = padded(b'{"contact_id": "c2"}', MAX_BODY)
    resp = await client.post(URL, data=chunks(body), headers={**headers, "Content-Type": JSON})
    assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("content_type", [JSON, FORM])
async def test_a_body_over_64_kib_is_413(client, headers, db, chunked, content_type):
    created = await create(client, headers, contact_id="c0")
    if content_type == JSON:
        raw = padded(b'{"contact_id": "c1"}', MAX_BODY + 1)
    else:
        raw = b"contact_id=c1&pinned_message_id=" + b"m" * MAX_BODY
    for method, path in [("POST", URL), ("PATCH", f"{URL}/{created['id']}")]:
        resp = await client.request(
            method,
            path,
            data=chunks(raw) if chunked else raw,
            headers={**headers, "Content-Type": content_type},
        )
        body = await error_body(resp, 413, "invalid_request")
        assert "64 KiB" in body["message"]
    assert await db.fetchval("select count(*) from conversations") == 1
    assert await db.fetchval("select count(*) from outbox") == 1


# --- schema validation --------------------------------------------------------------------------

WRONG_CREATE_VALUES = [
    ("is_pinned", "true"),
    ("is_pinned", 1),
    ("is_pinned", 0),
    ("is_pinned", None),
    ("is_muted", "false"),
    ("is_muted", 1),
    ("is_muted", []),
    ("last_active_at", "1700000000"),
    ("last_active_at", 1.5),
    ("last_active_at", 1700000000.0),
    ("last_active_at", True),
    ("last_active_at", False),
    ("last_active_at", -1),
    ("last_active_at", MAX_TIMESTAMP + 1),
    ("last_active_at", 10**30),
    ("last_opened_at", "1700000000"),
    ("last_opened_at", -1),
    ("last_opened_at", {"at": 1}),
    ("pinned_message_id", "m" * 65),
    ("pinned_message_id", "m 1"),
    ("pinned_message_id", ""),
    ("pinned_message_id", 7),
]
WRONG_IDS = ["c" * 65, "", "bad id", "a/b", "a.b", "é", "c1;", "x'); DROP TABLE conversations;--"]


@pytest.mark.parametrize(("field", "value"), WRONG_CREATE_VALUES)
async def test_create_refuses_wrong_json_types_and_ranges(client, headers, field, value):
    resp = await client.post(URL, json={"contact_id": "c1", field: value}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param=field)
    assert list(body["errors"]) == [field]


@pytest.mark.parametrize("field", ["contact_id", "group_id"])
@pytest.mark.parametrize("value", [*WRONG_IDS, 12, None, ["c1"]])
async def test_create_refuses_malformed_participant_ids(client, headers, field, value):
    resp = await client.post(URL, json={field: value}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param=field)
    assert list(body["errors"]) == [field]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("is_pinned", "true"),
        ("is_muted", 1),
        ("is_muted", None),
        ("archived_at", "1700000000"),
        ("archived_at", 1.5),
        ("archived_at", True),
        ("archived_at", -1),
        ("archived_at", MAX_TIMESTAMP + 1),
        ("last_active_at", "0"),
        ("last_opened_at", 2.0),
        ("pinned_message_id", "m" * 65),
        ("pinned_message_id", "m;1"),
    ],
)
async def test_update_refuses_wrong_json_types_and_ranges(client, headers, field, value):
    created = await create(client, headers, contact_id="c1")
    for method in ("PUT", "PATCH"):
        resp = await client.request(
            method, f"{URL}/{created['id']}", json={field: value}, headers=headers
        )
        body = await error_body(resp, 422, "validation_error", param=field)
        assert list(body["errors"]) == [field]


async def test_timestamp_bounds_are_inclusive(client, headers):
    created = await create(client, headers, contact_id="c1", last_active_at=0)
    resp = await client.put(
        f"{URL}/{created['id']}",
        json={"archived_at": MAX_TIMESTAMP, "last_opened_at": 0, "last_active_at": MAX_TIMESTAMP},
        headers=headers,
    )
    assert resp.status == 200
    updated = await resp.json()
    assert (updated["archived_at"], updated["last_opened_at"], updated["last_active_at"]) == (
        MAX_TIMESTAMP,
        0,
        MAX_TIMESTAMP,
    )


@pytest.mark.parametrize(
    "body",
    [
        {"contact_id": "c1", "group_id": "g1"},
        {},
        {"is_pinned": True},
        {"contact_id": None, "group_id": None},
    ],
    ids=["both", "neither", "neither-with-others", "both-null"],
)
async def test_create_needs_exactly_one_participant(client, headers, body):
    resp = await client.post(URL, json=body, headers=headers)
    error = await error_body(resp, 422, "validation_error", param="contact_id")
    assert set(error["errors"]) <= {"contact_id", "group_id"}


@pytest.mark.parametrize("field", ["id", "created_at", "archived_at"])
async def test_create_refuses_read_only_fields(client, headers, field):
    value = "0000000000000000" if field == "id" else 1700000000
    resp = await client.post(URL, json={"contact_id": "c1", field: value}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param=field)
    assert list(body["errors"]) == [field]


@pytest.mark.parametrize("field", ["id", "contact_id", "group_id", "created_at"])
async def test_update_refuses_read_only_fields(client, headers, field):
    created = await create(client, headers, contact_id="c1")
    # Even the value it already has: the field is not the caller's to send.
    for value in (created[field], "c2" if field != "created_at" else 1):
        resp = await client.patch(
            f"{URL}/{created['id']}", json={field: value, "is_muted": True}, headers=headers
        )
        body = await error_body(resp, 422, "validation_error", param=field)
        assert list(body["errors"]) == [field]


@pytest.mark.parametrize("field", ["version", "account_id", "deleted", "Contact_id", ""])
async def test_unknown_fields_are_422(client, headers, field):
    resp = await client.post(URL, json={"contact_id": "c1", field: 1}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param=field)
    assert list(body["errors"]) == [field]
    created = await create(client, headers, contact_id="c2")
    resp = await client.put(f"{URL}/{created['id']}", json={field: 1}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param=field)
    assert list(body["errors"]) == [field]


async def test_every_invalid_field_is_named(client, headers):
    resp = await client.post(
        URL,
        json={"contact_id": "c1", "is_pinned": "yes", "last_active_at": -1, "extra": 1},
        headers=headers,
    )
    body = await error_body(resp, 422, "validation_error", param="is_pinned")
    assert set(body["errors"]) == {"is_pinned", "last_active_at", "extra"}
    assert "is_pinned" in body["message"]


@pytest.mark.parametrize("field", ["contact_id", "group_id", "pinned_message_id"])
async def test_an_id_with_a_trailing_newline_is_422(client, headers, db, field):
    # "^...$" lets one trailing newline through re.match; the contract's ids have none.
    body = {"contact_id": "c1", field: "c1\n"} if field == "pinned_message_id" else {field: "c1\n"}
    resp = await client.post(URL, json=body, headers=headers)
    await error_body(resp, 422, "validation_error", param=field)
    assert await db.fetchval("select count(*) from conversations") == 0


# --- the router's own errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "authorized"),
    [
        ("/nope", False),
        ("/v1", False),
        ("/v1/nope", True),
        ("/v1/conversations/0000000000000000/messages", True),
        ("/v2/conversations", False),
    ],
)
async def test_an_unknown_path_is_404(client, headers, path, authorized):
    resp = await client.get(path, headers=headers if authorized else {})
    await error_body(resp, 404, "not_found_error")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", URL, {"GET", "POST"}),
        ("PUT", URL, {"GET", "POST"}),
        ("PATCH", URL, {"GET", "POST"}),
        ("POST", f"{URL}/0000000000000000", {"GET", "PUT", "PATCH", "DELETE"}),
    ],
)
async def test_a_wrong_method_is_405_with_allow(client, headers, method, path, allowed):
    resp = await client.request(method, path, headers=headers)
    body = await error_body(resp, 405, "invalid_request")
    allow = {verb.strip() for verb in resp.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method not in allow
    assert method in body["message"]


async def test_a_wrong_method_on_a_probe_is_405(client):
    resp = await client.post("/healthz")
    await error_body(resp, 405, "invalid_request")
    assert "GET" in resp.headers["Allow"]


# --- query strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("limit=1.5", "limit"),
        ("limit=5&limit=6", "limit"),
        ("archived=maybe", "archived"),
        ("archived=1", "archived"),
        ("archived=", "archived"),
        ("muted=yes", "muted"),
        ("pinned=0", "pinned"),
        ("starting_after=abc", "starting_after"),
        ("starting_after=0000000000000000x", "starting_after"),
        ("ending_before=000000000000000!", "ending_before"),
        ("starting_after=0000000000000000&starting_after=0000000000000001", "starting_after"),
        ("contact_id=a%20b", "contact_id"),
        ("group_id=" + "g" * 65, "group_id"),
        ("contact_id=c1%0A", "contact_id"),
        ("starting_after=0000000000000000%0A", "starting_after"),
        ("offset=10", "offset"),
        ("account_id=someone_else", "account_id"),
        ("Limit=5", "Limit"),
    ],
)
async def test_bad_query_values_are_422_with_param(client, headers, query, param):
    resp = await client.get(f"{URL}?{query}", headers=headers)
    await error_body(resp, 422, "validation_error", param=param)


async def test_both_cursors_at_once_is_400(client, headers):
    resp = await client.get(
        f"{URL}?starting_after=0000000000000000&ending_before=zzzzzzzzzzzzzzzz", headers=headers
    )
    await error_body(resp, 400, "invalid_request", param="ending_before", errors=False)


async def test_limit_bounds_are_inclusive(client, headers):
    for limit in (1, 100):
        resp = await client.get(f"{URL}?limit={limit}", headers=headers)
        assert resp.status == 200
        assert await resp.json() == {
            "has_more": False,
            "data": [],
            "cursors": {"before": None, "after": None},
        }


# --- X-Request-ID -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["req-123", "a.b:c_d-E", "x" * 128])
async def test_a_sane_request_id_is_echoed(client, headers, request_id):
    resp = await client.get(URL, headers={**headers, "X-Request-ID": request_id})
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == request_id
    resp = await client.get(
        f"{URL}/0000000000000000", headers={**headers, "X-Request-ID": request_id}
    )
    body = await error_body(resp, 404, "not_found_error")
    assert body["request_id"] == request_id
    resp = await client.get(URL, headers={"X-Request-ID": request_id})
    body = await error_body(resp, 401, "authentication_error")
    assert body["request_id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    ["x" * 129, "has space", "semi;colon", 'quote"d', "<script>", "a/b", "", "x'); DROP TABLE"],
)
async def test_a_silly_request_id_is_replaced(client, headers, request_id):
    resp = await client.get(f"{URL}?limit=0", headers={**headers, "X-Request-ID": request_id})
    body = await error_body(resp, 422, "validation_error", param="limit")
    generated = resp.headers["X-Request-ID"]
    assert GENERATED_REQUEST_ID.fullmatch(generated)
    assert body["request_id"] == generated
    assert generated != request_id


async def test_each_request_gets_its_own_generated_id(client, headers):
    ids = set()
    for _ in range(3):
        resp = await client.get(URL, headers=headers)
        ids.add(resp.headers["X-Request-ID"])
    assert len(ids) == 3
    assert all(GENERATED_REQUEST_ID.fullmatch(value) for value in ids)


# --- SQL-looking input --------------------------------------------------------------------------

SQL = "x'); DROP TABLE conversations;--"


async def tables_exist(db) -> bool:
    return await db.fetchval(
        "select to_regclass('public.conversations') is not null"
        " and to_regclass('public.outbox') is not null"
    )


async def test_sql_looking_ids_are_stored_verbatim(client, headers, db):
    created = await create(
        client, headers, contact_id="Robert-DROP_TABLE", pinned_message_id="1_OR_1-1--"
    )
    resp = await client.get(f"{URL}/{created['id']}", headers=headers)
    fetched = await resp.json()
    assert fetched["contact_id"] == "Robert-DROP_TABLE"
    assert fetched["pinned_message_id"] == "1_OR_1-1--"
    resp = await client.get(f"{URL}?contact_id=Robert-DROP_TABLE", headers=headers)
    assert (await resp.json())["data"] == [created]
    stored = await db.fetchval("select contact_id from conversations where id = $1", created["id"])
    assert stored == "Robert-DROP_TABLE"
    assert await tables_exist(db)


async def test_sql_in_queries_paths_and_bodies_is_refused(client, headers, db):
    created = await create(client, headers, contact_id="c1")
    for field in ("contact_id", "group_id", "starting_after", "ending_before", "limit", "archived"):
        resp = await client.get(f"{URL}?{field}={quote(SQL)}", headers=headers)
        await error_body(resp, 422, "validation_error", param=field)
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        resp = await client.request(
            method, f"{URL}/{quote(SQL, safe='')}", json={"is_muted": True}, headers=headers
        )
        await error_body(resp, 404, "not_found_error")
    resp = await client.post(URL, json={"contact_id": SQL}, headers=headers)
    await error_body(resp, 422, "validation_error", param="contact_id")
    resp = await client.post(URL, json={"contact_id": "c2", SQL: True}, headers=headers)
    body = await error_body(resp, 422, "validation_error", param=SQL)
    assert body["errors"] == {SQL: ["Unknown field."]}
    assert await tables_exist(db)
    resp = await client.get(URL, headers=headers)
    assert (await resp.json())["data"] == [created]


# --- refused input changes nothing --------------------------------------------------------------


async def test_refused_writes_change_nothing(client, headers, db):
    created = await create(client, headers, contact_id="c1")
    item = f"{URL}/{created['id']}"
    resp = await client.get(item, headers=headers)
    etag = resp.headers["ETag"]
    outbox_before = await db.fetchval("select count(*) from outbox")

    refused_creates = [
        {"contact_id": "c2", "is_pinned": "true"},
        {"contact_id": "c2", "unknown": 1},
        {"contact_id": "c2", "id": "0000000000000000"},
        {"contact_id": "c2", "created_at": 1},
        {"contact_id": "c2", "group_id": "g2"},
        {"contact_id": "c1", "is_muted": 1},
        {"contact_id": "c2", "last_active_at": -1},
    ]
    for body in refused_creates:
        resp = await client.post(URL, json=body, headers=headers)
        assert resp.status == 422
    refused_updates = [
        {"is_muted": True, "archived_at": "1700000000"},
        {"is_pinned": True, "contact_id": "c9"},
        {"is_pinned": True, "id": created["id"]},
        {"is_pinned": True, "created_at": 1},
        {"is_pinned": True, "group_id": "g1"},
        {"is_pinned": True, "nope": 1},
        {"is_pinned": 1},
        {"last_opened_at": MAX_TIMESTAMP + 1, "is_muted": True},
    ]
    for body in refused_updates:
        for method in ("PUT", "PATCH"):
            resp = await client.request(method, item, json=body, headers=headers)
            assert resp.status == 422
    for raw, content_type, status in [
        (b"[]", JSON, 400),
        (b"{", JSON, 400),
        (b"is_muted=true", "text/plain", 415),
        (b"is_muted=1", FORM, 422),
    ]:
        for method, path in [("POST", URL), ("PUT", item)]:
            resp = await client.request(
                method, path, data=raw, headers={**headers, "Content-Type": content_type}
            )
            assert resp.status == status

    resp = await client.get(item, headers=headers)
    assert await resp.json() == created
    assert resp.headers["ETag"] == etag
    resp = await client.get(URL, headers=headers)
    assert await resp.json() == {
        "has_more": False,
        "data": [created],
        "cursors": {"before": created["id"], "after": created["id"]},
    }
    assert await db.fetchval("select count(*) from outbox") == outbox_before
    assert await db.fetchval("select count(*) from conversations") == 1


# --- loaded query strings are kept -----------------------------------------------------------


def test_a_query_string_is_loaded_once_and_each_caller_gets_its_own_dict(monkeypatch):
    kept = bodies._loaded_queries
    assert isinstance(kept, LRUCache)
    assert kept.maxsize == bodies.QUERY_CACHE_SIZE
    monkeypatch.setattr(bodies, "_loaded_queries", LRUCache(maxsize=2))  # the same, smaller
    loads = []
    schema = handlers._list_query_schema
    monkeypatch.setattr(
        schema, "load", lambda data: loads.append(data) or type(schema).load(schema, data)
    )

    def load(query: str) -> dict:
        return bodies.load_query(schema, make_mocked_request("GET", f"/v1/conversations?{query}"))

    first = load("limit=5&metadata%5Bteam%5D=sales")
    first["limit"] = 99  # a caller's own dict: the next caller never sees this
    again = load("limit=5&metadata%5Bteam%5D=sales")
    assert again["limit"] == 5
    assert again["metadata"] == {"team": "sales"}
    assert len(loads) == 1
    # Refused ones are refused every time (the second load words the whole error), never kept.
    for _ in range(2):
        with pytest.raises(ValidationError):
            load("limit=0")
    assert len(loads) == 5
    assert len(bodies._loaded_queries) == 1
    # A cursor is read for each request, the rest of its query string is kept: a deep page
    # loads no more than the first one does.
    for place in ("0000000000000000", "0000000000000001", "0000000000000002"):
        assert load(f"limit=5&starting_after={place}")["starting_after"].id == place
    assert len(loads) == 6
    assert len(bodies._loaded_queries) == 2
    # Bounded: full, it forgets the least recently used (here the first query string).
    load("limit=7")
    assert len(bodies._loaded_queries) == 2
    assert load("limit=7")["limit"] == 7
    assert load("limit=5&starting_after=0000000000000003")["limit"] == 5
    assert len(loads) == 7
    load("limit=5&metadata%5Bteam%5D=sales")
    assert len(loads) == 8


LIST_QUERIES = [
    "",
    "limit=5",
    "limit=0",
    "limit=5&limit=6",
    "sort=-last_active_at&unread=true&metadata%5Bteam%5D=sales",
    "metadata=x",
    "starting_after=0000000000000000",
    "starting_after=0000000000000000&ending_before=0000000000000001",
    "starting_after=0000000000000000&starting_after=0000000000000001",
    "starting_after=bad",
    "starting_after=",
    "limit=0&starting_after=bad",
    "sort=-last_active_at&starting_after=0000000000000000",
    "sort=bogus&starting_after=0000000000000000",
    f"sort=-last_active_at&starting_after={cursor.encode(Sort.ACTIVITY, Position('0' * 16, 17))}",
    f"sort=-last_active_at&ending_before={cursor.encode(Sort.ACTIVITY, Position('0' * 16, None))}",
    f"ending_before={cursor.encode(Sort.ACTIVITY, Position('0' * 16, 17))}",
    "unknown=1&starting_after=0000000000000000",
]


@pytest.mark.parametrize(
    ("schema", "query"),
    [(handlers._list_query_schema, q) for q in LIST_QUERIES]
    + [
        (handlers._changes_query_schema, q)
        for q in ("", "since=abc", "since=", "limit=1001&since=abc", "since=a&since=b")
    ],
)
def test_a_kept_query_string_loads_as_the_schema_loads_it_whole(monkeypatch, schema, query):
    """Twice each (the second from what was kept): the same result, or the same error, as the
    schema loading the whole query string."""
    monkeypatch.setattr(bodies, "_loaded_queries", LRUCache(maxsize=bodies.QUERY_CACHE_SIZE))
    request = make_mocked_request("GET", f"/v1/conversations?{query}")

    def outcome(load: Callable[[], dict]) -> object:
        try:
            return load()
        except ValidationError as error:
            return error.messages
        except ApiError as error:  # a name given twice
            return (error.status, error.message, error.errors)

    expected = outcome(
        lambda: schema.load(bodies._objects(schema, bodies._single_values(request.query)))
    )
    for _ in range(2):
        assert outcome(lambda: bodies.load_query(schema, request)) == expected
