"""The OpenAPI document: generated from the schemas, valid, served, and committed unchanged."""

from pathlib import Path

import orjson
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from service.api.openapi import build_openapi, render_openapi

COMMITTED = Path(__file__).parent.parent / "docs" / "openapi.json"


def test_the_generated_document_is_valid_openapi_3():
    validate(build_openapi())


def test_the_committed_copy_matches_the_schemas():
    assert COMMITTED.read_bytes() == render_openapi(), (
        "docs/openapi.json is stale: run `.venv/bin/conversations openapi > docs/openapi.json`"
    )


def test_every_contract_operation_is_documented():
    paths = build_openapi()["paths"]
    assert set(paths["/v1/conversations"]) == {"get", "post"}
    assert {"get", "put", "patch", "delete"} <= set(paths["/v1/conversations/{id}"])
    query = {p["name"] for p in paths["/v1/conversations"]["get"]["parameters"]}
    assert query == {
        "limit",
        "starting_after",
        "ending_before",
        "archived",
        "muted",
        "pinned",
        "contact_id",
        "group_id",
        "sort",
        "unread",
        "metadata",
    }


async def test_served_without_a_token(client):
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert orjson.loads(await resp.read()) == build_openapi()


def schema_accepts(name: str, instance: dict) -> bool:
    schema = build_openapi()["components"]["schemas"][name]
    return OAS30Validator(schema).is_valid(instance)


CREATE_BODIES = [
    ({"contact_id": "c1"}, 201),
    ({"group_id": "g1"}, 201),
    ({}, 422),
    ({"contact_id": "c1", "group_id": "g1"}, 422),
    ({"is_pinned": True}, 422),
]


@pytest.mark.parametrize(("body", "status"), CREATE_BODIES, ids=str)
async def test_the_create_schema_says_exactly_one_participant_as_the_service_does(
    client, headers, body, status
):
    assert schema_accepts("ConversationCreate", body) is (status == 201)
    resp = await client.post("/v1/conversations", json=body, headers=headers)
    assert resp.status == status


@pytest.mark.parametrize(
    ("name", "form", "accepted"),
    [
        ("ConversationCreateForm", {"contact_id": "c1", "pinned_message_id": ""}, True),
        ("ConversationCreateForm", {"contact_id": "c1", "last_active_at": ""}, True),
        ("ConversationCreateForm", {"contact_id": ""}, False),
        ("ConversationUpdateForm", {"archived_at": "", "pinned_message_id": ""}, True),
        ("ConversationUpdateForm", {"is_muted": ""}, False),
    ],
    ids=str,
)
async def test_form_schemas_say_an_empty_value_is_null_as_the_service_does(
    client, headers, name, form, accepted
):
    assert schema_accepts(name, form) is accepted
    resp = await client.post("/v1/conversations", data={"contact_id": "c0"}, headers=headers)
    item = f"/v1/conversations/{(await resp.json())['id']}"
    if name == "ConversationCreateForm":
        resp = await client.post("/v1/conversations", data=form, headers=headers)
        assert resp.status == (201 if accepted else 422), await resp.text()
    else:
        resp = await client.patch(item, data=form, headers=headers)
        assert resp.status == (200 if accepted else 422), await resp.text()
    if accepted:
        body = await resp.json()
        assert all(body[key] is None for key, value in form.items() if value == "")


def test_both_cursors_at_once_is_documented():
    operation = build_openapi()["paths"]["/v1/conversations"]["get"]
    assert "400" in operation["responses"]
    described = {p["name"]: p.get("description", "") for p in operation["parameters"]}
    assert "(400)" in described["starting_after"]
    assert "(400)" in described["ending_before"]
