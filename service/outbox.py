"""The outbox: each committed change leaves its event here, in the change's own transaction."""

import time
from typing import Any

import asyncpg
import orjson

from service.ids import new_id
from service.repository import StoredConversation

CREATED = "conversation.created"
UPDATED = "conversation.updated"
ARCHIVED = "conversation.archived"
DELETED = "conversation.deleted"

INSERT_EVENT = """
INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload,
                    traceparent)
VALUES ($1, $2, $3, $4, $5, $6::json, $7)
"""


def build_event(
    event_type: str,
    account_id: str,
    conversation: StoredConversation,
    sequence: int,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The event envelope (schemas.event.EventSchema); its id and sequence are fixed here."""
    data: dict[str, Any] = {"object": conversation.resource}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": "evt_" + new_id(),
        "type": event_type,
        "created_at": int(time.time()),
        "account_id": account_id,
        "sequence": sequence,
        "data": data,
    }


async def record(
    conn: asyncpg.Connection, event: dict[str, Any], traceparent: str | None = None
) -> None:
    """Write `event` to the outbox on `conn`, which must be inside the change's transaction."""
    await conn.execute(
        INSERT_EVENT,
        event["id"],
        event["type"],
        event["account_id"],
        event["data"]["object"]["id"],
        event["sequence"],
        orjson.dumps(event).decode(),
        traceparent,
    )
