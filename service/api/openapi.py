"""The OpenAPI 3 document, generated from the marshmallow schemas with apispec."""

from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from schemas import (
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
_BODY_TYPES = ("application/json", "application/x-www-form-urlencoded")


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
    return {"required": True, "content": {kind: {"schema": schema} for kind in _BODY_TYPES}}


_ID_PARAM = {"in": "path", "name": "id", "required": True, "schema": {"type": "string"}}
_IF_MATCH = {
    "in": "header",
    "name": "If-Match",
    "required": False,
    "description": "Strong ETag of the version the change is based on; another version: 412.",
    "schema": {"type": "string"},
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
        "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}},
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
    "503": _error("A dependency is unavailable; retry after Retry-After seconds."),
}
_BODY_ERRORS = {
    "400": _error("Empty, malformed or non-object body, or a malformed Idempotency-Key."),
    "413": _error("Body larger than 64 KiB."),
    "415": _error("Unsupported Content-Type."),
    "422": _error("Invalid fields" + _KEY_REUSED),
}


def build_openapi() -> dict[str, Any]:
    """The whole document as a dict."""
    spec = APISpec(
        title="DigiVault Conversations",
        version=VERSION,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Conversations: the containers for messages with contacts and groups."
        },
        security=[{"bearer": []}],
    )
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
    spec.components.header(
        "RetryAfter",
        {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
    )
    for name, schema in (
        ("Conversation", ConversationSchema),
        ("ConversationCreate", ConversationCreateSchema),
        ("ConversationUpdate", ConversationUpdateSchema),
        ("ConversationList", ConversationListSchema),
        ("DeletedConversation", DeletedConversationSchema),
        ("Error", ErrorSchema),
        ("Health", HealthSchema),
        ("Readiness", ReadinessSchema),
    ):
        spec.components.schema(name, schema=schema)

    spec.path(
        path="/v1/conversations",
        operations={
            "get": {
                "summary": "List conversations, newest first",
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
    return spec.to_dict()


def render_openapi() -> bytes:
    """The document as the committed `docs/openapi.json` holds it."""
    return orjson.dumps(build_openapi(), option=orjson.OPT_INDENT_2) + b"\n"
