"""The AsyncAPI 3 document of the events, generated from the marshmallow schemas with apispec."""

from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from schemas.event import EVENT_TYPES, EventHeadersSchema, EventSchema

VERSION = "1.0.0"
# The exchange's default name (EVENTS_EXCHANGE); declared by service/events/broker.py.
EXCHANGE = "conversations"
# The version of the AMQP bindings (github.com/asyncapi/bindings, amqp/) the objects follow.
AMQP_BINDING_VERSION = "0.3.0"

_DESCRIPTION = f"""\
The events the Conversations service publishes to RabbitMQ: one per committed change of a \
conversation, on the durable topic exchange `{EXCHANGE}` with the event type as routing key. \
An event that no binding matches goes to the alternate exchange `{EXCHANGE}.unrouted` and \
waits in the quorum queue of that name.

Delivery is at least once: the AMQP `message_id` is the event id and stays the same on every \
redelivery, so deduplicate by it. Events of one conversation arrive in commit order and their \
`sequence` increases strictly: drop an event whose `sequence` is not above the last one applied. \
There is no order across conversations. While RabbitMQ is down, writes are still accepted and \
their events wait in the service's outbox until it returns. Subscriber guide: docs/events.md."""

_MESSAGE_DESCRIPTION = """\
AMQP properties: `message_id` = the event id (the same on every redelivery), `type` = the event \
type, `timestamp` = when the change recorded the event, `content_type` `application/json`, \
`delivery_mode` 2 (persistent), `app_id` `conversations`."""

_SUMMARIES = {
    "conversation.created": "A conversation was created; `data.object` is the new conversation.",
    "conversation.updated": (
        "A conversation changed (unarchiving included); `data.object` is the conversation after "
        "the change, `data.previous_attributes` the changed fields' values before it."
    ),
    "conversation.archived": (
        "A conversation was archived (`archived_at` went from null to a value, whatever else "
        "the change did); `data.previous_attributes` holds the changed fields' old values."
    ),
    "conversation.deleted": (
        "A conversation was deleted permanently; `data.object` is its last state and "
        "`sequence` its last version + 1."
    ),
}


def _key(event_type: str) -> str:
    """`conversation.created` -> `conversationCreated`: AsyncAPI's keys admit no dots."""
    first, *rest = event_type.split(".")
    return first + "".join(word.capitalize() for word in rest)


def _examples_as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with OpenAPI's `example` turned into JSON Schema's `examples`, at every level.

    The `$ref`s stay as they are: AsyncAPI keeps schemas under `#/components/schemas` too.
    """
    converted: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword == "example":
            converted["examples"] = [value]
        elif keyword == "properties":
            converted[keyword] = {
                name: _examples_as_json_schema(property_schema)
                for name, property_schema in value.items()
            }
        elif keyword in ("items", "additionalProperties") and isinstance(value, dict):
            converted[keyword] = _examples_as_json_schema(value)
        else:
            converted[keyword] = value
    return converted


def _schemas() -> dict[str, Any]:
    """The event's schemas (and those they nest) as JSON Schema.

    apispec in OpenAPI 3.1 mode writes a nullable field as `"type": ["integer", "null"]`, which is
    plain JSON Schema, unlike 3.0's `nullable`.
    """
    spec = APISpec(
        title="DigiVault Conversations events",
        version=VERSION,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
    )
    spec.components.schema("Event", schema=EventSchema)
    spec.components.schema("EventHeaders", schema=EventHeadersSchema)
    schemas = spec.to_dict()["components"]["schemas"]
    return {name: _examples_as_json_schema(schema) for name, schema in schemas.items()}


def _message(event_type: str) -> dict[str, Any]:
    return {
        "name": event_type,
        "title": event_type,
        "summary": _SUMMARIES[event_type],
        "description": _MESSAGE_DESCRIPTION,
        "headers": {"$ref": "#/components/schemas/EventHeaders"},
        "payload": {
            "allOf": [
                {"$ref": "#/components/schemas/Event"},
                {"properties": {"type": {"const": event_type}}},
            ]
        },
        "bindings": {"amqp": {"messageType": event_type, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _channel(event_type: str) -> dict[str, Any]:
    key = _key(event_type)
    return {
        "address": event_type,
        "title": event_type,
        "description": f"Routing key `{event_type}` on the topic exchange `{EXCHANGE}`.",
        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": EXCHANGE,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def _operation(event_type: str) -> dict[str, Any]:
    key = _key(event_type)
    return {
        "action": "send",
        "channel": {"$ref": f"#/channels/{key}"},
        "summary": f"Publish `{event_type}` after the change commits.",
        "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
        # Persistent, stamped with the commit time, and returned rather than dropped unroutable.
        "bindings": {
            "amqp": {
                "deliveryMode": 2,
                "timestamp": True,
                "mandatory": True,
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def build_asyncapi() -> dict[str, Any]:
    """The whole document as a dict: one channel, message and send operation per event type."""
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "DigiVault Conversations events",
            "version": VERSION,
            "description": _DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "rabbitmq:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The deployment's RabbitMQ (the host is a placeholder), vhost `/`.",
            }
        },
        "channels": {_key(event_type): _channel(event_type) for event_type in EVENT_TYPES},
        "operations": {
            _key(f"send.{event_type}"): _operation(event_type) for event_type in EVENT_TYPES
        },
        "components": {
            "schemas": _schemas(),
            "messages": {_key(event_type): _message(event_type) for event_type in EVENT_TYPES},
        },
    }


def render_asyncapi() -> bytes:
    """The document as the committed `docs/asyncapi.json` holds it."""
    return orjson.dumps(build_asyncapi(), option=orjson.OPT_INDENT_2) + b"\n"
