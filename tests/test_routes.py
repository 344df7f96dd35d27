"""The route table: the router and the OpenAPI document come from the same declarations, and the
/v1 sub-application's middlewares guard everything under /v1 and nothing else."""

import pytest
from aiohttp import web

from service.api.app import create_app
from service.api.openapi import build_openapi, documented_operations
from service.api.routes import API_PREFIX
from tests.conftest import make_auth_settings, make_settings
from tests.error_bodies import error_body

UNUSED_DATABASE = "postgresql://127.0.0.1:1/unused"  # the app is built, never started


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route, the mounted sub-application's included."""
    return {(route.method, route.resource.canonical) for route in app.router.routes()}


def documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in build_openapi()["paths"].items()
        for method in item
        if method != "parameters"
    }


@pytest.fixture
def api_app() -> web.Application:
    return create_app(make_settings(UNUSED_DATABASE, make_auth_settings()))


def test_every_route_is_documented_and_every_documented_operation_routed(api_app):
    routes = routed(api_app)
    # HEAD comes with every GET, as aiohttp's add_get gives it; the document lists the GET.
    assert {path for method, path in routes if method == "HEAD"} == {
        path for method, path in routes if method == "GET"
    }
    assert {route for route in routes if route[0] != "HEAD"} == documented()


def test_the_relay_role_routes_only_the_probes_and_metrics():
    relay = create_app(make_settings(UNUSED_DATABASE, make_auth_settings()), role="relay")
    assert {path for _, path in routed(relay)} == {"/healthz", "/readyz", "/metrics"}


def test_the_table_s_paths_are_the_routes_canonical_templates(api_app):
    # The logs and the metrics label a request by its route's canonical template: the full
    # path, /v1 included, as the document spells it.
    templates = {operation.template for operation in documented_operations()}
    assert templates == {path for _, path in routed(api_app)}
    assert "/v1/conversations/{id}" in templates


def test_what_the_traits_imply_is_documented_on_every_operation():
    paths = build_openapi()["paths"]
    for operation in documented_operations():
        documented = paths[operation.template][operation.method.lower()]
        statuses = set(documented["responses"])
        header_params = {p["name"] for p in documented.get("parameters", []) if p["in"] == "header"}
        under_api = operation.path.startswith(API_PREFIX + "/")
        assert ({"401", "403", "429", "503"} <= statuses) is under_api, operation.path
        assert ("security" not in documented) is under_api
        write = under_api and operation.method in {"POST", "PUT", "PATCH", "DELETE"}
        assert ("Idempotency-Key" in header_params) is write
        assert ({"400", "409", "422"} <= statuses) if write else "409" not in statuses
        assert ({"413", "415"} <= statuses) is (operation.body is not None)
        assert ("412" in statuses) is operation.if_match is ("If-Match" in header_params)
        for status, response in documented["responses"].items():
            rate_limited = under_api and status != "401"
            assert ("X-RateLimit-Remaining" in response.get("headers", {})) is rate_limited


@pytest.mark.parametrize("path", ["/v1", "/v1/", "/v1/nope", "/v1/conversations/x/messages"])
async def test_everything_under_v1_needs_a_token_even_an_unknown_path(client, path):
    resp = await client.get(path)
    body = await error_body(resp, 401, "authentication_error")
    assert body["request_id"] == resp.headers["X-Request-ID"]


async def test_an_unknown_path_under_v1_with_a_token_is_the_contract_s_404_with_its_budget(
    client, headers
):
    resp = await client.get("/v1/nope", headers=headers)
    body = await error_body(resp, 404, "not_found_error")
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert "X-RateLimit-Remaining" in resp.headers  # it drew on the read budget


@pytest.mark.parametrize("path", ["/nope", "/v1x", "/healthz/x"])
async def test_outside_v1_no_token_is_asked_for(client, path):
    resp = await client.get(path)
    await error_body(resp, 404, "not_found_error")
    assert "X-RateLimit-Remaining" not in resp.headers


async def test_the_probes_and_the_document_need_no_token(client):
    for path in ("/healthz", "/metrics", "/openapi.json"):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert "X-RateLimit-Remaining" not in resp.headers
