"""The OpenAPI 3 document, generated from the marshmallow schemas with apispec."""

import copy
from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import fields

from schemas import (
    ConversationChangesQuerySchema,
    ConversationChangesSchema,
    ConversationCreateSchema,
    ConversationListQuerySchema,
    ConversationListSchema,
    ConversationSchema,
    ConversationUpdateSchema,
    DeletedConversationSchema,
    ErrorSchema,
    HealthSchema,
    ReadinessSchema,
)

VERSION = "1.0.0"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": "Error"}}}


_REPLAYED = {"$ref": "#/components/headers/IdempotentReplayed"}


def _conversation(description: str, *, location: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "ETag": {"$ref": "#/components/headers/ETag"},
        "Idempotent-Replayed": _REPLAYED,
    }
    if location:
        headers["Location"] = {
            "description": "The new conversation's URL.",
            "schema": {"type": "string"},
        }
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": "Conversation"}},
    }


def _body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": (
            "JSON, or a form (`curl -d`): in a form `true`/`false` and decimal integers are "
            "read as such, and an empty value means null (`archived_at=` unarchives)."
        ),
        "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {
                "schema": {"$ref": f"#/components/schemas/{schema}Form"},
                # metadata[key]=value, one pair per key, as in a query string.
                "encoding": {"metadata": {"style": "deepObject", "explode": True}},
            },
        },
    }


# Exactly one participant: a body with both or neither is a 422 (the create schema's validator).
_ONE_PARTICIPANT = {"oneOf": [{"required": ["contact_id"]}, {"required": ["group_id"]}]}
_EMPTY = {"type": "string", "enum": [""], "description": "Empty: null."}


def _form_variant(component: dict[str, Any]) -> dict[str, Any]:
    """A request body's schema as a form reads it: a nullable field also takes an empty value,
    and at least one field is needed."""
    form = copy.deepcopy(component)
    form["minProperties"] = 1  # an empty form is an empty body: 400
    for name, field in form["properties"].items():
        if field.pop("nullable", False):
            field.pop("default", None)
            description = field.pop("description", None)
            form["properties"][name] = {
                "anyOf": [field, _EMPTY],
                "description": " ".join(filter(None, [description, "An empty value means null."])),
            }
    return form


_ID_PARAM = {"in": "path", "name": "id", "required": True, "schema": {"type": "string"}}
_IF_MATCH = {
    "in": "header",
    "name": "If-Match",
    "required": False,
    "description": "Strong ETag of the version the change is based on; another version: 412.",
    "schema": {"type": "string"},
}
# Every authenticated /v1 answer carries the budget it drew on (none when that budget is off).
_RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": "Requests per window in the budget this request drew on (reads or writes).",
    "X-RateLimit-Remaining": "Requests left in that budget now.",
    "X-RateLimit-Reset": "Unix second at which Remaining next goes up.",
    "Retry-After": "Seconds to wait before a retry is admitted (429: the spent budget; 409: the "
    "first request with the Idempotency-Key).",
}


_IDEMPOTENCY_KEY = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "description": (
        "Makes the write safe to retry (1 to 255 printable ASCII characters, per account; "
        "otherwise 400). The first request's answer (2xx, 404 or 412) is stored with its write "
        "for IDEMPOTENCY_TTL_HOURS (24 by default); a retry with the same key and the same "
        "request (method, path with query, If-Match, body as parsed) gets it again with "
        "`Idempotent-Replayed: true`, without a second write or event. Answers of requests "
        "refused before the write (400, 401, 403, 413, 415, 422, 429) and 5xx are not stored."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}
_IDEMPOTENCY_ERRORS = {
    "409": {
        "description": (
            "A request with this Idempotency-Key is still running; retry after Retry-After seconds."
        ),
        "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
        "content": {"application/json": {"schema": "Error"}},
    },
}
_KEY_REUSED = (
    "; or the Idempotency-Key was already used for a different request "
    '(`param: "Idempotency-Key"`).'
)
_COMMON_ERRORS = {
    "401": _error("Missing or invalid bearer token."),
    "403": _error("The token lacks the scope."),
    "429": {
        **_error("The account's budget for this method is spent; retry after Retry-After seconds."),
        "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
    },
    "503": _error("A dependency is unavailable; retry after Retry-After seconds."),
}
_BODY_ERRORS = {
    "400": _error("Empty, malformed or non-object body, or a malformed Idempotency-Key."),
    "413": _error("Body larger than 64 KiB."),
    "415": _error("Unsupported Content-Type."),
    "422": _error("Invalid fields" + _KEY_REUSED),
}


