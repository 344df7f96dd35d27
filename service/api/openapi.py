"""The OpenAPI 3 document, generated with apispec from the route table (each operation as its
handler declares it) and the marshmallow schemas; and `GET /openapi.json`, which serves it.

What an operation answers besides its own answers and errors follows from its traits, by the
rules of `_implied`, one place per rule."""

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from schemas import (
    ConversationChangesSchema,
    ConversationCreateSchema,
    ConversationListSchema,
    ConversationSchema,
    ConversationUpdateSchema,
    DeletedConversationSchema,
    ErrorSchema,
    HealthSchema,
    ReadinessSchema,
)
from service.api import handlers, idempotency, probes
from service.api.bodies import MAX_BODY_BYTES
from service.api.keys import OPENAPI_DOCUMENT
from service.api.middleware import budget_for, scope_for
from service.api.ratelimit import WRITE_METHODS
from service.api.routes import Answer, Operation, RouteTable

VERSION = "1.0.0"

routes = RouteTable()


@routes.operation(
    "GET",
    "/openapi.json",
    summary="This document",
    answers={200: Answer("The OpenAPI document.", {"type": "object"})},
)
async def openapi_document(request: web.Request) -> web.Response:
    """The document generated from the route table and the schemas."""
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")


def documented_operations() -> list[Operation]:
    """Every operation the `api` role serves, in the document's order."""
    return [*handlers.routes, *probes.routes, *routes]


# Answers' and bodies' schemas, as the document's components name them.
_SCHEMAS: tuple[tuple[str, type[Schema]], ...] = (
    ("Conversation", ConversationSchema),
    ("ConversationList", ConversationListSchema),
    ("DeletedConversation", DeletedConversationSchema),
    ("ConversationChanges", ConversationChangesSchema),
    ("Error", ErrorSchema),
    ("Health", HealthSchema),
    ("Readiness", ReadinessSchema),
)
# Exactly one participant: a body with both or neither is a 422 (the create schema's validator).
_ONE_PARTICIPANT = {"oneOf": [{"required": ["contact_id"]}, {"required": ["group_id"]}]}
_BODIES: tuple[tuple[str, type[Schema], dict[str, Any]], ...] = (
    ("ConversationCreate", ConversationCreateSchema, _ONE_PARTICIPANT),
    ("ConversationUpdate", ConversationUpdateSchema, {}),
)
_EMPTY = {"type": "string", "enum": [""], "description": "Empty: null."}

_RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": 'The version, as a strong ETag: "<version>".',
        "schema": {"type": "string"},
    },
    "Location": {"description": "The new conversation's URL.", "schema": {"type": "string"}},
    **{
        name: {"description": description, "schema": {"type": "integer"}}
        for name, description in zip(
            _RATE_LIMIT_HEADERS,
            (
                "Requests per window in the budget this request drew on (reads or writes).",
                "Requests left in that budget now.",
                "Unix second at which Remaining next goes up.",
            ),
            strict=True,
        )
    },
    "Retry-After": {
        "description": "Seconds to wait before a retry is admitted (429: the spent budget; 409: "
        "the first request with the Idempotency-Key).",
        "schema": {"type": "integer"},
    },
    idempotency.REPLAYED_HEADER: {
        "description": (
            "`true` when the answer is the stored answer of an earlier request with the "
            "same Idempotency-Key (same status, body, ETag and Location); absent otherwise."
        ),
        "schema": {"type": "string", "enum": ["true"]},
    },
}

