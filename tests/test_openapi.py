"""The OpenAPI document: generated from the schemas, valid, served, and committed unchanged."""

from pathlib import Path

import orjson
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
