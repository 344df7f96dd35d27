"""The outbox: each committed change leaves its event here, in the change's own statement."""

import time
from typing import Any, NamedTuple

import orjson

from service.conversations.ids import new_id
from service.conversations.parameters import Parameters

CREATED = "conversation.created"
UPDATED = "conversation.updated"
ARCHIVED = "conversation.archived"
DELETED = "conversation.deleted"


class OutboxRow(NamedTuple):
    """An event's row of `outbox`, as a write statement inserts it: the fields are the columns
    (a tuple, so that it is passed to the statement as its values)."""

    event_id: str
    event_type: str
    account_id: str
    conversation_id: str
    sequence: int
    payload: str  # the envelope as JSON text
    traceparent: str | None


def build_event(
    event_type: str,
    account_id: str,
    resource: dict[str, Any],
    sequence: int,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The event envelope (schemas.event.EventSchema) of a change that left the conversation as
    `resource`; its id and sequence are fixed here."""
    data: dict[str, Any] = {"object": resource}
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


def event_row(event: dict[str, Any], traceparent: str | None) -> OutboxRow:
    """The outbox row that records `event`."""
    return OutboxRow(  # positional: keywords cost a NamedTuple twice the time, on every write
        event["id"],
        event["type"],
        event["account_id"],
        event["data"]["object"]["id"],
        event["sequence"],
        orjson.dumps(event).decode(),
        traceparent,
    )


def insert_row(parameters: Parameters, source: str) -> str:
    """An INSERT of the event's outbox row for each row of `source` (one row, or none): its
    values are the next parameters, an `OutboxRow`."""
    values = parameters.take(*OutboxRow._fields)
    values["payload"] += "::json"
    return f"""
    INSERT INTO outbox ({", ".join(values)})
    SELECT {", ".join(values.values())} FROM {source}"""
