"""HTTP handlers for /v1/conversations: HTTP and schemas only; the work is in `conversations`.

A write handler reads its input and gives `run_write` the operation and how its result is
answered: under an Idempotency-Key the domain stores that answer with the write."""

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from schemas import (
    ConversationChangesQuerySchema,
    ConversationCreateSchema,
    ConversationListQuerySchema,
    ConversationUpdateSchema,
    cursor,
)
from schemas.fields import CONVERSATION_ID_PATTERN, METADATA_MAX_KEYS, TRACEPARENT_PATTERN
from service.api.bodies import load_query, read_body
from service.api.idempotency import json_answer, response, run_write
from service.api.keys import DB_POOL, PRINCIPAL, SETTINGS
from service.conversations import operations, sync
from service.conversations.idempotency import Keyed, StoredAnswer
from service.conversations.operations import (
    ConversationNotFound,
    IfMatch,
    TooManyMetadataKeys,
    VersionMismatch,
)
from service.conversations.repository import ListFilter, StoredConversation
from service.errors import ApiError, not_found, validation_error
from service.tracing import current_traceparent

_create_schema = ConversationCreateSchema()
_update_schema = ConversationUpdateSchema()
_list_query_schema = ConversationListQuerySchema()
_changes_query_schema = ConversationChangesQuerySchema()
_ID = re.compile(CONVERSATION_ID_PATTERN)
_TRACEPARENT = re.compile(TRACEPARENT_PATTERN)


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def _conversation_answer(
    conversation: StoredConversation, *, status: int = 200, headers: dict[str, str] | None = None
) -> StoredAnswer:
    return json_answer(
        conversation.resource,
        status=status,
        headers={"ETag": f'"{conversation.version}"', **(headers or {})},
    )


def _path_id(request: web.Request) -> str:
    """The conversation id from the path; a malformed one names nothing, so it is a 404."""
    conversation_id = request.match_info["id"]
    if not _ID.fullmatch(conversation_id):
        raise not_found()
    return conversation_id


def _if_match(request: web.Request) -> IfMatch:
    """If-Match as a set of strong entity-tag values; weak tags never match (RFC 9110 13.1.1)."""
    header = request.headers.get("If-Match")
    if header is None:
        return None
    tags = set()
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            tags.add("*")
        elif len(tag) >= 2 and tag[0] == tag[-1] == '"':
            tags.add(tag[1:-1])
    return frozenset(tags)


def _traceparent(request: web.Request) -> str | None:
    """The trace context kept with the event: with tracing on, the request's SERVER span (so
    that the event's publish and its subscribers join the request's trace, also when the caller
    sent none); with it off, the caller's W3C traceparent if it is well-formed."""
    traced = current_traceparent()
    if traced is not None:
        return traced
    value = request.headers.get("traceparent", "").strip()
    return value if _TRACEPARENT.fullmatch(value) else None


async def list_conversations(request: web.Request) -> web.Response:
    """GET /v1/conversations: a page in the order asked for (newest first by default)."""
    query = load_query(_list_query_schema, request)
    if "starting_after" in query and "ending_before" in query:
        raise ApiError(400, "Use starting_after or ending_before, not both.", param="ending_before")
    page = await operations.list_page(
        request.app[DB_POOL],
        request[PRINCIPAL].account_id,
        ListFilter(
            archived=query.get("archived"),
            muted=query.get("muted"),
            pinned=query.get("pinned"),
            contact_id=query.get("contact_id"),
            group_id=query.get("group_id"),
            unread=query.get("unread"),
            metadata=query.get("metadata"),
        ),
        sort=query["sort"],
        limit=query["limit"],
        starting_after=query.get("starting_after"),
        ending_before=query.get("ending_before"),
    )
    items = [item.resource for item in page.conversations]
    return json_response(
        {
            "has_more": page.has_more,
            "data": items,
            "cursors": {
                "before": _cursor(query["sort"], items[0]) if items else None,
                "after": _cursor(query["sort"], items[-1]) if items else None,
            },
        }
    )