def _deep_object(converter: object, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """An object in the query string is spelled name[key]=value (metadata[team]=sales).
    (apispec calls it as a method of its converter.)"""
    return {"style": "deepObject", "explode": True} if isinstance(field, fields.Dict) else {}


def build_openapi() -> dict[str, Any]:
    """The whole document as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="DigiVault Conversations",
        version=VERSION,
        openapi_version="3.0.3",
        plugins=[plugin],
        info={
            "description": "Conversations: the containers for messages with contacts and groups."
        },
        security=[{"bearer": []}],
    )
    plugin.converter.add_parameter_attribute_function(_deep_object)  # type: ignore[union-attr]
    spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )
    spec.components.header(
        "ETag",
        {
            "description": 'The version, as a strong ETag: "<version>".',
            "schema": {"type": "string"},
        },
    )
    for name, description in _RATE_LIMIT_HEADERS.items():
        spec.components.header(name, {"description": description, "schema": {"type": "integer"}})
    spec.components.header(
        "IdempotentReplayed",
        {
            "description": (
                "`true` when the answer is the stored answer of an earlier request with the "
                "same Idempotency-Key (same status, body, ETag and Location); absent otherwise."
            ),
            "schema": {"type": "string", "enum": ["true"]},
        },
    )
    for name, schema in (
        ("Conversation", ConversationSchema),
        ("ConversationList", ConversationListSchema),
        ("DeletedConversation", DeletedConversationSchema),
        ("ConversationChanges", ConversationChangesSchema),
        ("Error", ErrorSchema),
        ("Health", HealthSchema),
        ("Readiness", ReadinessSchema),
    ):
        spec.components.schema(name, schema=schema)
    for name, schema, rules in (
        ("ConversationCreate", ConversationCreateSchema, _ONE_PARTICIPANT),
        ("ConversationUpdate", ConversationUpdateSchema, {}),
    ):
        spec.components.schema(name, component=rules, schema=schema)
        body = {**plugin.converter.schema2jsonschema(schema), **rules}
        spec.components.schema(f"{name}Form", component=_form_variant(body))

    spec.path(
        path="/v1/conversations",
        operations={
            "get": {
                "summary": "List conversations, newest first or by last activity",
                "operationId": "listConversations",
                "parameters": [{"in": "query", "schema": ConversationListQuerySchema}],
                "responses": {
                    "200": {
                        "description": "A page.",
                        "content": {"application/json": {"schema": "ConversationList"}},
                    },
                    "400": _error("starting_after and ending_before together."),
                    "422": _error("Invalid query parameter."),
                    **_COMMON_ERRORS,
                },
            },
            "post": {
                "summary": "Create a conversation (or get the contact's or group's existing one)",
                "operationId": "createConversation",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": _body("ConversationCreate"),
                "responses": {
                    "201": _conversation("Created.", location=True),
                    "200": _conversation("The contact or group already has this conversation."),
                    **_BODY_ERRORS,
                    **_IDEMPOTENCY_ERRORS,
                    **_COMMON_ERRORS,
                },
            },
        },
    )
    spec.path(
        path="/v1/conversations/changes",
        operations={
            "get": {
                "summary": "Delta sync: the account's changes since a token",
                "description": (
                    "Call with `next_since` until `has_more` is false, then keep `next_since` "
                    "for the next sync. Each item is the conversation as it is now, or "
                    '`{"id", "deleted": true}`; a conversation may come more than once (the '
                    "later item wins). A change that commits late is delivered late, never "
                    "skipped."
                ),
                "operationId": "listConversationChanges",
                "parameters": [{"in": "query", "schema": ConversationChangesQuerySchema}],
                "responses": {
                    "200": {
                        "description": "A page of changes.",
                        "content": {"application/json": {"schema": "ConversationChanges"}},
                    },
                    "410": _error(
                        "since is older than the sync retention: start again without it."
                    ),
                    "422": _error("Invalid query parameter, or a since token that is not valid."),
                    **_COMMON_ERRORS,
                },
            },
        },
    )
    not_found = {"404": _error("No such conversation.")}
    precondition = {"412": _error("If-Match names another version.")}
    update = {
        "summary": "Update a conversation (partial)",
        "parameters": [_IF_MATCH, _IDEMPOTENCY_KEY],
        "requestBody": _body("ConversationUpdate"),
        "responses": {
            "200": _conversation("Updated (or unchanged)."),
            **not_found,
            **precondition,
            **_BODY_ERRORS,
            **_IDEMPOTENCY_ERRORS,
            **_COMMON_ERRORS,
        },
    }
    spec.path(
        path="/v1/conversations/{id}",
        parameters=[_ID_PARAM],
        operations={
            "get": {
                "summary": "Retrieve a conversation",
                "operationId": "retrieveConversation",
                "responses": {
                    "200": _conversation("The conversation."),
                    **not_found,
                    **_COMMON_ERRORS,
                },
            },
            "put": {**update, "operationId": "updateConversation"},
            "patch": {**update, "operationId": "patchConversation"},
            "delete": {
                "summary": "Delete a conversation permanently",
                "operationId": "deleteConversation",
                "parameters": [_IF_MATCH, _IDEMPOTENCY_KEY],
                "responses": {
                    "200": {
                        "description": "Deleted.",
                        "headers": {"Idempotent-Replayed": _REPLAYED},
                        "content": {"application/json": {"schema": "DeletedConversation"}},
                    },
                    **not_found,
                    **precondition,
                    "400": _error("A malformed Idempotency-Key."),
                    **_IDEMPOTENCY_ERRORS,
                    "422": _error("The Idempotency-Key was already used for a different request."),
                    **_COMMON_ERRORS,
                },
            },
        },
    )
    for path, summary, schema in (
        ("/healthz", "Liveness: the process answers", "Health"),
        ("/readyz", "Readiness: PostgreSQL reachable, migrations applied", "Readiness"),
    ):
        spec.path(
            path=path,
            operations={
                "get": {
                    "summary": summary,
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OK.",
                            "content": {"application/json": {"schema": schema}},
                        },
                        "503": _error("Not ready."),
                    },
                }
            },
        )
    return _with_rate_limit_headers(spec.to_dict())


def _with_rate_limit_headers(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with the X-RateLimit-* headers on each /v1 answer but 401 (no draw)."""
    refs = {
        name: {"$ref": f"#/components/headers/{name}"}
        for name in _RATE_LIMIT_HEADERS
        if name.startswith("X-")
    }
    for path, item in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue  # the path's shared parameters
            operation["responses"] = {
                status: response
                if status == "401"
                else {**response, "headers": {**response.get("headers", {}), **refs}}
                for status, response in operation["responses"].items()
            }
    return document


def render_openapi() -> bytes:
    """The document as the committed `docs/openapi.json` holds it."""
    return orjson.dumps(build_openapi(), option=orjson.OPT_INDENT_2) + b"\n"