_IF_MATCH = {
    "in": "header",
    "name": "If-Match",
    "required": False,
    "description": "Strong ETag of the version the change is based on; another version: 412.",
    "schema": {"type": "string"},
}
_IDEMPOTENCY_KEY = {
    "in": "header",
    "name": idempotency.HEADER,
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


@dataclasses.dataclass
class _Implied:
    """What an operation's traits add to it: parameters, refusals (each a sentence), and the
    headers its answers carry."""

    parameters: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: defaultdict[int, list[str]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    # By status; under 0, those of every answer.
    headers: defaultdict[int, list[str]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )


def _implied(operation: Operation) -> _Implied:
    """The rules: what each trait of `operation` implies, one place per rule."""
    implied = _Implied()
    if operation.query is not None:  # bodies.load_query
        implied.parameters.append({"in": "query", "schema": operation.query})
        implied.errors[422].append("Invalid query parameter.")
    if operation.body is not None:  # bodies.read_body, and aiohttp's client_max_size
        implied.errors[400].append("Empty, malformed or non-object body.")
        implied.errors[413].append(f"Body larger than {MAX_BODY_BYTES // 1024} KiB.")
        implied.errors[415].append("Unsupported Content-Type.")
        implied.errors[422].append("Invalid fields.")
    for status, sentence in operation.errors.items():
        implied.errors[status].append(sentence)
    if operation.if_match:  # handlers._if_match; the domain's VersionMismatch
        implied.parameters.append(_IF_MATCH)
        implied.errors[412].append("If-Match names another version.")
    if operation.authenticated and operation.method in WRITE_METHODS:  # idempotency.run_write
        implied.parameters.append(_IDEMPOTENCY_KEY)
        implied.errors[400].append(f"A malformed {idempotency.HEADER}.")
        implied.errors[409].append(
            f"A request with this {idempotency.HEADER} is still running; retry after "
            "Retry-After seconds."
        )
        implied.headers[409].append("Retry-After")
        implied.errors[422].append(
            f"The {idempotency.HEADER} was already used for a different request "
            f'(`param: "{idempotency.HEADER}"`).'
        )
        for status in (*operation.answers, *idempotency.STORED_ERRORS):
            implied.headers[status].append(idempotency.REPLAYED_HEADER)
    if operation.authenticated:  # the /v1 sub-application's middlewares
        implied.errors[401].append("Missing or invalid bearer token.")
        implied.errors[403].append(f"The token lacks the {scope_for(operation.method)} scope.")
        implied.errors[429].append(
            f"The account's {budget_for(operation.method)} budget is spent; retry after "
            "Retry-After seconds."
        )
        implied.headers[429].append("Retry-After")
        implied.errors[503].append("A dependency is unavailable; retry after Retry-After seconds.")
        # Every answer but a 401 drew on the account's budget, and says so.
        implied.headers[0].extend(_RATE_LIMIT_HEADERS)
    return implied


def _operation(operation: Operation, names: dict[type[Schema], str]) -> dict[str, Any]:
    """The document's object for `operation`, its answers and refusals in status order."""
    implied = _implied(operation)

    def headers(status: int, own: tuple[str, ...] = ()) -> dict[str, Any]:
        every = implied.headers[0] if status != 401 else []
        return {
            name: {"$ref": f"#/components/headers/{name}"}
            for name in (*own, *implied.headers[status], *every)
        }

    responses = {
        status: {
            "description": answer.description,
            "headers": headers(status, answer.headers),
            "content": {answer.media_type: {"schema": answer.schema}},
        }
        for status, answer in operation.answers.items()
    }
    for status, sentences in implied.errors.items():
        responses[status] = {
            "description": " ".join(sentences),
            "headers": headers(status),
            "content": {"application/json": {"schema": "Error"}},
        }
    document: dict[str, Any] = {"summary": operation.summary}
    if operation.description is not None:
        document["description"] = operation.description
    if operation.operation_id is not None:
        document["operationId"] = operation.operation_id
    if not operation.authenticated:
        document["security"] = []
    if implied.parameters:
        document["parameters"] = implied.parameters
    if operation.body is not None:
        document["requestBody"] = _body(names[operation.body])
    document["responses"] = {
        str(status): {key: value for key, value in responses[status].items() if value}
        for status in sorted(responses)
    }
    return document


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


def _deep_object(converter: object, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """An object in the query string is spelled name[key]=value (metadata[team]=sales).
    (apispec calls it as a method of its converter.)"""
    return {"style": "deepObject", "explode": True} if isinstance(field, fields.Dict) else {}


def _paths(spec: APISpec, operations: Iterable[Operation], names: dict[type[Schema], str]) -> None:
    """One path item per path, its operations in a fixed order of methods."""
    by_path: dict[str, list[Operation]] = {}
    for operation in operations:
        by_path.setdefault(operation.template, []).append(operation)
    for path, on_path in by_path.items():
        variables = [name.strip("{}") for name in path.split("/") if name.startswith("{")]
        spec.path(
            path=path,
            parameters=[
                {"in": "path", "name": name, "required": True, "schema": {"type": "string"}}
                for name in variables
            ],
            operations={
                operation.method.lower(): _operation(operation, names)
                for operation in sorted(on_path, key=lambda o: _METHOD_ORDER.index(o.method))
            },
        )


_METHOD_ORDER = ("GET", "POST", "PUT", "PATCH", "DELETE")


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
    for name, header in _HEADERS.items():
        spec.components.header(name, header)
    for name, schema in _SCHEMAS:
        spec.components.schema(name, schema=schema)
    for name, schema, rules in _BODIES:
        spec.components.schema(name, component=rules, schema=schema)
        body = {**plugin.converter.schema2jsonschema(schema), **rules}  # type: ignore[union-attr]
        spec.components.schema(f"{name}Form", component=_form_variant(body))
    names = {schema: name for name, schema, _ in _BODIES}
    _paths(spec, documented_operations(), names)
    return spec.to_dict()


def render_openapi() -> bytes:
    """The document as the committed `docs/openapi.json` holds it."""
    return orjson.dumps(build_openapi(), option=orjson.OPT_INDENT_2) + b"\n"
