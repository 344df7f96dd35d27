"""The outbox: each committed change leaves its event here, in the change's own statement."""

import time
from typing import Any

import orjson

from service.conversations.ids import new_id
from service.conversations.repository import StoredConversation

CREATED = "conversation.created"
UPDATED = "conversation.updated"
ARCHIVED = "conversation.archived"
DELETED = "conversation.deleted"


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


def event_row(event: dict[str, Any], traceparent: str | None) -> tuple[object, ...]:
    """The outbox row's values for `event`, in the order the repository's statements take them:
    event id, type, account, conversation, sequence, payload (JSON text), traceparent."""
    return (
        event["id"],
        event["type"],
        event["account_id"],
        event["data"]["object"]["id"],
        event["sequence"],
        orjson.dumps(event).decode(),
        traceparent,
    )