def _cursor(sort: cursor.Sort, item: dict[str, Any]) -> str:
    return cursor.encode(sort, cursor.Position(item["id"], item["last_active_at"]))


async def list_changes(request: web.Request) -> web.Response:
    """GET /v1/conversations/changes: the account's changes since a token (delta sync)."""
    query = load_query(_changes_query_schema, request)
    try:
        page = await sync.changes(
            request.app[DB_POOL],
            request[PRINCIPAL].account_id,
            query.get("since"),
            limit=query["limit"],
            retention_seconds=request.app[SETTINGS].sync_retention_seconds,
        )
    except sync.MalformedSyncToken:
        message = "since is not a token this service issued for this account."
        raise validation_error({"since": [message]}) from None
    except sync.ExpiredSyncToken:
        raise ApiError(
            410,
            "The since token is older than the sync retention; start again without since.",
            param="since",
        ) from None
    return json_response(
        {"data": page.items, "has_more": page.has_more, "next_since": page.next_since}
    )


async def create_conversation(request: web.Request) -> web.Response:
    """POST /v1/conversations: 201 and the new conversation, or 200 and the existing one."""
    fields = await read_body(request, _create_schema)

    def render(result: tuple[StoredConversation, bool]) -> StoredAnswer:
        conversation, created = result
        if not created:
            return _conversation_answer(conversation)
        location = request.app.router["conversation"].url_for(id=conversation.resource["id"])
        return _conversation_answer(conversation, status=201, headers={"Location": str(location)})

    async def create(
        keyed: Keyed[tuple[StoredConversation, bool]] | None,
    ) -> tuple[StoredConversation, bool]:
        with _domain_errors():
            return await operations.create(
                request.app[DB_POOL],
                request[PRINCIPAL].account_id,
                fields,
                _traceparent(request),
                keyed,
            )

    return await run_write(request, fields, create, render)


async def retrieve_conversation(request: web.Request) -> web.Response:
    """GET /v1/conversations/{id}."""
    with _domain_errors():
        conversation = await operations.get(
            request.app[DB_POOL], request[PRINCIPAL].account_id, _path_id(request)
        )
    return response(_conversation_answer(conversation))


async def update_conversation(request: web.Request) -> web.Response:
    """PUT or PATCH /v1/conversations/{id}: a partial update."""
    conversation_id = _path_id(request)
    changes = await read_body(request, _update_schema)

    async def update(keyed: Keyed[StoredConversation] | None) -> StoredConversation:
        with _domain_errors():
            return await operations.update(
                request.app[DB_POOL],
                request[PRINCIPAL].account_id,
                conversation_id,
                changes,
                _if_match(request),
                _traceparent(request),
                keyed,
            )

    return await run_write(request, changes, update, _conversation_answer)


async def delete_conversation(request: web.Request) -> web.Response:
    """DELETE /v1/conversations/{id}: permanent."""
    conversation_id = _path_id(request)

    async def delete(keyed: Keyed[StoredConversation] | None) -> StoredConversation:
        with _domain_errors():
            return await operations.delete(
                request.app[DB_POOL],
                request[PRINCIPAL].account_id,
                conversation_id,
                _if_match(request),
                _traceparent(request),
                keyed,
            )

    def render(deleted: StoredConversation) -> StoredAnswer:
        return json_answer({"id": deleted.resource["id"], "deleted": True})

    return await run_write(request, None, delete, render)


@contextlib.contextmanager
def _domain_errors() -> Iterator[None]:
    """The domain's refusals as HTTP answers: missing is 404, a stale If-Match is 412, metadata
    over the limit (after the merge) is 422."""
    try:
        yield
    except ConversationNotFound:
        raise not_found() from None
    except TooManyMetadataKeys as error:
        message = f"At most {METADATA_MAX_KEYS} keys; this change would leave {error.count}."
        raise validation_error({"metadata": [message]}) from None
    except VersionMismatch:
        raise ApiError(
            412,
            "The conversation has changed since the version in If-Match; fetch it and retry.",
            param="If-Match",
        ) from None
