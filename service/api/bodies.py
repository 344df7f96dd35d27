"""Reading request input (query strings and bodies) into schema-validated dicts."""

import asyncio
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from cachetools import LRUCache
from marshmallow import Schema, ValidationError, fields
from multidict import MultiMapping

from schemas.conversation import WalkQuerySchema
from schemas.fields import StrictBoolean
from service.api.keys import MALFORMED_BODY
from service.errors import ApiError, validation_error

MAX_BODY_BYTES = 64 * 1024
# The longest a request may take to send its body once its headers are in: 64 KiB arrive well
# within it on any working link.
BODY_TIMEOUT_SECONDS = 10
# nginx's "client closed request": the status that metrics and the access log record for a
# request whose client hung up before it was read; no answer reaches anyone.
CLIENT_CLOSED = 499
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
_DECIMAL = re.compile(r"-?[0-9]{1,20}")
# `metadata[team]=sales` in a query string or a form: one entry of the object `metadata`.
_BRACKETED = re.compile(r"([a-z_]+)\[(.*)\]", re.DOTALL)


def _single_values(values: MultiMapping[str]) -> dict[str, str]:
    """A query string or form as a plain dict; a name given twice is a validation error."""
    repeated = {key for key in values if len(values.getall(key)) > 1}
    if repeated:
        raise validation_error({key: ["Given more than once."] for key in sorted(repeated)})
    return {key: values[key] for key in values}


def _objects(schema: Schema, values: dict[str, str]) -> dict[str, Any]:
    """`name[key]=value` pairs gathered into an object `name` when the schema's `name` is one
    (a fields.Dict); other names are left as they are, for the schema to judge."""
    loaded: dict[str, Any] = {}
    objects: dict[str, dict[str, str]] = {}
    for name, value in values.items():
        match = _BRACKETED.fullmatch(name)
        if match and isinstance(schema.fields.get(match[1]), fields.Dict):
            objects.setdefault(match[1], {})[match[2]] = value
        else:
            loaded[name] = value
    clashing = sorted(name for name in objects if name in loaded)
    if clashing:
        message = "Give name[key]=value pairs, not the name alone."
        raise validation_error({name: [message] for name in clashing})
    return {**loaded, **objects}


# Query strings already loaded, by schema and query, without the parameters that place a page
# in one walk (a schema's WALK: cursors, sync tokens). The rest is the same few again and again
# from every client (a first page, an inbox's poll), and loading it through marshmallow costs a
# list page about as much as its SELECT; the walk's own values are read for each request, so a
# deep page costs what a first page does. The least recently used goes when full; refused
# queries are never kept.
QUERY_CACHE_SIZE = 1024
_loaded_queries: LRUCache[tuple[WalkQuerySchema, tuple[tuple[str, str], ...]], dict[str, Any]] = (
    LRUCache(maxsize=QUERY_CACHE_SIZE)
)


def load_query(schema: WalkQuerySchema, request: web.Request) -> dict[str, Any]:
    """The request's query string, validated by `schema` (a ValidationError becomes a 422).

    A new dict each time; the values in it are shared with other requests: read, never change.
    """
    values = _single_values(request.query)
    walk = {name: values.pop(name) for name in schema.WALK if name in values}
    key = (schema, tuple(values.items()))
    loaded = _loaded_queries.get(key)
    try:
        if loaded is None:
            loaded = schema.load(_objects(schema, values))
            _loaded_queries[key] = loaded
        placed = dict(loaded)
        if walk:
            placed.update((name, schema.fields[name].deserialize(v)) for name, v in walk.items())
            placed = schema.place(placed)
        return placed
    except ValidationError:
        # Every error of the whole query string, worded by the schema as one load gives them.
        return schema.load(_objects(schema, {**values, **walk}))


async def read_body(request: web.Request, schema: Schema) -> dict[str, Any]:
    """The body as JSON or form data, validated by `schema`.

    400 for an empty, malformed or non-object body (or one not in its charset), 408 if it takes
    over BODY_TIMEOUT_SECONDS to arrive, 413 over 64 KiB, 415 for another content type, 422 for
    fields that the schema refuses.
    """
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "The request body is larger than 64 KiB.")
    if not request.body_exists:
        raise ApiError(400, "The request body is empty; send a JSON object.")
    if request.content_type == JSON:
        data = _parse_json(await _read(request))
    elif request.content_type == FORM:
        await _read(request)  # within the deadline; post() parses what it read
        form = await _parse_form(request)
        if not form:
            raise ApiError(400, "The request body is empty; send at least one field.")
        data = _form_values(schema, _objects(schema, _single_values(form)))  # type: ignore[arg-type]
    else:
        raise ApiError(
            415,
            f"Content-Type must be {JSON} or {FORM}.",
            headers={"Accept-Post": f"{JSON}, {FORM}"},
        )
    return schema.load(data)


async def _read(request: web.Request) -> bytes:
    """The whole body, within BODY_TIMEOUT_SECONDS: a client that trickles it must not hold a
    connection (and the database connection its request will take) for long."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            body = await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            f"The request body did not arrive within {BODY_TIMEOUT_SECONDS} s.",
            headers={"Connection": "close"},
        ) from None
    except ConnectionError:
        # The client hung up mid-body: nobody reads the answer, and it is not a failure of ours.
        raise ApiError(CLIENT_CLOSED, "The client closed the connection.") from None
    if request.get(MALFORMED_BODY):
        raise ApiError(
            400,
            "The request body is not valid HTTP/1.1 (a bad chunk); nothing was done.",
            headers={"Connection": "close"},
        )
    return body


async def _parse_form(request: web.Request) -> MultiMapping[str]:
    """A form body; bytes that are not in its charset, or an unknown charset, are a 400."""
    charset = request.charset or "utf-8"
    try:
        return await request.post()  # type: ignore[return-value]
    except LookupError:
        raise ApiError(400, "The form body's charset is not supported; send UTF-8.") from None
    except UnicodeDecodeError:
        raise ApiError(400, f"The form body is not valid {charset}.") from None


def _parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return data


def _form_values(schema: Schema, form: Mapping[str, Any]) -> dict[str, Any]:
    """Form fields typed as the schema wants them: true/false, decimal integers, empty = null.

    Anything else stays as it is (a string, or an object of strings), so the schema reports a
    wrong type.
    """
    typed: dict[str, Any] = {}
    for key, value in form.items():
        field = schema.fields.get(key)
        if field is not None and value == "" and field.allow_none:
            typed[key] = None
        elif isinstance(field, StrictBoolean) and value in ("true", "false"):
            typed[key] = value == "true"
        elif isinstance(field, fields.Integer) and _DECIMAL.fullmatch(value):
            typed[key] = int(value)
        else:
            typed[key] = value
    return typed
